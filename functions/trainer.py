"""The training loop itself, free of jobs and databases: a transformers Trainer over a PEFT LoRA model, or over
the whole model for full fine-tuning (adapter "none").

What makes it faster and lighter than a plain transformers + PEFT loop (scripts/bench_training.py measures it):
- frozen base weights in bf16 with bf16 autocast where the hardware runs bf16 natively (GPUs; CPUs with
  AVX512-BF16 or AMX), while PEFT keeps the trained LoRA weights and the optimizer state in fp32;
- batches grouped by length, so little compute goes to padding, and in bf16 padded to a multiple of PAD_MULTIPLE
  tokens, so kernels are reused across steps rather than built (and cached) for every row length;
- micro-batches (one row on a CPU) with gradient accumulation up to effective_batch_size, so activations stay
  small, and on a CPU activations recomputed in the backward pass for rows longer than CPU_ROW_TOKENS only;
- the loss on completion tokens only, its logits computed a chunk of positions at a time and never for the whole
  sequence (functions/completion_loss.py): a 135M model's job peaks at a few hundred MB of logits, not gigabytes.
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
from functions.prompts import IGNORE_INDEX, Tokenized, pad_multiple

# Examples per forward pass on a GPU; gradient accumulation makes up effective_batch_size. On a CPU each row is its
# own forward pass: two rows a pass were 12% faster but kept 0.4 GB more activations (scripts/train_memory.py
# 240,230,220,210,200,190,180,170 --steps 3, native bf16: 19.6 s and 1.29 GB one a pass, 17.3 s and 1.70 GB two;
# four: 26.5 s and 3.33 GB with LoRA dropout 0.05), and the memory target of a ~400-email job is 2.5 GB.
MICRO_BATCH = 4
CPU_MICRO_BATCH = 1
# On a CPU, a row longer than this has its activations recomputed in the backward pass, for one more forward pass
# (recompute_long_rows); shorter rows keep theirs. Kept activations cost ~4 MB a token; recompute nearly doubles a
# row's time. Peak RSS and time of one optimizer step (scripts/train_memory.py: SmolLM2-135M, LoRA on every linear
# layer, fp32): one 384-token row kept 1.82 GB; one 770-token row kept 3.39 GB; rows of 330, 320, 310 and 300
# tokens kept 1.91 GB in 12.7 s, recomputed 1.68 GB in 22.1 s.
CPU_ROW_TOKENS = 384


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

    def close(self) -> None:
        """Free what the run holds besides its trainer (a GRPO run's engine); nothing for the others."""


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
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer

    bf16 = prepare_run(config, precision)
    tokenizer = load_tokenizer(config.base_model)
    model = _trainable_model(config, bf16, init_from)
    args = training_arguments(config, workdir, bf16, checkpoints, max(len(t.input_ids) for t in examples))
    features = [{"input_ids": t.input_ids, "labels": t.labels} for t in examples]
    collator = DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_multiple(bf16)
    )
    trainer = _completion_trainer(Trainer)(model=model, args=args, train_dataset=features, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    return TrainingRun(trainer, tokenizer, steps_per_epoch(args, len(features)), bf16, config.kind)


def prepare_run(config: FinetuneConfig, precision: str | None = None) -> bool:
    """Threads and seed for a training run (this module's and functions/classifier_head.py's); returns whether it
    computes in bf16 (`precision`, else the training settings')."""
    import torch
    from transformers import set_seed

    settings = get_settings()
    if not torch.cuda.is_available():
        torch.set_num_threads(settings.training.train_threads or os.cpu_count() or 1)
    set_seed(config.seed)
    return use_bf16(precision or settings.training.train_precision)


def training_arguments(
    config: FinetuneConfig,
    workdir: Path,
    bf16: bool,
    checkpoints: bool,
    longest: int = 0,
    arguments: type | None = None,
    **extra: Any,
) -> Any:
    """The TrainingArguments of a run over config's resolved values: micro-batches (MICRO_BATCH rows on a GPU, one
    on a CPU) with gradient accumulation up to effective_batch_size, batches grouped by length, checkpoints under
    workdir/trainer when asked. `longest`: the longest training row, in tokens: on a CPU, a row longer than
    CPU_ROW_TOKENS has its activations recomputed in the backward pass rather than kept. `arguments`: a subclass
    of TrainingArguments to build (TRL's DPOConfig), with `extra` settings of its own or in place of these."""
    import torch
    from transformers import TrainingArguments

    arguments = arguments or TrainingArguments

    cuda = torch.cuda.is_available()
    values = config.values()
    micro = min(MICRO_BATCH if cuda else CPU_MICRO_BATCH, values.effective_batch_size)
    recompute = (config.kind == "full" and cuda) or (not cuda and longest > CPU_ROW_TOKENS)
    settings: dict[str, Any] = dict(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, values.effective_batch_size // micro),
        num_train_epochs=values.epochs,
        max_steps=config.train_steps or -1,
        learning_rate=values.learning_rate,
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
        **(_activation_checkpointing(TrainingArguments) if recompute else {}),
    )
    return arguments(**(settings | extra))


def steps_per_epoch(args: Any, rows: int) -> int:
    """Optimizer steps in one epoch over `rows` examples under TrainingArguments `args`, as the Trainer counts them."""
    return max(1, math.ceil(rows / args.per_device_train_batch_size) // args.gradient_accumulation_steps)


def _completion_trainer(trainer_class: type) -> type:
    """A Trainer whose loss is functions/completion_loss.py's: per label token, averaged over the optimizer step."""
    from functions.completion_loss import completion_loss

    class CompletionTrainer(trainer_class):
        loss_is_scaled_for_ga = True  # divided by the step's label tokens below, not per micro-batch

        def compute_loss(
            self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            recompute_long_rows(self, inputs["input_ids"])
            result = completion_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            # num_items_in_batch: label tokens of the whole optimizer step (all its micro-batches), which the
            # Trainer counts when the model takes loss kwargs (Llama-style models do); else this micro-batch's.
            if num_items_in_batch is None:
                loss = result.loss_sum / max(result.count, 1) / self.current_gradient_accumulation_steps
            else:
                loss = result.loss_sum / num_items_in_batch
            return (loss, None) if return_outputs else loss

    return CompletionTrainer


def recompute_long_rows(trainer: Any, input_ids: Any) -> None:
    """In a CPU run that recomputes activations (training_arguments), recompute them for this micro-batch only when
    its row (`input_ids` [1, seq]) is longer than CPU_ROW_TOKENS: shorter ones keep theirs and skip the extra
    forward pass. Written here because transformers switches recompute for a whole run; its decoder layers read
    their `gradient_checkpointing` flag at every forward, so the flag is set per micro-batch."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    args = trainer.args
    if not args.use_cpu or not (getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing):
        return
    layers = getattr(trainer, "_recompute_layers", None)
    if layers is None:
        layers = trainer._recompute_layers = [
            m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)
        ]
    long = input_ids.shape[1] > CPU_ROW_TOKENS
    for layer in layers:
        layer.gradient_checkpointing = long


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
    return get_peft_model(model, new_lora(config, "CAUSAL_LM"))


def new_lora(config: FinetuneConfig, task_type: str) -> Any:
    """A new LoRA of config's shape (rank, alpha, modules, variants) and dropout, for PEFT's `task_type`."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.resolved_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.resolved_target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type=task_type,
    )


def _activation_checkpointing(arguments: type) -> dict[str, Any]:
    """Recompute activations in the backward pass (the option's name changed in transformers 5.2x)."""
    fields = getattr(arguments, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    # Non-reentrant: it needs no input that requires grad, which a LoRA over frozen embeddings has none of.
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _checkpoint_args(config: FinetuneConfig, enabled: bool) -> dict[str, Any]:
    """TrainingArguments for checkpoints. Only the newest stays on local disk: the caller has copied the others."""
    if not enabled:
        return {"save_strategy": "no"}
    if config.checkpoint_every == "epoch":
        return {"save_strategy": "epoch", "save_total_limit": 1}
    return {"save_strategy": "steps", "save_steps": config.checkpoint_every, "save_total_limit": 1}
