"""Handler for `finetune.requested`: train a LoRA adapter (or, with adapter "none", the whole model) and save it
as the repo's version `repo/N`.

Steps: claim the job (it takes its version number N on its first start) -> tokenize the dataset (and detect the
label set of a classification dataset) -> train (per-step metrics rows, evaluations, a checkpoint `repo/N@k` every
epoch or `checkpoint_every` steps, cancel checks) -> publish the evaluated step with the best task metric
(accuracy for a classification dataset, exact match then character error rate for prompt/completion rows, loss
for plain text), not the last one (files renamed into place, version row, job row and usage record in one
transaction).

A retried job (its worker died and the queue re-delivered the event once the lease expired, or the attempt
failed) resumes from its last checkpoint: the Trainer continues at that step with its optimizer and schedule,
and the metrics rows after that step, written by the attempt that died, are replaced rather than duplicated.
"""

import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app import volume
from app.db import session_scope
from app.models import AdapterVersion, FinetuneJob, JobMetric
from app.queue import EventInfo, PermanentError
from app.settings import get_settings
from billing import ledger
from functions import checkpoints, repos
from functions.base_models import BaseModelUnavailable, load_tokenizer
from functions.catalog import get_model
from functions.checkpoints import ResumePoint, TrainingTarget
from functions.dataset_files import parse_dataset
from functions.datasets import Example, detect_labels, single_class_message
from functions.evaluate import EvalResult, evaluate
from functions.finetune_config import FinetuneConfig
from functions.prompts import Tokenized, example_ids, tokenize_example
from functions.trainer import TrainingRun, build_trainer

log = logging.getLogger("loraplex.train")
FINAL = ("completed", "failed", "cancelled")
MIN_ROWS_TO_HOLD_OUT = 10  # smaller datasets without an evaluation split train on every row


class Cancelled(Exception):
    pass


@dataclass(frozen=True)
class Data:
    train: list[Tokenized]
    evaluation: list[Tokenized]
    # a classification dataset's labels, each with its completion token ids (the label, then the end of the turn)
    labels: dict[str, list[int]] | None


def run(event: EventInfo) -> None:
    job = _start(event)
    if job is None:
        return
    config = FinetuneConfig.model_validate(job.config)
    target = _target(job)
    data = _tokenize(job, config)
    init_from = _source(job, config)
    with tempfile.TemporaryDirectory(prefix="loraplex-train-") as workdir:
        try:
            stats = _train(job, config, data, init_from, target, Path(workdir), event.attempt)
        except Cancelled:
            log.info("job %s cancelled", job.id)
            checkpoints.drop_resume_state(target)
            return
        except (MemoryError, _torch_oom()) as exc:  # the same config would run out again: no retry
            raise PermanentError(
                f"ran out of memory while training ({type(exc).__name__}); lower effective_batch_size or "
                "max_seq_length, or choose a larger accelerator"
            ) from exc
        _publish(job, config, Path(workdir) / "result", stats, list(data.labels) if data.labels else None)
    checkpoints.drop_resume_state(target)


def _at_creation(summary: dict[str, Any] | None) -> dict[str, Any]:
    """What the API wrote into a job's summary when it created it (functions/auto_config.Resolved.record)."""
    return {key: value for key, value in (summary or {}).items() if key in ("auto", "warnings", "truncation")}


def _torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError  # CUDA out of memory; CPU allocation failures raise MemoryError


def fail(event: EventInfo, reason: str) -> None:
    with session_scope() as s:
        job = s.get(FinetuneJob, event.subject_id)
        if job is None:
            return
        if job.status not in FINAL:
            job.status, job.error, job.finished_at = "failed", reason, datetime.now(UTC)
        target = _target(job) if job.version is not None else None
    if target is not None:  # no attempt is left to resume: its checkpoints keep their weights only
        checkpoints.drop_resume_state(target)


# ---- steps ---------------------------------------------------------------------------------------------


def _start(event: EventInfo) -> FinetuneJob | None:
    with session_scope() as s:
        # Locked, so a cancel committed between this read and the write below is not overwritten by "training".
        job = s.get(FinetuneJob, event.subject_id, with_for_update=True)
        if job is None or job.status in FINAL:
            return None  # cancelled while queued, or finished by an earlier attempt
        job.status, job.attempts = "training", event.attempt
        job.started_at = job.started_at or datetime.now(UTC)
        if job.version is None:  # taken once: retries train (and checkpoint) under the same number
            job.version = repos.allocate_version(s, job.repo_id)
        s.flush()
        s.refresh(job, ["dataset", "repo"])
        return job


def _target(job: FinetuneJob) -> TrainingTarget:
    if job.version is None:
        raise RuntimeError(f"job {job.id} has no version number yet")
    kind = "full" if job.config.get("adapter") == "none" else "lora"
    return TrainingTarget(job.id, job.tenant_id, job.repo_id, job.repo.name, job.version, job.base_model, kind)


def _source(job: FinetuneJob, config: FinetuneConfig) -> Path | None:
    """The directory of the version or checkpoint to continue from (checked when the job was created)."""
    if config.continue_from_version is None:
        return None
    with session_scope() as s:
        source = repos.find(s, job.tenant_id, config.continue_from_version)
    if source is None or source.base_model != config.base_model:
        raise PermanentError(f"continue_from_version: {config.continue_from_version!r} is no longer available")
    return source.path


def _tokenize(job: FinetuneJob, config: FinetuneConfig) -> Data:
    """Train and evaluation examples, and the label set of a classification dataset. Without an evaluation split,
    `eval_fraction` of the rows is held out (a seeded draw) when the dataset has at least MIN_ROWS_TO_HOLD_OUT
    rows."""
    dataset = job.dataset
    data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
    parsed = parse_dataset(data, dataset.file_format, get_settings().limits.max_dataset_rows)  # type: ignore[arg-type]  # a FileFormat, checked at upload
    if not parsed.ok:
        raise PermanentError(f"dataset {dataset.name!r} no longer validates: {parsed.errors[0].message}")
    try:
        tokenizer = load_tokenizer(config.base_model)
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc

    max_seq_length = config.values().max_seq_length

    def tokenized(split: str) -> list[Tokenized]:
        rows = [
            tokenize_example(e, tokenizer, config.apply_chat_template, max_seq_length)
            for e in parsed.examples
            if e.split == split
        ]
        # A row whose prompt fills the window has no completion token: the job's summary counted it as dropped.
        return [t for t in rows if any(label >= 0 for label in t.labels)]

    train, evaluation = tokenized("train"), tokenized("evaluation")
    if not evaluation and config.eval_fraction > 0 and len(train) >= MIN_ROWS_TO_HOLD_OUT:
        shuffled = random.Random(config.seed).sample(train, len(train))
        held_out = max(1, round(len(train) * config.eval_fraction))
        evaluation, train = shuffled[:held_out], shuffled[held_out:]
    if not train:
        raise PermanentError(f"no training rows with completion tokens within max_seq_length {max_seq_length}")
    labels = detect_labels(parsed.examples)
    if labels is not None and len(labels) < 2:  # also refused when the job was created; datasets may predate that
        raise PermanentError(f"dataset: {single_class_message(dataset.name, labels)}")
    if labels is None:
        return Data(train, evaluation, None)

    def completion_ids(label: str) -> list[int]:  # what follows any prompt: the completion does not depend on it
        return example_ids(Example(0, "train", prompt="", completion=label), tokenizer, config.apply_chat_template)[1]

    return Data(train, evaluation, {label: completion_ids(label) for label in labels})


def _train(
    job: FinetuneJob,
    config: FinetuneConfig,
    data: Data,
    init_from: Path | None,
    target: TrainingTarget,
    workdir: Path,
    attempt: int,
) -> dict:
    resume = checkpoints.prepare_resume(target, workdir)
    try:
        run = build_trainer(config, data.train, workdir, init_from=init_from, checkpoints=True)
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc
    epoch_tokens = sum(len(t.input_ids) for t in data.train)  # after truncation
    progress = _Progress(job.id, attempt, epoch_tokens, run.steps_per_epoch, config, data, target, run, workdir)
    progress.rewind(resume)
    run.trainer.add_callback(progress.callback())
    run.trainer.train(resume_from_checkpoint=str(resume.trainer_dir) if resume else None)
    if progress.cancelled:
        raise Cancelled()
    last_step = run.trainer.state.global_step
    progress.evaluate(run.trainer.model, last_step)  # the last step is a candidate too (skipped if evaluated)
    if progress.kept_step is None:  # no evaluation rows: the last step is all there is
        run.save(workdir / "result")
    else:
        progress.kept_dir.rename(workdir / "result")
    progress.save_summary(last_step)
    return {
        "tokens_processed": progress.tokens_done(run.trainer.state.epoch or 0.0),
        "seconds": time.monotonic() - progress.started,
    }


def _publish(
    job: FinetuneJob, config: FinetuneConfig, adapter_files: Path, stats: dict, labels: list[str] | None
) -> None:
    """Rename the adapter into place and record it with the job and its usage record, in one transaction
    (functions/repos.publish_adapter, shared with imports); on any database error the files are removed."""
    params = get_model(config.base_model).params
    lora = config.kind == "lora"

    def still_training(s: Session) -> bool:
        current = s.get_one(FinetuneJob, job.id, with_for_update=True)
        return current.status == "training"  # cancelled at the last moment: keep nothing

    def complete_job(s: Session, adapter: AdapterVersion) -> None:
        current = s.get_one(FinetuneJob, job.id)
        amount = ledger.price_book(s, job.tenant_id).finetune(params, config.technique, stats["tokens_processed"])
        current.status, current.finished_at = "completed", datetime.now(UTC)
        current.adapter_version_id = adapter.id
        ledger.record(
            s,
            ledger.Usage(
                idempotency_key=f"finetune:{job.id}",
                tenant_id=job.tenant_id,
                kind="finetune",
                technique=f"sft_{config.technique}",
                base_model=config.base_model,
                adapter=f"{job.repo.name}/{adapter.version}",
                input_tokens=stats["tokens_processed"],
                compute_ms=int(stats["seconds"] * 1000),
                amount_micro_usd=amount,
                reference=job.id,
            ),
        )

    repos.publish_adapter(
        job.tenant_id,
        job.repo.name,
        adapter_files,
        base_model=config.base_model,
        adapter_type=config.adapter,
        kind=config.kind,
        rank=config.rank if lora else 0,
        target_modules=config.resolved_target_modules if lora else [],
        version=job.version,
        repo_id=job.repo_id,
        job_id=job.id,
        labels=labels,  # a classification adapter answers from its labels (web/inference.py)
        guard=still_training,
        on_published=complete_job,
    )


class _Progress:
    """Writes one metrics row per optimizer step and one per evaluation, keeps the weights of the evaluated step
    with the best task metric, saves each checkpoint to the volume, stops early once the task metric stops
    improving, and stops at once when the job is cancelled."""

    def __init__(
        self,
        job_id: str,
        attempt: int,
        epoch_tokens: int,
        steps_per_epoch: int,
        config: FinetuneConfig,
        data: Data,
        target: TrainingTarget,
        run: TrainingRun,
        workdir: Path,
    ) -> None:
        self.job_id, self.attempt, self.epoch_tokens, self.config = job_id, attempt, epoch_tokens, config
        self.run, self.kept_dir = run, workdir / "kept"  # the best evaluated step's weights, as a version's files
        self.steps_per_epoch = steps_per_epoch  # optimizer steps; for the epoch of evaluation rows
        self.evaluation, self.labels, self.target = data.evaluation, data.labels, target
        self.eval_steps = config.values().eval_steps
        self.tokenizer, self.bf16 = run.tokenizer, run.bf16
        self.started = time.monotonic()
        self.start_epoch = 0.0  # where this attempt began: a resumed one does not count the epochs before
        self.cancelled = self.stopped_early = False
        self.max_steps = 1
        self.evals: list[tuple[int, EvalResult]] = []  # (step, result)
        self.best_score: tuple[float, ...] | None = None  # the best evaluation's score (self.score), for patience
        self.kept_score: tuple[float, ...] | None = None  # the score of the weights in kept_dir
        self.kept_step: int | None = None  # the step whose weights are in kept_dir
        self.evals_without_improvement = 0
        self.resumed_from: dict | None = None

    def tokens_done(self, epochs: float) -> int:
        """Tokens processed after `epochs` (fractional) passes over the training rows: what the job is charged."""
        return round(self.epoch_tokens * epochs)

    def rewind(self, resume: ResumePoint | None) -> None:
        """Make the job's metrics rows this attempt's history. Starting over: earlier attempts' rows go. Resuming
        at a checkpoint: rows past its step (the dead attempt's work after it, done again now) go, the rest become
        this attempt's, and their evaluations are taken back, so early stopping and the summary carry on."""
        with session_scope() as s:
            job_rows = JobMetric.job_id == self.job_id
            if resume is None:
                s.execute(delete(JobMetric).where(job_rows, JobMetric.attempt != self.attempt))
                return
            s.execute(delete(JobMetric).where(job_rows, JobMetric.step > resume.step))
            s.execute(update(JobMetric).where(job_rows).values(attempt=self.attempt))
            for row in s.scalars(select(JobMetric).where(job_rows, JobMetric.kind == "eval").order_by(JobMetric.step)):
                self._track(row.step, self._restored(row), weights=False)  # the dead attempt's weights are gone
            self.resumed_from = {"checkpoint": resume.name, "step": resume.step, "attempt": self.attempt}
            job = s.get_one(FinetuneJob, self.job_id)
            job.summary = _at_creation(job.summary) | {"resumed_from": self.resumed_from}
        log.info("job %s resumes from %s at step %d", self.job_id, resume.name, resume.step)

    def _restored(self, row: JobMetric) -> EvalResult:
        return EvalResult(
            loss=row.loss,
            perplexity=row.perplexity or 0.0,
            token_accuracy=row.token_accuracy or 0.0,
            sequence_accuracy=row.sequence_accuracy,
            char_error_rate=row.char_error_rate,
            rows=len(self.evaluation),
            classification=row.classification,
        )

    def callback(self) -> Any:
        from transformers import TrainerCallback

        progress = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
                progress.max_steps, progress.start_epoch = state.max_steps, state.epoch or 0.0
                with session_scope() as s:
                    s.get_one(FinetuneJob, progress.job_id).total_steps = state.max_steps
                progress.evaluate(model, 0)  # the model before training: the baseline users compare against

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if logs and "loss" in logs:
                    progress.log(state.global_step, logs)

            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
                if progress.is_cancelled():
                    progress.cancelled = True
                    control.should_training_stop = True
                    return
                every = progress.eval_steps
                if every and state.global_step % every == 0 and progress.evaluate(model, state.global_step):
                    control.should_training_stop = True

            def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
                evaluate_now = not progress.eval_steps and not progress.cancelled
                if evaluate_now and progress.evaluate(model, state.global_step):
                    control.should_training_stop = True

            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                # After the Trainer wrote checkpoint-<step>/ (and the step's metrics and evaluation rows).
                if not progress.cancelled:
                    local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    progress.checkpoint(local, state.global_step, state.epoch or 0.0)

        return Callback()

    def log(self, step: int, logs: dict) -> None:
        elapsed = time.monotonic() - self.started
        epoch = float(logs.get("epoch", 0.0))
        with session_scope() as s:
            s.add(
                JobMetric(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    step=step,
                    epoch=epoch,
                    loss=float(logs["loss"]),
                    learning_rate=float(logs.get("learning_rate", 0.0)),
                    tokens_per_second=self.tokens_done(epoch - self.start_epoch) / elapsed if elapsed > 0 else 0.0,
                )
            )

    def checkpoint(self, trainer_dir: Path, step: int, epoch: float) -> None:
        name = checkpoints.save(self.target, trainer_dir, step, epoch, self.tokenizer)
        log.info("job %s saved checkpoint %s at step %d", self.job_id, name, step)

    def evaluate(self, model: Any, step: int) -> bool:
        """Evaluate, record the row, and say whether early stopping should stop training now."""
        if not self.evaluation or any(s == step for s, _ in self.evals):
            return False
        result = evaluate(model, self.tokenizer, self.evaluation, bf16=self.bf16, labels=self.labels)
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
                    classification=result.classification,
                )
            )
        if not self._track(step, result):
            return False
        self.stopped_early = step < self.max_steps
        return self.stopped_early

    def _track(self, step: int, result: EvalResult, weights: bool = True) -> bool:
        """Keep the evaluation (and, with `weights`, the model's weights when it is the best so far) and say whether
        early stopping's patience has run out."""
        self.evals.append((step, result))
        if step == 0:
            return False  # the untrained model: a baseline, never published
        score = self.score(result)
        if weights and (self.kept_score is None or score > self.kept_score):
            if self.kept_dir.exists():
                shutil.rmtree(self.kept_dir)
            self.run.save(self.kept_dir)
            self.kept_step, self.kept_score = step, score
        if self.best_score is None or score > self.best_score:
            self.best_score, self.evals_without_improvement = score, 0
            return False
        self.evals_without_improvement += 1
        return (
            self.config.enable_early_stopping and self.evals_without_improvement >= self.config.early_stopping_patience
        )

    def score(self, result: EvalResult) -> tuple[float, ...]:
        """Higher is better: the task metric first, the loss to break ties (accuracy on 40 rows ties often)."""
        if result.classification is not None:
            return (result.classification["accuracy"], -result.loss)
        if result.sequence_accuracy is not None and result.char_error_rate is not None:
            return (result.sequence_accuracy, -result.char_error_rate, -result.loss)
        return (-result.loss,)

    @property
    def metric(self) -> str:
        """The name of the task metric that picks the published step."""
        if self.labels:
            return "accuracy"
        trained = [r for step, r in self.evals if step > 0]
        return "sequence_accuracy" if trained and trained[0].sequence_accuracy is not None else "loss"

    def save_summary(self, steps_done: int) -> None:
        def row(step: int, r: EvalResult) -> dict:
            return {"step": step} | {k: v for k, v in r.__dict__.items()}

        trained = [(step, r) for step, r in self.evals if step > 0]
        summary: dict[str, Any] = {
            "steps_done": steps_done,
            "stopped_early": self.stopped_early,
            "evaluation_rows": len(self.evaluation),
        }
        if self.labels:
            summary["labels"] = list(self.labels)
        if self.resumed_from:
            summary["resumed_from"] = self.resumed_from
        if self.evals:
            summary["baseline"] = row(*self.evals[0])
        if trained:
            summary["final"] = row(*trained[-1])
            summary["best"] = row(*max(trained, key=lambda e: self.score(e[1])))
        # The version published: the best evaluated step of this attempt (a resumed job's earlier evaluations
        # have no weights left), or the last step when nothing was evaluated.
        summary["kept"] = {"step": self.kept_step or steps_done, "metric": self.metric if self.kept_step else None}
        with session_scope() as s:
            job = s.get_one(FinetuneJob, self.job_id)
            job.summary = _at_creation(job.summary) | summary

    def is_cancelled(self) -> bool:
        with session_scope() as s:
            return s.scalar(select(FinetuneJob.status).where(FinetuneJob.id == self.job_id)) == "cancelled"
