"""Does reinforcement fine-tuning (method "grpo") teach the bundled model a task it can be scored on? A measured
before/after on held-out prompts, with the trainer a job uses (functions/grpo.py: TRL's GRPOTrainer on a LoRA
adapter, the step's completions scored by the job's graders in one score_batch call, the Python one in the sandbox).

The task: short additions ("What is 17 + 25? Reply with the number only."), rewarded by two graders: `correct`, the
built-in numeric grader against the row's answer column, and `bare`, a Python reward function (sandboxed) giving 1.0
when the completion is the number alone. Measured on held-out prompts before and after, one greedy completion each
(functions/grpo.generate, as a job's evaluation): the mean weighted reward, the share answered correctly (`correct`)
and the share answered with the number alone (`bare`).

The job's defaults (temperature 0.7, learning rate "auto": 2e-4 here), bf16 where the CPU runs it as a job does,
completions from the native engine (functions/grpo_rollout.py):

    .venv/bin/python scripts/bench_grpo.py --steps 30      # the README's figures: 64 prompts, 40 held out
    .venv/bin/python scripts/bench_grpo.py --steps 30 --temperature 1.0 --learning-rate 1e-4 \
        --output scripts/results/grpo_benchmark_t1.json     # the defaults before: TRL's temperature, a tenth of SFT

Prints one JSON line and writes scripts/results/grpo_benchmark.json (or --output); each step's training reward goes
to stderr as it comes.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

RESULTS = Path(__file__).resolve().parent / "results" / "grpo_benchmark.json"
BARE = """
def reward_fn(prompt, completion, example):
    return 1.0 if completion.strip() == str(example["answer"]) else 0.0
"""
GRADERS = [
    {"type": "numeric", "name": "correct", "column": "answer"},
    {"type": "python", "name": "bare", "source": BARE, "columns": ["answer"], "weight": 0.5},
]


def prompts(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        rows.append({"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train", type=int, default=64, help="training prompts")
    parser.add_argument("--held-out", type=int, default=40, help="held-out prompts, other questions")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    parser.add_argument("--learning-rate", default="auto")
    parser.add_argument("--num-generations", type=int, default=None)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the job's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    from functions.auto_config import learning_rate
    from functions.base_models import load_tokenizer
    from functions.finetune_config import FinetuneConfig
    from functions.grpo import PromptRow, build_grpo_trainer, counted

    fields = {"base_model": args.model, "dataset": "d", "repo": "r", "method": "grpo", "reward_functions": GRADERS}
    fields |= {"effective_batch_size": 8, "max_seq_length": 128, "eval_steps": None, "task": "completion"}
    fields |= {"max_completion_length": args.max_completion_length}
    fields |= {"train_steps": args.steps} if args.steps else {"epochs": 1}
    fields |= {"num_generations": args.num_generations} if args.num_generations else {}
    fields |= {"temperature": args.temperature} if args.temperature is not None else {}
    config = FinetuneConfig.model_validate(fields)
    rate = learning_rate(config) if args.learning_rate == "auto" else float(args.learning_rate)
    config = config.model_copy(update={"learning_rate": rate})
    tokenizer = load_tokenizer(args.model)

    def rows(data: list[dict[str, Any]]) -> list[Any]:
        return counted([PromptRow(i, i + 1, "train", r["prompt"], r) for i, r in enumerate(data)], tokenizer, config)

    train_rows = prompts(args.train, seed=1)
    held_out = rows([r for r in prompts(args.held_out * 2, seed=2) if r not in train_rows][: args.held_out])
    train = rows(train_rows)
    with tempfile.TemporaryDirectory() as workdir:
        run = build_grpo_trainer(config, train, Path(workdir))  # the precision a job trains at
        before = measure(run, config, held_out)
        run.trainer.add_callback(Progress())
        started = time.monotonic()
        run.trainer.train()
        seconds = time.monotonic() - started
        after = measure(run, config, held_out)
        run.close()
        history = [
            {"step": log["step"], "reward": round(log["reward"], 3), "kl": round(log.get("kl") or 0.0, 4)}
            for log in run.trainer.state.log_history
            if "reward" in log
        ]
    grpo = config.grpo
    result = {
        "model": args.model,
        "train_prompts": len(train),
        "held_out_prompts": len(held_out),
        "steps": run.trainer.state.global_step,
        "num_generations": grpo.num_generations,
        "max_completion_length": grpo.max_completion_length,
        "beta": grpo.beta,
        "temperature": grpo.temperature,
        "learning_rate": rate,
        "precision": "bf16" if run.bf16 else "fp32",
        "completions_from": "engine" if run.rollout is not None else "transformers",
        "train_seconds": round(seconds, 1),
        "tokens_processed": int(run.trainer.state.num_input_tokens_seen),
        "before": before,
        "after": after,
        "training_reward_by_step": history,
    }
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


class Progress(TrainerCallback):
    """Each step's training reward on stderr while the run goes (the JSON comes at the end)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "reward" in logs:
            print(f"step {state.global_step}: reward {logs['reward']:.3f}", file=sys.stderr, flush=True)


def measure(run: Any, config: Any, held_out: list[Any]) -> dict[str, Any]:
    """One greedy completion per held-out prompt (as a job's evaluation): the mean reward and each grader's mean."""
    from functions.grpo import evaluate_rewards

    result = evaluate_rewards(run, config, held_out)
    graders = result.rewards["graders"] if result.rewards else {}
    return {
        "mean_reward": round(result.reward or 0.0, 3),
        "correct": round(graders["correct"]["mean"] or 0.0, 3),
        "number_only": round(graders["bare"]["mean"] or 0.0, 3),
        "failures": result.rewards["failures"] if result.rewards else {},
        "samples": [(s["prompt"], s["completion"]) for s in (result.samples or [])[:3]],
    }


if __name__ == "__main__":
    main()
