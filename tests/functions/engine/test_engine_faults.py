"""Fault isolation in the native engine: what goes wrong with one request (its adapter's numbers, its sampling, its
start) fails that request alone, frees its cache and slot at once, and the others decode exactly as they would
alone; a model that cannot compute at all makes the engine report itself unhealthy; a stalled engine says so; a
request whose caller left the engine process's HTTP API leaves the queue."""

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL, free_port, wait_for
from functions.engine import adapter_manager, native
from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import (
    AdapterRef,
    Completion,
    EngineError,
    GenerationRequest,
    RequestFailed,
    SamplingParams,
    collect,
)
from lora_helpers import build_lora
from web.errors import status_of

PROMPTS = ["The cat sat on the", "Once upon a time, in a land far away,", "def add(a, b):", "Write a poem."]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good: an ordinary LoRA; overflow: finite weights so large that its output is NaN/Inf (what import cannot see);
    nan: a NaN in one weight (import refuses these; here the file is written straight to disk)."""
    root = tmp_path_factory.mktemp("fault_adapters")
    paths = {
        "good": build_lora(tiny_model_dir, root / "good", 1),
        "overflow": build_lora(tiny_model_dir, root / "overflow", 2, b_scale=1e30),
        "nan": build_lora(tiny_model_dir, root / "nan", 3),
    }
    weights = paths["nan"] / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = next(iter(tensors))
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(weights))
    return paths


@pytest.fixture
def engine(sqlite_platform: object) -> Iterator[NativeEngine]:
    config = EngineConfig(dtype="fp32", adapter_slots=4, kv_cache_bytes=16 * 2**20, stall_seconds=0.5)
    engine = NativeEngine(TINY_MODEL, config=config)
    yield engine
    engine.close()


def ref(adapters: dict[str, Path], name: str | None) -> AdapterRef | None:
    return None if name is None else AdapterRef(f"ad_{name}", adapters[name], base_model=TINY_MODEL)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=24, temperature=0.0, **kw)


async def gather(engine: NativeEngine, requests: list[GenerationRequest]) -> list[Completion | BaseException]:
    """All requests submitted at once (one batch), each one's completion or error."""
    return await asyncio.gather(*(collect(engine.generate(r)) for r in requests), return_exceptions=True)


def idle(engine: NativeEngine) -> None:
    """Wait until the engine holds nothing: every cache block and adapter slot returned."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if engine.kv.used_fraction == 0 and not any(engine.lora.pins) and engine.stats()["running"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine still holds resources: {engine.stats()}, pins {engine.lora.pins}")


def test_adapter_with_non_finite_output_fails_alone_in_a_mixed_batch(
    engine: NativeEngine, adapters: dict[str, Path]
) -> None:
    batch = [(None, PROMPTS[0]), ("good", PROMPTS[1]), ("overflow", PROMPTS[2]), ("good", PROMPTS[3])]
    requests = [GenerationRequest(prompt, greedy(), ref(adapters, name)) for name, prompt in batch]
    alone = [asyncio.run(collect(engine.generate(requests[i]))) for i in (0, 1, 3)]
    results = asyncio.run(gather(engine, requests))
    failed = results[2]
    assert isinstance(failed, RequestFailed), failed
    assert (failed.code, status_of(failed)) == ("adapter_numeric_fault", 422)
    others = [results[0], results[1], results[3]]
    assert [(c.text, c.completion_tokens, c.finish_reason) for c in others] == [  # type: ignore[union-attr]
        (c.text, c.completion_tokens, c.finish_reason) for c in alone
    ]
    idle(engine)
    assert engine.healthy() == (True, "")
    # repeatable, and the engine serves on: the broken values it left in its freed blocks reach nobody
    again = asyncio.run(gather(engine, [requests[2], requests[0], requests[1]]))
    assert isinstance(again[0], RequestFailed)
    assert [c.text for c in again[1:]] == [alone[0].text, alone[1].text]  # type: ignore[union-attr]
    idle(engine)


def test_adapter_with_nan_weights_is_refused_at_load(engine: NativeEngine, adapters: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="not finite") as refused:
        asyncio.run(collect(engine.generate(GenerationRequest(PROMPTS[0], greedy(), ref(adapters, "nan")))))
    assert refused.value.field == "model"
    assert "ad_nan" not in engine.lora.resident
    idle(engine)


def test_seed_out_of_range_is_refused_and_a_request_that_cannot_start_fails_alone(
    engine: NativeEngine, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed that hung the engine (2**64: torch's generator takes a signed 64-bit seed) is refused up front; and
    should a request still fail while being admitted, it fails alone, holding no cache."""
    huge = SamplingParams(max_new_tokens=8, temperature=0.7, seed=2**64)
    with pytest.raises(EngineError, match="seed") as refused:
        asyncio.run(collect(engine.generate(GenerationRequest(PROMPTS[0], huge))))
    assert refused.value.field == "seed"

    monkeypatch.setattr(native, "check_request", lambda *args: None)  # as if the check had a hole
    fine = GenerationRequest(PROMPTS[1], greedy(), ref(adapters, "good"))
    want = asyncio.run(collect(engine.generate(fine)))
    results = asyncio.run(gather(engine, [GenerationRequest(PROMPTS[0], huge), fine]))
    assert isinstance(results[0], RequestFailed) and "could not start" in str(results[0])
    assert results[1].text == want.text  # type: ignore[union-attr]
    idle(engine)
    assert engine.healthy() == (True, "")


def test_sampling_that_raises_fails_only_its_request(
    engine: NativeEngine, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_choose = native.choose

    def choose(logits: torch.Tensor, rows: list[Any]) -> Any:  # a sampling fault of the request with seed 666
        if any(row.params.seed == 666 for row in rows):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_choose(logits, rows)

    plain = [
        GenerationRequest(p, greedy(), ref(adapters, name)) for name, p in ((None, PROMPTS[0]), ("good", PROMPTS[1]))
    ]
    want = [asyncio.run(collect(engine.generate(r))).text for r in plain]
    monkeypatch.setattr(native, "choose", choose)
    cursed = GenerationRequest(PROMPTS[2], SamplingParams(max_new_tokens=24, temperature=0.8, seed=666))
    results = asyncio.run(gather(engine, [plain[0], cursed, plain[1]]))
    assert isinstance(results[1], RequestFailed) and "sampling failed" in str(results[1])
    assert [results[0].text, results[2].text] == want  # type: ignore[union-attr]
    idle(engine)
    assert engine.healthy() == (True, "")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_model_that_cannot_compute_breaks_the_engine_down_and_it_says_so(
    engine: NativeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "forward", broken)
    results = asyncio.run(gather(engine, [GenerationRequest(p, greedy()) for p in PROMPTS[:2]]))
    assert all(isinstance(r, RequestFailed) for r in results), results
    deadline = time.monotonic() + 5
    while engine.healthy()[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    ok, reason = engine.healthy()
    assert not ok and "failed for every request" in reason
    with pytest.raises(RequestFailed) as refused:  # new requests are refused at once, not queued behind a dead loop
        asyncio.run(collect(engine.generate(GenerationRequest(PROMPTS[0], greedy()))))
    assert (refused.value.code, status_of(refused.value)) == ("engine_restarting", 503)
    assert engine.kv.used_fraction == 0


@pytest.fixture
def blocked_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Adapter reads wait until the returned event is set: requests of an adapter sit in the engine's queue."""
    release = threading.Event()
    real = adapter_manager.load_adapter

    def slow(*args: Any) -> Any:
        release.wait(timeout=30)
        return real(*args)

    monkeypatch.setattr(adapter_manager, "load_adapter", slow)
    yield release
    release.set()


def test_a_stalled_engine_reports_unhealthy_until_it_moves_again(
    engine: NativeEngine, adapters: dict[str, Path], blocked_loads: threading.Event
) -> None:
    async def scenario() -> tuple[tuple[bool, str], Completion]:
        task = asyncio.ensure_future(
            collect(engine.generate(GenerationRequest(PROMPTS[0], greedy(), ref(adapters, "good"))))
        )
        await asyncio.sleep(1.0)  # stall_seconds is 0.5
        verdict = engine.healthy()
        blocked_loads.set()
        return verdict, await task

    (ok, reason), done = asyncio.run(scenario())
    assert not ok and "no progress" in reason
    assert done.completion_tokens == 24
    assert engine.healthy() == (True, "")


def test_engine_process_api_drops_a_queued_request_whose_caller_left_and_reports_health(
    engine: NativeEngine, adapters: dict[str, Path], blocked_loads: threading.Event
) -> None:
    """The engine process's HTTP API (functions/engine/server.py) over a real socket: a caller that gives up on a
    queued request takes it out of the engine's queue; /health is 503 with the reason while the engine is stalled."""
    import uvicorn

    from functions.engine.protocol import request_to_dict
    from functions.engine.server import create_engine_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_engine_app(engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, 10, "the engine API did not start")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        body = request_to_dict(GenerationRequest(PROMPTS[0], greedy(), ref(adapters, "good")))
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/generate", json=body, timeout=0.3)
        stalled = httpx.get(f"{url}/health")
        assert stalled.status_code == 503 and "no progress" in stalled.json()["reason"]
        wait_for(lambda: engine.stats()["waiting"] == 0, 5, "the callers left, their requests stayed")
        assert httpx.get(f"{url}/health").status_code == 200
        blocked_loads.set()
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line]
        assert '"finish_reason": "length"' in lines[-1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
