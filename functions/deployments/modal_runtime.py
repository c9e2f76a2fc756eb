"""Private deployments as container pools (LORAPLEX_RUNTIME=modal): the runtime surface the API uses (acquire,
describe, metrics, gauges, health, notify, start, stop; as runtime.py's), where the platform's autoscaler runs the
replicas and the containers report themselves.

Each deployment config is its own pool (functions/engine/pool.py `Pool`: the deployment's id and config version,
its accelerator's GPU, its engine, its scale_up_threshold as the per-container concurrency target). Its autoscaler
bounds follow the deployment row (`bounds`): min_replicas -> min_containers, max_replicas -> max_containers,
cooldown_time -> scaledown_window; a deployment Stopped, Errored, being deleted or held (its tenant cannot pay,
suspension.py) keeps no container (0 kept, idle ones gone after the shortest window) and its requests are refused
here (rules.py). They are set through the injected `PoolCalls.autoscale` whenever they change (create, PATCH, stop,
standby, delete, a hold), live, without a redeploy. A request to a deployment at zero containers makes the platform
start one: Standby wakes on a request.

Each tick (LORAPLEX_DEPLOYMENT_TICK_SECONDS) the loop
  1. closes the rows of containers that stopped reporting, billing them up to their last heartbeat (containers.py),
  2. reads the deployment rows and their containers' rows,
  3. per deployment: sets its pool's bounds when they changed (and lets a replaced config's pool go), and derives
     its status from what its containers reported (started, ready, stopped, failed) with the status machine of
     status.py, recording every transition with its reason,
  4. samples the health figures (replicas up, replicas serving) and adds this process's figures to the rows every
     API process reads.
Modal runs the web function in as many containers as traffic needs: steps 1 and 3's writes (closing rows, setting
bounds, recording transitions) and the replica time of step 4 are done by the one holding the "modal-pools" lease
(app/control_lease.py), so N web containers record each transition and each replica-second once. The others
refresh their view of the rows (for requests and reads) and add their own request figures.
"""

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import or_, select

from app.control_lease import Lease as ControlLease
from app.control_lease import this_process
from app.db import session_scope
from app.models import Deployment, ReplicaRecord, utcnow
from app.settings import get_settings
from functions.deployments import suspension
from functions.deployments.autoscaler import ScalingConfig
from functions.deployments.containers import RUNTIME, close_silent
from functions.deployments.live import Effects, Live, set_columns
from functions.deployments.metrics import DeploymentMetrics, Gauges
from functions.deployments.replica import Replica
from functions.deployments.rules import serving_refusal
from functions.deployments.status import DELETED, ERRORED, STOPPED, settle, transition
from functions.engine.pool import Autoscaling, Pool, PoolCalls, PoolEngine
from functions.engine.protocol import AdapterRef, Delta

log = logging.getLogger(__name__)
# Modal's scale-down window is whole seconds in [2, 3600]: cooldown_time is clamped to it, and a pool let go (Stopped,
# Errored, deleted, a replaced config) gets the shortest.
MIN_WINDOW, MAX_WINDOW = 2, 3600
SILENT_POLLS = 3  # a container silent this many heartbeats (LORAPLEX_ENGINE_HEALTH_INTERVAL) is gone


def bounds(row: Deployment) -> Autoscaling:
    """The autoscaler bounds of the deployment's pool, from its row."""
    if row.target_state != "active" or row.status in (ERRORED, STOPPED, DELETED) or row.suspended_reason is not None:
        return Autoscaling(0, max(1, row.max_replicas), MIN_WINDOW)
    window = min(MAX_WINDOW, max(MIN_WINDOW, math.ceil(row.cooldown_time)))
    return Autoscaling(row.min_replicas, row.max_replicas, window)


def pool_of(row: Deployment) -> Pool:
    """The deployment's current pool: a change of config version, accelerator, engine or threshold is another."""
    return Pool(
        row.base_model,
        deployment=row.id,
        config_version=row.config_version,
        accelerator=row.accelerator,
        engine=row.engine,
        concurrency=row.scale_up_threshold,
    )


class PoolRuntime:
    """The deployments' side of the API under the Modal runtime; `clock` is monotonic seconds."""

    def __init__(
        self, calls: PoolCalls, clock: Callable[[], float] = time.monotonic, holder: str | None = None
    ) -> None:
        """`holder`: how the lease names this web container ("host:pid" unless given)."""
        self.settings = get_settings()
        self.calls, self.clock = calls, clock
        self.metrics = DeploymentMetrics(self.settings.deployments.deployment_metrics_interval)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.metrics.collector(self.gauges))
        self.lock = threading.RLock()
        self.lives: dict[str, Live] = {}
        self.pools: dict[str, Pool] = {}
        self.applied: dict[str, tuple[Pool, Autoscaling]] = {}  # deployment id -> the pool and bounds last set
        self.seen: dict[str, str] = {}  # replica row id -> the state last seen
        self.in_flight: dict[str, int] = {}  # deployment id -> requests this process streams
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = utcnow()
        self._last_tick = clock()
        self._credit_checked_at = -math.inf
        seconds = self.settings.deployments.deployment_lease_seconds
        self.lease = ControlLease("modal-pools", holder or this_process(), seconds)

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "PoolRuntime":
        self._thread = threading.Thread(target=self._run, name="deployment-pools", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; the containers are the platform's and keep serving other API processes."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.metrics.flush()
        except Exception:  # noqa: BLE001 - the database may be gone already (tests drop it)
            log.warning("could not write the last deployment figures", exc_info=True)

    def health(self) -> dict[str, Any]:
        with self.lock:
            ready = sum(1 for live in self.lives.values() for r in live.replicas if r.state == "ready")
        running = self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
        return {"status": "ok" if running else "degraded", "ready_replicas": ready}

    def notify(self) -> None:
        """A row changed (created, updated, stopped, deleted): look at once."""
        self._wake.set()

    def _run(self) -> None:
        tick = self.settings.deployments.deployment_tick_seconds
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("deployment pools tick failed")
            self._wake.wait(tick)
            self._wake.clear()

    # ---- the tick ------------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        leader = self.lease.hold()
        if leader:
            close_silent(SILENT_POLLS * self.settings.engine.engine_health_interval)
            if now - self._credit_checked_at >= self.settings.billing.credit_check_seconds:
                self._credit_checked_at = now
                suspension.check()  # tenants that cannot pay: their deployments held (or released), read below
        with session_scope() as s:
            rows = s.scalars(select(Deployment).where(Deployment.status != DELETED)).all()
            replicas = s.scalars(
                select(ReplicaRecord).where(
                    ReplicaRecord.runtime == RUNTIME,
                    ReplicaRecord.deployment_id.in_([row.id for row in rows]),
                    or_(ReplicaRecord.state.in_(("starting", "ready")), ReplicaRecord.stopped_at >= self._since),
                )
            ).all()
            s.expunge_all()
        by_deployment: dict[str, list[ReplicaRecord]] = {}
        for record in replicas:
            by_deployment.setdefault(record.deployment_id, []).append(record)
        effects: Effects = []
        for row in rows:
            if leader:
                self._autoscale(row)
            with self.lock:
                self._reconcile(row, by_deployment.get(row.id, []), now, effects)
        for effect in effects if leader else ():  # database writes, outside the lock requests take
            effect()
        if leader:
            self._sample(max(0.0, now - self._last_tick))
        self.metrics.flush()  # the figures go to the rows every API process reads (metrics.py)
        self.metrics.prune()
        self._last_tick = now

    def _autoscale(self, row: Deployment) -> None:
        """Set the pool's bounds when they changed; a replaced pool (new config or threshold) is let go."""
        pool, wanted = pool_of(row), bounds(row)
        with self.lock:
            self.pools[row.id] = pool
            applied = self.applied.get(row.id)
        if applied == (pool, wanted):
            return
        try:
            if applied is not None and applied[0] != pool:
                self.calls.autoscale(applied[0], Autoscaling(0, applied[1].max_containers, MIN_WINDOW))
            self.calls.autoscale(pool, wanted)
        except Exception:  # noqa: BLE001 - the platform did not answer: set them again on the next tick
            log.exception("setting the autoscaler of deployment %s failed", row.name)
            return
        with self.lock:
            self.applied[row.id] = (pool, wanted)

    def _reconcile(self, row: Deployment, records: list[ReplicaRecord], now: float, effects: Effects) -> None:
        """The deployment's status from its containers' rows, through the status machine (under the lock)."""
        live = self._live(row, now)
        hints: list[str] = []
        failed_starts: list[str] = []
        up: list[Replica] = []
        for record in records:
            said, before = record.state, self.seen.get(record.id)
            self.seen[record.id] = said
            name = record.process or record.id
            if said in ("starting", "ready"):
                up.append(_view(record, live))
            if said == before:
                continue
            if said == "ready" and record.ready_at is not None:
                hints.append(
                    f"container {name} ready after {(record.ready_at - record.started_at).total_seconds():.1f} s"
                )
            elif said == "failed" and record.ready_at is None:
                failed_starts.append(f"container {name} failed to start: {record.reason}")
            elif said in ("failed", "stopped") and before is not None:
                hints.append(f"container {name} {'stopped' if said == 'stopped' else 'failed'}: {record.reason}")
        live.replicas = up
        if failed_starts and not any(r.state == "ready" for r in up) and live.status not in (ERRORED, STOPPED):
            transition(live, ERRORED, failed_starts[-1], effects)  # Errored stays until the tenant moves it
        elif hints or failed_starts:
            live.hint = (hints + failed_starts)[-1]
        suspension.apply(live, effects)  # its tenant cannot pay: bounds() keeps no container, the move says why
        if settle(live, effects) == DELETED and not up:
            self.lives.pop(row.id, None)
            self.metrics.forget(row.id)
            return
        count = sum(1 for r in up if r.state == "ready")
        if count != live.replicas_written:
            live.replicas_written = count
            set_columns(effects, live.id, replicas=count)

    def _live(self, row: Deployment, now: float) -> Live:
        """The deployment as this process holds it, refreshed from its row (the row is the truth every process
        shares: a transition another process recorded is not recorded again)."""
        scaling = ScalingConfig(row.min_replicas, row.max_replicas, row.scale_up_threshold, row.cooldown_time)
        live = self.lives.get(row.id)
        if live is None:
            live = self.lives[row.id] = Live.of_row(row, now)
        live.scaling, live.config_version, live.target_state = scaling, row.config_version, row.target_state
        live.accelerator, live.engine = row.accelerator, row.engine
        live.status, live.status_reason = row.status, row.status_reason
        live.suspended = row.suspended_reason
        return live

    def _sample(self, seconds: float) -> None:
        with self.lock:
            for live in self.lives.values():
                ready = [r for r in live.replicas if r.state == "ready"]
                busy = sum(1 for r in ready if r.in_flight > 0)
                self.metrics.sample(live.id, len(ready), busy, None, seconds)

    # ---- the request path and reading ------------------------------------------------------------------

    async def acquire(self, deployment_id: str, adapter: AdapterRef | None, adapter_name: str | None) -> "PoolLease":
        """The deployment's pool for one request, refusing what it cannot serve now. No wait here: a pool at zero
        containers starts one for the request (the platform queues it meanwhile)."""
        with session_scope() as s:
            row = s.get_one(Deployment, deployment_id)
            refusal = serving_refusal(row.name, row.status, row.target_state, row.status_reason, row.suspended_reason)
            if refusal is not None:
                raise refusal
            s.expunge(row)
        if self.applied.get(deployment_id) is None:  # created a moment ago: its bounds before its first request
            await asyncio.to_thread(self._autoscale, row)
        with self.lock:
            self.in_flight[deployment_id] = self.in_flight.get(deployment_id, 0) + 1
        engine = PoolEngine(self.calls, pool_of(row), None, 0)
        return PoolLease(self, deployment_id, engine)

    def describe(self, deployment_id: str) -> dict[str, Any]:
        """The deployment's containers as they reported themselves, for GET /v1/deployments/{name}."""
        with session_scope() as s:
            records = s.scalars(
                select(ReplicaRecord)
                .where(
                    ReplicaRecord.deployment_id == deployment_id,
                    ReplicaRecord.runtime == RUNTIME,
                    ReplicaRecord.state.in_(("starting", "ready")),
                )
                .order_by(ReplicaRecord.started_at)
            ).all()
            now = utcnow()
            replicas: list[dict[str, Any]] = [
                {
                    "id": r.process or r.id,
                    "state": r.state,
                    "in_flight": r.in_flight,
                    "served": r.served,
                    "adapters": [],
                    "config_version": r.config_version,
                    "prewarmed": False,
                    "up_seconds": round((now - r.started_at).total_seconds(), 1),
                    "start_seconds": round((r.ready_at - r.started_at).total_seconds(), 3) if r.ready_at else None,
                }
                for r in records
            ]
        with self.lock:
            in_flight = self.in_flight.get(deployment_id, 0)
        return {"replicas": replicas, "in_flight": in_flight, "waiting": 0}

    def gauges(self) -> list[Gauges]:
        with self.lock:
            out = []
            for live in self.lives.values():
                states: dict[str, int] = {}
                for r in live.replicas:
                    states[r.state] = states.get(r.state, 0) + 1
                in_flight = self.in_flight.get(live.id, 0)
                out.append(
                    Gauges(live.id, live.name, live.tenant_id, live.accelerator, live.status, states, in_flight, 0)
                )
            return out

    def replica_pids(self, deployment_id: str) -> list[int]:
        return []  # containers are not processes of this machine


@dataclass
class PoolLease:
    """One request's use of a deployment's pool, from acquire to release (the health figures); DeploymentEngine
    streams from `engine`."""

    runtime: PoolRuntime
    deployment_id: str
    engine: PoolEngine
    released: bool = False

    def release(self, adapter_name: str | None, last: Delta | None, ok: bool, began: float) -> None:
        if self.released:
            return
        self.released = True
        with self.runtime.lock:
            self.runtime.in_flight[self.deployment_id] -= 1
        self.runtime.metrics.request(
            self.deployment_id,
            adapter_name,
            last.completion_tokens if last is not None else 0,
            last.prompt_tokens if last is not None else 0,
            (time.monotonic() - began) * 1000,
            last.queue_ms if last is not None else 0.0,
            ok,
        )


def _view(record: ReplicaRecord, live: Live) -> Replica:
    """A container's row as the status machine reads a replica (its state, its config)."""
    view = Replica(record.id, live.id, live.base_model, record.config_version, Path(record.process or record.id))
    view.state = "ready" if record.state == "ready" else "starting"
    view.in_flight = record.in_flight
    return view
