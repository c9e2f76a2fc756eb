"""A training job's progress, as the Trainer's callbacks see it: a metrics row per optimizer step and per
evaluation, the weights of the evaluated step with the best task metric (the version the job publishes),
checkpoints copied to the volume, early stopping on the task metric, and cancellation (functions/train.py runs
the job).
"""

import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from app.db import session_scope
from app.models import FinetuneJob, JobMetric
from functions import checkpoints
from functions.checkpoints import ResumePoint, TrainingTarget
from functions.classifier_head import evaluate_classifier
from functions.dpo import REWARD_METRICS, evaluate_pairs
from functions.evaluate import EvalResult, evaluate
from functions.finetune_config import FinetuneConfig
from functions.grpo import METRIC_COLUMNS, PromptRow, evaluate_rewards, step_metrics
from functions.preference import PreferencePair
from functions.prompts import Tokenized
from functions.trainer import TrainingRun

log = logging.getLogger("loraplex.train")


@dataclass(frozen=True)
class Data:
    # rows, a preference-tuning job's pairs (method "dpo"), or a reinforcement fine-tuning job's prompts ("grpo")
    train: list[Tokenized] | list[PreferencePair] | list[PromptRow]
    evaluation: list[Tokenized] | list[PreferencePair] | list[PromptRow]
    # a classification dataset's labels, each with its completion token ids (the label, then the end of the turn)
    labels: dict[str, list[int]] | None


def _at_creation(summary: dict[str, Any] | None) -> dict[str, Any]:
    """What the API wrote into a job's summary when it created it (functions/auto_config.Resolved.record)."""
    return {key: value for key, value in (summary or {}).items() if key in ("auto", "warnings", "truncation")}


class Progress:
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
        self.best: EvalResult | None = None  # the best evaluation so far (self.better), for patience
        self.kept: EvalResult | None = None  # the evaluation of the weights in kept_dir
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
            perplexity=row.perplexity,
            token_accuracy=row.token_accuracy,
            sequence_accuracy=row.sequence_accuracy,
            char_error_rate=row.char_error_rate,
            rows=len(self.evaluation),
            classification=row.classification,
            **{name: getattr(row, name) for name in (*REWARD_METRICS.values(), *METRIC_COLUMNS)},
        )

    def callback(self) -> Any:
        from transformers import TrainerCallback

        progress = self

        def evaluate(control: Any, model: Any, step: int) -> bool:
            # A DPO evaluation runs the Trainer's own evaluation loop, whose logging clears the step's flags: the
            # step's metrics row and checkpoint must still follow.
            flags = control.should_log, control.should_evaluate, control.should_save
            stop = progress.evaluate(model, step)
            control.should_log, control.should_evaluate, control.should_save = flags
            return stop

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
                if every and state.global_step % every == 0 and evaluate(control, model, state.global_step):
                    control.should_training_stop = True

            def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
                evaluate_now = not progress.eval_steps and not progress.cancelled
                if evaluate_now and evaluate(control, model, state.global_step):
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
                    **{ours: float(logs[theirs]) for theirs, ours in REWARD_METRICS.items() if theirs in logs},
                    **step_metrics(logs, self.run),
                )
            )

    def checkpoint(self, trainer_dir: Path, step: int, epoch: float) -> None:
        name = checkpoints.save(self.target, trainer_dir, step, epoch, self.tokenizer)
        log.info("job %s saved checkpoint %s at step %d", self.job_id, name, step)

    def evaluate(self, model: Any, step: int) -> bool:
        """Evaluate, record the row, and say whether early stopping should stop training now."""
        if not self.evaluation or any(s == step for s, _ in self.evals):
            return False
        if self.config.method == "grpo":
            result = evaluate_rewards(self.run, self.config, self.evaluation)  # type: ignore[arg-type]  # prompts
        elif self.config.method == "dpo":
            result = evaluate_pairs(self.run.trainer, self.evaluation)  # type: ignore[arg-type]  # pairs
        elif self.run.kind == "classification" and self.labels:
            result = evaluate_classifier(model, self.tokenizer, self.evaluation, self.labels, bf16=self.bf16)  # type: ignore[arg-type]  # rows
        else:
            result = evaluate(model, self.tokenizer, self.evaluation, bf16=self.bf16, labels=self.labels)  # type: ignore[arg-type]  # rows
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
                    **{name: getattr(result, name) for name in (*REWARD_METRICS.values(), *METRIC_COLUMNS)},
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
        if weights and self.better(result, self.kept):
            if self.kept_dir.exists():
                shutil.rmtree(self.kept_dir)
            self.run.save(self.kept_dir)
            self.kept_step, self.kept = step, result
        if self.better(result, self.best):
            self.best, self.evals_without_improvement = result, 0
            return False
        self.evals_without_improvement += 1
        return (
            self.config.enable_early_stopping and self.evals_without_improvement >= self.config.early_stopping_patience
        )

    @staticmethod
    def better(new: EvalResult, old: EvalResult | None) -> bool:
        """Whether evaluation `new` beats `old`: on the task metric (classification accuracy, a preference job's
        share of pairs whose chosen answer wins, else a generation's sequence accuracy then its CER), then on the
        loss. Two accuracies the evaluation cannot tell apart, at most
        one standard error of a proportion over its rows apart (and at least one row), count as equal: 39 of 40
        rows right against 38 of 40 is noise, and the loss, which every row moves, decides."""
        if old is None:
            return True
        mine, theirs = _accuracy(new), _accuracy(old)
        if mine is not None and theirs is not None:
            rows, p = max(new.rows, 1), (mine + theirs) / 2
            rows_apart = round(abs(mine - theirs) * rows)
            if rows_apart > max(1.0, math.sqrt(rows * p * (1 - p))):
                return mine > theirs
            cer = new.char_error_rate, old.char_error_rate  # None on a classification evaluation
            if new.classification is None and cer[0] is not None and cer[1] is not None and cer[0] != cer[1]:
                return cer[0] < cer[1]
        return new.loss < old.loss

    @property
    def metric(self) -> str:
        """The name of the task metric that picks the published step."""
        if self.labels:
            return "accuracy"
        if self.config.method == "dpo":
            return "reward_accuracy"
        if self.config.method == "grpo":
            return "reward"
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
            summary["best"] = row(*functools.reduce(lambda b, e: e if self.better(e[1], b[1]) else b, trained))
        # The version published: the best evaluated step of this attempt (a resumed job's earlier evaluations
        # have no weights left), or the last step when nothing was evaluated.
        summary["kept"] = {"step": self.kept_step or steps_done, "metric": self.metric if self.kept_step else None}
        with session_scope() as s:
            job = s.get_one(FinetuneJob, self.job_id)
            job.summary = _at_creation(job.summary) | summary

    def is_cancelled(self) -> bool:
        with session_scope() as s:
            return s.scalar(select(FinetuneJob.status).where(FinetuneJob.id == self.job_id)) == "cancelled"


def _accuracy(result: EvalResult) -> float | None:
    """The accuracy a kept step is chosen on: the label's for a classification dataset, chosen over rejected for
    preference tuning, the sequence's otherwise."""
    if result.classification is not None:
        return float(result.classification["accuracy"])
    return result.reward_accuracy if result.reward_accuracy is not None else result.sequence_accuracy
