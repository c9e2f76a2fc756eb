"""One replica: an engine process (launcher.py, then functions/engine/server.py) and the API's client of it.

Lifecycle: starting (process spawned, loading) -> ready (healthy, preloaded adapters loaded) -> draining (no new
requests; stopped once its in-flight requests are done) -> stopped. A replica whose process exits is dead; one
that fails to start carries the reason (the last error line of its log).

Processes are spawned from the runtime's own long-lived thread: they are asked to die with their parent thread
(PR_SET_PDEATHSIG), so a short-lived spawning thread would take them down with it.
"""

import itertools
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import httpx

from app.models import new_id, utcnow
from app.supervisor import die_with_parent
from functions.deployments.launcher import TIMINGS_PREFIX
from functions.deployments.prewarm import Spare
from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams, request_to_dict
from functions.engine.remote import RemoteEngine, _free_port, wait_healthy

State = Literal["starting", "ready", "draining", "stopping", "stopped", "failed"]
_order = itertools.count()
ENV_PREFIXES = ("LORAPLEX_", "DATABASE_URL", "HF_", "TRANSFORMERS_", "OMP_", "MKL_")


class ReplicaFailed(RuntimeError):
    """A replica did not become ready; the message says why."""


@dataclass(eq=False)
class Replica:
    id: str  # "<deployment>-r<n>", as reasons name it
    deployment_id: str
    base_model: str
    config_version: int
    log_path: Path
    state: State = "starting"
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    engine: RemoteEngine | None = None
    prewarmed: bool = False  # started from a spare (imports already done)
    spawned_at: float = field(default_factory=time.monotonic)  # the runtime's clock
    ready_at: float | None = None
    drain_since: float | None = None
    in_flight: int = 0  # requests this process streams from it
    remote_in_flight: int = 0  # requests the other API processes stream from it, as they last reported
    served: int = 0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # cold-start breakdown, seconds
    adapters: "OrderedDict[str, None]" = field(default_factory=OrderedDict)  # resident keys, least recent first
    order: int = field(default_factory=lambda: next(_order))
    metered_at: float = field(default_factory=time.monotonic)  # replica time up to here is on the ledger
    metered_periods: int = 0
    failed_polls: int = 0  # health polls in a row that found it unhealthy (runtime.py replaces it at 3)
    polling: bool = False  # a health poll is under way
    record_id: str = field(default_factory=lambda: new_id("rep"))  # its `replicas` row (records.py)
    started_wall: datetime = field(default_factory=utcnow)

    @property
    def load(self) -> int:
        """Requests it serves now, from every API process."""
        return self.in_flight + self.remote_in_flight

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def spawn(self, env: dict[str, str], spare: Spare | None) -> None:
        """Start the process (from the spare when given). Runs on the runtime's thread; quick."""
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = {"base_model": self.base_model, "port": port, "model_dir": None, "env": env}
        if spare is not None and spare.alive():
            self.process = spare.hand_off(command)
            self.log_path = spare.log_path
            self.prewarmed = True
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "functions.deployments.launcher"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.close()

    def wait_ready(self, timeout: float, preload: list[AdapterRef]) -> None:
        """Block until healthy and the preloaded adapters are resident (runs on a pool thread)."""
        assert self.process is not None
        started = time.monotonic()
        try:
            health = wait_healthy(self.url, self.process, timeout)
        except Exception as exc:  # noqa: BLE001 - EngineUnavailable, or anything the client raised
            self.stop_process()
            raise ReplicaFailed(f"{exc}: {self.last_error()}") from None
        self.timings["healthy_s"] = round(time.monotonic() - started, 3)
        self.timings.update(self._launcher_timings())
        engine = RemoteEngine(self.base_model, self.url, int(health["context_length"]))
        engine.process = self.process
        self.engine = engine
        began = time.monotonic()
        for adapter in preload:
            self._preload(adapter)
        if preload:
            self.timings["preload_s"] = round(time.monotonic() - began, 3)

    def _preload(self, adapter: AdapterRef) -> None:
        """One single-token request with the adapter: the engine loads it into a slot, as for any request."""
        request = GenerationRequest("Hi", SamplingParams(max_new_tokens=1, temperature=0), adapter)
        try:
            response = httpx.post(f"{self.url}/generate", json=request_to_dict(request), timeout=120)
        except httpx.HTTPError as exc:
            self.stop_process()
            raise ReplicaFailed(f"preloading an adapter failed: {exc!r}") from None
        if response.status_code != 200:
            self.stop_process()
            message = response.json().get("error", response.text) if response.content else response.reason_phrase
            raise ReplicaFailed(f"preloading an adapter was refused: {message}")
        self.note_adapter(adapter.key, capacity=1 << 30)

    def note_adapter(self, key: str | None, capacity: int) -> None:
        """The engine keeps `capacity` adapters (LRU); mirror that to know which it holds."""
        if key is None:
            return
        self.adapters[key] = None
        self.adapters.move_to_end(key)
        while len(self.adapters) > capacity:
            self.adapters.popitem(last=False)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def stop_process(self, timeout: float = 15.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def last_error(self) -> str:
        """The most telling line of the replica's log: the last exception line, else the last line."""
        try:
            lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        lines = [line for line in lines if not line.startswith(TIMINGS_PREFIX)]
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if head.endswith(("Error", "Exception", "Unavailable", "Exit")) and " " not in head:
                return line[:500]
        return lines[-1][:500] if lines else "the process printed nothing"

    def _launcher_timings(self) -> dict[str, float]:
        try:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(TIMINGS_PREFIX):
                    return json.loads(line.removeprefix(TIMINGS_PREFIX))
        except (OSError, ValueError):
            pass
        return {}


def replica_env(engine: str, accelerator: str, max_replicas: int) -> dict[str, str]:
    """The environment a replica's engine reads its settings from: ours, with the deployment's engine. A CPU
    replica gets its share of the cores (cores // max_replicas torch threads): replicas of one deployment on one
    machine would otherwise each spin a thread per core and slow one another down."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    env["LORAPLEX_ENGINE"] = engine
    env["LORAPLEX_ENGINE_PROCESS"] = "false"  # the replica is the engine process: the engine runs inside it
    if accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = str(max(1, (os.cpu_count() or 1) // max(1, max_replicas)))
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    return env
