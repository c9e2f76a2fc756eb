"""Credit grants and the balance they leave after usage.

Usage draws on the grant that expires first; what a grant still holds when it expires is forfeited; usage
that no grant covers is pay-as-you-go, charged to the card on file.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import BillingAccount, CreditGrant, UsageRecord, utcnow
from app.settings import get_settings
from billing import outbox


def grant_credit(
    session: Session,
    tenant_id: str,
    amount_micro_usd: int,
    *,
    category: str,
    reason: str,
    idempotency_key: str,
    expires_at: datetime | None = None,
) -> CreditGrant:
    """Add credits once per idempotency key, and owe Stripe the matching credit grant."""
    if amount_micro_usd <= 0:
        raise ValueError(f"a credit grant must be positive, got {amount_micro_usd}")
    existing = session.scalar(select(CreditGrant).where(CreditGrant.idempotency_key == idempotency_key))
    if existing is not None:
        return existing
    grant = CreditGrant(
        tenant_id=tenant_id,
        amount_micro_usd=amount_micro_usd,
        category=category,
        reason=reason,
        idempotency_key=idempotency_key,
        expires_at=expires_at,
    )
    session.add(grant)
    session.flush()
    outbox.enqueue(
        session,
        tenant_id,
        "credit_grant",
        f"credit_grant:{grant.id}",
        {
            "grant_id": grant.id,
            "amount_micro_usd": amount_micro_usd,
            "category": category,
            "reason": reason,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return grant


def grant_signup_credits(session: Session, tenant_id: str, now: datetime | None = None) -> CreditGrant | None:
    settings = get_settings()
    if settings.billing.signup_credit_micro_usd <= 0:
        return None
    now = now or utcnow()
    return grant_credit(
        session,
        tenant_id,
        settings.billing.signup_credit_micro_usd,
        category="promotional",
        reason="developer sign-up",
        idempotency_key=f"signup:{tenant_id}",
        expires_at=now + timedelta(days=settings.billing.signup_credit_days),
    )


@dataclass(frozen=True)
class GrantState:
    grant: CreditGrant
    remaining_micro_usd: int  # 0 once expired
    expired: bool


@dataclass(frozen=True)
class Balance:
    credit_micro_usd: int  # still spendable now
    pay_as_you_go_micro_usd: int  # usage no credit covered (all time)
    grants: list[GrantState]


def lock_account(session: Session, tenant_id: str) -> None:
    """Hold the tenant's billing account until this transaction ends, before reading a balance to act on it.

    A balance read and the credit state moved after it must see the same ledger: without the lock, the periodic
    check could read the ledger just before a top-up commits and the account just after the top-up reset its
    state, and so announce (and hold the deployments for) a fall that had been undone. A no-op UPDATE is the one
    lock both databases take: PostgreSQL locks the row; SQLite starts its single write transaction, whose reads
    then see every earlier commit."""
    session.execute(
        update(BillingAccount)
        .where(BillingAccount.tenant_id == tenant_id)
        .values(credit_state=BillingAccount.credit_state)
        .execution_options(synchronize_session=False)
    )


def balance(session: Session, tenant_id: str, now: datetime | None = None) -> Balance:
    now = now or utcnow()
    grants = list(
        session.scalars(
            select(CreditGrant)
            .where(CreditGrant.tenant_id == tenant_id, CreditGrant.created_at <= now)
            .order_by(CreditGrant.created_at)
        )
    )
    usage = session.execute(
        select(UsageRecord.created_at, UsageRecord.amount_micro_usd)
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.created_at <= now, UsageRecord.amount_micro_usd > 0)
        .order_by(UsageRecord.created_at, UsageRecord.id)
    ).all()
    return settle(grants, [(at, amount) for at, amount in usage], now)


def settle(grants: list[CreditGrant], usage: list[tuple[datetime, int]], now: datetime) -> Balance:
    """Replay grants and usage in time order. Pure: the clock is an argument."""
    remaining = {g.id: g.amount_micro_usd for g in grants}
    uncovered = 0
    for at, amount in usage:
        live = sorted(
            (
                g
                for g in grants
                if g.created_at <= at and (g.expires_at is None or g.expires_at > at) and remaining[g.id] > 0
            ),
            key=lambda g: (g.expires_at is None, g.expires_at or at, g.created_at),  # soonest expiry first
        )
        for g in live:
            take = min(amount, remaining[g.id])
            remaining[g.id] -= take
            amount -= take
            if amount == 0:
                break
        uncovered += amount
    states = []
    for g in grants:
        expired = g.expires_at is not None and g.expires_at <= now
        states.append(GrantState(g, 0 if expired else remaining[g.id], expired))
    return Balance(sum(s.remaining_micro_usd for s in states), uncovered, states)


def paid_work_refusal(
    session: Session, tenant_id: str, cost_micro_usd: int, now: datetime | None = None, credit: int | None = None
) -> str | None:
    """Why this tenant may not start work estimated at `cost_micro_usd` (None: it may). A card in good standing
    or an enterprise plan always may; otherwise the credits must cover the estimate. Pass `credit` (micro-USD)
    when the caller has just computed the balance: replaying the ledger is the costly part."""
    from billing.prices import usd

    account = session.get(BillingAccount, tenant_id)
    if account is not None and account.plan == "enterprise":
        return None
    if account is not None and account.payment_method and account.payment_status == "ok":
        return None
    how = "add a card (POST /v1/billing/checkout with purpose 'card') or buy credits (purpose 'topup')"
    if account is not None and account.payment_method and account.payment_status == "past_due":
        how = "update the card in the billing portal (POST /v1/billing/portal); the last payment failed"
    if credit is None:
        credit = balance(session, tenant_id, now).credit_micro_usd
    if credit >= max(cost_micro_usd, 1):
        return None
    if credit == 0:
        return f"no credit left and no payment method in good standing: {how}"
    return f"estimated at {usd(cost_micro_usd)} but only {usd(credit)} of credit is left: {how}"
