"""Private deployments with real replica processes of the tiny model, over real HTTP: 0 -> 1 on a request (the
request waits and is served), 1 -> 2 under concurrent load, back to 0 after the cooldown, replica time on the
ledger, health figures; a killed replica is replaced; a config update rolls the replicas with requests in flight
and drops none; a replica that cannot start leaves the deployment Errored with the reason; stop and delete."""

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import TINY_MODEL, Platform, make_tenant, process_alive
from deployment_helpers import (
    FAST_ENV,
    Served,
    deployment,
    import_lora,
    ready_replicas,
    serve_app,
    wait_for,
    wait_status,
)
from lora_helpers import build_lora

HELLO = [{"role": "user", "content": "Say hi"}]
METRICS_TOKEN = "metrics-s3cret"


@pytest.fixture
def extra_env() -> dict[str, str]:
    """Settings a test adds to FAST_ENV (by parametrizing this fixture)."""
    return {}


@pytest.fixture
def served(sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch, extra_env: dict[str, str]) -> Iterator[Served]:
    from app.settings import get_settings

    for key, value in (FAST_ENV | extra_env).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORAPLEX_METRICS_TOKEN", METRICS_TOKEN)  # /metrics is private without one
    get_settings.cache_clear()
    with serve_app() as s:
        yield s


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    _, headers = make_tenant("acme")
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as client:
        yield client


def create(http: httpx.Client, name: str, **config: Any) -> dict[str, Any]:
    r = http.post("/v1/deployments", json={"name": name, "base_model": TINY_MODEL} | config)
    assert r.status_code == 201, r.text
    return dict(r.json())


def chat(http: httpx.Client, name: str, model: str = TINY_MODEL, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0}
    return http.post(f"/v1/deployments/{name}/chat/completions", json=body)


def long_stream(http: httpx.Client, name: str, tokens: int, model: str = TINY_MODEL) -> dict[str, Any]:
    """A streamed completion that cannot stop early (min_tokens): the text and finish reason it ended with."""
    body = {"model": model, "prompt": "Count:", "max_tokens": tokens, "min_tokens": tokens, "stream": True}
    text, finish = [], None
    with http.stream("POST", f"/v1/deployments/{name}/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return {"text": "".join(text), "finish": finish}


def transitions(http: httpx.Client, name: str) -> list[dict[str, Any]]:
    return list(http.get(f"/v1/deployments/{name}/transitions").json())


def status_path(http: httpx.Client, name: str) -> list[tuple[str | None, str]]:
    """The status changes (scaling events, which keep the status, left out)."""
    return [(t["from_status"], t["to_status"]) for t in transitions(http, name) if t["from_status"] != t["to_status"]]


def test_scales_from_zero_to_two_and_back_to_zero(served: Served, http: httpx.Client) -> None:
    create(http, "auto", min_replicas=0, max_replicas=2, scale_up_threshold=1, cooldown_time=2)
    assert wait_status(http, "auto", "Standby")["replicas"] == 0

    # 0 -> 1: the request waits for the first replica and is served; the cold start is measured.
    started = time.monotonic()
    api = OpenAI(base_url=f"{served.url}/v1/deployments/auto", api_key=http.headers["Authorization"][7:])
    reply = api.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert reply.choices[0].message.content is not None and reply.usage is not None
    assert reply.usage.completion_tokens > 0
    d = wait_status(http, "auto", "Ready")  # written by the runtime's tick, which may follow the answer by a moment
    assert ready_replicas(d) == 1
    assert 0 < d["cold_start_ms"] <= waited * 1000 + 50
    assert status_path(http, "auto") == [
        (None, "Pending"),
        ("Pending", "Standby"),
        ("Standby", "Initializing"),
        ("Initializing", "Ready"),
    ]

    # 1 -> 2: concurrent streams beyond scale_up_threshold=1 per replica start a second replica.
    results: list[dict[str, Any]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(long_stream(http, "auto", 200))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: ready_replicas(deployment(http, "auto")) == 2, 90, "no second replica under load")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert results and all(r["finish"] == "length" for r in results)
    [scale_up] = [t for t in transitions(http, "auto") if t["from_status"] == t["to_status"]]
    assert scale_up["to_status"] == "Ready" and scale_up["replicas"] == 2
    assert "scale_up_threshold 1: 1 -> 2 replicas" in scale_up["reason"]
    # The event feed has each, with the deployment as GET shows it: the wake's cold start (published in the tick
    # that took the replica in, before its status says Ready) and the scaling event.
    feed = [(e["type"], e["data"]) for e in http.get("/v1/events").json() if e["type"].startswith("deployment.")]
    assert [(kind, data["status"]) for kind, data in feed] == [
        ("deployment.status_changed", "Pending"),
        ("deployment.status_changed", "Standby"),
        ("deployment.status_changed", "Initializing"),
        ("deployment.cold_start", "Initializing"),
        ("deployment.status_changed", "Ready"),
        ("deployment.scaled", "Ready"),
    ]
    assert feed[3][1]["cold_start_ms"] == d["cold_start_ms"] and feed[3][1]["id"] == d["id"]
    assert feed[5][1]["transitions"][-1] == scale_up

    # Back to 0 after the 2 s cooldown: Standby, and no replica process left.
    pids = served.runtime.replica_pids(d["id"])
    wait_status(http, "auto", "Standby", timeout=60)
    wait_for(lambda: not any(process_alive(p) for p in pids), 30, "a replica outlived the scale-down")
    last = transitions(http, "auto")[-1]
    assert (last["from_status"], last["to_status"], last["replicas"]) == ("Ready", "Standby", 0)
    assert "cooldown_time 2 s: 2 -> 0 replicas" in last["reason"]

    # Replica time is on the ledger, priced per second at the CPU rate.
    records = [r for r in http.get("/v1/usage", params={"limit": 1000}).json()["records"] if r["kind"] == "deployment"]
    assert records and all(r["technique"] == "replica" for r in records)
    total_ms = sum(r["compute_ms"] for r in records)
    assert total_ms > 2000
    assert sum(r["cost"]["micro_usd"] for r in records) >= total_ms * 100_000 // 3_600_000

    # Health figures: time series with a per-adapter breakdown, and Prometheus text.
    metrics = http.get("/v1/deployments/auto/metrics", params={"minutes": 5}).json()
    assert sum(p["requests"] for p in metrics["points"]) == len(results) + 1
    assert max(p["replicas"] or 0 for p in metrics["points"]) >= 1.5
    assert any(p["generated_tokens_per_second"] > 0 for p in metrics["points"])
    assert any((p["utilization"] or 0) > 0 for p in metrics["points"])
    assert sum(p["requests"] for p in metrics["adapters"]["base"]) == len(results) + 1
    assert metrics["cold_starts"] and metrics["cold_starts"][0]["seconds"] > 0
    assert http.get("/metrics").status_code == 401  # the tenant's own API key does not open it
    text = httpx.get(f"{served.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    requests = [line for line in text.splitlines() if line.startswith("loraplex_deployment_requests_total{")]
    assert len(requests) == 1 and 'adapter="base"' in requests[0] and 'deployment="auto"' in requests[0]
    assert float(requests[0].rsplit(" ", 1)[1]) == len(results) + 1
    assert 'loraplex_deployment_status{accelerator="cpu",deployment="auto"' in text
    assert "loraplex_deployment_inference_seconds_bucket{" in text


@pytest.mark.parametrize(
    ("extra_env", "kill", "reason"),
    [
        ({}, signal.SIGKILL, "exited with code -9"),
        # alive but answering nothing (its /health times out): stopped after three polls in a row
        ({"LORAPLEX_ENGINE_HEALTH_INTERVAL": "0.5"}, signal.SIGSTOP, "unhealthy 3 health polls in a row"),
    ],
    ids=["killed", "hung"],
)
def test_a_dead_or_hung_replica_is_replaced(
    served: Served, http: httpx.Client, kill: signal.Signals, reason: str
) -> None:
    d = create(http, "steady", min_replicas=1, max_replicas=1, cooldown_time=600)
    wait_status(http, "steady", "Ready")
    [pid] = served.runtime.replica_pids(d["id"])
    os.kill(pid, kill)
    new = wait_for(
        lambda: [p for p in served.runtime.replica_pids(d["id"]) if p != pid], 90, "the replica was not replaced"
    )
    assert len(new) == 1 and not process_alive(pid)
    assert chat(http, "steady").status_code == 200
    path = status_path(http, "steady")
    assert path[-3:] == [("Initializing", "Ready"), ("Ready", "Initializing"), ("Initializing", "Ready")]
    died = [t for t in transitions(http, "steady") if t["to_status"] == "Initializing"][-1]
    assert reason in died["reason"] and "replacing it" in died["reason"]


def test_a_config_update_rolls_replicas_without_dropping_requests(
    served: Served, http: httpx.Client, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = import_lora(http, "greeter", build_lora(tiny_model_dir, tmp_path / "lora"))
    d = create(http, "rolling", min_replicas=1, max_replicas=1, cooldown_time=600)
    wait_status(http, "rolling", "Ready")
    [old_pid] = served.runtime.replica_pids(d["id"])

    results: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(long_stream(http, "rolling", 120))
            except BaseException as exc:  # noqa: BLE001 - every failure is the test's business
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served.runtime.describe(d["id"])["in_flight"] >= 2, 30, "no load on the replica")
        r = http.patch("/v1/deployments/rolling", json={"preloaded_adapters": ["greeter"]})
        assert r.status_code == 200, r.text
        assert r.json()["config_version"] == 2 and r.json()["preloaded_adapters"] == [adapter]
        wait_status(http, "rolling", "Updating", timeout=30)
        rolled = wait_status(http, "rolling", "Ready", timeout=90)
        time.sleep(1)  # requests keep arriving on the new replica
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures
    assert len(results) >= 3 and all(r["finish"] == "length" for r in results)  # none dropped, none cut short
    [replica] = [r for r in rolled["live"]["replicas"] if r["state"] == "ready"]  # the old one may still drain
    assert replica["config_version"] == 2 and replica["adapters"] == [adapter]
    assert old_pid not in served.runtime.replica_pids(d["id"])
    wait_for(lambda: not process_alive(old_pid), 30, "the old replica was not stopped")
    assert status_path(http, "rolling")[-2:] == [("Ready", "Updating"), ("Updating", "Ready")]
    # The preloaded adapter answers on the new replica, and the base model next to it.
    assert chat(http, "rolling", model="greeter/1").status_code == 200
    assert chat(http, "rolling").status_code == 200


def test_a_replica_that_cannot_start_leaves_the_deployment_errored(
    served: Served, http: httpx.Client, sqlite_platform: Platform
) -> None:
    broken = sqlite_platform.data_dir / "volume" / "base_models" / "broken-llama"
    broken.mkdir()
    (broken / "loraplex_model.json").write_text(json.dumps({"params": 1000, "context_length": 512}))
    create(http, "broken", base_model="broken-llama", min_replicas=1, max_replicas=1)
    d = wait_status(http, "broken", "Errored", timeout=90)
    assert "failed to start" in d["status_reason"] and "has no config.json" in d["status_reason"]
    assert d["replicas"] == 0 and served.runtime.replica_pids(d["id"]) == []
    r = chat(http, "broken", model="broken-llama")
    assert r.status_code == 503 and r.json()["error"]["code"] == "deployment_errored"
    assert "has no config.json" in r.json()["error"]["message"]
    assert status_path(http, "broken") == [(None, "Pending"), ("Pending", "Initializing"), ("Initializing", "Errored")]


def test_stopped_refuses_until_standby_and_delete_drains_first(served: Served, http: httpx.Client) -> None:
    create(http, "pausable", min_replicas=0, max_replicas=1, cooldown_time=600)
    wait_status(http, "pausable", "Standby")
    assert http.post("/v1/deployments/pausable/stop").status_code == 200
    wait_status(http, "pausable", "Stopped")
    r = chat(http, "pausable")
    assert r.status_code == 409 and r.json()["error"]["code"] == "deployment_stopped"
    assert "moved to Standby" in r.json()["error"]["message"]
    assert http.post("/v1/deployments/pausable/standby").json()["status"] == "Standby"
    assert chat(http, "pausable").status_code == 200  # wakes it

    # Delete while a request is in flight: it finishes, then the replica stops and the status is Deleted.
    finished: list[dict[str, Any]] = []
    streaming = threading.Thread(target=lambda: finished.append(long_stream(http, "pausable", 300)))
    streaming.start()
    d = deployment(http, "pausable")
    wait_for(lambda: served.runtime.describe(d["id"])["in_flight"] == 1, 30, "the stream did not start")
    r = http.delete("/v1/deployments/pausable", params={"wait": 90})
    streaming.join(timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "Deleted" and r.json()["deleted_at"]
    assert finished and finished[0]["finish"] == "length"
    assert chat(http, "pausable").status_code == 404
    assert http.get("/v1/deployments/pausable").status_code == 404
    assert [d["status"] for d in http.get("/v1/deployments", params={"include_deleted": True}).json()] == ["Deleted"]


def test_the_cli_manages_deployments(served: Served, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    monkeypatch.setenv("LORAPLEX_API_URL", served.url)
    monkeypatch.setenv("LORAPLEX_API_KEY", http.headers["Authorization"].removeprefix("Bearer "))
    runner = CliRunner()
    args = ["deployments", "create", "cli", "--base-model", TINY_MODEL, "--max-replicas", "2", "--cooldown-time", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "deployment cli: Pending" in result.output and "0..2 replicas" in result.output
    wait_status(http, "cli", "Standby")
    result = runner.invoke(app, ["deployments", "get", "cli"])
    assert result.exit_code == 0 and "Pending -> Standby" in result.output
    result = runner.invoke(app, ["deployments", "update", "cli", "--min-replicas", "3"])
    assert result.exit_code == 1 and "min_replicas: 3 is more than max_replicas (2)" in result.output
    result = runner.invoke(app, ["deployments", "delete", "cli"])
    assert result.exit_code == 0 and "deployment cli: Deleted" in result.output


def test_the_sdk_manages_deployments_with_configurable_retries(
    served: Served, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplex import Loraplex, LoraplexError

    monkeypatch.setenv("LORAPLEX_MAX_RETRIES", "0")  # the CLI is configured the same way
    lp = Loraplex(served.url, http.headers["Authorization"].removeprefix("Bearer "))
    assert (lp.max_retries, lp.backoff_seconds) == (0, 0.5)
    created = lp.create_deployment("sdk", TINY_MODEL, max_replicas=2, cooldown_time=5)
    assert created["max_replicas"] == 2 and [d["name"] for d in lp.list_deployments()] == ["sdk"]
    assert lp.update_deployment("sdk", scale_up_threshold=3)["scale_up_threshold"] == 3
    assert lp.stop_deployment("sdk")["name"] == "sdk"
    wait_status(http, "sdk", "Stopped")
    assert lp.standby_deployment("sdk")["status"] == "Standby"
    assert [t["to_status"] for t in lp.deployment_transitions("sdk")][-2:] == ["Stopped", "Standby"]
    assert lp.deployment_metrics("sdk")["points"] is not None
    with pytest.raises(LoraplexError) as refused:
        lp.create_deployment("sdk2", TINY_MODEL, min_replicas=2, max_replicas=1)
    assert refused.value.status == 422 and refused.value.param == "min_replicas"
    assert lp.delete_deployment("sdk", wait=10)["status"] == "Deleted"
