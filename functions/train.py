"""Handler for `finetune.requested`: train a LoRA adapter and save it as the repo's next version.

Steps: claim the job -> tokenize the dataset -> train (per-step metrics rows, cancel checks) -> publish the
adapter (files renamed into place, version row, job row and usage record in one transaction).
"""

import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app import volume
from app.db import session_scope
from app.models import AdapterVersion, FinetuneJob, JobMetric
from app.queue import EventInfo, PermanentError
from app.settings import get_settings
from billing import ledger
from functions.base_models import BaseModelUnavailable, load_model, load_tokenizer
from functions.catalog import get_model
from functions.datasets import parse_dataset
from functions.finetune_config import FinetuneConfig
from functions.prompts import Tokenized, tokenize_example

log = logging.getLogger("loraplex.train")
FINAL = ("completed", "failed", "cancelled")
MICRO_BATCH = 4  # examples per forward pass; gradient accumulation makes up effective_batch_size


class Cancelled(Exception):
    pass


def run(event: EventInfo) -> None:
    job = _start(event)
    if job is None:
        return
    config = FinetuneConfig.model_validate(job.config)
    examples = _tokenize(job, config)
    with tempfile.TemporaryDirectory(prefix="loraplex-train-") as workdir:
        try:
            stats = _train(job, config, examples, Path(workdir), event.attempt)
        except Cancelled:
            log.info("job %s cancelled", job.id)
            return
        _publish(job, config, Path(workdir) / "adapter", stats)


def fail(event: EventInfo, reason: str) -> None:
    with session_scope() as s:
        job = s.get(FinetuneJob, event.subject_id)
        if job is not None and job.status not in FINAL:
            job.status, job.error, job.finished_at = "failed", reason, datetime.now(UTC)


# ---- steps ---------------------------------------------------------------------------------------------


def _start(event: EventInfo) -> FinetuneJob | None:
    with session_scope() as s:
        # Locked, so a cancel committed between this read and the write below is not overwritten by "training".
        job = s.get(FinetuneJob, event.subject_id, with_for_update=True)
        if job is None or job.status in FINAL:
            return None  # cancelled while queued, or finished by an earlier attempt
        job.status, job.attempts = "training", event.attempt
        job.started_at = job.started_at or datetime.now(UTC)
        s.flush()
        s.refresh(job, ["dataset", "repo"])
        return job


def _tokenize(job: FinetuneJob, config: FinetuneConfig) -> list[Tokenized]:
    dataset = job.dataset
    data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
    parsed = parse_dataset(data, dataset.file_format, get_settings().max_dataset_rows)  # type: ignore[arg-type]
    if not parsed.ok:
        raise PermanentError(f"dataset {dataset.name!r} no longer validates: {parsed.errors[0].message}")
    try:
        tokenizer = load_tokenizer(config.base_model)
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc
    train = [
        tokenize_example(e, tokenizer, config.apply_chat_template, config.max_seq_length)
        for e in parsed.examples
        if e.split == "train"
    ]
    train = [t for t in train if any(label >= 0 for label in t.labels)]  # prompt filled the whole window
    if not train:
        raise PermanentError(f"no training rows with completion tokens within max_seq_length {config.max_seq_length}")
    return train


def _train(job: FinetuneJob, config: FinetuneConfig, examples: list[Tokenized], workdir: Path, attempt: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments, set_seed

    settings = get_settings()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(settings.train_threads or os.cpu_count() or 1)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.base_model)
    try:
        model = load_model(config.base_model, "bfloat16" if cuda else "float32")
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.resolved_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.resolved_target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    micro = min(MICRO_BATCH, config.effective_batch_size)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, config.effective_batch_size // micro),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        use_cpu=not cuda,
        bf16=cuda,
        remove_unused_columns=False,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",  # batches of similar length pad less
    )
    features = [{"input_ids": t.input_ids, "labels": t.labels} for t in examples]
    train_tokens = sum(len(t.input_ids) for t in examples)  # per epoch, after truncation
    progress = _Progress(job.id, attempt, train_tokens * config.epochs)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model, args=args, train_dataset=features, data_collator=collator, callbacks=[progress.callback()]
    )
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    trainer.train()
    if progress.cancelled:
        raise Cancelled()
    model.save_pretrained(workdir / "adapter")
    return {"tokens_processed": train_tokens * config.epochs, "seconds": time.monotonic() - progress.started}


def _publish(job: FinetuneJob, config: FinetuneConfig, adapter_files: Path, stats: dict) -> None:
    """Rename the adapter into place and record it; on any database error the files are removed again."""
    params = get_model(config.base_model).params
    for _ in range(3):  # another job of the same repo may take the same version number first
        final: Path | None = None
        try:
            with session_scope() as s:
                current = s.get_one(FinetuneJob, job.id, with_for_update=True)
                if current.status != "training":
                    return  # cancelled at the last moment: keep nothing
                version = (
                    s.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.repo_id == job.repo_id)) or 0
                ) + 1
                final = volume.adapter_dir(job.tenant_id, job.repo.name, version)
                with volume.atomic_dir(final) as tmp:  # replaces files a crashed attempt left uncommitted
                    shutil.copytree(adapter_files, tmp, dirs_exist_ok=True)
                adapter = AdapterVersion(
                    repo_id=job.repo_id,
                    version=version,
                    base_model=config.base_model,
                    adapter_type=config.adapter,
                    rank=config.rank,
                    target_modules=config.resolved_target_modules,
                    job_id=job.id,
                )
                s.add(adapter)
                s.flush()
                amount = ledger.price_book(s, job.tenant_id).finetune(params, config.adapter, stats["tokens_processed"])
                current.status, current.finished_at = "completed", datetime.now(UTC)
                current.adapter_version_id = adapter.id
                ledger.record(
                    s,
                    ledger.Usage(
                        idempotency_key=f"finetune:{job.id}",
                        tenant_id=job.tenant_id,
                        kind="finetune",
                        technique=f"sft_{config.adapter}",
                        base_model=config.base_model,
                        adapter=f"{job.repo.name}/{version}",
                        input_tokens=stats["tokens_processed"],
                        compute_ms=int(stats["seconds"] * 1000),
                        amount_micro_usd=amount,
                        reference=job.id,
                    ),
                )
            return
        except IntegrityError:
            if final is not None:
                shutil.rmtree(final, ignore_errors=True)
        except BaseException:
            if final is not None:
                shutil.rmtree(final, ignore_errors=True)
            raise
    raise RuntimeError("could not allocate an adapter version after 3 tries")


class _Progress:
    """Writes one metrics row per optimizer step and stops training once the job is cancelled."""

    def __init__(self, job_id: str, attempt: int, total_tokens: int) -> None:
        self.job_id, self.attempt, self.total_tokens = job_id, attempt, total_tokens
        self.started = time.monotonic()
        self.cancelled = False

    def callback(self) -> Any:
        from transformers import TrainerCallback

        progress = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                with session_scope() as s:
                    s.get_one(FinetuneJob, progress.job_id).total_steps = state.max_steps

            def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
                if logs and "loss" in logs:
                    progress.log(state.global_step, state.max_steps, logs)

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                if progress.is_cancelled():
                    progress.cancelled = True
                    control.should_training_stop = True

        return Callback()

    def log(self, step: int, max_steps: int, logs: dict) -> None:
        elapsed = time.monotonic() - self.started
        tokens_done = self.total_tokens * step / max(max_steps, 1)
        with session_scope() as s:
            s.add(
                JobMetric(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    step=step,
                    epoch=float(logs.get("epoch", 0.0)),
                    loss=float(logs["loss"]),
                    learning_rate=float(logs.get("learning_rate", 0.0)),
                    tokens_per_second=tokens_done / elapsed if elapsed > 0 else 0.0,
                )
            )

    def is_cancelled(self) -> bool:
        with session_scope() as s:
            return s.scalar(select(FinetuneJob.status).where(FinetuneJob.id == self.job_id)) == "cancelled"
