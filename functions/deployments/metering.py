"""Replica time on the ledger, and its price.

A replica is billed from the moment it became ready until it stopped, in records of at most
LORAPLEX_DEPLOYMENT_METERING_SECONDS each (one ledger row per replica and period, idempotent by its key); a
replica that never became ready is not billed.
"""

import logging
from dataclasses import replace
from typing import Any

from app.db import session_scope
from app.models import BillingAccount, ReplicaRecord, utcnow
from app.settings import get_settings
from billing import ledger
from billing.prices import PriceError
from functions.deployments.live import Fleet, Live
from functions.deployments.replica import Replica

log = logging.getLogger(__name__)
HOUR_MS = 3_600_000


def meter_due(fleet: Fleet, now: float, every: float) -> None:
    """Record every ready replica whose last record is `every` seconds old or more."""
    with fleet.lock:
        due = [
            (live, r)
            for live in fleet.deployments.values()
            for r in live.replicas
            if r.ready_at is not None and now - r.metered_at >= every
        ]
    for live, r in due:
        meter(live, r, now)


def meter(live: Live, r: Replica, until: float) -> None:
    """Write the replica's time since its last record to the ledger (replicas that never became ready are
    not billed). Idempotent per (replica, period); its row's `metered_until` says how far."""
    if r.ready_at is None:
        return
    ms = int((until - r.metered_at) * 1000)
    if ms <= 0:
        return
    period = r.metered_periods
    r.metered_at, r.metered_periods = until, period + 1
    try:
        with session_scope() as s:
            record_time(s, live.tenant_id, live.id, live.base_model, live.accelerator, ms, f"{r.record_id}:{period}")
            row = s.get(ReplicaRecord, r.record_id)
            if row is not None:  # every process sees how far it is billed
                row.metered_until = utcnow()
    except Exception:  # noqa: BLE001 - a failed write is retried with the next period's time
        r.metered_at, r.metered_periods = r.metered_at - ms / 1000, period
        log.exception("metering replica %s failed", r.id)


def record_time(
    session: Any, tenant_id: str, deployment_id: str, base_model: str, accelerator: str, ms: int, key: str
) -> int:
    """One ledger record of `ms` of a replica's time, priced by its accelerator; `key` names the replica and the
    period, so a record written twice counts once. Returns the price, micro-USD."""
    amount = replica_price(session, tenant_id, accelerator, ms)
    ledger.record(
        session,
        ledger.Usage(
            idempotency_key=f"replica:{key}",
            tenant_id=tenant_id,
            kind="deployment",
            technique="replica",
            base_model=base_model,
            compute_ms=ms,
            accelerator=accelerator,
            amount_micro_usd=amount,
            reference=deployment_id,
        ),
    )
    return amount


def replica_price(session: Any, tenant_id: str, accelerator: str, milliseconds: int) -> int:
    """The tenant's price of `milliseconds` of one replica; a CPU replica at LORAPLEX_CPU_REPLICA_MICRO_USD_PER_HOUR
    unless the tenant's own price table names a CPU rate. PriceError: the tenant's plan has no price for it."""
    book = ledger.price_book(session, tenant_id)
    account = session.get(BillingAccount, tenant_id)
    own = ((account.prices or {}).get("accelerator_per_hour") or {}) if account is not None else {}
    if accelerator == "cpu" and "cpu" not in own:
        rates = {**book.accelerator_per_hour, "cpu": get_settings().billing.cpu_replica_micro_usd_per_hour}
        book = replace(book, accelerator_per_hour=rates)
    return book.deployment(accelerator, milliseconds)


def hourly_price(session: Any, tenant_id: str, accelerator: str) -> int:
    """One replica-hour's price as shown with a deployment, micro-USD: 0 where the plan has no price for it."""
    try:
        return replica_price(session, tenant_id, accelerator, HOUR_MS)
    except PriceError:
        return 0
