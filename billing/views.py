"""The billing resources as the API returns them: the balance (GET /v1/billing/balance) and a credit grant (an item
of GET /v1/billing/credits), built once here for the API's routes (web/routers/billing.py validates them into its
response models) and for the billing events (billing/alerts.py), which web/ sits above."""

from datetime import datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy.orm import Session

from app.models import BillingAccount, CreditGrant, utcnow
from billing import credits, statements
from billing.prices import usd

_JSON_TIME = TypeAdapter(datetime)  # datetimes written exactly as the API's responses write them


def money(micro_usd: int) -> dict[str, Any]:
    """web/schemas.py `Money`."""
    return {"micro_usd": micro_usd, "usd": usd(micro_usd)}


def balance(session: Session, tenant_id: str, now: datetime | None = None, credit: int | None = None) -> dict[str, Any]:
    """The tenant's balance at `now`; pass `credit` (micro-USD) when the caller has just computed it."""
    now = now or utcnow()
    account = session.get(BillingAccount, tenant_id) or BillingAccount(tenant_id=tenant_id)
    if credit is None:
        credit = credits.balance(session, tenant_id, now).credit_micro_usd
    month = statements.statement(session, tenant_id, f"{now.year:04d}-{now.month:02d}")
    return {
        "plan": account.plan or "developer",
        "credit": money(credit),  # spendable now
        "pay_as_you_go_this_month": money(month.amount_due_micro_usd),  # usage credits did not cover: the card's
        "payment_method": account.payment_method,
        "payment_status": account.payment_status or "ok",
        "can_start_paid_work": credits.paid_work_refusal(session, tenant_id, 1, now, credit=credit) is None,
    }


def credit_grant(grant: CreditGrant, *, remaining: int, expired: bool) -> dict[str, Any]:
    """One grant, with what is left of it (micro-USD)."""
    return {
        "id": grant.id,
        "category": grant.category,
        "reason": grant.reason,
        "amount": money(grant.amount_micro_usd),
        "remaining": money(remaining),
        "expires_at": _JSON_TIME.dump_python(grant.expires_at, mode="json") if grant.expires_at is not None else None,
        "expired": expired,
    }
