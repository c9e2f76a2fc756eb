"""Sign in with an API key, sign out, and `/` (the datasets page, or sign-in)."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.tenants import KeyRefused, authenticate
from web import console_session
from web.console.render import page
from web.deps import Db

router = APIRouter(include_in_schema=False)
WRONG_KEY = "That API key was not accepted: check it, or create a new one with `loraplex keys create`."
HOME = "/datasets"


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=303)


@router.get("/signin", response_class=HTMLResponse)
def sign_in_form(request: Request, next: str = HOME) -> HTMLResponse:
    return page(request, "signin.html", None, next=_local(next))


@router.post("/signin", response_model=None)
def sign_in(
    request: Request,
    db: Db,
    api_key: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = HOME,
) -> Response:
    """A new session (and a new token: nothing from before sign-in carries over) for an active key whose scope
    reads the account. A wrong, revoked or expired key gets one answer, whichever it was and whoever it was."""
    try:
        console_session.check_forgery(request, console_session.current(request), csrf_token)
    except console_session.SessionRefused as refused:
        return page(request, "signin.html", None, status_code=403, error=str(refused), next=_local(next))
    try:
        key = authenticate(db, api_key.strip())
    except KeyRefused:
        return page(request, "signin.html", None, status_code=401, error=WRONG_KEY, next=_local(next))
    if key.scope == "inference":
        message = "This key may only call the inference routes; sign in with a key of scope `all` or `read`."
        return page(request, "signin.html", None, status_code=403, error=message, next=_local(next))
    response = RedirectResponse(_local(next), status_code=303)
    console_session.save(response, request, console_session.ConsoleSession.fresh(key.id))
    return response


@router.post("/signout")
def sign_out(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    session = console_session.current(request)
    try:
        console_session.check_forgery(request, session, csrf_token)
    except console_session.SessionRefused as refused:
        return page(request, "signin.html", None, status_code=403, error=str(refused), next=HOME)
    response = RedirectResponse("/signin", status_code=303)
    console_session.clear(response)
    return response


def _local(path: str) -> str:
    """Only a path of this site: never an open redirect to another one (`//evil.example`, `https://...`)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else HOME
