"""Supervision under a real `loraplex serve`: the children it runs are killed (SIGKILL) or hung (SIGSTOP) and
come back without a person. A killed worker is started again and validates the next upload; the shared endpoint's
engine process, killed or hung, is replaced before any request asks for it, and the next request is served.
GET /health says what happened, and answers 503 while a component is down. (A killed or hung deployment replica:
tests/functions/deployments/test_deployment_replicas.py.)"""

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest

from conftest import TINY_MODEL, Platform, Processes, make_tenant

HELLO = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture
def processes(sqlite_platform: Platform) -> Iterator[Processes]:
    procs = Processes(sqlite_platform, {"LORAPLEX_ENGINE_HEALTH_INTERVAL": "0.5", "LORAPLEX_UPLOAD_WAIT_SECONDS": "30"})
    yield procs
    procs.stop()


def children(server: Processes, word: str) -> list[int]:
    """The pids of `loraplex serve`'s live children whose command line holds `word` (worker, engine)."""
    found = []
    for child in psutil.Process(server.children[0].pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and word in child.cmdline():
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for(condition: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{message} (after {timeout:.0f} s)")


def health(url: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{url}/health", timeout=10)
    return r.status_code, r.json()


def test_serve_starts_a_killed_worker_again_and_it_validates_the_next_upload(processes: Processes) -> None:
    url = processes.server(workers=1)
    [worker] = children(processes, "worker")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: children(processes, "worker") not in ([], [worker]), 30, "no worker was started again")

    _, headers = make_tenant("after")
    rows = "\n".join(json.dumps({"prompt": f"Say {i}", "completion": str(i)}) for i in range(8))
    r = httpx.post(
        f"{url}/v1/datasets",
        headers=headers,
        files={"file": ("rows.jsonl", rows.encode())},
        data={"name": "rows", "base_model": TINY_MODEL},
        timeout=60,
    )
    assert r.status_code == 201 and r.json()["status"] == "ready", r.text  # validated by the new worker

    status, body = health(url)
    workers = body["components"]["workers"]
    assert status == 200 and body["status"] == "ok"
    assert (workers["expected"], workers["alive"], workers["restarts"]) == (1, 1, 1)
    assert f"(pid {worker}) exited with code -9" in workers["last_exit"]


def test_the_api_replaces_a_killed_or_hung_engine_before_the_next_request(processes: Processes) -> None:
    url = processes.server(workers=0)
    _, headers = make_tenant("chat")

    def chat() -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", headers=headers, json=HELLO, timeout=120)

    assert chat().status_code == 200  # starts the engine process
    [first] = children(processes, "engine")

    def replaced(old: set[int]) -> int:
        """The engine started in place of the `old` ones, without a request; /health back to 200 with it."""
        [new] = wait_for(
            lambda: (pids := [p for p in children(processes, "engine") if p not in old]) and pids,
            90,
            "no new engine process was started",
        )
        wait_for(lambda: health(url)[0] == 200, 90, "/health did not come back to 200")
        return int(new)

    os.kill(first, signal.SIGKILL)
    wait_for(lambda: health(url)[0] == 503, 30, "/health did not report the dead engine")
    second = replaced({first})
    [engine] = health(url)[1]["components"]["engines"]["engines"]
    assert engine["status"] == "ok" and engine["restarts"] == 1
    assert "exited with code -9" in engine["restarted_because"]
    assert chat().status_code == 200

    os.kill(second, signal.SIGSTOP)  # alive, but answers nothing: unhealthy three polls in a row
    third = replaced({first, second})
    wait_for(lambda: not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie", 30, "hung one")
    [engine] = health(url)[1]["components"]["engines"]["engines"]
    assert engine["restarts"] == 2 and "unhealthy 3 polls in a row" in engine["restarted_because"]
    assert chat().status_code == 200
    assert children(processes, "engine") == [third]
