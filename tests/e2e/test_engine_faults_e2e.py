"""Fault isolation over real HTTP: `loraplex serve` with its engine process. One tenant's adapter whose output
overflows fails that tenant's requests alone while another tenant's stream completes; a stream whose engine dies
mid-answer ends with an error event (the openai SDK raises it), never as if complete, and is charged for what was
sent; the next request is served by a new engine."""

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from sqlalchemy import select

from conftest import TINY_MODEL, Platform, Processes, make_tenant
from lora_helpers import build_lora

LONG = {"max_tokens": 1500, "min_tokens": 1500, "temperature": 0}  # the tiny model never stops early


@pytest.fixture
def processes(sqlite_platform: Platform) -> Iterator[Processes]:
    procs = Processes(sqlite_platform, {})
    yield procs
    procs.stop()


def engine_pids(server_pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(server_pid).children(recursive=True) if "engine" in " ".join(p.cmdline())]


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def test_overflowing_adapter_fails_its_own_requests_while_another_tenant_streams_in_full(
    processes: Processes, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = processes.server(workers=0)
    _, alice = make_tenant("alice")
    _, bob = make_tenant("bob")
    adapter = build_lora(tiny_model_dir, tmp_path / "overflow", 2, b_scale=1e30)  # finite: import takes it
    files = [
        ("files", (name, (adapter / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    r = httpx.post(
        f"{url}/v1/repos/wild/versions", headers=alice, files=files, data={"base_model": TINY_MODEL}, timeout=60
    )
    assert r.status_code == 201, r.text

    bob_events: list[Any] = []

    def bob_streams() -> None:
        body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True}
        body |= {"max_tokens": 200, "min_tokens": 200, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=bob, json=body, timeout=120) as response:
            bob_events.extend(sse_events(response.iter_lines()))

    bob_thread = threading.Thread(target=bob_streams)
    bob_thread.start()
    for _ in range(3):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            headers=alice,
            json={"model": "wild/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
            timeout=60,
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("adapter_numeric_fault", "model")
        assert "not finite" in error["message"]
    bob_thread.join(timeout=120)
    assert bob_events[-1] == "[DONE]"
    finish = [e["choices"][0]["finish_reason"] for e in bob_events[:-1] if e["choices"]]
    assert finish[-1] == "length"
    assert not any("error" in e for e in bob_events[:-1])


def test_a_stream_whose_engine_dies_ends_with_an_error_and_is_charged_for_what_was_sent(
    processes: Processes, sqlite_platform: Platform
) -> None:
    url = processes.server(workers=0)
    tenant_id, headers = make_tenant("carol")
    server_pid = processes.children[0].pid
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1], max_retries=0)
    messages: Any = [{"role": "user", "content": "Tell me a long story"}]

    # through the official SDK: the error event is raised, not taken for the end of the answer
    stream = sdk.chat.completions.create(model=TINY_MODEL, messages=messages, stream=True, extra_body=LONG)
    received = []
    with pytest.raises(openai.APIError, match="engine"):
        for chunk in stream:
            received.append(chunk)
            if len(received) == 5:
                for pid in engine_pids(server_pid):
                    psutil.Process(pid).send_signal(signal.SIGKILL)
    assert all(c.choices[0].finish_reason is None for c in received if c.choices)

    # the raw events: an error in the API's shape last, no finish_reason, no [DONE]
    body = {"model": TINY_MODEL, "messages": messages, "stream": True} | LONG
    events: list[Any] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, json=body, timeout=120) as response:
        assert response.status_code == 200  # a new engine was started for it
        for event in sse_events(response.iter_lines()):
            events.append(event)
            if len(events) == 5:
                for pid in engine_pids(server_pid):
                    psutil.Process(pid).send_signal(signal.SIGKILL)
    assert "[DONE]" not in events
    assert set(events[-1]) == {"error"}
    assert events[-1]["error"]["code"] == "engine_unavailable"
    assert events[-1]["error"]["type"] == "service_unavailable"
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"])
    sent = sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content"))

    from app.db import session_scope
    from app.models import UsageRecord

    with session_scope() as s:
        records = s.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)).all()
        charged = sorted(r.output_tokens for r in records)
    assert len(charged) == 2 and all(n >= 4 for n in charged)  # what each stream generated before it broke
    assert sent <= charged[-1] < 1500

    # and the platform serves on
    answer = sdk.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8)
    assert answer.choices[0].finish_reason == "length"


def test_queued_requests_whose_clients_left_leave_the_engine(sqlite_platform: Platform) -> None:
    """One request decodes at a time; three non-streaming requests queued behind it are given up by their clients:
    the engine's queue empties at once (before, they stayed until served, holding their place)."""
    procs = Processes(sqlite_platform, {"LORAPLEX_MAX_BATCH_SIZE": "1"})
    try:
        url = procs.server(workers=0)
        _, headers = make_tenant("dave")
        body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}]}

        done = threading.Event()

        def occupy() -> None:  # a stream that holds the engine's one batch place until the test is done with it
            stream = body | LONG | {"stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, json=stream, timeout=120) as r:
                for _ in r.iter_lines():
                    if done.is_set():
                        return

        occupier = threading.Thread(target=occupy)
        occupier.start()
        engine = None
        while engine is None:  # the engine process, started by the first request; its port is on its command line
            pids = engine_pids(procs.children[0].pid)
            engine = psutil.Process(pids[0]).cmdline() if pids else None
        health = f"http://127.0.0.1:{engine[engine.index('--port') + 1]}/health"
        while not _running(health):
            time.sleep(0.1)
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=1)
        deadline = time.monotonic() + 5
        while (waiting := httpx.get(health, timeout=5).json()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting == 0
        assert _running(health) == 1  # the long one decodes on
        done.set()
        occupier.join(timeout=30)
    finally:
        procs.stop()


def _running(health: str) -> int:
    try:
        return httpx.get(health, timeout=5).json()["running"]
    except httpx.HTTPError:  # still loading
        return 0
