"""The request path of an API process that does not hold the deployments lease (a follower): a request leases a
ready replica that the holder published (records.py), by its address, and streams from it over HTTP like the
holder does. With none ready it waits, and its wait is reported (load_reports) so that the holder's autoscaler
wakes the deployment from Standby; what it streams is reported the same way, so the holder scales on the sum.

The refusals are the same as the holder's (rules.py), read from the deployment's row.
"""

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from app.db import session_scope
from app.errors import NotFound, Unavailable
from app.models import Deployment, ReplicaRecord
from functions.catalog import get_model
from functions.deployments import records
from functions.deployments.metrics import DeploymentMetrics
from functions.deployments.routing import Candidate, pick
from functions.deployments.rules import serving_refusal
from functions.engine.protocol import AdapterRef, Delta, Engine
from functions.engine.remote import RemoteEngine

POLL_SECONDS = 0.1  # between looks at the rows while a request waits for a replica


@dataclass
class Followed:
    """This process's load on one deployment."""

    waiting: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)  # replica record id -> requests streaming
    adapters: dict[str, "OrderedDict[str, str]"] = field(default_factory=dict)  # record id -> key -> name sent

    def load(self) -> records.Load:
        return records.Load(
            self.waiting,
            {k: n for k, n in self.in_flight.items() if n},
            {k: [[key, name] for key, name in sent.items()] for k, sent in self.adapters.items()},
        )


@dataclass
class RemoteLease:
    """A request's hold on a replica another process runs, from acquire to release."""

    leasing: "RemoteLeasing"
    deployment_id: str
    record_id: str
    engine: Engine
    waited_ms: float
    released: bool = False

    def release(self, adapter_name: str | None, last: Delta | None, ok: bool, began: float) -> None:
        if self.released:
            return
        self.released = True
        self.leasing.done(self.deployment_id, self.record_id)
        self.leasing.metrics.request(
            self.deployment_id,
            adapter_name,
            last.completion_tokens if last is not None else 0,
            last.prompt_tokens if last is not None else 0,
            (time.monotonic() - began) * 1000,
            self.waited_ms + (last.queue_ms if last is not None else 0.0),
            ok,
        )


@dataclass(frozen=True)
class _Look:
    """What the rows say of a deployment at one look."""

    name: str
    base_model: str
    threshold: int
    refusal: Exception | None
    ready: list[ReplicaRecord]


class RemoteLeasing:
    """`wake` is set whenever this process's load changed, so its loop reports it at once; `adapter_cache_size`
    is how many adapters one replica keeps."""

    def __init__(
        self, metrics: DeploymentMetrics, wake: threading.Event, wake_timeout: float, adapter_cache_size: int
    ) -> None:
        self.metrics, self.wake, self.wake_timeout = metrics, wake, wake_timeout
        self.adapter_cache_size = adapter_cache_size
        self.lock = threading.Lock()
        self.followed: dict[str, Followed] = {}
        self._engines: dict[tuple[str, str], Engine] = {}  # (base model, address) -> its client

    def loads(self) -> dict[str, records.Load]:
        """This process's load per deployment, for its reports."""
        with self.lock:
            return {d: f.load() for d, f in self.followed.items()}

    async def acquire(
        self, deployment_id: str, adapter: AdapterRef | None, adapter_name: str | None, holding: Callable[[], bool]
    ) -> RemoteLease | None:
        """A published replica for one request, at once or after waiting (bounded) for one; None when this process
        took the lease meanwhile (the caller leases from its own replicas then)."""
        began = time.monotonic()
        registered = False
        key = adapter.key if adapter is not None else None
        try:
            while not holding():
                look = await asyncio.to_thread(self._look, deployment_id)
                if look.refusal is not None:
                    raise look.refusal
                chosen = self._pick(deployment_id, look, key)
                if chosen is not None:
                    engine = await asyncio.to_thread(self._engine, look.base_model, chosen.url or "")
                    self._take(deployment_id, chosen.id, key, adapter_name)
                    return RemoteLease(self, deployment_id, chosen.id, engine, (time.monotonic() - began) * 1000)
                if not registered:
                    registered = True
                    with self.lock:
                        self.followed.setdefault(deployment_id, Followed()).waiting += 1
                    self.wake.set()  # reported at once: the holder wakes the deployment
                if time.monotonic() - began > self.wake_timeout:
                    raise Unavailable(
                        f"no replica of the deployment became ready within {self.wake_timeout:.0f} s; try again",
                        code="deployment_starting",
                        retry_after=5,
                    )
                await asyncio.sleep(POLL_SECONDS)
            return None
        finally:
            if registered:
                with self.lock:
                    self.followed[deployment_id].waiting -= 1
                self.wake.set()

    def _look(self, deployment_id: str) -> _Look:
        with session_scope() as s:
            row = s.get(Deployment, deployment_id)
            if row is None:
                missing = NotFound("The deployment does not exist", code="deployment_not_found")
                return _Look("", "", 1, missing, [])
            refusal = serving_refusal(row.name, row.status, row.target_state, row.status_reason, row.suspended_reason)
            look = _Look(row.name, row.base_model, row.scale_up_threshold, refusal, [])
        return _Look(look.name, look.base_model, look.threshold, look.refusal, records.ready(deployment_id))

    def _pick(self, deployment_id: str, look: _Look, key: str | None) -> ReplicaRecord | None:
        with self.lock:
            mine = self.followed.get(deployment_id, Followed())
            candidates = [
                Candidate(
                    row.id,
                    row.in_flight,
                    frozenset(k for k, _ in row.adapters or []) | frozenset(mine.adapters.get(row.id, {})),
                    int(row.started_at.timestamp() * 1000),
                )
                for row in look.ready
            ]
        chosen = pick(candidates, key, look.threshold)
        return next((row for row in look.ready if chosen is not None and row.id == chosen.id), None)

    def _engine(self, base_model: str, url: str) -> Engine:
        """A client of the replica at `url` (its tokenizer read once per base model)."""
        engine = self._engines.get((base_model, url))
        if engine is None:
            engine = RemoteEngine(base_model, url, get_model(base_model).context_length)
            self._engines[(base_model, url)] = engine
        return engine

    def _take(self, deployment_id: str, record_id: str, key: str | None, adapter_name: str | None) -> None:
        with self.lock:
            followed = self.followed.setdefault(deployment_id, Followed())
            followed.in_flight[record_id] = followed.in_flight.get(record_id, 0) + 1
            if key is not None:
                sent = followed.adapters.setdefault(record_id, OrderedDict())
                sent[key] = adapter_name or "(loaded)"
                sent.move_to_end(key)
                while len(sent) > self.adapter_cache_size:
                    sent.popitem(last=False)
        self.wake.set()

    def done(self, deployment_id: str, record_id: str) -> None:
        with self.lock:
            followed = self.followed[deployment_id]
            followed.in_flight[record_id] -= 1
        self.wake.set()
