"""Handler for `finetune.requested`: train a LoRA adapter and save it as the repo's next version.

Steps: claim the job -> tokenize the dataset -> train (per-step metrics rows, cancel checks) -> publish the
adapter (files renamed into place, version row, job row and usage record in one transaction).
"""

import logging
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import volume
from app.db import session_scope
from app.models import AdapterVersion, FinetuneJob, JobMetric
from app.queue import EventInfo, PermanentError
from app.settings import get_settings
from billing import ledger
from functions.adapter_io import publish_adapter
from functions.base_models import BaseModelUnavailable, load_tokenizer
from functions.catalog import get_model
from functions.datasets import parse_dataset
from functions.evaluate import EvalResult, evaluate
from functions.finetune_config import FinetuneConfig
from functions.prompts import Tokenized, tokenize_example
from functions.trainer import build_trainer

log = logging.getLogger("loraplex.train")
FINAL = ("completed", "failed", "cancelled")
MIN_ROWS_TO_HOLD_OUT = 10  # smaller datasets without an evaluation split train on every row


class Cancelled(Exception):
    pass


def run(event: EventInfo) -> None:
    job = _start(event)
    if job is None:
        return
    config = FinetuneConfig.model_validate(job.config)
    train, evaluation = _tokenize(job, config)
    with tempfile.TemporaryDirectory(prefix="loraplex-train-") as workdir:
        try:
            stats = _train(job, config, train, evaluation, Path(workdir), event.attempt)
        except Cancelled:
            log.info("job %s cancelled", job.id)
            return
        except (MemoryError, _torch_oom()) as exc:  # the same config would run out again: no retry
            raise PermanentError(
                f"ran out of memory while training ({type(exc).__name__}); lower effective_batch_size or "
                "max_seq_length, or choose a larger accelerator"
            ) from exc
        _publish(job, config, Path(workdir) / "adapter", stats)


def _torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError  # CUDA out of memory; CPU allocation failures raise MemoryError


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


def _tokenize(job: FinetuneJob, config: FinetuneConfig) -> tuple[list[Tokenized], list[Tokenized]]:
    """(train, evaluation) examples. Without an evaluation split, `eval_fraction` of the rows is held out
    (a seeded draw) when the dataset has at least MIN_ROWS_TO_HOLD_OUT rows."""
    dataset = job.dataset
    data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
    parsed = parse_dataset(data, dataset.file_format, get_settings().max_dataset_rows)  # type: ignore[arg-type]
    if not parsed.ok:
        raise PermanentError(f"dataset {dataset.name!r} no longer validates: {parsed.errors[0].message}")
    try:
        tokenizer = load_tokenizer(config.base_model)
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc

    def tokenized(split: str) -> list[Tokenized]:
        rows = [
            tokenize_example(e, tokenizer, config.apply_chat_template, config.max_seq_length)
            for e in parsed.examples
            if e.split == split
        ]
        return [t for t in rows if any(label >= 0 for label in t.labels)]  # not a prompt filling the window

    train, evaluation = tokenized("train"), tokenized("evaluation")
    if not evaluation and config.eval_fraction > 0 and len(train) >= MIN_ROWS_TO_HOLD_OUT:
        shuffled = random.Random(config.seed).sample(train, len(train))
        held_out = max(1, round(len(train) * config.eval_fraction))
        evaluation, train = shuffled[:held_out], shuffled[held_out:]
    if not train:
        raise PermanentError(f"no training rows with completion tokens within max_seq_length {config.max_seq_length}")
    return train, evaluation


def _train(
    job: FinetuneJob,
    config: FinetuneConfig,
    examples: list[Tokenized],
    evaluation: list[Tokenized],
    workdir: Path,
    attempt: int,
) -> dict:
    try:
        run = build_trainer(config, examples, workdir)
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc
    epoch_tokens = sum(len(t.input_ids) for t in examples)  # after truncation
    progress = _Progress(
        job.id, attempt, epoch_tokens, run.steps_per_epoch, config, evaluation, run.tokenizer, run.bf16
    )
    run.trainer.add_callback(progress.callback())
    run.trainer.train()
    if progress.cancelled:
        raise Cancelled()
    run.trainer.model.save_pretrained(workdir / "adapter")
    progress.save_summary(run.trainer.state.global_step)
    return {
        "tokens_processed": progress.tokens_done(run.trainer.state.epoch or 0.0),
        "seconds": time.monotonic() - progress.started,
    }


def _publish(job: FinetuneJob, config: FinetuneConfig, adapter_files: Path, stats: dict) -> None:
    """Rename the adapter into place and record it with the job and its usage record, in one transaction
    (functions/adapter_io.publish_adapter, shared with imports); on any database error the files are removed."""
    params = get_model(config.base_model).params

    def still_training(s: Session) -> bool:
        current = s.get_one(FinetuneJob, job.id, with_for_update=True)
        return current.status == "training"  # cancelled at the last moment: keep nothing

    def complete_job(s: Session, adapter: AdapterVersion) -> None:
        current = s.get_one(FinetuneJob, job.id)
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
                adapter=f"{job.repo.name}/{adapter.version}",
                input_tokens=stats["tokens_processed"],
                compute_ms=int(stats["seconds"] * 1000),
                amount_micro_usd=amount,
                reference=job.id,
            ),
        )

    publish_adapter(
        job.tenant_id,
        job.repo.name,
        adapter_files,
        base_model=config.base_model,
        adapter_type=config.adapter,
        rank=config.rank,
        target_modules=config.resolved_target_modules,
        repo_id=job.repo_id,
        job_id=job.id,
        guard=still_training,
        on_published=complete_job,
    )


class _Progress:
    """Writes one metrics row per optimizer step and one per evaluation, stops early once the evaluation loss
    stops improving, and stops at once when the job is cancelled."""

    def __init__(
        self,
        job_id: str,
        attempt: int,
        epoch_tokens: int,
        steps_per_epoch: int,
        config: FinetuneConfig,
        evaluation: list[Tokenized],
        tokenizer: Any,
        bf16: bool,
    ) -> None:
        self.job_id, self.attempt, self.epoch_tokens, self.config = job_id, attempt, epoch_tokens, config
        self.steps_per_epoch = steps_per_epoch  # optimizer steps; for the epoch of evaluation rows
        self.evaluation, self.tokenizer, self.bf16 = evaluation, tokenizer, bf16
        self.started = time.monotonic()
        self.cancelled = self.stopped_early = False
        self.max_steps = 1
        self.evals: list[tuple[int, EvalResult]] = []  # (step, result)
        self.best_loss = float("inf")
        self.evals_without_improvement = 0

    def tokens_done(self, epochs: float) -> int:
        """Tokens processed after `epochs` (fractional) passes over the training rows: what the job is charged."""
        return round(self.epoch_tokens * epochs)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        progress = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
                progress.max_steps = state.max_steps
                with session_scope() as s:
                    s.get_one(FinetuneJob, progress.job_id).total_steps = state.max_steps
                progress.evaluate(model, 0)  # the model before training: the baseline users compare against

            def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
                if logs and "loss" in logs:
                    progress.log(state.global_step, logs)

            def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
                if progress.is_cancelled():
                    progress.cancelled = True
                    control.should_training_stop = True
                    return
                every = progress.config.eval_steps
                if every and state.global_step % every == 0 and progress.evaluate(model, state.global_step):
                    control.should_training_stop = True

            def on_epoch_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
                evaluate_now = not progress.config.eval_steps and not progress.cancelled
                if evaluate_now and progress.evaluate(model, state.global_step):
                    control.should_training_stop = True

        return Callback()

    def log(self, step: int, logs: dict) -> None:
        elapsed = time.monotonic() - self.started
        with session_scope() as s:
            s.add(
                JobMetric(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    step=step,
                    epoch=float(logs.get("epoch", 0.0)),
                    loss=float(logs["loss"]),
                    learning_rate=float(logs.get("learning_rate", 0.0)),
                    tokens_per_second=self.tokens_done(float(logs.get("epoch", 0.0))) / elapsed if elapsed > 0 else 0.0,
                )
            )

    def evaluate(self, model: Any, step: int) -> bool:
        """Evaluate, record the row, and say whether early stopping should stop training now."""
        if not self.evaluation or any(s == step for s, _ in self.evals):
            return False
        result = evaluate(model, self.tokenizer, self.evaluation, bf16=self.bf16)
        self.evals.append((step, result))
        with session_scope() as s:
            s.add(
                JobMetric(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    step=step,
                    epoch=step / self.steps_per_epoch,
                    kind="eval",
                    loss=result.loss,
                    learning_rate=0.0,
                    perplexity=result.perplexity,
                    token_accuracy=result.token_accuracy,
                    sequence_accuracy=result.sequence_accuracy,
                    char_error_rate=result.char_error_rate,
                )
            )
        if step == 0:
            return False
        if result.loss < self.best_loss - 1e-4:
            self.best_loss, self.evals_without_improvement = result.loss, 0
            return False
        self.evals_without_improvement += 1
        if self.config.enable_early_stopping and self.evals_without_improvement >= self.config.early_stopping_patience:
            self.stopped_early = step < self.max_steps
            return self.stopped_early
        return False

    def save_summary(self, steps_done: int) -> None:
        def row(step: int, r: EvalResult) -> dict:
            return {"step": step} | {k: v for k, v in r.__dict__.items()}

        trained = [(step, r) for step, r in self.evals if step > 0]
        summary = {
            "steps_done": steps_done,
            "stopped_early": self.stopped_early,
            "evaluation_rows": len(self.evaluation),
        }
        if self.evals:
            summary["baseline"] = row(*self.evals[0])
        if trained:
            summary["final"] = row(*trained[-1])
            summary["best"] = row(*min(trained, key=lambda e: e[1].loss))
        with session_scope() as s:
            s.get_one(FinetuneJob, self.job_id).summary = summary

    def is_cancelled(self) -> bool:
        with session_scope() as s:
            return s.scalar(select(FinetuneJob.status).where(FinetuneJob.id == self.job_id)) == "cancelled"
