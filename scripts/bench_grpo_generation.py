"""Where should a GRPO step's completions come from: TRL's own `generate` on the PEFT model being trained, or our
native engine (functions/engine/native.py) with the adapter as it is at that step? Measured on one step's shape, in
one run, on the bundled model at the training precision (a job's: bf16 where the CPU runs it natively, as here).

One step's generation: `--prompts` prompts (the job's effective_batch_size) x `--generations` completions each
(num_generations), sampled at temperature 1.0 up to `--new-tokens` tokens (max_completion_length), with a rank-8
LoRA on every projection whose B is not zero (a trained adapter changes the output; a new one does not).

  transformers  what GRPOTrainer runs without vLLM: one left-padded `generate` over the step's 32 prompts on the
                unmerged PeftModel (do_sample, temperature 1.0, the chat template's end-of-turn as EOS).
  engine        the adapter saved to a new directory (as a step would hand over its weights), then the step's prompts
                as requests to a NativeEngine, each prompt's completions as one request with n = num_generations
                (one prefill); timed from the save to the last token, so the hand-over is in the figure.

    .venv/bin/python scripts/bench_grpo_generation.py                  # 8 x 4 completions, 16 and 128 new tokens

Prints one JSON line and writes scripts/results/grpo_generation_benchmark.json: per length, each side's median
seconds over --repeats, the completion tokens per second, and engine ÷ transformers speed.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "grpo_generation_benchmark.json"
MODEL = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", default="16,128", help="max_completion_length values, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="auto (a job's default: bf16 where the CPU runs it), fp32")
    args = parser.parse_args()

    from peft import get_peft_model

    from functions.base_models import load_model, load_tokenizer
    from functions.engine.native import EngineConfig, NativeEngine
    from functions.finetune_config import FinetuneConfig
    from functions.precision import use_bf16
    from functions.prompts import encode_chat
    from functions.trainer import new_lora

    torch.manual_seed(0)
    dtype = "bfloat16" if use_bf16(args.precision) else "float32"  # as a job trains (functions/trainer.prepare_run)
    tokenizer = load_tokenizer(MODEL)
    config = FinetuneConfig.model_validate({"base_model": MODEL, "dataset": "d", "repo": "r", "rank": 8})
    model = get_peft_model(load_model(MODEL, dtype), new_lora(config, "CAUSAL_LM"))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02)  # as a trained adapter: it changes the output
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    questions = [f"What is {a} + {a + 7}? Reply with the number only." for a in range(args.prompts)]
    prompts = [list(encode_chat(tokenizer, [{"role": "user", "content": q}])) for q in questions]
    engine = NativeEngine(MODEL, config=EngineConfig(dtype=dtype, max_lora_rank=8), background=True)
    results: dict[str, Any] = {"model": MODEL, "precision": dtype, "torch_threads": torch.get_num_threads()}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            by_transformers(model, tokenizer, prompts[:1], args, 2, eos)  # warm-up, untimed: first calls' set-up
            asyncio.run(by_engine(engine, model, Path(workdir) / "warm-up", prompts[:1], args, 2))
            for new_tokens in [int(n) for n in args.new_tokens.split(",")]:
                trials: dict[str, list[tuple[float, int]]] = {"transformers": [], "engine": []}
                for repeat in range(args.repeats):
                    trials["transformers"].append(by_transformers(model, tokenizer, prompts, args, new_tokens, eos))
                    target = Path(workdir) / f"step-{new_tokens}-{repeat}"
                    trials["engine"].append(asyncio.run(by_engine(engine, model, target, prompts, args, new_tokens)))
                    print(f"{new_tokens} tokens, repeat {repeat}: {trials}", flush=True)
                results[f"new_tokens_{new_tokens}"] = summary(trials)
    finally:
        engine.close()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


def by_transformers(
    model: Any, tokenizer: Any, prompts: list[list[int]], args: Any, new_tokens: int, eos: int
) -> tuple[float, int]:
    """TRL's path: every prompt repeated `generations` times, left-padded, one sampled `generate`."""
    rows = [p for p in prompts for _ in range(args.generations)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    started = time.monotonic()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
            top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
    seconds = time.monotonic() - started
    new = out[:, width:]
    tokens = 0
    for row in new.tolist():  # completion tokens up to and with the first EOS, as TRL counts them
        tokens += row.index(eos) + 1 if eos in row else len(row)
    return seconds, tokens


async def by_engine(
    engine: Any, model: Any, target: Path, prompts: list[list[int]], args: Any, new_tokens: int
) -> tuple[float, int]:
    from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams

    started = time.monotonic()
    model.save_pretrained(target)
    adapter = AdapterRef(target.name, target, MODEL)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, n=args.generations)

    async def one(prompt: list[int]) -> int:
        tokens: dict[int, int] = {}  # answer index -> its completion tokens
        async for delta in engine.generate(GenerationRequest(tuple(prompt), params, adapter)):
            tokens[delta.index] = max(tokens.get(delta.index, 0), delta.completion_tokens)
        return sum(tokens.values())

    counts = await asyncio.gather(*(one(p) for p in prompts))
    return time.monotonic() - started, sum(counts)


def summary(trials: dict[str, list[tuple[float, int]]]) -> dict[str, Any]:
    side = {
        name: {
            "median_s": round(statistics.median(s for s, _ in runs), 3),
            "tokens_per_s": round(statistics.median(t / s for s, t in runs), 1),
            "runs": [(round(s, 3), t) for s, t in runs],
        }
        for name, runs in trials.items()
    }
    side["engine_speedup"] = round(side["transformers"]["median_s"] / side["engine"]["median_s"], 2)
    return side


if __name__ == "__main__":
    main()
