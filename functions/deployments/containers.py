"""Serving containers that report themselves (runtime "modal"): each writes its own `replicas` row when it starts,
becomes ready, beats and stops, and meters its own time; whoever finds one that went silent closes its row.

    starting  --ready()-->  ready  --stopped()-->  stopped
        \\--failed(reason)-->  failed           (silent past `silent_after`: failed, closed by `close_silent`)

Billing: a container is billed from its readiness until it stopped, or, when it died without a word, until its
last heartbeat, priced by its accelerator like a local replica (metering.replica_price). `meter` advances the
row's `metered_until` with a compare-and-set in the same transaction as the ledger record, whose idempotency key
names the period's start: two writers (the container's heartbeat, an API process closing it) cannot bill one
second twice, and a retry after a crash bills nothing again.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Update, select, update
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import Deployment, ReplicaRecord, utcnow
from functions.deployments.metering import record_time

log = logging.getLogger(__name__)
RUNTIME = "modal"
UP = ("starting", "ready")


def meter(replica_id: str, until: datetime) -> int:
    """Bill the replica's time from its last record (or its readiness) to `until` (at most its stop); the micro-USD
    written (0: nothing new, or never ready). A writer that loses a period to another (a heartbeat racing the
    container's exit) reads the row again and bills what is left after that period: no millisecond is lost."""
    while (written := _meter_once(replica_id, until)) is None:
        pass
    return written


def _meter_once(replica_id: str, until: datetime) -> int | None:
    """One compare-and-set period: the micro-USD written, 0 when nothing is left to bill, None when another writer
    moved `metered_until` first (the caller tries again from there)."""
    with session_scope() as s:
        row = s.get(ReplicaRecord, replica_id)
        if row is None or row.ready_at is None:
            return 0
        start = row.metered_until or row.ready_at
        if row.stopped_at is not None:
            until = min(until, row.stopped_at)  # a closed row: no time after its stop is billed
        ms = int((until - start).total_seconds() * 1000)
        if ms <= 0:
            return 0
        same = (
            ReplicaRecord.metered_until.is_(None) if row.metered_until is None else ReplicaRecord.metered_until == start
        )
        if (
            _updated(s, update(ReplicaRecord).where(ReplicaRecord.id == replica_id, same).values(metered_until=until))
            != 1
        ):
            return None  # another writer took this period
        deployment = s.get_one(Deployment, row.deployment_id)
        key = f"{row.id}:{int(start.timestamp() * 1000)}"
        return record_time(s, deployment.tenant_id, deployment.id, deployment.base_model, row.accelerator, ms, key)


def close_silent(silent_after: float, now: datetime | None = None) -> list[str]:
    """Close the rows of containers that stopped reporting (killed, preempted, lost): failed, stopped at their last
    heartbeat, and billed up to it. Safe from every API process at once (a conditional update). Their ids."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=silent_after)
    with session_scope() as s:
        silent = s.scalars(
            select(ReplicaRecord.id).where(
                ReplicaRecord.runtime == RUNTIME, ReplicaRecord.state.in_(UP), ReplicaRecord.heartbeat_at < cutoff
            )
        ).all()
    closed = []
    for replica_id in silent:
        with session_scope() as s:
            last = s.get_one(ReplicaRecord, replica_id).heartbeat_at
            reason = f"the container stopped reporting (last heartbeat {last:%H:%M:%S} UTC)"
            moved = _updated(
                s,
                update(ReplicaRecord)
                .where(ReplicaRecord.id == replica_id, ReplicaRecord.state.in_(UP), ReplicaRecord.heartbeat_at < cutoff)
                .values(state="failed", reason=reason, stopped_at=last, in_flight=0),
            )
        if moved == 1:
            meter(replica_id, last)
            closed.append(replica_id)
            log.warning("replica %s: %s", replica_id, reason)
    return closed


@dataclass
class ContainerReport:
    """One container's own row, written from the container: `started` on entry, `ready` once it serves, a heartbeat
    every `every` seconds (its load, and its time metered), `stopped` on exit. `clock` gives aware UTC times."""

    deployment_id: str
    container_id: str  # the platform's container id (Modal's task id)
    accelerator: str  # as priced: a10g | l40s | a100-80gb | h100 | cpu
    config_version: int
    every: float  # heartbeat period, seconds
    meter_every: float  # a beat bills the time since the last record once it is this old, seconds
    in_flight: Callable[[], int] = lambda: 0
    clock: Callable[[], datetime] = utcnow
    replica_id: str = ""

    def __post_init__(self) -> None:
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._metered_at: datetime | None = None

    def started(self) -> "ContainerReport":
        with session_scope() as s:
            now = self.clock()
            row = ReplicaRecord(
                deployment_id=self.deployment_id,
                runtime=RUNTIME,
                accelerator=self.accelerator,
                config_version=self.config_version,
                state="starting",
                process=self.container_id,
                started_at=now,
                heartbeat_at=now,
            )
            s.add(row)
            s.flush()
            self.replica_id = row.id
        self._thread = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.replica_id}", daemon=True)
        self._thread.start()
        return self

    def ready(self) -> None:
        now = self.clock()
        self._metered_at = now
        self._set(state="ready", ready_at=now, heartbeat_at=now)

    def failed(self, reason: str) -> None:
        self._halt.set()
        now = self.clock()
        self._set(state="failed", reason=reason[:2000], stopped_at=now, heartbeat_at=now, in_flight=0)

    def stopped(self, reason: str = "the container exited") -> None:
        """On exit: the row closed and its time billed up to now (nothing after)."""
        self._halt.set()
        now = self.clock()
        if self._set(state="stopped", reason=reason, stopped_at=now, heartbeat_at=now, in_flight=0):
            meter(self.replica_id, now)

    def beat(self) -> None:
        """Report the load; bill the time since the last record once that is `meter_every` old."""
        now = self.clock()
        due = self._metered_at is not None and (now - self._metered_at).total_seconds() >= self.meter_every
        if self._set(heartbeat_at=now, in_flight=self.in_flight()) and due:
            meter(self.replica_id, now)
            self._metered_at = now

    def halt(self) -> None:
        """Stop beating and write nothing more (what a killed container does)."""
        self._halt.set()

    def _beat_loop(self) -> None:
        while not self._halt.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the next beat tries again; a silent container is closed by the API
                log.exception("heartbeat of replica %s failed", self.replica_id)

    def _set(self, **values: object) -> bool:
        """Write to the row while it is up (a row closed by `close_silent` stays closed); whether it was."""
        with session_scope() as s:
            up = update(ReplicaRecord).where(ReplicaRecord.id == self.replica_id, ReplicaRecord.state.in_(UP))
            return _updated(s, up.values(**values)) == 1


def _updated(session: Session, statement: Update) -> int:
    """Rows an UPDATE changed (its result is a CursorResult; Session.execute is typed for any statement)."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount
