"""`loraplex serve`'s worker processes: started, watched, and started again when one dies.

A worker that dies (killed, out of memory, a crash) leaves its event's lease to run out; the queue's reaper in any
worker re-sends it (app/queue.py). Without a worker nothing reaps, so `serve` restarts its workers itself, with a
backoff that keeps a worker that dies at once (a bad setting, a database that is down) from being restarted in a
tight loop. `status()` is what GET /health reports about them.
"""

import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("loraplex.supervisor")

WORKER_COMMAND = (sys.executable, "-m", "app.cli", "worker")
STOP_TIMEOUT = 30.0  # seconds a worker gets to exit after SIGTERM before SIGKILL


@dataclass
class Backoff:
    """Delays before starting again something that failed: none the first time (one failure after a long run is
    not a pattern), then base, 2 × base, 4 × base … at most `cap`; one that stayed up `stable` seconds before it
    failed counts as failing for the first time again."""

    base: float = 1.0
    cap: float = 60.0
    stable: float = 60.0
    failures: int = 0

    def delay(self, uptime: float) -> float:
        if uptime >= self.stable:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(self.cap, self.base * 2 ** (self.failures - 1))
        self.failures += 1
        return delay


@dataclass(eq=False)
class _Slot:
    backoff: Backoff
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    started_at: float = 0.0
    start_at: float = 0.0  # when the (next) process is due


class WorkerSupervisor:
    """`count` worker processes, started by this object's thread and restarted after they exit."""

    def __init__(
        self, count: int, command: tuple[str, ...] = WORKER_COMMAND, backoff: Backoff | None = None, poll: float = 0.5
    ) -> None:
        self.count, self.command, self.poll = count, command, poll
        template = backoff or Backoff()
        self._slots = [_Slot(Backoff(template.base, template.cap, template.stable)) for _ in range(count)]
        self.restarts = 0
        self.last_exit = ""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "WorkerSupervisor":
        # The children are spawned from this thread, which lives as long as `serve`: they are asked to die with
        # the thread that spawned them (PR_SET_PDEATHSIG), so a short-lived spawner would take them down with it.
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """SIGTERM every worker and wait for it (SIGKILL after STOP_TIMEOUT); none is started again."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT + 10)

    def status(self) -> dict[str, object]:
        with self._lock:
            alive = sum(1 for s in self._slots if s.process is not None and s.process.poll() is None)
        body: dict[str, object] = {
            "status": "ok" if alive >= self.count else "degraded",
            "expected": self.count,
            "alive": alive,
            "restarts": self.restarts,
        }
        if self.last_exit:
            body["last_exit"] = self.last_exit
        return body

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._check(time.monotonic())
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one failed spawn
                log.exception("worker supervision failed; trying again")
            self._stopping.wait(self.poll)
        self._stop_children()

    def _check(self, now: float) -> None:
        for number, slot in enumerate(self._slots, 1):
            process = slot.process
            if process is not None and process.poll() is not None:
                uptime = now - slot.started_at
                delay = slot.backoff.delay(uptime)
                what = f"worker {number} (pid {process.pid}) exited with code {process.returncode} after {uptime:.0f} s"
                log.warning("%s; starting it again in %.1f s", what, delay)
                with self._lock:
                    slot.process, slot.start_at, self.last_exit = None, now + delay, what
            if slot.process is None and now >= slot.start_at and not self._stopping.is_set():
                child = subprocess.Popen(list(self.command), preexec_fn=die_with_parent)
                with self._lock:
                    slot.process, slot.started_at = child, now
                    slot.starts += 1
                    self.restarts += slot.starts > 1
                if slot.starts > 1:
                    log.warning("worker %d started again (pid %d)", number, child.pid)

    def _stop_children(self) -> None:
        children = [s.process for s in self._slots if s.process is not None]
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the thread that spawned it ends, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
