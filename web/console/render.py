"""What every console page shares: the templates (autoescaped: a row, a name or an error holding HTML is shown as
text), the signed-in tenant a page reads for (`Page`), and the response that renders a template for it.

A page reads through the same service functions and router functions the API's routes call, with the same tenant,
so there is no second path to the data; what changes after the page loads, its scripts fetch from the API itself
(static/console.js), signed in by the same session.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app import tenants
from app.models import ApiKey, BillingAccount, Tenant
from web import console_session
from web.deps import Db

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html
NAV = (  # (path, label) of the pages in the header, in order
    ("/datasets", "Datasets"),
    ("/jobs", "Fine-tuning"),
    ("/adapters", "Adapters"),
    ("/playground", "Playground"),
    ("/deployments", "Deployments"),
    ("/billing", "Billing"),
)


class SignInNeeded(Exception):
    """A page asked for without a live session: answered with a redirect to /signin (web/console/__init__.py)."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


@dataclass
class SignedIn:
    """The tenant a page is for, its key, the database session of the request, and the console session (whose token
    the page's forms and scripts send back)."""

    tenant: Tenant
    key: ApiKey
    db: Session
    session: console_session.ConsoleSession


def signed_in(request: Request, db: Db) -> SignedIn:
    session = console_session.read(request)
    key = tenants.active_key(db, session.key_id) if session and session.key_id else None
    if session is None or key is None:
        raise SignInNeeded(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return SignedIn(tenant=key.tenant, key=key, db=db, session=session)


Page = Annotated[SignedIn, Depends(signed_in)]


def page(request: Request, template: str, who: SignedIn | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render `template` with the header (navigation, the tenant, a billing banner) and the session's token."""
    session = who.session if who is not None else console_session.current(request)
    response = templates.TemplateResponse(
        request,
        template,
        {
            "nav": NAV,
            "path": request.url.path,
            "tenant": who.tenant if who is not None else None,
            "scope": who.key.scope if who is not None else None,
            "banner": _banner(who.db, who.tenant.id) if who is not None else None,
            "csrf_token": session.csrf,
            **context,
        },
        status_code=status_code,
    )
    if session.new:
        console_session.save(response, request, session)
    return response


def sign_in_url(next_path: str) -> str:
    return f"/signin?next={quote(next_path, safe='/')}"


def _banner(db: Session, tenant_id: str) -> str | None:
    """What every page says at the top while the tenant's billing needs attention."""
    account = db.get(BillingAccount, tenant_id)
    if account is None:
        return None
    if account.payment_status == "past_due":
        return "Your last payment failed: update your card in Billing to keep deployments and jobs running."
    if account.credit_state == "exhausted":
        return "Your credit is used up: paid work is paused until you top up in Billing."
    if account.credit_state == "low":
        return "Your credit is running low: top up in Billing to keep paid work running."
    return None
