"""The billing events a tenant is told of (app/events.py), each published in the caller's transaction, beside the
change it reports:

    billing.charge          a priced fine-tuning job's usage record, as GET /v1/usage lists it
    billing.credit_low      spendable credit fell below LORAPLEX_CREDIT_LOW_MICRO_USD, or to zero: the balance
    billing.credit_expired  a credit grant expired: the grant as GET /v1/billing/credits lists it, plus `forfeited`
    billing.payment_failed  Stripe reported a failed payment: the balance (payment_status "past_due")

The API's shapes live in web/, above billing, so the few this module sends are written here, field for field as
the API returns them (tests/web/test_credit_exhaustion.py compares them).
"""

from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import TypeAdapter
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from app import events
from app.models import BillingAccount, CreditGrant, TenantEvent, UsageRecord, utcnow
from app.settings import get_settings
from billing import credits, statements
from billing.prices import usd

# ok: at or above the threshold | low: below it | exhausted: none left. A move down is announced once; a move up
# (credit returned) only resets the state, so the next fall is announced again.
CREDIT_STATES = ("ok", "low", "exhausted")
# An expiry first noticed later than this (the platform was down that long) is not announced any more.
EXPIRY_LOOKBACK = timedelta(days=7)
_JSON_TIME = TypeAdapter(datetime)  # datetimes written exactly as the API's responses write them


def charged(session: Session, record: UsageRecord) -> None:
    """billing.charge for a priced record (a fine-tuning job's): the record as the usage API lists it; then
    billing.credit_low if the charge made the credit fall."""
    if record.amount_micro_usd <= 0:
        return
    events.publish(session, record.tenant_id, "billing.charge", record.reference or "", usage_data(record))
    credit_moved(session, record.tenant_id, credits.balance(session, record.tenant_id).credit_micro_usd)


def payment_failed(session: Session, tenant_id: str, now: datetime | None = None) -> None:
    """billing.payment_failed, once the account says past_due: the balance as the billing API returns it."""
    events.publish(session, tenant_id, "billing.payment_failed", "", balance_data(session, tenant_id, now))


def credit_moved(session: Session, tenant_id: str, credit_micro_usd: int, now: datetime | None = None) -> str:
    """Compare spendable credit with the state last announced: a fall (ok -> low, low -> exhausted, ok ->
    exhausted) publishes billing.credit_low once; a rise resets the state quietly. Enterprise tenants are not
    told (they are invoiced). The state is moved with a compare-and-set, so of two processes looking at the same
    moment only one announces. Returns the state now."""
    account = session.get(BillingAccount, tenant_id)
    if account is None or account.plan == "enterprise":
        return "ok"
    before, after = account.credit_state, credit_state(credit_micro_usd)
    if before == after:
        return after
    cas = (
        update(BillingAccount)
        .where(BillingAccount.tenant_id == tenant_id, BillingAccount.credit_state == before)
        .values(credit_state=after)
        .execution_options(synchronize_session=False)
    )
    moved = cast("CursorResult[Any]", session.execute(cas)).rowcount
    session.refresh(account, ["credit_state"])
    if moved != 1:  # another process moved it first, and told
        return account.credit_state
    if CREDIT_STATES.index(after) > CREDIT_STATES.index(before):
        data = balance_data(session, tenant_id, now, credit=credit_micro_usd)
        events.publish(session, tenant_id, "billing.credit_low", "", data)
    return after


def credit_state(credit_micro_usd: int) -> str:
    if credit_micro_usd <= 0:
        return "exhausted"
    return "low" if credit_micro_usd < get_settings().billing.credit_low_micro_usd else "ok"


def expiries(session: Session, tenant_id: str, balance: credits.Balance, now: datetime | None = None) -> int:
    """billing.credit_expired for each of the tenant's grants that expired by `now` (within EXPIRY_LOOKBACK) and
    was not announced yet (its event, keyed by the grant's id, is the record that it was). Returns how many."""
    now = now or utcnow()
    expired = [
        s.grant
        for s in balance.grants
        if s.expired and s.grant.expires_at is not None and s.grant.expires_at > now - EXPIRY_LOOKBACK
    ]
    if not expired:
        return 0
    told = set(
        session.scalars(
            select(TenantEvent.subject_id).where(
                TenantEvent.tenant_id == tenant_id,
                TenantEvent.type == "billing.credit_expired",
                TenantEvent.subject_id.in_([g.id for g in expired]),
            )
        )
    )
    for grant in expired:
        if grant.id in told:
            continue
        assert grant.expires_at is not None  # filtered above
        # What it still held a moment before it expired is what the tenant lost.
        before = credits.balance(session, tenant_id, grant.expires_at - timedelta(microseconds=1))
        forfeited = next((s.remaining_micro_usd for s in before.grants if s.grant.id == grant.id), 0)
        data = credit_data(grant, remaining=0, expired=True) | {"forfeited": money(forfeited)}
        events.publish(session, tenant_id, "billing.credit_expired", grant.id, data)
    return len(expired) - len(told)


# ---- the API's shapes ----------------------------------------------------------------------------------------


def money(micro_usd: int) -> dict[str, Any]:
    """web/schemas.py `Money`."""
    return {"micro_usd": micro_usd, "usd": usd(micro_usd)}


def json_time(value: datetime | None) -> Any:
    return _JSON_TIME.dump_python(value, mode="json") if value is not None else None


def usage_data(record: UsageRecord) -> dict[str, Any]:
    """One record as GET /v1/usage lists it (web/schemas.py `UsageOut`)."""
    return {
        "kind": record.kind,
        "technique": record.technique,
        "base_model": record.base_model,
        "adapter": record.adapter,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "compute_ms": record.compute_ms,
        "cost": money(record.amount_micro_usd),
        "reference": record.reference,
        "created_at": json_time(record.created_at),
    }


def balance_data(
    session: Session, tenant_id: str, now: datetime | None = None, credit: int | None = None
) -> dict[str, Any]:
    """The balance as GET /v1/billing/balance returns it (web/routers/billing.py `BalanceOut`); pass `credit`
    (micro-USD) when the caller has just computed it."""
    now = now or utcnow()
    account = session.get(BillingAccount, tenant_id) or BillingAccount(tenant_id=tenant_id)
    if credit is None:
        credit = credits.balance(session, tenant_id, now).credit_micro_usd
    month = statements.statement(session, tenant_id, f"{now.year:04d}-{now.month:02d}")
    return {
        "plan": account.plan or "developer",
        "credit": money(credit),
        "pay_as_you_go_this_month": money(month.amount_due_micro_usd),
        "payment_method": account.payment_method,
        "payment_status": account.payment_status or "ok",
        "can_start_paid_work": credits.paid_work_refusal(session, tenant_id, 1, now, credit=credit) is None,
    }


def credit_data(grant: CreditGrant, *, remaining: int, expired: bool) -> dict[str, Any]:
    """One grant as GET /v1/billing/credits lists it (web/routers/billing.py `CreditOut`)."""
    return {
        "id": grant.id,
        "category": grant.category,
        "reason": grant.reason,
        "amount": money(grant.amount_micro_usd),
        "remaining": money(remaining),
        "expires_at": json_time(grant.expires_at),
        "expired": expired,
    }
