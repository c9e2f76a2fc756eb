"""The training loop itself, free of jobs and databases: a transformers Trainer over a PEFT LoRA model.

What makes it faster and lighter than a plain transformers + PEFT loop (scripts/bench_training.py measures it):
- frozen base weights in bf16 with bf16 autocast where the hardware runs bf16 natively (GPUs; CPUs with
  AVX512-BF16 or AMX), while PEFT keeps the trained LoRA weights and the optimizer state in fp32;
- batches grouped by length, so little compute goes to padding;
- micro-batches with gradient accumulation up to effective_batch_size, so activations stay small.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import get_settings
from functions.base_models import load_model, load_tokenizer
from functions.finetune_config import FinetuneConfig
from functions.prompts import IGNORE_INDEX, Tokenized

MICRO_BATCH = 4  # examples per forward pass; gradient accumulation makes up effective_batch_size


@dataclass
class TrainingRun:
    trainer: Any  # transformers.Trainer, ready to .train()
    tokenizer: Any
    steps_per_epoch: int  # optimizer steps, as the Trainer counts them
    bf16: bool


def use_bf16(precision: str) -> bool:
    """bf16 when asked, or on "auto" where the hardware runs it natively (elsewhere it is slower than fp32)."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def build_trainer(
    config: FinetuneConfig, examples: list[Tokenized], workdir: Path, precision: str | None = None
) -> TrainingRun:
    """A Trainer for `examples`; raises BaseModelUnavailable when the weights cannot be had."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments, set_seed

    settings = get_settings()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(settings.train_threads or os.cpu_count() or 1)
    bf16 = use_bf16(precision or settings.train_precision)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.base_model)
    # Frozen base weights in bf16 halve their memory and run matmuls at bf16 speed; PEFT keeps the trained LoRA
    # weights (and so the optimizer state) in fp32.
    model = load_model(config.base_model, "bfloat16" if bf16 else "float32")
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.resolved_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.resolved_target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    micro = min(MICRO_BATCH, config.effective_batch_size)
    accumulation = max(1, config.effective_batch_size // micro)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.train_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        use_cpu=not cuda,
        bf16=bf16,
        remove_unused_columns=False,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",  # batches of similar length pad less
    )
    features = [{"input_ids": t.input_ids, "labels": t.labels} for t in examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    steps_per_epoch = max(1, math.ceil(len(features) / micro) // accumulation)
    return TrainingRun(trainer, tokenizer, steps_per_epoch, bf16)
