"""The deployment manager of the embedded runtime: runs in the API process (a thread started by web/main.py's
lifespan) and owns every replica process.

Each tick (LORAPLEX_DEPLOYMENT_TICK_SECONDS) it
  1. reads the deployment rows when the API changed one (and every few seconds regardless),
  2. per deployment: takes in replicas that finished starting, notices dead ones, stops drained ones, asks the
     autoscaler for a replica count, starts or drains replicas to reach it (rolling old-config replicas one at a
     time: a new one starts, takes traffic, then an old one drains), and derives the status, recording every
     transition with its reason,
  3. writes replica time to the ledger, samples the health figures, and keeps one pre-warmed interpreter ready.

Requests reach replicas through `acquire` (adapter-aware, least loaded; a request to a deployment with no replica
waits, bounded, while one starts) and give them back with `Lease.release`.
The database rows are the truth for what tenants asked (config, target_state); this process is the truth for
what runs. One API process runs the replicas: with several, each would start its own.
"""

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select

from app.db import session_scope
from app.errors import Unavailable
from app.models import BillingAccount, Deployment, DeploymentTransition, utcnow
from app.settings import get_settings
from billing import ledger
from functions import checkpoints
from functions.deployments.autoscaler import ReplicaView, ScalerMemory, ScalingConfig, decide
from functions.deployments.config import (
    DELETED,
    ERRORED,
    INITIALIZING,
    READY,
    STANDBY,
    STOPPED,
    UPDATING,
)
from functions.deployments.metrics import DeploymentMetrics, Gauges
from functions.deployments.replica import Replica, ReplicaFailed, Spare, replica_env
from functions.deployments.routing import Candidate, pick
from functions.deployments.rules import serving_refusal
from functions.engine.protocol import AdapterRef, Delta, GenerationRequest
from functions.engine.remote import STOP_GRACE_SECONDS
from functions.engine.supervisor import UNHEALTHY_POLLS
from functions.prompts import encode_text

log = logging.getLogger(__name__)
SYNC_SECONDS = 2.0  # the rows are re-read at least this often (changes made by another process, the CLI)
FAILED_START_BACKOFF = 30.0  # seconds before another start once one failed while other replicas serve
WAIT_POLL = 0.02  # seconds between looks of a request waiting for a replica
SPARE_QUIET_SECONDS = 5.0  # a spare is spawned this long after the last replica start ended: its imports would
# otherwise take CPU from that replica's first requests


@dataclass(eq=False)
class _Live:
    """A deployment as the runtime holds it."""

    id: str
    tenant_id: str
    name: str
    base_model: str
    accelerator: str
    engine: str
    scaling: ScalingConfig
    config_version: int
    preloaded: list[str]
    target_state: str
    status: str
    status_reason: str
    memory: ScalerMemory
    replicas: list[Replica] = field(default_factory=list)
    waiting: int = 0  # requests waiting for a replica
    wake_from: float | None = None  # when a request found no replica (the cold start's start)
    hint: str = ""  # why a status change in this tick happens
    scaled: tuple[int, str] | None = None  # an autoscaler decision that changed the replica count: (target, why)
    no_start_before: float = 0.0
    next_number: int = 1
    adapter_names: dict[str, str] = field(default_factory=dict)  # adapter key -> "repo/3" (users see names)
    replicas_written: int = -1  # the `replicas` figure last written to the row

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in ("starting", "ready")]


@dataclass
class Lease:
    """A request's hold on one replica, from acquire to release."""

    runtime: "DeploymentRuntime"
    deployment_id: str
    replica: Replica
    waited_ms: float
    released: bool = False

    def release(self, adapter_name: str | None, last: Delta | None, ok: bool, began: float) -> None:
        if self.released:
            return
        self.released = True
        with self.runtime._lock:
            self.replica.in_flight -= 1
        queue_ms = self.waited_ms + (last.queue_ms if last is not None else 0.0)
        self.runtime.metrics.request(
            self.deployment_id,
            adapter_name,
            last.completion_tokens if last is not None else 0,
            last.prompt_tokens if last is not None else 0,
            (time.monotonic() - began) * 1000,
            queue_ms,
            ok,
        )
        if self.replica.state == "draining":
            self.runtime._wake.set()


class DeploymentRuntime:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = get_settings()
        self.clock = clock
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._starts: dict[Replica, Future[None]] = {}
        self._wake = threading.Event()
        self._dirty = True
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="replica")
        self._spare: Spare | None = None
        self._spare_after = 0.0  # no spare before this time (the runtime's clock)
        self._synced_at = -math.inf
        self._polled_at = -math.inf
        self._last_tick = clock()
        self._cpu: dict[int, Any] = {}  # pid -> psutil.Process, for CPU utilization
        self.log_dir = self.settings.data_dir / "deployments"
        self.metrics = DeploymentMetrics(self.settings.deployment_metrics_interval)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.metrics.collector(self.gauges))

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "DeploymentRuntime":
        self._thread = threading.Thread(target=self._run, name="deployments", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the loop and every replica (and the spare)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        """For GET /health: whether the loop that keeps the replicas runs (no deployment names: /health is public)."""
        with self._lock:
            ready = sum(1 for live in self._live.values() for r in live.replicas if r.state == "ready")
        running = self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
        return {"status": "ok" if running else "degraded", "ready_replicas": ready}

    def notify(self) -> None:
        """A row changed (created, updated, stopped, deleted): look at once."""
        self._dirty = True
        self._wake.set()

    def _run(self) -> None:
        tick = self.settings.deployment_tick_seconds
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("deployment runtime tick failed")
            self._wake.wait(tick)
            self._wake.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            replicas = [(live, r) for live in self._live.values() for r in live.replicas]
        for _, r in replicas:
            if r.alive():
                r.process.terminate()  # type: ignore[union-attr]
        now = self.clock()
        for live, r in replicas:
            r.stop_process(timeout=10)
            self._meter(live, r, now)
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        effects: list[Callable[[], None]] = []
        with self._lock:
            for live in self._live.values():
                live.replicas.clear()
                if live.status in (READY, UPDATING, INITIALIZING):
                    self._transition(live, STANDBY, "the API process stopped, and its replicas with it", effects)
        for effect in effects:
            try:
                effect()
            except Exception:  # noqa: BLE001 - the database may be gone already (tests drop it)
                log.warning("could not record a deployment's status at shutdown", exc_info=True)

    # ---- the tick ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self.clock()
        if self._dirty or now - self._synced_at >= SYNC_SECONDS:
            self._dirty = False
            self._sync(now)
        effects: list[Callable[[], None]] = []
        with self._lock:
            for live in list(self._live.values()):
                self._reconcile(live, now, effects)
        for effect in effects:  # database writes, outside the lock the requests take
            effect()
        self._meter_due(now)
        self._sample(now)
        self._keep_spare()
        self._poll_health(now)
        self._last_tick = now

    def _sync(self, now: float) -> None:
        with session_scope() as s:
            rows = s.scalars(select(Deployment).where(Deployment.status != DELETED)).all()
            seen = set()
            with self._lock:
                for row in rows:
                    seen.add(row.id)
                    self._adopt(row, now)
                for gone in [k for k in self._live if k not in seen]:  # removed with their tenant
                    live = self._live[gone]
                    live.target_state = "deleted"
        self._synced_at = now

    def _adopt(self, row: Deployment, now: float) -> None:
        scaling = ScalingConfig(row.min_replicas, row.max_replicas, row.scale_up_threshold, row.cooldown_time)
        live = self._live.get(row.id)
        if live is None:
            live = _Live(
                id=row.id,
                tenant_id=row.tenant_id,
                name=row.name,
                base_model=row.base_model,
                accelerator=row.accelerator,
                engine=row.engine,
                scaling=scaling,
                config_version=row.config_version,
                preloaded=list(row.preloaded_adapters or []),
                target_state=row.target_state,
                status=row.status,
                status_reason=row.status_reason,
                memory=ScalerMemory(now),
            )
            if row.status in (READY, INITIALIZING, UPDATING):
                live.hint = "the API process started with no replica up"
            self._live[row.id] = live
            return
        live.scaling = scaling
        live.accelerator, live.engine, live.preloaded = row.accelerator, row.engine, list(row.preloaded_adapters or [])
        if row.config_version != live.config_version:
            live.config_version = row.config_version
            live.no_start_before = 0.0
            live.hint = "config changed: replacing replicas one at a time"
        live.target_state = row.target_state
        if live.status in (ERRORED, STOPPED) and row.status not in (ERRORED, STOPPED):
            live.status, live.status_reason = row.status, row.status_reason  # moved to Standby through the API
            live.no_start_before = 0.0

    def _reconcile(self, live: _Live, now: float, effects: list[Callable[[], None]]) -> None:
        self._collect_starts(live, now, effects)
        self._reap_dead(live, now, effects)
        self._stop_drained(live, now)
        desired = self._desired(live, now)
        self._apply(live, desired, now)
        self._update_status(live, effects)

    def _collect_starts(self, live: _Live, now: float, effects: list[Callable[[], None]]) -> None:
        for r, future in [(r, f) for r, f in self._starts.items() if r.deployment_id == live.id and f.done()]:
            del self._starts[r]
            error = future.exception()
            if r.state != "starting":  # drained while it started: it is being stopped
                continue
            if error is None:
                r.state, r.ready_at = "ready", now
                live.hint = f"replica {r.id} ready after {now - r.spawned_at:.1f} s"
                if live.wake_from is not None:
                    self._record_cold_start(live, r, now, effects)
                continue
            r.state, r.error = "failed", str(error)
            live.replicas.remove(r)
            reason = f"replica {r.id} failed to start: {error}"
            log.warning("deployment %s: %s", live.name, reason)
            if not any(x.state == "ready" for x in live.replicas):
                live.hint = reason
                live.status_reason = reason
                self._transition(live, ERRORED, reason, effects)
                live.wake_from = None
            else:
                live.no_start_before = now + FAILED_START_BACKOFF
                live.status_reason = reason

    def _record_cold_start(self, live: _Live, r: Replica, now: float, effects: list[Callable[[], None]]) -> None:
        assert live.wake_from is not None
        seconds = now - live.wake_from
        live.wake_from = None
        record = {"at": utcnow().isoformat(), "seconds": round(seconds, 3), "replica": r.id, "prewarmed": r.prewarmed}
        record |= r.timings
        self.metrics.cold_start(live.id, record)
        live.hint = (
            f"replica {r.id} ready: cold start {seconds:.1f} s ({'pre-warmed' if r.prewarmed else 'new'} process)"
        )
        ms = int(seconds * 1000)

        def write() -> None:
            with session_scope() as s:
                row = s.get(Deployment, live.id)
                if row is not None:
                    row.cold_start_ms = ms

        effects.append(write)

    def _reap_dead(self, live: _Live, now: float, effects: list[Callable[[], None]]) -> None:
        for r in [r for r in live.replicas if r.state in ("ready", "draining") and not r.alive()]:
            live.replicas.remove(r)
            self._meter(live, r, now)
            reason = f"replica {r.id} exited with code {r.exit_code()} ({r.error or r.last_error()})"
            if live.target_state == "active" and r.state == "ready":
                reason += "; replacing it"
            log.warning("deployment %s: %s", live.name, reason)
            live.hint = reason
            live.status_reason = reason
            r.state = "stopped"

    def _poll_health(self, now: float) -> None:
        """Every engine_health_interval, ask each ready replica's GET /health, on pool threads: the tick must not wait
        for a hung one. A replica unhealthy UNHEALTHY_POLLS polls in a row is stopped, and `_reap_dead` replaces it
        as it replaces one that died."""
        if now - self._polled_at < self.settings.engine_health_interval:
            return
        self._polled_at = now
        with self._lock:
            due = [r for live in self._live.values() for r in live.replicas if r.state == "ready" and not r.polling]
            for r in due:
                r.polling = True
        for r in due:
            self._pool.submit(self._poll_replica, r)

    def _poll_replica(self, r: Replica) -> None:
        try:
            assert r.engine is not None
            ok, reason = r.engine.healthy()
            r.failed_polls = 0 if ok else r.failed_polls + 1
            if r.failed_polls >= UNHEALTHY_POLLS and r.state == "ready" and r.alive():
                r.error = f"stopped: unhealthy {r.failed_polls} health polls in a row: {reason}"
                log.warning("replica %s %s", r.id, r.error)
                r.stop_process(timeout=STOP_GRACE_SECONDS)
                self._wake.set()
        finally:
            r.polling = False

    def _stop_drained(self, live: _Live, now: float) -> None:
        timeout = self.settings.deployment_drain_timeout
        for r in [r for r in live.replicas if r.state == "draining"]:
            if r.in_flight == 0 or (r.drain_since is not None and now - r.drain_since > timeout):
                r.state = "stopping"
                self._pool.submit(self._stop_replica, live, r)

    def _stop_replica(self, live: _Live, r: Replica) -> None:
        r.stop_process()
        with self._lock:
            if r in live.replicas:
                live.replicas.remove(r)
            r.state = "stopped"
        self._meter(live, r, self.clock())
        self._wake.set()

    def _desired(self, live: _Live, now: float) -> int:
        if live.target_state != "active" or live.status in (ERRORED, STOPPED):
            return 0
        up = live.up()
        old = [r for r in up if r.config_version != live.config_version]
        new = [r for r in up if r.config_version == live.config_version]
        paired = set(map(id, old[: len(new)]))  # old replicas a new one is replacing: not counted twice
        views = tuple(
            ReplicaView(r.id, "draining" if r.state == "draining" or id(r) in paired else r.state, r.in_flight)
            for r in live.replicas
            if r.state in ("starting", "ready", "draining")
        )
        decision = decide(live.scaling, views, live.waiting, live.memory, now)
        current = sum(1 for v in views if v.state != "draining")
        if decision.target != current:
            live.hint = live.hint or decision.reason  # a replica's death or readiness this tick says more
            live.scaled = (decision.target, decision.reason)
        live.memory = decision.memory
        return decision.target

    def _apply(self, live: _Live, desired: int, now: float) -> None:
        up = live.up()
        new = [r for r in up if r.config_version == live.config_version]
        old = [r for r in up if r.config_version != live.config_version]
        if desired == 0:
            for r in up:
                self._drain(r, now)
            return
        can_start = now >= live.no_start_before and live.target_state == "active"
        if old:  # rolling: one new replica at a time; an old one drains once a new one is ready
            if can_start and len(new) < desired and not any(r.state == "starting" for r in new):
                self._start(live, now)
        elif can_start:
            for _ in range(desired - len(new)):
                self._start(live, now)
        for r in _drain_order(new)[: max(0, len(new) - desired)]:
            self._drain(r, now)
        ready_new = sum(1 for r in live.up() if r.config_version == live.config_version and r.state == "ready")
        for r in _drain_order(old)[: max(0, len(old) - max(0, desired - ready_new))]:
            self._drain(r, now)

    def _drain(self, r: Replica, now: float) -> None:
        if r.state in ("starting", "ready"):
            r.state, r.drain_since = "draining", now

    def _start(self, live: _Live, now: float) -> None:
        number = live.next_number
        live.next_number += 1
        replica_id = f"{live.name}-r{number}"
        log_path = self.log_dir / live.id / f"{replica_id}-{secrets.token_hex(3)}.log"
        r = Replica(replica_id, live.id, live.base_model, live.config_version, log_path, spawned_at=now, metered_at=now)
        spare, self._spare = self._spare, None
        try:
            r.spawn(replica_env(live.engine, live.accelerator, live.scaling.max_replicas), spare)
        except OSError as exc:
            live.status_reason = f"replica {replica_id} could not be spawned: {exc}"
            live.no_start_before = now + FAILED_START_BACKOFF
            return
        live.replicas.append(r)
        if live.waiting and not any(x.state == "ready" for x in live.replicas) and live.wake_from is None:
            live.wake_from = now
        preload = list(live.preloaded)
        self._starts[r] = self._pool.submit(self._wait_ready, live.tenant_id, r, preload)

    def _wait_ready(self, tenant_id: str, r: Replica, preload: list[str]) -> None:
        refs = []
        if preload:
            with session_scope() as s:
                for name in preload:
                    weights = checkpoints.find(s, tenant_id, name)
                    if weights is None:
                        r.stop_process()
                        raise ReplicaFailed(f"preloaded adapter {name!r} no longer exists")
                    refs.append(AdapterRef(weights.key, weights.path, weights.base_model))
        r.wait_ready(self.settings.engine_start_timeout, refs)
        with self._lock:
            live = self._live.get(r.deployment_id)
            if live is not None:
                for ref, name in zip(refs, preload, strict=True):
                    live.adapter_names[ref.key] = name
        self._wake.set()

    def _update_status(self, live: _Live, effects: list[Callable[[], None]]) -> None:
        status = self._derived_status(live)
        scaled, live.scaled = live.scaled, None
        hint, live.hint = live.hint, ""  # hints explain what happened in this tick only
        if status is not None and status != live.status:
            reason = hint or _default_reason(status, live)
            self._transition(live, status, reason, effects, scaled[0] if scaled else None)
        elif scaled is not None and live.status not in (ERRORED, STOPPED, DELETED):
            self._transition(live, live.status, scaled[1], effects, scaled[0])  # a scaling event
        if status == DELETED and not live.replicas:
            del self._live[live.id]
            self.metrics.forget(live.id)
            return
        count = sum(1 for r in live.replicas if r.state in ("ready", "draining"))
        if count != live.replicas_written:
            live.replicas_written = count

            def write() -> None:
                with session_scope() as s:
                    row = s.get(Deployment, live.id)
                    if row is not None:
                        row.replicas = count

            effects.append(write)

    def _derived_status(self, live: _Live) -> str | None:
        if live.target_state == "deleted":
            return DELETED if not live.replicas else None
        if live.target_state == "stopped":
            return STOPPED if not live.replicas else None
        if live.status in (ERRORED, STOPPED):
            return None
        ready = [r for r in live.replicas if r.state == "ready"]
        starting = [r for r in live.replicas if r.state == "starting"]
        if ready:
            rolling = any(r.config_version != live.config_version for r in live.up())
            return UPDATING if rolling else READY
        if starting:
            return INITIALIZING
        return STANDBY

    def _transition(
        self, live: _Live, status: str, reason: str, effects: list[Callable[[], None]], replicas: int | None = None
    ) -> None:
        before = live.status
        live.status = status
        live.status_reason = reason
        log.info("deployment %s: %s -> %s (%s)", live.name, before, status, reason)

        def write() -> None:
            with session_scope() as s:
                row = s.get(Deployment, live.id)
                if row is None:
                    return
                s.add(
                    DeploymentTransition(
                        deployment_id=live.id, from_status=before, to_status=status, reason=reason, replicas=replicas
                    )
                )
                row.status, row.status_reason = status, reason
                if status == DELETED:
                    row.deleted_at = utcnow()
                    row.replicas = 0

        effects.append(write)

    # ---- metering and health figures -------------------------------------------------------------------

    def _meter_due(self, now: float) -> None:
        every = self.settings.deployment_metering_seconds
        with self._lock:
            due = [
                (live, r)
                for live in self._live.values()
                for r in live.replicas
                if r.ready_at is not None and now - r.metered_at >= every
            ]
        for live, r in due:
            self._meter(live, r, now)

    def _meter(self, live: _Live, r: Replica, until: float) -> None:
        """Write the replica's time since its last record to the ledger (replicas that never became ready are
        not billed). Idempotent per (replica, period)."""
        if r.ready_at is None:
            return
        ms = int((until - r.metered_at) * 1000)
        if ms <= 0:
            return
        period = r.metered_periods
        r.metered_at, r.metered_periods = until, period + 1
        try:
            with session_scope() as s:
                amount = replica_price(s, live.tenant_id, live.accelerator, ms)
                ledger.record(
                    s,
                    ledger.Usage(
                        idempotency_key=f"replica:{r.log_path.stem}:{period}",
                        tenant_id=live.tenant_id,
                        kind="deployment",
                        technique="replica",
                        base_model=live.base_model,
                        compute_ms=ms,
                        accelerator=live.accelerator,
                        amount_micro_usd=amount,
                        reference=live.id,
                    ),
                )
        except Exception:  # noqa: BLE001 - a failed write is retried with the next period's time
            r.metered_at, r.metered_periods = r.metered_at - ms / 1000, period
            log.exception("metering replica %s failed", r.id)

    def _sample(self, now: float) -> None:
        seconds = max(0.0, now - self._last_tick)
        with self._lock:
            figures = []
            for live in self._live.values():
                serving = [r for r in live.replicas if r.state in ("ready", "draining")]
                figures.append((live.id, len(serving), sum(1 for r in serving if r.in_flight > 0), serving))
        for deployment_id, count, busy, serving in figures:
            cpu = self._cpu_fraction(serving)
            self.metrics.sample(deployment_id, count, busy, cpu, seconds)

    def _cpu_fraction(self, replicas: list[Replica]) -> float | None:
        """The replicas' CPU use as a share of the machine's cores (psutil; None where it cannot tell)."""
        try:
            import psutil
        except ImportError:
            return None
        total, cores = 0.0, psutil.cpu_count() or 1
        for r in replicas:
            pid = r.pid
            if pid is None:
                continue
            process = self._cpu.get(pid)
            try:
                if process is None:
                    process = self._cpu[pid] = psutil.Process(pid)
                    process.cpu_percent(None)  # the first call starts the measurement
                    continue
                total += process.cpu_percent(None)
            except psutil.Error:
                self._cpu.pop(pid, None)
        return round(total / 100 / cores, 4) if replicas else 0.0

    def _keep_spare(self) -> None:
        """One pre-warmed interpreter while some deployment may need a replica, spawned when no replica is
        loading (it would slow that one down on a small machine)."""
        if not self.settings.deployment_prewarm:
            return
        with self._lock:
            wanted = any(
                live.target_state == "active" and live.status not in (ERRORED, STOPPED) for live in self._live.values()
            )
            starting = bool(self._starts)
        now = self.clock()
        if starting:
            self._spare_after = now + SPARE_QUIET_SECONDS
        if self._spare is not None and (not self._spare.alive() or not wanted):
            self._spare.discard()
            self._spare = None
        if wanted and self._spare is None and now >= self._spare_after and not self._stopping.is_set():
            self._spare = Spare(self.log_dir / "spares")

    # ---- the request path ----------------------------------------------------------------------------

    async def acquire(self, deployment_id: str, adapter: AdapterRef | None, adapter_name: str | None) -> Lease:
        """A replica for one request: at once when one is ready, else after waiting (bounded) for one to start."""
        began = self.clock()
        timeout = self.settings.deployment_wake_timeout
        registered: _Live | None = None
        key = adapter.key if adapter is not None else None
        try:
            while True:
                with self._lock:
                    live = self._live.get(deployment_id)
                    if live is None:
                        self._dirty = True  # created a moment ago: not read yet
                    else:
                        refusal = serving_refusal(live.name, live.status, live.target_state, live.status_reason)
                        if refusal is not None:
                            raise refusal
                        lease = self._take(live, key, adapter_name, began)
                        if lease is not None:
                            return lease
                        if registered is None:
                            registered = live
                            live.waiting += 1
                            if live.wake_from is None and not any(r.state == "ready" for r in live.replicas):
                                live.wake_from = began
                self._wake.set()
                if self.clock() - began > timeout:
                    raise Unavailable(
                        f"no replica of the deployment became ready within {timeout:.0f} s; try again",
                        code="deployment_starting",
                        retry_after=5,
                    )
                await asyncio.sleep(WAIT_POLL)
        finally:
            if registered is not None:
                with self._lock:
                    registered.waiting -= 1

    def _take(self, live: _Live, key: str | None, adapter_name: str | None, began: float) -> Lease | None:
        ready = [r for r in live.replicas if r.state == "ready"]
        chosen = pick(
            [Candidate(r.id, r.in_flight, frozenset(r.adapters), r.order) for r in ready],
            key,
            live.scaling.scale_up_threshold,
        )
        if chosen is None:
            return None
        replica = next(r for r in ready if r.id == chosen.id)
        replica.in_flight += 1
        replica.served += 1
        replica.note_adapter(key, self.settings.adapter_cache_size)
        if key is not None and adapter_name is not None:
            live.adapter_names[key] = adapter_name
        return Lease(self, live.id, replica, (self.clock() - began) * 1000)

    # ---- reading -------------------------------------------------------------------------------------

    def describe(self, deployment_id: str) -> dict[str, Any]:
        """Live replicas and load, for GET /v1/deployments/{name}."""
        now = self.clock()
        with self._lock:
            live = self._live.get(deployment_id)
            if live is None:
                return {"replicas": [], "in_flight": 0, "waiting": 0}
            return {
                "replicas": [
                    {
                        "id": r.id,
                        "state": r.state,
                        "in_flight": r.in_flight,
                        "served": r.served,
                        "adapters": [live.adapter_names.get(k, "(loaded)") for k in r.adapters],
                        "config_version": r.config_version,
                        "prewarmed": r.prewarmed,
                        "up_seconds": round(now - r.spawned_at, 1),
                        "start_seconds": round(r.ready_at - r.spawned_at, 3) if r.ready_at is not None else None,
                    }
                    for r in live.replicas
                    if r.state in ("starting", "ready", "draining", "stopping")
                ],
                "in_flight": sum(r.in_flight for r in live.replicas),
                "waiting": live.waiting,
            }

    def gauges(self) -> list[Gauges]:
        with self._lock:
            out = []
            for live in self._live.values():
                states: dict[str, int] = {}
                for r in live.replicas:
                    states[r.state] = states.get(r.state, 0) + 1
                out.append(
                    Gauges(
                        live.id,
                        live.name,
                        live.tenant_id,
                        live.accelerator,
                        live.status,
                        states,
                        sum(r.in_flight for r in live.replicas),
                        live.waiting,
                    )
                )
            return out

    def replica_pids(self, deployment_id: str) -> list[int]:
        with self._lock:
            live = self._live.get(deployment_id)
            return [r.pid for r in live.replicas if r.pid is not None and r.state == "ready"] if live else []


class DeploymentEngine:
    """The Engine protocol over a deployment's replicas, so the OpenAI-compatible handlers serve deployments
    exactly as they serve shared endpoints: `generate` leases a replica (waking the deployment if it is in
    Standby), streams from it, and gives it back."""

    def __init__(
        self, runtime: DeploymentRuntime, deployment_id: str, base_model: str, tokenizer: Any, context_length: int
    ) -> None:
        self.runtime, self.deployment_id = runtime, deployment_id
        self.base_model, self.tokenizer, self.context_length = base_model, tokenizer, context_length
        self.adapter_name: str | None = None

    def count_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))

    def stats(self) -> dict:
        return self.runtime.describe(self.deployment_id)

    def healthy(self) -> tuple[bool, str]:
        """Always: its replicas' health is the runtime's to watch, and it replaces one that is not healthy."""
        return True, ""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        began = time.monotonic()
        lease = await self.runtime.acquire(self.deployment_id, request.adapter, self.adapter_name)
        assert lease.replica.engine is not None
        last: Delta | None = None
        ok = False
        try:
            async for delta in lease.replica.engine.generate(request):
                last = delta
                yield delta
            ok = True
        except GeneratorExit:  # the client went away: not the replica's failure
            ok = True
            raise
        finally:
            lease.release(self.adapter_name, last, ok, began)


def replica_price(session: Any, tenant_id: str, accelerator: str, milliseconds: int) -> int:
    """The tenant's price of `milliseconds` of one replica; a CPU replica at LORAPLEX_CPU_REPLICA_MICRO_USD_PER_HOUR
    unless the tenant's own price table names a CPU rate."""
    book = ledger.price_book(session, tenant_id)
    account = session.get(BillingAccount, tenant_id)
    own = ((account.prices or {}).get("accelerator_per_hour") or {}) if account is not None else {}
    if accelerator == "cpu" and "cpu" not in own:
        rates = {**book.accelerator_per_hour, "cpu": get_settings().cpu_replica_micro_usd_per_hour}
        book = replace(book, accelerator_per_hour=rates)
    return book.deployment(accelerator, milliseconds)


def _drain_order(replicas: list[Replica]) -> list[Replica]:
    """Which to drain first: replicas still starting (no traffic yet), then the least loaded, newest first."""
    return sorted(replicas, key=lambda r: (r.state != "starting", r.in_flight, -r.order))


def _default_reason(status: str, live: _Live) -> str:
    return {
        STANDBY: "no replica up: scales up on the next request" if live.scaling.min_replicas == 0 else "no replica up",
        READY: "a replica is up",
        INITIALIZING: "starting the first replica",
        UPDATING: "config changed: replacing replicas one at a time",
        STOPPED: "stopped: every replica drained",
        DELETED: "deleted: every replica drained",
    }.get(status, status)
