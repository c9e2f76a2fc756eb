"""The deployment manager of the embedded runtime: runs in every API process (a thread started by web/main.py's
lifespan); the one holding the deployments lease (app/control_lease.py) owns every replica process.

Each tick (LORAPLEX_DEPLOYMENT_TICK_SECONDS) it takes or renews the lease; holding it, it
  1. reads the deployment rows when the API changed one (and every few seconds regardless),
  2. per deployment: takes in replicas that finished starting, notices dead ones, stops drained ones, asks the
     autoscaler for a replica count, starts or drains replicas to reach it (rolling old-config replicas one at a
     time: a new one starts, takes traffic, then an old one drains), and derives the status, recording every
     transition with its reason,
  3. writes replica time to the ledger, samples the health figures, and keeps one pre-warmed interpreter ready;
     every LORAPLEX_CREDIT_CHECK_SECONDS it holds the deployments of tenants that cannot pay (suspension.py),
  4. publishes its replicas (records.py) and reads the other processes' load reports into the autoscaler's figures.
Every process, holder or not, then reports its own load and adds the health figures it gathered to the rows.

Requests reach replicas through `acquire`: the holder's own (leases.py), or, in the other processes, the replicas
the holder published (remote_leases.py). `DeploymentEngine` is the Engine protocol over that, so the
OpenAI-compatible handlers serve a deployment exactly as they serve a shared endpoint. The database rows are the
truth for what tenants asked (config, target_state) and, through the holder, for what runs: N API processes run
one set of replicas, and answer the same figures.
"""

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select

from app.control_lease import Lease as ControlLease
from app.control_lease import this_process
from app.db import session_scope
from app.models import Deployment
from app.settings import get_settings
from functions.deployments import containers, peers, records, snapshot, suspension
from functions.deployments.autoscaler import ReplicaView, ScalingConfig, decide
from functions.deployments.leases import Lease, Leasing
from functions.deployments.lifecycle import Lifecycle, drain, drain_order
from functions.deployments.live import Effects, Fleet, Live, set_columns
from functions.deployments.metering import meter_due
from functions.deployments.metrics import DeploymentMetrics, Gauges
from functions.deployments.prewarm import Prewarm
from functions.deployments.remote_leases import RemoteLease, RemoteLeasing
from functions.deployments.sampling import Sampler
from functions.deployments.status import (
    DELETED,
    ERRORED,
    INITIALIZING,
    READY,
    STANDBY,
    STOPPED,
    UPDATING,
    settle,
    transition,
)
from functions.engine.protocol import AdapterRef, Delta, Engine, GenerationRequest
from functions.prompts import encode_text

log = logging.getLogger(__name__)
SYNC_SECONDS = 2.0  # the rows are re-read at least this often (changes made by another process, the CLI)
FIRST_TICK_SECONDS = 10.0  # a request arriving at start waits this long at most for the loop's first look


class DeploymentRuntime:
    """The loop over the fleet (live.py): its replicas' lifecycle, leases, metering, samples and spare are each
    their own module's; `clock` is monotonic seconds (tests pass their own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = get_settings()
        self.clock = clock
        self.fleet = Fleet()
        self.metrics = DeploymentMetrics(self.settings.deployments.deployment_metrics_interval)
        self.log_dir = self.settings.data_dir / "deployments"
        self.prewarm = Prewarm(self.log_dir / "spares")
        self.lifecycle = Lifecycle(self.fleet, self.settings, clock, self.metrics, self.prewarm, self.log_dir)
        self.sampler = Sampler(self.fleet, self.metrics)
        self.leasing = Leasing(
            self.fleet,
            self.metrics,
            clock,
            self.settings.deployments.deployment_wake_timeout,
            self.settings.engine.adapter_cache_size,
        )
        self.me = this_process()
        self.lease = ControlLease("deployments", self.me, self.settings.deployments.deployment_lease_seconds)
        self.holding = False  # whether this process ran the replicas at its last tick
        self.published = records.Published(self.me)
        self.reports = records.Reports(self.me)
        self.remote = RemoteLeasing(
            self.metrics,
            self.fleet.wake,
            self.settings.deployments.deployment_wake_timeout,
            self.settings.engine.adapter_cache_size,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.metrics.collector(self.gauges))
        self._ticked = threading.Event()  # set after the first tick: whether this process holds the lease is known
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced_at = -math.inf
        self._credit_checked_at = -math.inf
        self._last_tick = clock()

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "DeploymentRuntime":
        self._thread = threading.Thread(target=self._run, name="deployments", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the loop and every replica (and the spare)."""
        self._stopping.set()
        self.fleet.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.lifecycle.pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        """For GET /health: whether the loop runs, and whether this process runs the replicas (role "holder") or
        serves through the holder's ("follower"); no deployment names: /health is public."""
        with self.fleet.lock:
            ready = sum(1 for live in self.fleet.deployments.values() for r in live.replicas if r.state == "ready")
        running = self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
        role = "holder" if self.holding else "follower"
        return {"status": "ok" if running else "degraded", "role": role, "ready_replicas": ready}

    def notify(self) -> None:
        """A row changed (created, updated, stopped, deleted): look at once."""
        self.fleet.dirty = True
        self.fleet.wake.set()

    def _run(self) -> None:
        tick = self.settings.deployments.deployment_tick_seconds
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("deployment runtime tick failed")
            self.fleet.wake.wait(tick)
            self.fleet.wake.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        """Stop this process's replicas and record it; give the lease up so another process takes over at once."""
        self.lifecycle.stop_all()
        effects: Effects = []
        with self.fleet.lock:
            for live in self.fleet.deployments.values():
                live.replicas.clear()
                if live.status in (READY, UPDATING, INITIALIZING):
                    transition(live, STANDBY, "the API process stopped, and its replicas with it", effects)
        if self.holding:
            effects += [lambda: self.published.publish([]), self.lease.release]
        effects += [self.reports.withdraw, self.metrics.flush]
        for effect in effects:
            try:
                effect()
            except Exception:  # noqa: BLE001 - the database may be gone already (tests drop it)
                log.warning("could not record the deployments' state at shutdown", exc_info=True)

    # ---- the tick ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self.clock()
        holding = self.lease.hold()
        if holding and not self.holding:
            self._take_over()
        elif self.holding and not holding:
            self._step_down()
        self.holding = holding
        if holding:
            self._run_replicas(now)
        self.reports.write(peers.loads(self.fleet, self.remote))
        self.metrics.flush()
        self._ticked.set()
        self._last_tick = now

    def _take_over(self) -> None:
        """This process now runs the replicas: those of the process that ran them before died with it (or were
        stopped when it lost the lease), so their rows are closed, stopped and billed as of their last heartbeat
        (containers.meter: never twice); the deployments are read afresh."""
        for row in records.orphans(self.me):
            records.retire(row.id, f"its API process ({row.holder}) stopped running the deployments")
            containers.meter(row.id, row.heartbeat_at)
        self.fleet.dirty = True
        log.info("this process (%s) runs the deployments' replicas now", self.me)

    def _step_down(self) -> None:
        """Another process took the lease (this one stalled past it): its replicas are that one's to run now."""
        log.warning("the deployments lease went to another process; stopping this process's replicas")
        self.lifecycle.stop_all(meter_them=False)  # the new holder bills them up to their last heartbeat
        with self.fleet.lock:
            self.fleet.deployments.clear()
        self.published.publish([])

    def _run_replicas(self, now: float) -> None:
        """The holder's part of a tick."""
        if now - self._credit_checked_at >= self.settings.billing.credit_check_seconds:
            self._credit_checked_at = now
            self.fleet.dirty |= suspension.check()  # tenants that cannot pay: their deployments held (or released)
        if self.fleet.dirty or now - self._synced_at >= SYNC_SECONDS:
            self.fleet.dirty = False
            self._sync(now)
        effects: Effects = []
        with self.fleet.lock:
            for live in list(self.fleet.deployments.values()):
                self._reconcile(live, now, effects)
        # The replicas' rows first: a status this tick writes (Ready after a roll) never shows beside rows of the
        # replicas it replaced.
        peers.publish(self.fleet, self.published)
        for effect in effects:  # database writes, outside the lock the requests take
            effect()
        meter_due(self.fleet, now, self.settings.deployments.deployment_metering_seconds)
        self.sampler.sample(max(0.0, now - self._last_tick))
        self._keep_spare()
        self.lifecycle.poll_health(now)
        peers.merge_reports(self.fleet, records.others(self.me), now, self.settings.engine.adapter_cache_size)
        self.metrics.prune()

    def _sync(self, now: float) -> None:
        with session_scope() as s:
            rows = s.scalars(select(Deployment).where(Deployment.status != DELETED)).all()
            seen = set()
            with self.fleet.lock:
                for row in rows:
                    seen.add(row.id)
                    self._adopt(row, now)
                for gone in [k for k in self.fleet.deployments if k not in seen]:  # removed with their tenant
                    self.fleet.deployments[gone].target_state = "deleted"
        self._synced_at = now

    def _adopt(self, row: Deployment, now: float) -> None:
        scaling = ScalingConfig(row.min_replicas, row.max_replicas, row.scale_up_threshold, row.cooldown_time)
        live = self.fleet.deployments.get(row.id)
        if live is None:
            live = Live.of_row(row, now)
            live.replicas_written = -1  # this process has written no count yet
            if row.status in (READY, INITIALIZING, UPDATING):
                live.hint = "the API process started with no replica up"
            self.fleet.deployments[row.id] = live
            return
        live.scaling = scaling
        live.accelerator, live.engine, live.preloaded = row.accelerator, row.engine, list(row.preloaded_adapters or [])
        if row.config_version != live.config_version:
            live.config_version = row.config_version
            live.no_start_before = 0.0
            live.hint = "config changed: replacing replicas one at a time"
        live.target_state = row.target_state
        live.suspended = row.suspended_reason
        if live.status in (ERRORED, STOPPED) and row.status not in (ERRORED, STOPPED):
            live.status, live.status_reason = row.status, row.status_reason  # moved to Standby through the API
            live.no_start_before = 0.0

    def _reconcile(self, live: Live, now: float, effects: Effects) -> None:
        self.lifecycle.collect_starts(live, now, effects)
        self.lifecycle.reap_dead(live, now)
        self.lifecycle.stop_drained(live, now)
        held = suspension.apply(live, effects)  # its tenant cannot pay: no replica
        desired = 0 if held else self._desired(live, now)
        self._apply(live, desired, now)
        status = settle(live, effects)
        if status == DELETED and not live.replicas:
            del self.fleet.deployments[live.id]
            effects.append(functools.partial(self.metrics.forget, live.id))
            return
        self._write_replica_count(live, effects)

    def _desired(self, live: Live, now: float) -> int:
        """The autoscaler's replica count (0 for a deployment stopped, deleted or Errored)."""
        if live.target_state != "active" or live.status in (ERRORED, STOPPED):
            return 0
        up = live.up()
        old = [r for r in up if r.config_version != live.config_version]
        new = [r for r in up if r.config_version == live.config_version]
        paired = set(map(id, old[: len(new)]))  # old replicas a new one is replacing: not counted twice
        views = tuple(
            ReplicaView(r.id, "draining" if r.state == "draining" or id(r) in paired else r.state, r.load)
            for r in live.replicas
            if r.state in ("starting", "ready", "draining")
        )
        decision = decide(live.scaling, views, live.waiting + live.remote_waiting, live.memory, now)
        current = sum(1 for v in views if v.state != "draining")
        if decision.target != current:
            live.hint = live.hint or decision.reason  # a replica's death or readiness this tick says more
            live.scaled = (decision.target, decision.reason)
        live.memory = decision.memory
        return decision.target

    def _apply(self, live: Live, desired: int, now: float) -> None:
        """Start or drain replicas towards `desired`; while old-config replicas run, roll them one at a time."""
        up = live.up()
        new = [r for r in up if r.config_version == live.config_version]
        old = [r for r in up if r.config_version != live.config_version]
        if desired == 0:
            for r in up:
                drain(r, now)
            return
        can_start = now >= live.no_start_before and live.target_state == "active"
        if old:  # rolling: one new replica at a time; an old one drains once a new one is ready
            if can_start and len(new) < desired and not any(r.state == "starting" for r in new):
                self.lifecycle.start(live, now)
        elif can_start:
            for _ in range(desired - len(new)):
                self.lifecycle.start(live, now)
        for r in drain_order(new)[: max(0, len(new) - desired)]:
            drain(r, now)
        ready_new = sum(1 for r in live.up() if r.config_version == live.config_version and r.state == "ready")
        for r in drain_order(old)[: max(0, len(old) - max(0, desired - ready_new))]:
            drain(r, now)

    def _write_replica_count(self, live: Live, effects: Effects) -> None:
        """The row's `replicas` (ready or draining), written when it changed."""
        count = sum(1 for r in live.replicas if r.state in ("ready", "draining"))
        if count == live.replicas_written:
            return
        live.replicas_written = count
        set_columns(effects, live.id, replicas=count)

    def _keep_spare(self) -> None:
        """One pre-warmed interpreter while some deployment may need a replica (prewarm.py)."""
        if not self.settings.deployments.deployment_prewarm:
            return
        with self.fleet.lock:
            wanted = any(
                live.target_state == "active" and live.status not in (ERRORED, STOPPED) and live.held is None
                for live in self.fleet.deployments.values()
            )
            starting = bool(self.lifecycle.starts)
        self.prewarm.keep(wanted, starting, self.clock(), self._stopping.is_set())

    # ---- the request path and reading ------------------------------------------------------------------

    async def acquire(
        self, deployment_id: str, adapter: AdapterRef | None, adapter_name: str | None
    ) -> Lease | RemoteLease:
        """A replica for one request: at once when one is ready, else after waiting for one to start; this
        process's own (leases.py) while it holds the lease, else one the holder published (remote_leases.py)."""
        waited = 0.0
        while not self._ticked.is_set() and waited < FIRST_TICK_SECONDS:
            await asyncio.sleep(0.02)
            waited += 0.02
        while True:
            if self.holding:
                return await self.leasing.acquire(deployment_id, adapter, adapter_name)
            lease = await self.remote.acquire(deployment_id, adapter, adapter_name, lambda: self.holding)
            if lease is not None:
                return lease

    def describe(self, deployment_id: str) -> dict[str, Any]:
        """The replicas that run and the load, for GET /v1/deployments/{name}: from the rows, so the same from
        every API process."""
        return records.describe(deployment_id)

    def gauges(self) -> list[Gauges]:
        """For Prometheus, from the rows (records.py)."""
        return records.gauges()

    def replica_pids(self, deployment_id: str) -> list[int]:
        """The process ids of the deployment's ready replicas, when this process runs them."""
        return snapshot.replica_pids(self.fleet, deployment_id)


class DeploymentEngine(Engine):
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

    def close(self) -> None:
        """Nothing to stop: the runtime owns the replicas; this object lives for one request."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        began = time.monotonic()
        lease = await self.runtime.acquire(self.deployment_id, request.adapter, self.adapter_name)
        last: Delta | None = None
        ok = False
        try:
            async for delta in lease.engine.generate(request):
                last = delta
                yield delta
            ok = True
        except GeneratorExit:  # the client went away: not the replica's failure
            ok = True
            raise
        finally:
            lease.release(self.adapter_name, last, ok, began)
