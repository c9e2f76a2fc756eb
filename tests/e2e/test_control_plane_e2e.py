"""Two real API processes (`loraplex serve` twice) on one PostgreSQL database behave as one: a deployment created
through one and called through both runs exactly its replicas (one process holds the deployments lease and runs
them, the other streams from them by address); the shared endpoints' requests-per-second limit holds across both;
the shared endpoints use one engine process per model for both; the deployment's GET, its health time series and
/metrics read the same figures from either; and when the process running the replicas is killed, the other takes
over and runs the deployment's replicas itself. The tests run in order on the same two processes."""

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import select

from conftest import TINY_MODEL, Platform, Processes, _make_platform, free_port, make_tenant, process_alive, wait_for
from deployment_helpers import FAST_ENV, _up

PER_SECOND = 5  # the shared endpoints' requests-per-second limit per tenant
HELLO = [{"role": "user", "content": "Say hi"}]
METRICS_TOKEN = "metrics-s3cret"
ENV = FAST_ENV | {
    "LORAPLEX_SHARED_REQUESTS_PER_SECOND": str(PER_SECOND),
    "LORAPLEX_DEPLOYMENT_PREWARM": "false",  # every launcher process is then a replica: they can be counted
    "LORAPLEX_DEPLOYMENT_LEASE_SECONDS": "3",
    "LORAPLEX_METRICS_TOKEN": METRICS_TOKEN,
}


class Apis:
    """The two API processes, their addresses, and a tenant's clients of each."""

    def __init__(self, processes: Processes, urls: list[str], headers: dict[str, str]) -> None:
        self.processes, self.urls = processes, urls
        self.http = [httpx.Client(base_url=url, headers=headers, timeout=120) for url in urls]

    def pid(self, i: int) -> int:
        return self.processes.children[i].pid

    def role(self, i: int) -> str:
        return str(httpx.get(f"{self.urls[i]}/health", timeout=10).json()["components"]["deployments"]["role"])


@pytest.fixture(scope="module")
def pg_platform(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Platform]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _make_platform(tmp_path_factory.mktemp("control"), "postgres", monkeypatch, tiny_model_dir)


@pytest.fixture(scope="module")
def apis(pg_platform: Platform) -> Iterator[Apis]:
    processes = Processes(pg_platform, ENV)
    try:
        ports = [free_port(), free_port()]
        for port in ports:  # both start at once
            processes.start("serve", "--port", str(port), "--workers", "0")
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        wait_for(lambda: all(_up(url) for url in urls), 60, "the API processes did not start")
        _, headers = make_tenant("acme")
        yield Apis(processes, urls, headers)
    finally:
        processes.stop()


def chat(http: httpx.Client, name: str) -> httpx.Response:
    body = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0}
    return http.post(f"/v1/deployments/{name}/chat/completions", json=body)


def children(pid: int, word: str) -> list[int]:
    """The live processes under one API process whose command line holds `word`."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if word in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def launchers(pid: int) -> list[int]:
    """The replica processes (deployment launchers) under one API process."""
    return children(pid, "functions.deployments.launcher")


def replica_rows(deployment_id: str, state: str = "ready") -> list[Any]:
    from app.db import session_scope
    from app.models import ReplicaRecord

    with session_scope() as s:
        rows = select(ReplicaRecord).where(ReplicaRecord.deployment_id == deployment_id, ReplicaRecord.state == state)
        return list(s.scalars(rows))


def test_a_deployment_called_through_both_processes_runs_exactly_its_replicas(apis: Apis) -> None:
    assert sorted(apis.role(i) for i in (0, 1)) == ["follower", "holder"]
    holder = 0 if apis.role(0) == "holder" else 1
    r = apis.http[1 - holder].post(  # created through the process that does not run replicas
        "/v1/deployments",
        json={"name": "both", "base_model": TINY_MODEL, "min_replicas": 2, "max_replicas": 2, "cooldown_time": 600},
    )
    assert r.status_code == 201, r.text
    deployment_id = r.json()["id"]
    wait_for(lambda: len(replica_rows(deployment_id)) == 2, 90, "two replicas never became ready")

    for http in apis.http * 3:  # three requests through each process
        reply = chat(http, "both")
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0

    # Exactly two replica processes on the machine, both the holder's, and the rows say which.
    rows = replica_rows(deployment_id)
    assert len(rows) == 2 and {row.holder.split(":")[1] for row in rows} == {str(apis.pid(holder))}
    assert sorted(launchers(apis.pid(holder))) == sorted(int(row.process.split(":")[1]) for row in rows)
    assert launchers(apis.pid(1 - holder)) == []
    # Both processes show the same replicas.
    shown = [http.get("/v1/deployments/both").json() for http in apis.http]
    assert [d["replicas"] for d in shown] == [2, 2]
    ids = [sorted((r["id"], r["state"]) for r in d["live"]["replicas"]) for d in shown]
    assert ids[0] == ids[1] == sorted((row.id, "ready") for row in rows)


def test_the_requests_per_second_limit_holds_across_both_processes(apis: Apis) -> None:
    _, headers = make_tenant("bursty")
    clients = [httpx.Client(base_url=url, headers=headers, timeout=120) for url in apis.urls]
    body = {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    for client in clients:  # connections open before the burst
        assert client.get("/v1/models").status_code == 200
    statuses: list[int] = []
    extra = 3

    def send(client: httpx.Client) -> None:
        statuses.append(client.post("/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=send, args=(clients[i % 2],)) for i in range(PER_SECOND + extra)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(statuses) == [200] * PER_SECOND + [429] * extra
    # Both processes answered from one engine process of the model: whichever started it, the other reused it.
    assert len(children(apis.pid(0), "engine") + children(apis.pid(1), "engine")) == 1


def test_both_processes_read_the_same_health_figures(apis: Apis) -> None:
    def series(i: int) -> dict[str, Any]:
        r = apis.http[i].get("/v1/deployments/both/metrics", params={"minutes": 5})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def requests(metrics: dict[str, Any]) -> int:
        return sum(p["requests"] for p in metrics["points"])

    wait_for(lambda: requests(series(0)) == requests(series(1)) == 6, 30, "the six requests never showed")
    figures = [series(i) for i in (0, 1)]
    by_request = [[(p["t"], p["requests"], p["generated_tokens_per_second"]) for p in m["points"]] for m in figures]
    assert by_request[0] == by_request[1]
    assert figures[0]["adapters"] == figures[1]["adapters"]
    assert figures[0]["cold_starts"] == figures[1]["cold_starts"]
    assert any(p["replicas"] == 2 for p in figures[0]["points"])

    def prometheus(i: int) -> list[str]:
        text = httpx.get(f"{apis.urls[i]}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        return sorted(
            line
            for line in text.splitlines()
            if line.startswith(("loraplex_deployment_requests_total{", "loraplex_deployment_replicas{"))
        )

    lines = [prometheus(i) for i in (0, 1)]
    assert lines[0] == lines[1]
    assert any(line.endswith(" 6.0") and "deployment_requests_total" in line for line in lines[0])
    assert any('state="ready"' in line and line.endswith(" 2.0") for line in lines[0])


def test_when_the_process_running_the_replicas_dies_the_other_takes_over(apis: Apis) -> None:
    holder = 0 if apis.role(0) == "holder" else 1
    r = apis.http[0].patch("/v1/deployments/both", json={"min_replicas": 1, "max_replicas": 1})  # a quicker restart
    assert r.status_code == 200, r.text
    deployment_id = r.json()["id"]
    wait_for(
        lambda: (
            len(launchers(apis.pid(holder))) == 1
            and len(apis.http[0].get("/v1/deployments/both").json()["live"]["replicas"]) == 1
        ),
        30,
        "the deployment did not scale down to one replica",
    )
    old = launchers(apis.pid(holder))
    os.kill(apis.pid(holder), signal.SIGKILL)  # its replicas die with it (PR_SET_PDEATHSIG)

    survivor = 1 - holder
    wait_for(lambda: apis.role(survivor) == "holder", 30, "the other process never took the lease over")

    def runs_it() -> bool:
        rows = replica_rows(deployment_id)
        return len(rows) == 1 and rows[0].holder.endswith(f":{apis.pid(survivor)}")

    wait_for(runs_it, 90, "the new holder did not start the deployment's replica")
    wait_for(lambda: not any(process_alive(p) for p in old), 30, "a replica outlived the process that ran it")
    assert len(launchers(apis.pid(survivor))) == 1
    # The dead process's replica row is closed as of its last heartbeat, and its time billed up to there.
    [gone] = [row for row in replica_rows(deployment_id, "stopped") if "stopped running the deploy" in row.reason]
    assert gone.holder.endswith(f":{apis.pid(holder)}") and gone.stopped_at is not None
    assert gone.metered_until is not None and gone.metered_until >= gone.stopped_at
    assert chat(apis.http[survivor], "both").status_code == 200
