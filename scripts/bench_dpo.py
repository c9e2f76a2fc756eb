"""Does preference tuning (method "dpo") move the bundled model's preferences? A measured before/after on held-out
pairs, with the trainer a job uses (functions/dpo.py, TRL's DPOTrainer on a LoRA adapter, the reference the model
with the adapter off).

The task: short arithmetic questions, where the chosen answer is JSON (`{"answer": 7}`) and the rejected one the
same number in words the base model would rather write ("The answer is 7."). Measured on held-out questions, before
and after: the share of pairs where the model gives the chosen answer a higher log-probability than the rejected
one (the model's own preference, not DPO's reward, which is 0 before training by construction), the mean margin of
those log-probabilities, and the share of greedy answers (16 new tokens) that start with '{'.

    .venv/bin/python scripts/bench_dpo.py           # 96 pairs, 2 epochs, 50 held out: about 5 minutes on 2 CPU cores
    .venv/bin/python scripts/bench_dpo.py --learning-rate 5e-4 --beta 0.1

Prints one JSON line and writes scripts/results/dpo_benchmark.json.
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "dpo_benchmark.json"
QUESTIONS = ["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?", "Compute {a} + {b}."]


def pairs(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        prompt = rng.choice(QUESTIONS).format(a=a, b=b)
        rows.append({"prompt": prompt, "chosen": json.dumps({"answer": a + b}), "rejected": f"The answer is {a + b}."})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train", type=int, default=96, help="training pairs")
    parser.add_argument("--held-out", type=int, default=50, help="held-out pairs, other questions")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--learning-rate", default="auto")
    args = parser.parse_args()

    from functions.auto_config import learning_rate
    from functions.base_models import load_tokenizer
    from functions.datasets import Example
    from functions.dpo import build_dpo_trainer
    from functions.finetune_config import FinetuneConfig
    from functions.preference import tokenize_pair

    config = FinetuneConfig.model_validate(
        {"base_model": args.model, "dataset": "d", "repo": "r", "method": "dpo", "epochs": args.epochs}
        | {"effective_batch_size": 8, "max_seq_length": 128, "eval_steps": None, "task": "completion"}
        | ({"beta": args.beta} if args.beta is not None else {})
    )
    rate = learning_rate(config) if args.learning_rate == "auto" else float(args.learning_rate)
    config = config.model_copy(update={"learning_rate": rate})
    tokenizer = load_tokenizer(args.model)

    def tokenized(rows: list[dict[str, str]]) -> list[Any]:
        return [tokenize_pair(Example(0, "train", **row), tokenizer, True, 128) for row in rows]

    train = tokenized(pairs(args.train, seed=1))
    held_out_rows = [r for r in pairs(args.held_out * 2, seed=2) if r not in pairs(args.train, seed=1)][: args.held_out]
    held_out = tokenized(held_out_rows)
    with tempfile.TemporaryDirectory() as workdir:
        run = build_dpo_trainer(config, train, Path(workdir), precision="float32")
        model = run.trainer.model
        before = measure(model, tokenizer, held_out, adapter=False)
        started = time.monotonic()
        run.trainer.train()
        seconds = time.monotonic() - started
        after = measure(model, tokenizer, held_out, adapter=True)
    result = {
        "model": args.model,
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "epochs": args.epochs,
        "steps": run.trainer.state.global_step,
        "beta": config.dpo_beta,
        "learning_rate": rate,
        "train_seconds": round(seconds, 1),
        "before": before,
        "after": after,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def measure(model: Any, tokenizer: Any, held_out: list[Any], adapter: bool) -> dict[str, Any]:
    """Over the held-out pairs: the share where log p(chosen) > log p(rejected) (sums over the answer's tokens),
    the mean difference, and the share of greedy answers starting with '{'; with the adapter on or off."""
    import contextlib

    import torch

    model.eval()
    context = contextlib.nullcontext() if adapter else model.disable_adapter()
    wins, margins, json_answers, samples = 0, [], 0, []
    with torch.no_grad(), context:
        for pair in held_out:
            chosen = answer_logp(model, pair.prompt_ids, pair.chosen_ids)
            rejected = answer_logp(model, pair.prompt_ids, pair.rejected_ids)
            wins += chosen > rejected
            margins.append(chosen - rejected)
            ids = torch.tensor([pair.prompt_ids])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
            answer = tokenizer.decode(out[0, len(pair.prompt_ids) :], skip_special_tokens=True)
            json_answers += answer.lstrip().startswith("{")
            samples.append(answer)
    n = len(held_out)
    return {
        "chosen_over_rejected": round(wins / n, 3),
        "mean_logp_margin": round(sum(margins) / n, 3),
        "greedy_answers_in_json": round(json_answers / n, 3),
        "first_answers": samples[:3],
    }


def answer_logp(model: Any, prompt_ids: list[int], answer_ids: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # [answer tokens, vocab]
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids)[:, None]).sum())


if __name__ == "__main__":
    main()
