"""Monthly statements: line items by kind, technique, model, adapter and accelerator, then credits and discounts."""

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import UsageRecord
from billing.credits import balance
from billing.ledger import price_book


@dataclass(frozen=True)
class Line:
    kind: str
    technique: str
    base_model: str
    adapter: str | None
    accelerator: str | None
    records: int
    tokens: int  # prompt + generated, or tokens processed by fine-tuning
    compute_ms: int
    amount_micro_usd: int


@dataclass(frozen=True)
class Statement:
    month: str  # "2026-11"
    lines: list[Line]
    subtotal_micro_usd: int  # usage at list (or contract) prices
    credits_applied_micro_usd: int  # the part credits covered
    volume_discount_micro_usd: int  # enterprise discount on the rest
    amount_due_micro_usd: int  # charged to the payment method


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """ "2026-11" -> [2026-11-01, 2026-12-01) in UTC; ValueError for anything else."""
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def statement(session: Session, tenant_id: str, month: str) -> Statement:
    start, end = month_bounds(month)
    rows = session.execute(
        select(
            UsageRecord.kind,
            UsageRecord.technique,
            UsageRecord.base_model,
            UsageRecord.adapter,
            UsageRecord.accelerator,
            func.count(UsageRecord.id),
            func.coalesce(func.sum(UsageRecord.input_tokens + UsageRecord.output_tokens), 0),
            func.coalesce(func.sum(UsageRecord.compute_ms), 0),
            func.coalesce(func.sum(UsageRecord.amount_micro_usd), 0),
        )
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.created_at >= start, UsageRecord.created_at < end)
        .group_by(
            UsageRecord.kind,
            UsageRecord.technique,
            UsageRecord.base_model,
            UsageRecord.adapter,
            UsageRecord.accelerator,
        )
        .order_by(UsageRecord.kind, UsageRecord.base_model, UsageRecord.adapter)
    ).all()
    lines = [Line(k, t, m, a, acc, int(n), int(tok), int(ms), int(amt)) for k, t, m, a, acc, n, tok, ms, amt in rows]
    subtotal = sum(line.amount_micro_usd for line in lines)
    # What credits did not cover this month: growth of the uncovered total between the month's two ends.
    before = balance(session, tenant_id, start).pay_as_you_go_micro_usd
    after = balance(session, tenant_id, end).pay_as_you_go_micro_usd
    pay_as_you_go = after - before
    discount = pay_as_you_go * price_book(session, tenant_id).volume_discount_percent(pay_as_you_go) // 100
    return Statement(month, lines, subtotal, subtotal - pay_as_you_go, discount, pay_as_you_go - discount)


def months_with_usage(session: Session, tenant_id: str) -> list[str]:
    """Months with at least one usage record, newest first: one existence query per month between the first and
    the last record (the records themselves are never loaded)."""
    first, last = session.execute(
        select(func.min(UsageRecord.created_at), func.max(UsageRecord.created_at)).where(
            UsageRecord.tenant_id == tenant_id
        )
    ).one()
    if first is None:
        return []
    months, year, month = [], first.year, first.month
    while (year, month) <= (last.year, last.month):
        name = f"{year:04d}-{month:02d}"
        start, end = month_bounds(name)
        hit = session.scalar(
            select(UsageRecord.id)
            .where(UsageRecord.tenant_id == tenant_id, UsageRecord.created_at >= start, UsageRecord.created_at < end)
            .limit(1)
        )
        if hit is not None:
            months.append(name)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months[::-1]
