"""The worker supervisor of `loraplex serve`, with real child processes: a worker killed with SIGKILL is started
again; one that dies at once is started again after growing delays, capped, and not in a tight loop; stop() ends
every worker. (The same under a real `loraplex serve`, with the queue: tests/e2e/test_supervision_e2e.py.)"""

import logging
import os
import re
import signal
import sys
import time

import pytest

from app.supervisor import Backoff, WorkerSupervisor
from conftest import process_alive

SLEEPER = (sys.executable, "-c", "import time; time.sleep(600)")
CRASHER = (sys.executable, "-c", "raise SystemExit(3)")


def test_backoff_grows_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = Backoff(base=1, cap=8, stable=60)
    assert [backoff.delay(uptime=1) for _ in range(6)] == [0, 1, 2, 4, 8, 8]
    assert backoff.delay(uptime=60) == 0  # up a minute before it failed: a first failure again
    assert backoff.delay(uptime=1) == 1


def _pids(supervisor: WorkerSupervisor) -> list[int]:
    return [s.process.pid for s in supervisor._slots if s.process is not None and s.process.poll() is None]


def _wait(condition, timeout: float = 20):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_killed_worker_is_started_again_and_stop_ends_them_all() -> None:
    supervisor = WorkerSupervisor(2, SLEEPER, poll=0.05).start()
    try:
        first = _wait(lambda: len(pids := _pids(supervisor)) == 2 and pids)
        assert supervisor.status() == {"status": "ok", "expected": 2, "alive": 2, "restarts": 0}
        os.kill(first[0], signal.SIGKILL)
        again = _wait(lambda: len(pids := _pids(supervisor)) == 2 and first[0] not in pids and pids)
        assert again[1] == first[1]  # the other worker was left alone
        status = supervisor.status()
        assert status["alive"] == 2 and status["restarts"] == 1
        assert f"(pid {first[0]}) exited with code -9" in str(status["last_exit"])
    finally:
        supervisor.stop()
    assert not any(process_alive(pid) for pid in again)


def test_a_worker_that_dies_at_once_is_restarted_after_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "loraplex.supervisor")
    supervisor = WorkerSupervisor(1, CRASHER, Backoff(base=0.2, cap=0.8, stable=60), poll=0.02).start()
    try:
        _wait(lambda: supervisor.restarts >= 5)
    finally:
        supervisor.stop()
    delays = [float(d) for d in re.findall(r"exited with code 3 .*; starting it again in ([\d.]+) s", caplog.text)]
    assert delays[:5] == [0, 0.2, 0.4, 0.8, 0.8]
