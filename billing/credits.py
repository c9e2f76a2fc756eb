"""Credit grants and the balance they leave after usage.

Usage draws on the grant that expires first; what a grant still holds when it expires is forfeited; usage
that no grant covers is pay-as-you-go, charged to the card on file.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import CreditGrant, UsageRecord, utcnow
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
    if settings.signup_credit_micro_usd <= 0:
        return None
    now = now or utcnow()
    return grant_credit(
        session,
        tenant_id,
        settings.signup_credit_micro_usd,
        category="promotional",
        reason="developer sign-up",
        idempotency_key=f"signup:{tenant_id}",
        expires_at=now + timedelta(days=settings.signup_credit_days),
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
