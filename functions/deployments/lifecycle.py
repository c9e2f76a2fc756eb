"""The replicas' lifecycle as the runtime drives it: start one (from the spare when there is one), take it in
once it is ready (recording a cold start), drain it, stop it once drained, notice it died, and poll its health.

Slow work (waiting for a replica to load, stopping a process, a health poll) runs on a thread pool: the loop
must not wait for it. What those threads change they change under `Fleet.lock`, and they wake the loop.
"""

import logging
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from app import events
from app.db import session_scope
from app.models import Deployment, utcnow
from app.settings import Settings
from functions import repos
from functions.deployments.live import Effects, Fleet, Live
from functions.deployments.metering import meter
from functions.deployments.metrics import DeploymentMetrics
from functions.deployments.prewarm import Prewarm
from functions.deployments.replica import Replica, ReplicaFailed, replica_env
from functions.deployments.status import ERRORED, transition
from functions.engine.protocol import AdapterRef
from functions.engine.remote import STOP_GRACE_SECONDS
from functions.engine.supervisor import UNHEALTHY_POLLS

log = logging.getLogger(__name__)
FAILED_START_BACKOFF = 30.0  # seconds before another start once one failed while other replicas serve


class Lifecycle:
    """Starts, watches and stops the fleet's replicas; `clock` is the runtime's."""

    def __init__(
        self,
        fleet: Fleet,
        settings: Settings,
        clock: Callable[[], float],
        metrics: DeploymentMetrics,
        prewarm: Prewarm,
        log_dir: Path,
    ) -> None:
        self.fleet, self.settings, self.clock, self.metrics = fleet, settings, clock, metrics
        self.prewarm, self.log_dir = prewarm, log_dir
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="replica")
        self.starts: dict[Replica, Future[None]] = {}  # replicas loading, until the loop takes them in
        self._polled_at = float("-inf")

    # ---- starting ---------------------------------------------------------------------------------------

    def start(self, live: Live, now: float) -> None:
        """Spawn one replica of the deployment's config; it loads on a pool thread (`collect_starts` takes it in)."""
        number = live.next_number
        live.next_number += 1
        replica_id = f"{live.name}-r{number}"
        log_path = self.log_dir / live.id / f"{replica_id}-{secrets.token_hex(3)}.log"
        r = Replica(replica_id, live.id, live.base_model, live.config_version, log_path, spawned_at=now, metered_at=now)
        try:
            r.spawn(replica_env(live.engine, live.accelerator, live.scaling.max_replicas), self.prewarm.take())
        except OSError as exc:
            live.status_reason = f"replica {replica_id} could not be spawned: {exc}"
            live.no_start_before = now + FAILED_START_BACKOFF
            return
        live.replicas.append(r)
        if live.waiting and not any(x.state == "ready" for x in live.replicas) and live.wake_from is None:
            live.wake_from = now
        preload = list(live.preloaded)
        self.starts[r] = self.pool.submit(self._wait_ready, live.tenant_id, r, preload)

    def _wait_ready(self, tenant_id: str, r: Replica, preload: list[str]) -> None:
        refs = []
        if preload:
            with session_scope() as s:
                for name in preload:
                    weights = repos.find(s, tenant_id, name)
                    if weights is None:
                        r.stop_process()
                        raise ReplicaFailed(f"preloaded adapter {name!r} no longer exists")
                    refs.append(AdapterRef(weights.key, weights.path, weights.base_model))
        r.wait_ready(self.settings.engine.engine_start_timeout, refs)
        with self.fleet.lock:
            live = self.fleet.deployments.get(r.deployment_id)
            if live is not None:
                for ref, name in zip(refs, preload, strict=True):
                    live.adapter_names[ref.key] = name
        self.fleet.wake.set()

    def collect_starts(self, live: Live, now: float, effects: Effects) -> None:
        """Take in the deployment's replicas that finished loading: ready, or failed (Errored when none serves)."""
        for r, future in [(r, f) for r, f in self.starts.items() if r.deployment_id == live.id and f.done()]:
            del self.starts[r]
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
                transition(live, ERRORED, reason, effects)
                live.wake_from = None
            else:
                live.no_start_before = now + FAILED_START_BACKOFF
                live.status_reason = reason

    def _record_cold_start(self, live: Live, r: Replica, now: float, effects: Effects) -> None:
        assert live.wake_from is not None
        seconds = now - live.wake_from
        live.wake_from = None
        record = {"at": utcnow().isoformat(), "seconds": round(seconds, 3), "replica": r.id, "prewarmed": r.prewarmed}
        record |= r.timings
        self.metrics.cold_start(live.id, record)
        live.hint = (
            f"replica {r.id} ready: cold start {seconds:.1f} s ({'pre-warmed' if r.prewarmed else 'new'} process)"
        )
        deployment_id, cold_start_ms = live.id, int(seconds * 1000)

        def write() -> None:  # the column and its event on the tenant's feed, in one transaction
            with session_scope() as s:
                row = s.get(Deployment, deployment_id)
                if row is not None:
                    row.cold_start_ms = cold_start_ms
                    events.publish(s, row.tenant_id, "deployment.cold_start", row.id)

        effects.append(write)  # queued before this tick's transition to Ready: its data still says Initializing

    # ---- stopping ---------------------------------------------------------------------------------------

    def stop_drained(self, live: Live, now: float) -> None:
        """Stop (on a pool thread) the draining replicas with no request left, or draining past the timeout."""
        timeout = self.settings.deployments.deployment_drain_timeout
        for r in [r for r in live.replicas if r.state == "draining"]:
            if r.load == 0 or (r.drain_since is not None and now - r.drain_since > timeout):
                r.state = "stopping"
                self.pool.submit(self._stop_replica, live, r)

    def _stop_replica(self, live: Live, r: Replica) -> None:
        r.stop_process()
        with self.fleet.lock:
            if r in live.replicas:
                live.replicas.remove(r)
            r.state = "stopped"
        meter(live, r, self.clock())
        self.fleet.wake.set()

    def reap_dead(self, live: Live, now: float) -> None:
        """Drop the deployment's replicas whose process exited, saying why (the autoscaler replaces them)."""
        for r in [r for r in live.replicas if r.state in ("ready", "draining") and not r.alive()]:
            live.replicas.remove(r)
            meter(live, r, now)
            reason = f"replica {r.id} exited with code {r.exit_code()} ({r.error or r.last_error()})"
            if live.target_state == "active" and r.state == "ready":
                reason += "; replacing it"
            log.warning("deployment %s: %s", live.name, reason)
            live.hint = reason
            live.status_reason = reason
            r.state = "stopped"

    def stop_all(self, meter_them: bool = True) -> None:
        """At shutdown: every replica's process stopped (all asked at once, then each waited for) and metered
        (unless `meter_them` is False: another process bills them)."""
        with self.fleet.lock:
            replicas = [(live, r) for live in self.fleet.deployments.values() for r in live.replicas]
        for _, r in replicas:
            if r.alive() and r.process is not None:
                r.process.terminate()
        now = self.clock()
        for live, r in replicas:
            r.stop_process(timeout=10)
            if meter_them:
                meter(live, r, now)
        self.prewarm.discard()

    # ---- health -----------------------------------------------------------------------------------------

    def poll_health(self, now: float) -> None:
        """Every engine_health_interval, ask each ready replica's GET /health, on pool threads: the tick must not wait
        for a hung one. A replica unhealthy UNHEALTHY_POLLS polls in a row is stopped, and `reap_dead` replaces it
        as it replaces one that died."""
        if now - self._polled_at < self.settings.engine.engine_health_interval:
            return
        self._polled_at = now
        with self.fleet.lock:
            replicas = [r for live in self.fleet.deployments.values() for r in live.replicas]
            due = [r for r in replicas if r.state == "ready" and not r.polling]
            for r in due:
                r.polling = True
        for r in due:
            self.pool.submit(self._poll_replica, r)

    def _poll_replica(self, r: Replica) -> None:
        try:
            assert r.engine is not None
            ok, reason = r.engine.healthy()
            r.failed_polls = 0 if ok else r.failed_polls + 1
            if r.failed_polls >= UNHEALTHY_POLLS and r.state == "ready" and r.alive():
                r.error = f"stopped: unhealthy {r.failed_polls} health polls in a row: {reason}"
                log.warning("replica %s %s", r.id, r.error)
                r.stop_process(timeout=STOP_GRACE_SECONDS)
                self.fleet.wake.set()
        finally:
            r.polling = False


def drain(r: Replica, now: float) -> None:
    """No new requests for the replica; `stop_drained` stops it once its requests are done."""
    if r.state in ("starting", "ready"):
        r.state, r.drain_since = "draining", now


def drain_order(replicas: list[Replica]) -> list[Replica]:
    """Which to drain first: replicas still starting (no traffic yet), then the least loaded, newest first."""
    return sorted(replicas, key=lambda r: (r.state != "starting", r.load, -r.order))
