"""What every API process sees of the deployments' replicas and load, in the database.

`replicas` rows: the lease holder (app/control_lease.py) publishes each replica it runs (state, address, requests in
flight, adapters held, requests served) when it changes and at least every HEARTBEAT_SECONDS; the other processes
route requests to the ready ones by address (remote_leases.py). `load_reports` rows: each process writes its own
load on each deployment (requests waiting for a replica, requests it streams per replica, adapters it sent) when
it changes and while it lasts; the holder adds the others' up for the autoscaler. A report not renewed within
STALE_SECONDS is a process gone, and counts for nothing.

`describe` and `gauges` read both, so GET /v1/deployments/{name} and /metrics answer the same from any process.
"""

import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update

from app.db import session_scope
from app.models import Deployment, LoadReport, ReplicaRecord, utcnow
from functions.deployments.metrics import Gauges
from functions.deployments.replica import Replica

HEARTBEAT_SECONDS = 2.0  # a replica row or a non-zero report is rewritten at least this often
STALE_SECONDS = 10.0  # a report older than this is ignored (its process is gone)
UP = ("starting", "ready", "draining")  # the row states of a replica that runs
ROW_STATE = {"starting": "starting", "ready": "ready", "draining": "draining", "stopping": "draining"}


# ---- the holder's replicas ----------------------------------------------------------------------------------


def row_state(r: Replica) -> str:
    return ROW_STATE.get(r.state, r.state)  # stopped | failed stay as they are


@dataclass
class Published:
    """The replica rows this process wrote, and what they said (so unchanged rows are not written every tick)."""

    holder: str
    said: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # record id -> what the row says
    at: dict[str, datetime] = field(default_factory=dict)  # record id -> when it was written
    seen: dict[str, Replica] = field(default_factory=dict)  # record id -> the replica, while it runs

    def publish(self, replicas: list[tuple[Replica, str, dict[str, str]]]) -> None:
        """Write the rows of `replicas` (each with its deployment's accelerator and adapter names) that changed or
        are due a heartbeat; the replicas published before and absent now are written stopped (or failed), with
        why."""
        now = utcnow()
        due: list[tuple[Replica, str, dict[str, str], tuple[Any, ...]]] = []
        present = set()
        for r, accelerator, names in replicas:
            present.add(r.record_id)
            said = (row_state(r), r.in_flight + r.remote_in_flight, r.served, tuple(r.adapters), r.ready_at is None)
            last = self.at.get(r.record_id)
            if said != self.said.get(r.record_id) or last is None or now - last >= timedelta(seconds=HEARTBEAT_SECONDS):
                due.append((r, accelerator, names, said))
        gone = [self.seen[record_id] for record_id in self.said if record_id not in present]
        if not due and not gone:
            return
        with session_scope() as s:
            for r, accelerator, names, said in due:
                row = s.get(ReplicaRecord, r.record_id)
                if row is None:
                    if s.get(Deployment, r.deployment_id) is None:  # removed with its tenant: the replica stops
                        continue
                    row = ReplicaRecord(
                        id=r.record_id,
                        deployment_id=r.deployment_id,
                        runtime="local",
                        accelerator=accelerator,
                        config_version=r.config_version,
                        url=r.url,
                        process=f"{socket.gethostname()}:{r.pid}",
                        holder=self.holder,
                        started_at=r.started_wall,
                    )
                    s.add(row)
                row.state, row.in_flight, row.served = said[0], said[1], r.served
                row.adapters = [[key, names.get(key, "(loaded)")] for key in r.adapters]
                if r.ready_at is not None and row.ready_at is None:
                    row.ready_at = now
                row.heartbeat_at = now
            for r in gone:
                s.execute(
                    update(ReplicaRecord)
                    .where(ReplicaRecord.id == r.record_id, ReplicaRecord.state.in_(UP))
                    .values(
                        state="failed" if r.state == "failed" else "stopped",
                        reason=r.error or "",
                        stopped_at=now,
                        heartbeat_at=now,
                        in_flight=0,
                    )
                )
        for r, _, _, said in due:
            self.said[r.record_id], self.at[r.record_id], self.seen[r.record_id] = said, now, r
        for r in gone:
            for kept in (self.said, self.at, self.seen):
                kept.pop(r.record_id, None)


def orphans(holder: str) -> list[ReplicaRecord]:
    """Local replica rows still up that another process published: its replicas, which died with it (a process
    that takes the lease over retires them)."""
    with session_scope() as s:
        return list(
            s.scalars(
                select(ReplicaRecord).where(
                    ReplicaRecord.runtime == "local", ReplicaRecord.state.in_(UP), ReplicaRecord.holder != holder
                )
            ).all()
        )


def retire(record_id: str, reason: str) -> None:
    """Write a row stopped as of its last heartbeat (when it was last known to run)."""
    with session_scope() as s:
        row = s.get(ReplicaRecord, record_id)
        if row is not None and row.state in UP:
            row.state, row.stopped_at, row.in_flight, row.reason = "stopped", row.heartbeat_at, 0, reason


def ready(deployment_id: str) -> list[ReplicaRecord]:
    """The deployment's ready replicas with an address (what a follower routes to)."""
    with session_scope() as s:
        return list(
            s.scalars(
                select(ReplicaRecord).where(
                    ReplicaRecord.deployment_id == deployment_id,
                    ReplicaRecord.state == "ready",
                    ReplicaRecord.url.is_not(None),
                )
            ).all()
        )


# ---- every process's load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One process's load on one deployment."""

    waiting: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)  # replica record id -> requests
    adapters: dict[str, list[list[str]]] = field(default_factory=dict)  # record id -> [[key, name], ...] sent

    def idle(self) -> bool:
        return not self.waiting and not any(self.in_flight.values())


@dataclass
class Reports:
    """This process's load reports, as last written."""

    process: str
    said: dict[str, Load] = field(default_factory=dict)
    at: dict[str, datetime] = field(default_factory=dict)

    def write(self, loads: dict[str, Load]) -> None:
        """Write the loads that changed, or that are not idle and due a heartbeat (an idle one is written once)."""
        now = utcnow()
        beat = timedelta(seconds=HEARTBEAT_SECONDS)
        for deployment_id, said in self.said.items():
            if deployment_id not in loads and not said.idle():  # its last request ended: say so once
                loads[deployment_id] = Load()
        due = {
            d: load
            for d, load in loads.items()
            if load != self.said.get(d, Load()) or (not load.idle() and now - self.at.get(d, now) >= beat)
        }
        if not due:
            return
        with session_scope() as s:
            for deployment_id, load in due.items():
                row = s.get(LoadReport, (self.process, deployment_id))
                if row is None:
                    if s.get(Deployment, deployment_id) is None:  # deleted with its tenant
                        continue
                    row = LoadReport(process=self.process, deployment_id=deployment_id)
                    s.add(row)
                row.waiting, row.in_flight, row.adapters, row.reported_at = (
                    load.waiting,
                    dict(load.in_flight),
                    dict(load.adapters),
                    now,
                )
        for deployment_id, load in due.items():
            self.said[deployment_id], self.at[deployment_id] = load, now

    def withdraw(self) -> None:
        """At shutdown: this process's reports removed."""
        with session_scope() as s:
            s.execute(delete(LoadReport).where(LoadReport.process == self.process))
        self.said.clear()
        self.at.clear()


def others(process: str) -> dict[str, list[LoadReport]]:
    """The fresh reports of every other process, by deployment."""
    since = utcnow() - timedelta(seconds=STALE_SECONDS)
    with session_scope() as s:
        rows = s.scalars(select(LoadReport).where(LoadReport.process != process, LoadReport.reported_at >= since)).all()
    out: dict[str, list[LoadReport]] = {}
    for row in rows:
        out.setdefault(row.deployment_id, []).append(row)
    return out


def _waiting(s: Any, deployment_ids: list[str]) -> dict[str, int]:
    since = utcnow() - timedelta(seconds=STALE_SECONDS)
    rows = s.scalars(
        select(LoadReport).where(LoadReport.deployment_id.in_(deployment_ids), LoadReport.reported_at >= since)
    ).all()
    out: dict[str, int] = {}
    for row in rows:
        out[row.deployment_id] = out.get(row.deployment_id, 0) + row.waiting
    return out


# ---- reading, for the API and Prometheus --------------------------------------------------------------------


def describe(deployment_id: str) -> dict[str, Any]:
    """The replicas that run and the load, for GET /v1/deployments/{name}: the same from every API process."""
    now = utcnow()
    with session_scope() as s:
        rows = s.scalars(
            select(ReplicaRecord)
            .where(ReplicaRecord.deployment_id == deployment_id, ReplicaRecord.state.in_(UP))
            .order_by(ReplicaRecord.started_at, ReplicaRecord.id)
        ).all()
        waiting = _waiting(s, [deployment_id]).get(deployment_id, 0)
    return {
        "replicas": [
            {
                "id": row.id,
                "state": row.state,
                "runtime": row.runtime,
                "in_flight": row.in_flight,
                "served": row.served,
                "adapters": [name for _, name in row.adapters or []],
                "config_version": row.config_version,
                "up_seconds": round((now - row.started_at).total_seconds(), 1),
                "start_seconds": round((row.ready_at - row.started_at).total_seconds(), 3) if row.ready_at else None,
            }
            for row in rows
        ],
        "in_flight": sum(row.in_flight for row in rows),
        "waiting": waiting,
    }


def gauges() -> list[Gauges]:
    """Per deployment not deleted: its replicas by state, requests in flight and waiting (Prometheus)."""
    with session_scope() as s:
        deployments = s.scalars(select(Deployment).where(Deployment.status != "Deleted")).all()
        ids = [d.id for d in deployments]
        rows = s.scalars(
            select(ReplicaRecord).where(ReplicaRecord.deployment_id.in_(ids), ReplicaRecord.state.in_(UP))
        ).all()
        waiting = _waiting(s, ids)
    out = []
    for d in deployments:
        states: dict[str, int] = {}
        mine = [row for row in rows if row.deployment_id == d.id]
        for row in mine:
            states[row.state] = states.get(row.state, 0) + 1
        in_flight = sum(row.in_flight for row in mine)
        out.append(Gauges(d.id, d.name, d.tenant_id, d.accelerator, d.status, states, in_flight, waiting.get(d.id, 0)))
    return out
