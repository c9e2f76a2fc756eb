"""Supervision of the shared endpoints' engines, from a thread of the API process (started by web/main.py's lifespan).
Each engine process is watched by the API process that started it (other API processes use it through its row,
registry.py, which this supervisor renews every poll).

Every LORAPLEX_ENGINE_HEALTH_INTERVAL seconds it asks each engine started so far (the registry in __init__.py)
whether it is healthy: an engine process that exited is replaced at once; one whose GET /health answers 503 (its
loop makes no progress with work queued, or failed repeatedly) or does not answer, UNHEALTHY_POLLS polls in a row,
is stopped (SIGTERM, then SIGKILL) and replaced. Replacing it here, not when the next request finds it dead, keeps
that request from waiting for a start. Restarts back off (app/supervisor.py's Backoff) so an engine that cannot
start, or dies at once, is not restarted in a tight loop. `status()` is what GET /health reports about them.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from app.settings import get_settings
from app.supervisor import Backoff
from functions.engine import current_engine, owned_engines, registry, replace_engine, started_engines
from functions.engine.protocol import Engine

log = logging.getLogger("loraplex.engines")

UNHEALTHY_POLLS = 3  # failed polls in a row before an engine that still runs is replaced: one slow answer is no fault


def probe(engine: Engine) -> tuple[bool, bool, str]:
    """(alive, healthy, why not) of an engine: an engine process that exited is dead; the engine's own health check
    says whether it makes progress."""
    alive = engine.alive()
    ok, reason = engine.healthy()
    return alive, ok and alive, reason


@dataclass(eq=False)
class _Watched:
    key: str
    base_model: str
    full_model: bool  # a full fine-tuned version's own engine (its directory is not shown: it names the tenant)
    engine: Engine | None  # None: its last start failed; it is started again at `restart_at`
    since: float  # when this engine was started
    backoff: Backoff = field(default_factory=Backoff)
    failed_polls: int = 0
    restarts: int = 0
    reason: str = ""  # what is wrong now
    restarted_because: str = ""  # why it was last restarted
    restart_at: float | None = None  # a restart is due then (set once the engine is found dead or unhealthy)

    def state(self) -> str:
        if self.engine is None:
            return "down"
        return "unhealthy" if self.restart_at is not None else "ok"


class EngineSupervisor:
    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval or get_settings().engine.engine_health_interval
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.Lock()  # guards _watched against status() from request threads
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "EngineSupervisor":
        self._thread = threading.Thread(target=self._run, name="engine-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the engines are closed at shutdown, so none is started again)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def status(self) -> dict[str, Any]:
        with self._lock:
            engines: list[dict[str, Any]] = [
                {
                    "base_model": w.base_model,
                    "full_model": w.full_model,
                    "status": w.state(),
                    "restarts": w.restarts,
                    **({"failed_polls": w.failed_polls} if w.failed_polls else {}),
                    **({"reason": w.reason} if w.reason else {}),
                    **({"restarted_because": w.restarted_because} if w.restarted_because else {}),
                }
                for w in self._watched.values()
            ]
        healthy = all(e["status"] == "ok" for e in engines)
        restarts = sum(e["restarts"] for e in engines)
        return {"status": "ok" if healthy else "degraded", "restarts": restarts, "engines": engines}

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one failed check
                log.exception("engine supervision failed; trying again")

    def check(self) -> None:
        """One round: renew the rows of the engines this process started (the other API processes use them too),
        take in engines started since the last one, probe each, restart those due."""
        now = time.monotonic()
        if get_settings().engine.engine_process:
            registry.beat(owned_engines())
        for key, (base_model, model_dir) in started_engines().items():
            engine = current_engine(key)
            with self._lock:
                w = self._watched.get(key)
                if w is None:
                    w = self._watched[key] = _Watched(key, base_model, model_dir is not None, engine, now)
                elif engine is not None and engine is not w.engine:  # a request started a successor itself
                    w.engine, w.since, w.failed_polls, w.reason, w.restart_at = engine, now, 0, "", None
        for w in list(self._watched.values()):
            if self._stopping.is_set():
                return
            if w.restart_at is None:
                self._probe(w, now)
            if w.restart_at is not None and time.monotonic() >= w.restart_at:
                self._restart(w)

    def _probe(self, w: "_Watched", now: float) -> None:
        assert w.engine is not None
        alive, healthy, reason = probe(w.engine)
        with self._lock:
            if healthy:
                w.failed_polls, w.reason = 0, ""
                return
            w.failed_polls = UNHEALTHY_POLLS if not alive else w.failed_polls + 1
            w.reason = reason
            if w.failed_polls < UNHEALTHY_POLLS:
                return
            w.restarted_because = reason if not alive else f"unhealthy {w.failed_polls} polls in a row: {reason}"
            w.restart_at = now + w.backoff.delay(now - w.since)
        log.warning("engine %s: %s; replacing it in %.0f s", w.base_model, w.restarted_because, w.restart_at - now)

    def _restart(self, w: "_Watched") -> None:
        """Runs on the supervisor's thread: other engines wait for their next poll while this one starts."""
        try:
            engine = replace_engine(w.key, w.engine)
        except Exception as exc:  # noqa: BLE001 - EngineUnavailable, or whatever the start raised
            now = time.monotonic()
            with self._lock:
                w.engine, w.restarts = None, w.restarts + 1
                w.reason = f"restart failed: {exc}"
                w.restart_at = now + w.backoff.delay(0.0)
            log.warning("engine %s: %s; trying again in %.0f s", w.base_model, w.reason, w.restart_at - now)
            return
        with self._lock:
            w.engine, w.since, w.failed_polls, w.reason, w.restart_at = engine, time.monotonic(), 0, "", None
            w.restarts += 1
        log.warning("engine %s started again", w.base_model)
