"""Where should a GRPO step's completions come from: TRL's own `generate` on the PEFT model being trained, or our
native engine (functions/engine/native.py) with the adapter as it is at that step? Measured on one step's shape, in
one run, on the bundled model at the training precision (a job's: bf16 where the CPU runs it natively, as here).

One step's generation: `--prompts` prompts (the job's effective_batch_size) x `--generations` completions each
(num_generations), sampled at temperature 1.0 up to `--new-tokens` tokens (max_completion_length), with a rank-8
LoRA on every projection whose B is not zero (a trained adapter changes the output; a new one does not).

  transformers  what GRPOTrainer runs without vLLM: one left-padded `generate` over the step's 32 prompts on the
                unmerged PeftModel (do_sample, temperature 1.0, the chat template's end-of-turn as EOS).
  engine        what a job runs: functions/grpo_rollout.EngineRollout.sample at a new step each time (the adapter
                saved and handed over, each prompt's completions one request with n = num_generations); timed from
                the save to the last token, so the hand-over is in the figure.

    .venv/bin/python scripts/bench_grpo_generation.py                  # 8 x 4 completions, 16 and 128 new tokens

Prints one JSON line and writes scripts/results/grpo_generation_benchmark.json: per length, each side's median
seconds over --repeats, the completion tokens per second, and engine ÷ transformers speed.
"""

import argparse
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
    from functions.finetune_config import FinetuneConfig
    from functions.grpo_rollout import EngineRollout
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
    results: dict[str, Any] = {"model": MODEL, "precision": dtype, "torch_threads": torch.get_num_threads()}
    rows = [p for p in prompts for _ in range(args.generations)]  # as TRL hands a step over
    with tempfile.TemporaryDirectory() as workdir:
        rollout = EngineRollout(MODEL, dtype == "bfloat16", 8, len(rows), Path(workdir), seed=0)
        try:
            by_transformers(model, tokenizer, prompts[:1], args, 2, eos)  # warm-up, untimed: first calls' set-up
            by_engine(rollout, model, 0, rows[:1], 2)
            step = 1  # each engine trial a new step: a new hand-over, as in training
            for new_tokens in [int(n) for n in args.new_tokens.split(",")]:
                trials: dict[str, list[tuple[float, int]]] = {"transformers": [], "engine": []}
                for repeat in range(args.repeats):
                    trials["transformers"].append(by_transformers(model, tokenizer, prompts, args, new_tokens, eos))
                    trials["engine"].append(by_engine(rollout, model, step, rows, new_tokens))
                    step += 1
                    print(f"{new_tokens} tokens, repeat {repeat}: {trials}", flush=True)
                results[f"new_tokens_{new_tokens}"] = summary(trials)
        finally:
            rollout.close()
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


def by_engine(rollout: Any, model: Any, step: int, rows: list[list[int]], new_tokens: int) -> tuple[float, int]:
    started = time.monotonic()
    completions = rollout.sample(model, step, rows, new_tokens, temperature=1.0)
    return time.monotonic() - started, sum(len(c) for c in completions)  # with the end-of-turn token, as TRL's


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
