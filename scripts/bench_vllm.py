"""Serving benchmark of vLLM (through `VLLMEngine`, i.e. vLLM's async engine) on the bundled SmolLM2-135M.

Run in the vLLM environment (scripts/setup_vllm.sh):

    .venv-vllm/bin/python scripts/bench_vllm.py --workload all --out vllm.json

Workloads, each request a chat-templated "Write a short story about item {i}." and exactly 64 greedy new tokens
(min = max = 64):
  a  64 concurrent requests, base model
  b  64 concurrent requests over 64 distinct rank-8 q/k/v/o adapters
  c  the same 64 requests, skewed: 80% on 4 adapters, the rest spread over the others
  d  one request alone
  e  (b) with max_loras=16: adapters are swapped in and out (and re-read from disk) during the run
  f  (b) with every other request constrained to a JSON schema (STORY_SCHEMA: structured output, long enough that
     it runs its 64 tokens like the free half), to compare with (b) in the same run
Per workload: output tokens/s (all generated tokens ÷ time from the first submit to the last finish), TTFT and
inter-token latency p50/p99 (ms; the gaps between streamed deltas, one token each unless the client fell
behind), and peak memory. Each workload runs --repeats times; the figures are the medians over the runs.
"""

import argparse
import asyncio
import contextlib
import json
import platform
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench_adapters import make_adapters

BASE = "smollm2-135m"
REQUESTS = 64
NEW_TOKENS = 64
ADAPTERS = 64
RANK = 8
WORKLOADS = ("a", "b", "c", "d", "e", "f")
# Workload f's schema: a story in a JSON object, so the model writes as long under it as without it
STORY_SCHEMA = {
    "type": "object",
    # A story of at least 300 characters: every constrained answer runs its 64 tokens, as the free ones do, so (f)
    # and (b) generate the same tokens and their throughput compares the cost of the masks alone.
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 300}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
MB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--out", type=Path, help="write the JSON result here (it is printed either way)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters-dir", type=Path, default=Path(".data/bench_adapters"))
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    result = asyncio.run(bench(args))  # one event loop throughout: vLLM's output task lives on it
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


async def bench(args: argparse.Namespace) -> dict:
    from functions.base_models import ensure_local

    chosen = list(WORKLOADS) if args.workload == "all" else [args.workload]

    model_dir = ensure_local(BASE)
    adapters = make_adapters(args.adapters_dir, ADAPTERS, rank=RANK, base_model_dir=model_dir)
    result: dict[str, Any] = {"engine": "vllm", "model": BASE, "dtype": args.dtype, "repeats": args.repeats}
    result["workloads"] = workloads = {}
    memory = TreeMemory()

    if main_set := [w for w in chosen if w != "e"]:
        engine, result["engine_start_s"] = await start_engine(model_dir, args.dtype, max_loras=ADAPTERS)
        result["vllm_version"] = _vllm_version()
        for name in main_set:
            workloads[name] = await run_workload(engine, name, adapters, args.repeats, memory)
        await close(engine)
    if "e" in chosen:
        engine, start_s = await start_engine(model_dir, args.dtype, max_loras=16)
        result.setdefault("engine_start_s", start_s)
        result.setdefault("vllm_version", _vllm_version())
        workloads["e"] = await run_workload(engine, "e", adapters, args.repeats, memory)
        workloads["e"]["engine_start_s"] = start_s
        await close(engine)
    result["frontend_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["machine"] = {"cpus": _cpu_count(), "processor": platform.processor() or platform.machine()}
    memory.stop()
    return result


async def start_engine(model_dir: Path, dtype: str, max_loras: int) -> tuple[Any, float]:
    """A VLLMEngine with LoRA on (rank ≤ 8) and the seconds it took to start, warmed with one short request."""
    from functions.engine.protocol import GenerationRequest, SamplingParams, collect
    from functions.engine.vllm_engine import VLLMEngine

    started = time.monotonic()
    engine = VLLMEngine(BASE, model_dir, max_loras=max_loras, max_lora_rank=RANK, dtype=dtype)
    start_s = time.monotonic() - started
    warm = GenerationRequest(prompt_for(engine, 0), SamplingParams(max_new_tokens=8, temperature=0))
    await collect(engine.generate(warm))
    return engine, round(start_s, 1)


async def close(engine: Any) -> None:
    engine.close()
    await asyncio.sleep(0.1)  # let vLLM's output tasks see their cancellation


def prompt_for(engine: Any, i: int) -> tuple[int, ...]:
    """Request i's prompt: the chat template's token ids, as the API sends a chat request."""
    from functions.prompts import encode_chat

    return encode_chat(engine.tokenizer, [{"role": "user", "content": f"Write a short story about item {i}."}])


def adapter_plan(workload: str) -> list[int | None]:
    """The adapter index of each request (None: the base model)."""
    if workload == "a":
        return [None] * REQUESTS
    if workload == "d":
        return [None]
    if workload in ("b", "e", "f"):
        return list(range(REQUESTS))
    hot = int(REQUESTS * 0.8)  # (c): 51 requests on adapters 0-3, 13 on distinct others
    rest = REQUESTS - hot
    return [i % 4 for i in range(hot)] + [4 + k * (ADAPTERS - 4) // rest for k in range(rest)]


async def run_workload(engine: Any, name: str, adapters: list[Path], repeats: int, memory: "TreeMemory") -> dict:
    from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams, canonical_schema

    params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0)
    # f: every other request under the schema (min_tokens cannot go with one: the schema decides the end)
    constrained = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, json_schema=canonical_schema(STORY_SCHEMA))
    requests = [
        GenerationRequest(
            prompt_for(engine, i),
            constrained if name == "f" and i % 2 else params,
            None if a is None else AdapterRef(f"bench-{a:03d}", adapters[a], BASE),
        )
        for i, a in enumerate(adapter_plan(name))
    ]
    runs = []
    for _ in range(repeats):
        memory.reset()
        run = await measure(engine, requests)
        run["peak_rss_mb"] = memory.peak_mb()
        runs.append(run)
        print(f"[{name}] {json.dumps(run)}", flush=True)
    summary = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0] if key != "exact"}
    summary["requests"] = len(requests)
    summary["distinct_adapters"] = len({r.adapter.key for r in requests if r.adapter})
    summary["all_exactly_64_tokens"] = all(r["exact"] for r in runs)
    summary["runs_output_tok_s"] = [r["output_tok_s"] for r in runs]
    return summary


async def measure(engine: Any, requests: list) -> dict:
    """Submit all requests at once; per request, the arrival time of every streamed delta."""
    started = time.monotonic()

    async def one(request: Any) -> tuple[list[float], Any]:
        arrivals: list[float] = []
        last = None
        async for delta in engine.generate(request):
            if delta.text:
                arrivals.append(time.monotonic())
            last = delta
        return arrivals, last

    results = await asyncio.gather(*(one(r) for r in requests))
    wall = time.monotonic() - started
    tokens = sum(last.completion_tokens for _, last in results)
    ttft = [last.first_token_ms for _, last in results]
    itl = [(b - a) * 1000 for arrivals, _ in results for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return figures(tokens, wall, ttft, itl) | {
        "exact": all(last.completion_tokens == NEW_TOKENS for _, last in results)
    }


def figures(tokens: int, wall: float, ttft: list[float], itl: list[float]) -> dict:
    """Throughput and latency percentiles of one run (times in ms)."""
    return {
        "output_tok_s": round(tokens / wall, 2),
        "wall_s": round(wall, 3),
        "ttft_p50_ms": round(percentile(ttft, 50), 1),
        "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "itl_p50_ms": round(percentile(itl, 50), 1),
        "itl_p99_ms": round(percentile(itl, 99), 1),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class TreeMemory:
    """Peak resident memory of this process and its children (vLLM's engine core and worker run in child
    processes, so this process's own ru_maxrss misses most of it), sampled every 100 ms."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            total = 0
            for proc in [self._me, *self._me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child that just ended
                    total += proc.memory_info().rss
            self._peak = max(self._peak, total)

    def reset(self) -> None:
        self._peak = 0

    def peak_mb(self) -> float:
        return round(self._peak / MB, 1)

    def stop(self) -> None:
        self._stop.set()


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":  # vLLM starts its engine core with `spawn`, which re-imports this file
    main()
