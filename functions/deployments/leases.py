"""The request path: a request leases one ready replica (adapter-aware, least loaded), streams from it and gives
it back. A request to a deployment with no ready replica waits, bounded by LORAPLEX_DEPLOYMENT_WAKE_TIMEOUT,
while the loop starts one: its wait is what wakes a deployment from Standby.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import Unavailable
from functions.deployments.live import Fleet, Live
from functions.deployments.metrics import DeploymentMetrics
from functions.deployments.replica import Replica
from functions.deployments.routing import Candidate, pick
from functions.deployments.rules import serving_refusal
from functions.engine.protocol import AdapterRef, Delta, Engine

WAIT_POLL = 0.02  # seconds between looks of a request waiting for a replica


@dataclass
class Lease:
    """A request's hold on one replica, from acquire to release."""

    fleet: Fleet
    metrics: DeploymentMetrics
    deployment_id: str
    replica: Replica
    waited_ms: float
    released: bool = False

    @property
    def engine(self) -> Engine:
        assert self.replica.engine is not None  # a ready replica has its client
        return self.replica.engine

    def release(self, adapter_name: str | None, last: Delta | None, ok: bool, began: float) -> None:
        if self.released:
            return
        self.released = True
        with self.fleet.lock:
            self.replica.in_flight -= 1
        queue_ms = self.waited_ms + (last.queue_ms if last is not None else 0.0)
        self.metrics.request(
            self.deployment_id,
            adapter_name,
            last.completion_tokens if last is not None else 0,
            last.prompt_tokens if last is not None else 0,
            (time.monotonic() - began) * 1000,
            queue_ms,
            ok,
        )
        if self.replica.state == "draining":
            self.fleet.wake.set()


@dataclass(frozen=True)
class Leasing:
    """How the runtime leases: its clock, how long a request waits for a replica (s), adapters per replica."""

    fleet: Fleet
    metrics: DeploymentMetrics
    clock: Callable[[], float]
    wake_timeout: float
    adapter_cache_size: int

    async def acquire(self, deployment_id: str, adapter: AdapterRef | None, adapter_name: str | None) -> Lease:
        """A replica for one request: at once when one is ready, else after waiting (bounded) for one to start."""
        fleet = self.fleet
        began = self.clock()
        timeout = self.wake_timeout
        registered: Live | None = None
        key = adapter.key if adapter is not None else None
        try:
            while True:
                with fleet.lock:
                    live = fleet.deployments.get(deployment_id)
                    if live is None:
                        fleet.dirty = True  # created a moment ago: not read yet
                    else:
                        refusal = serving_refusal(
                            live.name, live.status, live.target_state, live.status_reason, live.suspended
                        )
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
                fleet.wake.set()
                if self.clock() - began > timeout:
                    raise Unavailable(
                        f"no replica of the deployment became ready within {timeout:.0f} s; try again",
                        code="deployment_starting",
                        retry_after=5,
                    )
                await asyncio.sleep(WAIT_POLL)
        finally:
            if registered is not None:
                with fleet.lock:
                    registered.waiting -= 1

    def _take(self, live: Live, key: str | None, adapter_name: str | None, began: float) -> Lease | None:
        ready = [r for r in live.replicas if r.state == "ready"]
        chosen = pick(
            [Candidate(r.id, r.load, frozenset(r.adapters), r.order) for r in ready],
            key,
            live.scaling.scale_up_threshold,
        )
        if chosen is None:
            return None
        replica = next(r for r in ready if r.id == chosen.id)
        replica.in_flight += 1
        replica.served += 1
        replica.note_adapter(key, self.adapter_cache_size)
        if key is not None and adapter_name is not None:
            live.adapter_names[key] = adapter_name
        return Lease(self.fleet, self.metrics, live.id, replica, (self.clock() - began) * 1000)
