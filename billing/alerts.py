"""The billing events a tenant is told of (app/events.py), each published in the caller's transaction, beside the
change it reports:

    billing.charge          a priced fine-tuning job's usage record, as GET /v1/usage lists it
    billing.credit_low      spendable credit fell below LORAPLEX_CREDIT_LOW_MICRO_USD, or to zero: the balance
    billing.credit_expired  a credit grant expired: the grant as GET /v1/billing/credits lists it, plus `forfeited`
    billing.payment_failed  Stripe reported a failed payment: the balance (payment_status "past_due")

The balance and a grant are built by billing/views.py, as the API's routes build them; a charge's usage record is
rendered by the API's own shape (a renderer web/ registers, app/events.py).
"""

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from app import events
from app.event_tables import TenantEvent
from app.models import BillingAccount, UsageRecord, utcnow
from app.settings import get_settings
from billing import credits, views

# ok: at or above the threshold | low: below it | exhausted: none left. A move down is announced once; a move up
# (credit returned) only resets the state, so the next fall is announced again.
CREDIT_STATES = ("ok", "low", "exhausted")
# An expiry first noticed later than this (the platform was down that long) is not announced any more.
EXPIRY_LOOKBACK = timedelta(days=7)


def charged(session: Session, record: UsageRecord) -> None:
    """billing.charge for a priced record (a fine-tuning job's): the record as the usage API lists it; then
    billing.credit_low if the charge made the credit fall."""
    if record.amount_micro_usd <= 0:
        return
    session.flush()  # its id: the record the event renders
    # The account before the tenant's feed (events.publish locks the tenant): the order every writer takes them in.
    credits.lock_account(session, record.tenant_id)
    events.publish(session, record.tenant_id, "billing.charge", str(record.id))
    credit_moved(session, record.tenant_id, credits.balance(session, record.tenant_id).credit_micro_usd)


def payment_failed(session: Session, tenant_id: str, now: datetime | None = None) -> None:
    """billing.payment_failed, once the account says past_due: the balance as the billing API returns it."""
    events.publish(session, tenant_id, "billing.payment_failed", "", views.balance(session, tenant_id, now))


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
        data = views.balance(session, tenant_id, now, credit=credit_micro_usd)
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
        data = views.credit_grant(grant, remaining=0, expired=True) | {"forfeited": views.money(forfeited)}
        events.publish(session, tenant_id, "billing.credit_expired", grant.id, data)
    return len(expired) - len(told)
