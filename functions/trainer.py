"""The training loop itself, free of jobs and databases: a transformers Trainer over a PEFT LoRA model, or over
the whole model for full fine-tuning (adapter "none").

What makes it faster and lighter than a plain transformers + PEFT loop (scripts/bench_training.py measures it):
- frozen base weights in bf16 with bf16 autocast where the hardware runs bf16 natively (GPUs; CPUs with
  AVX512-BF16 or AMX), while PEFT keeps the trained LoRA weights and the optimizer state in fp32;
- batches grouped by length, so little compute goes to padding;
- micro-batches with gradient accumulation up to effective_batch_size, so activations stay small.
Full fine-tuning trains every weight, so the weights stay fp32 (bf16 master weights would round the small AdamW
updates away) while bf16 autocast still runs the matmuls where native; the same batching applies, and on CUDA
gradient checkpointing trades recomputation for activation memory.

Checkpoints (when asked): the Trainer saves its own checkpoint-<step>/ (weights, optimizer, scheduler, RNG and
trainer state) every epoch or every `checkpoint_every` steps, keeping only the newest on local disk; the caller
copies each one to the volume from a callback's on_save (functions/checkpoints.py) and resumes from one with
`trainer.train(resume_from_checkpoint=...)`.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import get_settings
from functions.base_models import load_model, load_model_dir, load_tokenizer
from functions.finetune_config import FinetuneConfig
from functions.precision import use_bf16
from functions.prompts import IGNORE_INDEX, Tokenized

MICRO_BATCH = 4  # examples per forward pass; gradient accumulation makes up effective_batch_size


@dataclass
class TrainingRun:
    trainer: Any  # transformers.Trainer, ready to .train()
    tokenizer: Any
    steps_per_epoch: int  # optimizer steps, as the Trainer counts them
    bf16: bool
    kind: str = "lora"  # lora | full

    def save(self, target: Path) -> None:
        """Save the trained weights as a version's files: a PEFT directory, or a whole model with its tokenizer."""
        self.trainer.model.save_pretrained(target)
        if self.kind == "full":
            self.tokenizer.save_pretrained(target)


def build_trainer(
    config: FinetuneConfig,
    examples: list[Tokenized],
    workdir: Path,
    precision: str | None = None,
    init_from: Path | None = None,
    checkpoints: bool = False,
) -> TrainingRun:
    """A Trainer for `examples`; raises BaseModelUnavailable when the weights cannot be had.

    `init_from`: the directory of a version or checkpoint to start from (continue_from_version) instead of the
    base model. `checkpoints`: save Trainer checkpoints under workdir/trainer as config.checkpoint_every says.
    """
    import torch
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments, set_seed

    settings = get_settings()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(settings.training.train_threads or os.cpu_count() or 1)
    bf16 = use_bf16(precision or settings.training.train_precision)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.base_model)
    model = _trainable_model(config, bf16, init_from)
    full = config.kind == "full"
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
        report_to=[],
        seed=config.seed,
        use_cpu=not cuda,
        bf16=bf16,
        remove_unused_columns=False,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",  # batches of similar length pad less
        **_checkpoint_args(config, checkpoints),
        **(_activation_checkpointing(TrainingArguments) if full and cuda else {}),
    )
    features = [{"input_ids": t.input_ids, "labels": t.labels} for t in examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    steps_per_epoch = max(1, math.ceil(len(features) / micro) // accumulation)
    return TrainingRun(trainer, tokenizer, steps_per_epoch, bf16, config.kind)


def _trainable_model(config: FinetuneConfig, bf16: bool, init_from: Path | None) -> Any:
    """The model to train: the base model (or `init_from`) wrapped in a new or loaded LoRA, or whole."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.kind == "full":
        # fp32 master weights: bf16 autocast (TrainingArguments.bf16) still runs the matmuls in bf16.
        return load_model_dir(init_from) if init_from else load_model(config.base_model, "float32")
    # Frozen base weights in bf16 halve their memory and run matmuls at bf16 speed; PEFT keeps the trained LoRA
    # weights (and so the optimizer state) in fp32.
    model = load_model(config.base_model, "bfloat16" if bf16 else "float32")
    if init_from is not None:
        # The saved adapter's shape (rank, alpha, modules, variants) carries over; the dropout is a training choice.
        saved = LoraConfig.from_pretrained(str(init_from))
        saved.lora_dropout = config.lora_dropout
        return PeftModel.from_pretrained(model, init_from, config=saved, is_trainable=True)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.resolved_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.resolved_target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _activation_checkpointing(arguments: type) -> dict[str, Any]:
    """Recompute activations in the backward pass (the option's name changed in transformers 5.2x)."""
    fields = getattr(arguments, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def _checkpoint_args(config: FinetuneConfig, enabled: bool) -> dict[str, Any]:
    """TrainingArguments for checkpoints. Only the newest stays on local disk: the caller has copied the others."""
    if not enabled:
        return {"save_strategy": "no"}
    if config.checkpoint_every == "epoch":
        return {"save_strategy": "epoch", "save_total_limit": 1}
    return {"save_strategy": "steps", "save_steps": config.checkpoint_every, "save_total_limit": 1}
