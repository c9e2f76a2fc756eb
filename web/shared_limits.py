"""The free tier's limits on the shared endpoints, per tenant: requests per second, tokens per UTC day and per
month. Over one, a 429 whose message names the limit and whose Retry-After says when it lifts.

Tokens are read from the ledger (prompt + generated of every shared-endpoint request), so the count survives
restarts and is the same for every API process. Requests per second are counted in the database too (the
requests let through in the last second, `rate_log`), one tenant's checks one at a time whichever process makes
them, so the limit holds across every API process.
Enterprise tenants have no token limits (what is beyond the free allowance is priced on their own terms).
"""

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app import counters
from app.models import BillingAccount, RateLog, Tenant, utcnow
from app.settings import get_settings
from billing import ledger
from web.errors import APIError

MICROS = 1_000_000  # the log's unit: microseconds
LOCK = -1  # the `at` of a key's lock row


class SharedLimiter:
    """`clock`: wall-clock seconds (every API process must read the same clock: the windows are shared)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def check(self, db: Session, tenant: Tenant) -> None:
        """Raise a 429 APIError when the tenant is over a limit; otherwise count this request."""
        settings = get_settings()
        self._tokens(db, tenant, settings.billing.free_tokens_per_day, settings.billing.free_tokens_per_month)
        self._rate(db, tenant.id, settings.limits.shared_requests_per_second)

    def _rate(self, db: Session, tenant_id: str, per_second: float) -> None:
        if per_second <= 0:
            return
        allowed = max(1, math.floor(per_second))
        key = f"shared:{tenant_id}"
        at = int(self._clock() * MICROS)
        # On the request's own session (a second one per request would deadlock the connection pool under load:
        # every request holding one, waiting for another), committed at once: the other processes count on it.
        try:
            counters.add(db, RateLog, {"key": key, "at": LOCK}, {"count": 0})  # the key's checks: one at a time
            recent = (RateLog.key == key, RateLog.at > at - MICROS)
            count, oldest = db.execute(
                select(func.coalesce(func.sum(RateLog.count), 0), func.min(RateLog.at)).where(*recent)
            ).one()
            if count < allowed:
                counters.add(db, RateLog, {"key": key, "at": at}, {"count": 1})
                db.execute(delete(RateLog).where(RateLog.key == key, RateLog.at >= 0, RateLog.at <= at - MICROS))
            db.commit()
        except Exception:
            db.rollback()
            raise
        if count >= allowed:
            wait = max(1, math.ceil((oldest + MICROS - at) / MICROS))
            raise APIError(
                429,
                f"requests per second: the shared endpoints take at most {per_second:g} requests a second "
                f"per tenant; retry after {wait} s, or create a private deployment (POST /v1/deployments)",
                code="rate_limit_requests_per_second",
                headers={"Retry-After": str(wait)},
            )

    def _tokens(self, db: Session, tenant: Tenant, per_day: int, per_month: int) -> None:
        if per_day <= 0 and per_month <= 0:
            return
        account = db.get(BillingAccount, tenant.id)
        if account is not None and account.plan == "enterprise":
            return
        now = utcnow()
        today, month = ledger.inference_tokens_used(db, tenant.id, now)
        if per_day > 0 and today >= per_day:
            wait = _seconds_until(now, _next_day(now))
            raise APIError(
                429,
                f"tokens per day: the free tier's {per_day:,} shared-endpoint tokens a day are used up "
                f"({today:,} used today, UTC); retry after {wait} s, or create a private deployment",
                code="rate_limit_tokens_per_day",
                headers={"Retry-After": str(wait)},
            )
        if per_month > 0 and month >= per_month:
            wait = _seconds_until(now, _next_month(now))
            raise APIError(
                429,
                f"tokens per month: the free tier's {per_month:,} shared-endpoint tokens a month are used up "
                f"({month:,} used this month); retry after {wait} s, or create a private deployment",
                code="rate_limit_tokens_per_month",
                headers={"Retry-After": str(wait)},
            )


def _next_day(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def _next_month(now: datetime) -> datetime:
    first = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def _seconds_until(now: datetime, then: datetime) -> int:
    return max(1, math.ceil((then - now).total_seconds()))
