"""Training speed and peak memory: Loraplex's trainer against a plain transformers + PEFT loop, in one run.

Both sides train the bundled SmolLM2-135M-Instruct on the same rows (the sample dataset's train split with the
chat template and completion-only labels), with the same LoRA (rank 16, alpha 32, q/k/v/o projections), the
same effective batch (8 rows per optimizer step), learning rate and epochs. The plain loop is what one writes
by hand: fp32 weights, batches of 8 in a shuffled order padded to their longest row, AdamW.

Each measurement is its own process, so its peak resident memory (ru_maxrss, model loading included) is its
own; the two sides alternate, `--repeats` times, and the medians and their ratios are reported.

    .venv/bin/python scripts/bench_training.py [--repeats 3] [--epochs 1]

Writes scripts/results/training_benchmark.json and .md (linked from the README).
"""

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "app" / "samples" / "support_triage.jsonl"
RESULTS = ROOT / "scripts" / "results"
BASE_MODEL = "smollm2-135m"
LORA = {"rank": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH, LEARNING_RATE = 8, 1e-3


def examples() -> list:
    from functions.base_models import load_tokenizer
    from functions.dataset_files import parse_dataset
    from functions.prompts import tokenize_example

    tokenizer = load_tokenizer(BASE_MODEL)
    parsed = parse_dataset(SAMPLE.read_bytes(), "jsonl")
    return [tokenize_example(e, tokenizer, True, 1024) for e in parsed.examples if e.split == "train"]


def run_ours(epochs: int) -> dict:
    from functions.finetune_config import FinetuneConfig
    from functions.trainer import build_trainer

    rows = examples()
    config = FinetuneConfig(
        base_model=BASE_MODEL,
        dataset="bench",
        repo="bench",
        epochs=epochs,
        learning_rate=LEARNING_RATE,
        effective_batch_size=BATCH,
        lora_dropout=0.0,
        max_seq_length=max(len(r.input_ids) for r in rows),  # nothing cut, as in the plain loop
        eval_steps=None,  # the trainer alone: no evaluation in the timed loop
        task="completion",
        **LORA,
    )
    with tempfile.TemporaryDirectory() as workdir:
        run = build_trainer(config, rows, Path(workdir), precision="fp32")  # the plain loop's precision, everywhere
        start = time.perf_counter()
        run.trainer.train()
        seconds = time.perf_counter() - start
    return {"tokens": sum(len(r.input_ids) for r in rows) * epochs, "seconds": seconds, "bf16": run.bf16}


def run_plain(epochs: int) -> dict:
    import os

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from functions.base_models import ensure_local, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(42)
    rows = examples()
    pad = load_tokenizer(BASE_MODEL).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(ensure_local(BASE_MODEL), dtype=torch.float32)
    lora = LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["lora_alpha"],
        target_modules=LORA["target_modules"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    order = random.Random(42)
    start = time.perf_counter()
    for _ in range(epochs):
        shuffled = order.sample(rows, len(rows))
        for i in range(0, len(shuffled), BATCH):
            batch = shuffled[i : i + BATCH]
            width = max(len(r.input_ids) for r in batch)
            ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in batch])
            labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in batch])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(r.input_ids) for r in batch])[:, None]).long()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return {"tokens": sum(len(r.input_ids) for r in rows) * epochs, "seconds": seconds, "bf16": False}


def measure(side: str, epochs: int) -> dict:
    """One measurement in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--side", side, "--epochs", str(epochs)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--side", choices=["ours", "plain"], help=argparse.SUPPRESS)  # a single measurement
    args = parser.parse_args()
    if args.side:
        result = (run_ours if args.side == "ours" else run_plain)(args.epochs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from functions.base_models import ensure_local

    ensure_local(BASE_MODEL)  # the one-time conversion is not part of any measurement
    runs: dict[str, list[dict]] = {"ours": [], "plain": []}
    for i in range(args.repeats):
        for side in ("plain", "ours"):
            runs[side].append(measure(side, args.epochs))
            r = runs[side][-1]
            print(
                f"run {i + 1} {side:5}: {r['tokens'] / r['seconds']:7.1f} tokens/s, peak {r['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    summary = {}
    for side, results in runs.items():
        summary[side] = {
            "tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in results),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "bf16": results[0]["bf16"],
        }
    ratios = {
        "tokens_per_second": summary["ours"]["tokens_per_second"] / summary["plain"]["tokens_per_second"],
        "peak_rss": summary["ours"]["peak_rss_mb"] / summary["plain"]["peak_rss_mb"],
    }
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "processor": platform.processor() or platform.machine()},
        "workload": {"model": BASE_MODEL, "rows": len(examples()), "epochs": args.epochs, "batch": BATCH, **LORA},
        "repeats": args.repeats,
        "median": summary,
        "ratio_ours_to_plain": ratios,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "training_benchmark.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    m, r, w = report["median"], report["ratio_ours_to_plain"], report["workload"]
    return (
        f"# Training benchmark\n\n{report['when']}, {report['machine']['cpus']} CPUs. SmolLM2-135M-Instruct, "
        f"{w['rows']} rows x {w['epochs']} epoch(s), LoRA rank {w['rank']} on {', '.join(w['target_modules'])}, "
        f"{w['batch']} rows per step. Medians of {report['repeats']} runs per side, alternating, each its own "
        f"process (`scripts/bench_training.py`).\n\n"
        "| trainer | tokens/s | peak memory (RSS) |\n|---|---|---|\n"
        f"| plain transformers + PEFT loop (fp32) | {m['plain']['tokens_per_second']:.1f} | "
        f"{m['plain']['peak_rss_mb']:.0f} MB |\n"
        f"| Loraplex ({'bf16 base weights' if m['ours']['bf16'] else 'fp32'}) | {m['ours']['tokens_per_second']:.1f}"
        f" | {m['ours']['peak_rss_mb']:.0f} MB |\n"
        f"| ratio | **{r['tokens_per_second']:.2f}x** | **{r['peak_rss']:.2f}x** |\n"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
