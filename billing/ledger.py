"""The usage ledger: append-only, idempotent, the source of truth for billing.

Every priced record also owes Stripe a meter event (through the outbox, in the same transaction), so Stripe
mirrors the ledger; it never decides an amount.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import BillingAccount, UsageRecord, utcnow
from app.settings import get_settings
from billing import outbox
from billing.prices import DEFAULT, PriceBook

MAX_TOKENS_PER_RECORD = 10**12  # beyond any real job: a larger value is a bug upstream, not usage
MAX_COMPUTE_MS_PER_RECORD = 366 * 24 * 3600 * 1000  # a year of one replica
KINDS = ("finetune", "inference", "deployment")


class LedgerError(ValueError):
    """A usage value the ledger refuses (negative, absurd, unknown kind); nothing is written."""


@dataclass(frozen=True)
class Usage:
    idempotency_key: str  # e.g. "finetune:<job id>" or "inference:<request id>"
    tenant_id: str
    kind: str  # finetune | inference | deployment
    technique: str  # sft_lora | inference | replica
    base_model: str
    amount_micro_usd: int
    adapter: str | None = None  # "repo/3"
    input_tokens: int = 0
    output_tokens: int = 0
    compute_ms: int = 0
    accelerator: str | None = None  # deployments
    reference: str | None = None  # job, request or deployment id
    created_at: datetime | None = None  # now unless given (tests, back-dated replica periods)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise LedgerError(f"kind: unknown usage kind {self.kind!r}; one of {KINDS}")
        if not self.idempotency_key:
            raise LedgerError("idempotency_key: required")
        for name in ("input_tokens", "output_tokens", "compute_ms", "amount_micro_usd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise LedgerError(f"{name}: must be a non-negative integer, got {value!r}")
        if self.input_tokens + self.output_tokens > MAX_TOKENS_PER_RECORD:
            raise LedgerError(f"tokens: {self.input_tokens + self.output_tokens} in one record is not plausible")
        if self.compute_ms > MAX_COMPUTE_MS_PER_RECORD:
            raise LedgerError(f"compute_ms: {self.compute_ms} in one record is not plausible")


def record(session: Session, usage: Usage) -> UsageRecord:
    """Write the record once; a second call with the same idempotency key returns the first record."""
    usage.check()
    existing = session.scalar(select(UsageRecord).where(UsageRecord.idempotency_key == usage.idempotency_key))
    if existing is not None:
        return existing
    fields = {k: v for k, v in usage.__dict__.items() if not (k == "created_at" and v is None)}
    row = UsageRecord(**fields)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
            if usage.amount_micro_usd > 0:
                outbox.enqueue(
                    session,
                    usage.tenant_id,
                    "meter_event",
                    f"meter:{usage.idempotency_key}",
                    {
                        "usage_key": usage.idempotency_key,
                        "value_micro_usd": usage.amount_micro_usd,
                        "timestamp": int(row.created_at.timestamp()),
                    },
                )
    except IntegrityError:  # a concurrent writer won the race: theirs is the record
        return session.scalars(select(UsageRecord).where(UsageRecord.idempotency_key == usage.idempotency_key)).one()
    return row


def price_book(session: Session, tenant_id: str) -> PriceBook:
    account = session.get(BillingAccount, tenant_id)
    if account is None or not account.prices:
        return DEFAULT
    return DEFAULT.with_overrides(account.prices)


def inference_charge(session: Session, tenant_id: str, params: int, tokens: int, now: datetime | None = None) -> int:
    """Shared-endpoint inference is free up to the daily and monthly allowance; tokens beyond it are priced."""
    settings = get_settings()
    now = now or utcnow()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    used_today, used_month = _inference_tokens(session, tenant_id, day)
    free_left = max(
        0, min(settings.billing.free_tokens_per_day - used_today, settings.billing.free_tokens_per_month - used_month)
    )
    return price_book(session, tenant_id).inference(params, max(0, tokens - free_left))


def inference_tokens_used(session: Session, tenant_id: str, now: datetime | None = None) -> tuple[int, int]:
    """Shared-endpoint tokens (prompt + generated) the tenant used today (UTC) and this month."""
    now = now or utcnow()
    return _inference_tokens(session, tenant_id, now.replace(hour=0, minute=0, second=0, microsecond=0))


def _inference_tokens(session: Session, tenant_id: str, day: datetime) -> tuple[int, int]:
    """Inference tokens (prompt + generated) since `day` began and since its month began, in one query: this
    runs on every inference request."""
    tokens = UsageRecord.input_tokens + UsageRecord.output_tokens
    today, month = session.execute(
        select(
            func.coalesce(func.sum(case((UsageRecord.created_at >= day, tokens), else_=0)), 0),
            func.coalesce(func.sum(tokens), 0),
        ).where(
            UsageRecord.tenant_id == tenant_id,
            UsageRecord.kind == "inference",
            UsageRecord.created_at >= day.replace(day=1),
        )
    ).one()
    return int(today), int(month)


@dataclass(frozen=True)
class Totals:
    records: int
    input_tokens: int
    output_tokens: int
    compute_ms: int
    amount_micro_usd: int


def totals(
    session: Session,
    tenant_id: str,
    since: datetime | None = None,
    kind: str | None = None,
    until: datetime | None = None,
) -> Totals:
    query = select(
        func.count(UsageRecord.id),
        func.coalesce(func.sum(UsageRecord.input_tokens), 0),
        func.coalesce(func.sum(UsageRecord.output_tokens), 0),
        func.coalesce(func.sum(UsageRecord.compute_ms), 0),
        func.coalesce(func.sum(UsageRecord.amount_micro_usd), 0),
    ).where(UsageRecord.tenant_id == tenant_id)
    if since is not None:
        query = query.where(UsageRecord.created_at >= since)
    if until is not None:
        query = query.where(UsageRecord.created_at < until)
    if kind is not None:
        query = query.where(UsageRecord.kind == kind)
    count, tin, tout, ms, amount = session.execute(query).one()
    return Totals(int(count), int(tin), int(tout), int(ms), int(amount))
