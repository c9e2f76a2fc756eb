"""The free tier's limits on the shared endpoints, per tenant: requests per second, tokens per UTC day and per
month. Over one, a 429 whose message names the limit and whose Retry-After says when it lifts.

Tokens are read from the ledger (prompt + generated of every shared-endpoint request), so the count survives
restarts and is the same for every API process; the requests-per-second window is kept in this process.
Enterprise tenants have no token limits (what is beyond the free allowance is priced on their own terms).
"""

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from app.models import BillingAccount, Tenant, utcnow
from app.settings import get_settings
from billing import ledger
from web.errors import APIError

WINDOW_SECONDS = 1.0


class SharedLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = defaultdict(deque)  # tenant id -> times of its last requests

    def check(self, db: Session, tenant: Tenant) -> None:
        """Raise a 429 APIError when the tenant is over a limit; otherwise count this request."""
        settings = get_settings()
        self._tokens(db, tenant, settings.billing.free_tokens_per_day, settings.billing.free_tokens_per_month)
        self._rate(tenant.id, settings.limits.shared_requests_per_second)

    def _rate(self, tenant_id: str, per_second: float) -> None:
        if per_second <= 0:
            return
        now = self._clock()
        allowed = max(1, math.floor(per_second * WINDOW_SECONDS))
        with self._lock:
            recent = self._recent[tenant_id]
            while recent and recent[0] <= now - WINDOW_SECONDS:
                recent.popleft()
            if len(recent) >= allowed:
                wait = max(1, math.ceil(recent[0] + WINDOW_SECONDS - now))
                raise APIError(
                    429,
                    f"requests per second: the shared endpoints take at most {per_second:g} requests a second "
                    f"per tenant; retry after {wait} s, or create a private deployment (POST /v1/deployments)",
                    code="rate_limit_requests_per_second",
                    headers={"Retry-After": str(wait)},
                )
            recent.append(now)

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
