"""The usage ledger: append-only, idempotent, the source of truth for billing."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import UsageRecord


@dataclass(frozen=True)
class Usage:
    idempotency_key: str  # e.g. "finetune:<job id>" or "inference:<request id>"
    tenant_id: str
    kind: str  # finetune | inference
    technique: str  # lora | inference | ...
    base_model: str
    amount_micro_usd: int
    adapter: str | None = None  # "repo/3"
    input_tokens: int = 0
    output_tokens: int = 0
    compute_ms: int = 0
    reference: str | None = None  # job or request id


def record(session: Session, usage: Usage) -> UsageRecord:
    """Write the record once; a second call with the same idempotency key returns the first record."""
    existing = session.scalar(select(UsageRecord).where(UsageRecord.idempotency_key == usage.idempotency_key))
    if existing is not None:
        return existing
    row = UsageRecord(**usage.__dict__)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # a concurrent writer won the race: theirs is the record
        return session.scalars(select(UsageRecord).where(UsageRecord.idempotency_key == usage.idempotency_key)).one()
    return row


@dataclass(frozen=True)
class Totals:
    records: int
    input_tokens: int
    output_tokens: int
    compute_ms: int
    amount_micro_usd: int


def totals(session: Session, tenant_id: str, since: datetime | None = None, kind: str | None = None) -> Totals:
    query = select(
        func.count(UsageRecord.id),
        func.coalesce(func.sum(UsageRecord.input_tokens), 0),
        func.coalesce(func.sum(UsageRecord.output_tokens), 0),
        func.coalesce(func.sum(UsageRecord.compute_ms), 0),
        func.coalesce(func.sum(UsageRecord.amount_micro_usd), 0),
    ).where(UsageRecord.tenant_id == tenant_id)
    if since is not None:
        query = query.where(UsageRecord.created_at >= since)
    if kind is not None:
        query = query.where(UsageRecord.kind == kind)
    count, tin, tout, ms, amount = session.execute(query).one()
    return Totals(int(count), int(tin), int(tout), int(ms), int(amount))
