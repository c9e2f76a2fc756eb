"""Peak memory of one optimizer step of a LoRA job on this machine, for rows of given lengths: what
functions/trainer.py's CPU_ROW_TOKENS (past it, activations are recomputed) is chosen from.

    .venv/bin/python scripts/train_memory.py 770,256,200                 # at the trainer's CPU_ROW_TOKENS
    .venv/bin/python scripts/train_memory.py 770,256,200 --row-tokens 0  # recompute every pass

Synthetic token ids (the memory depends on the lengths only), completion loss on each row's last 3 tokens, the
base model of --model; prints the process's peak RSS (it includes the ~0.5 GB the model and the run hold before the
step) and the step's wall time. One measurement a process: the peak RSS never goes down.
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lengths", help="comma-separated row lengths in tokens: one optimizer step over them")
    parser.add_argument("--row-tokens", type=int, help="CPU_ROW_TOKENS for this run (default: the trainer's)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--micro", type=int, help="rows a forward pass on a CPU (default: the trainer's)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps over the same rows")
    parser.add_argument("--config", default="{}", help="fine-tuning config fields as JSON, e.g. lora_dropout")
    args = parser.parse_args()

    from functions import trainer
    from functions.finetune_config import FinetuneConfig
    from functions.prompts import IGNORE_INDEX, Tokenized

    if args.micro is not None:
        trainer.CPU_MICRO_BATCH = args.micro
    if args.row_tokens is not None:
        trainer.CPU_ROW_TOKENS = args.row_tokens
    lengths = [int(n) for n in args.lengths.split(",")]
    config = FinetuneConfig.model_validate(
        {"base_model": args.model, "dataset": "d", "repo": "r", "train_steps": args.steps, "task": "completion"}
        | {"effective_batch_size": len(lengths), "learning_rate": 1e-3, "max_seq_length": max(lengths)}
        | {"eval_steps": None}
        | json.loads(args.config)
    )
    rows = [
        Tokenized(list(range(100, 100 + n)), [IGNORE_INDEX] * (n - 3) + list(range(97 + n, 100 + n)), n)
        for n in lengths
    ]
    with tempfile.TemporaryDirectory() as workdir:
        run = trainer.build_trainer(config, rows, Path(workdir))
        started = time.monotonic()
        run.trainer.train()
        seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: GB
    micro = run.trainer.args.per_device_train_batch_size
    print(
        f"rows {lengths}, CPU_ROW_TOKENS {trainer.CPU_ROW_TOKENS}, {micro} a pass, {args.config}: peak {peak:.2f} GB, "
        f"{seconds:.1f} s for {args.steps} step(s)"
    )


if __name__ == "__main__":
    main()
