"""Handler for `finetune.requested`: train a LoRA adapter (or, with adapter "none", the whole model) and save it
as the repo's version `repo/N`.

Steps: claim the job (it takes its version number N on its first start) -> tokenize the dataset (and detect the
label set of a classification dataset) -> train (per-step metrics rows, evaluations, a checkpoint `repo/N@k` every
epoch or `checkpoint_every` steps, cancel checks) -> publish the evaluated step with the best task metric
(accuracy for a classification dataset, exact match then character error rate for prompt/completion rows, loss
for plain text, chosen over rejected for preference tuning, the mean reward for reinforcement fine-tuning), not the
last one (files renamed into place, version row, job row and usage record in one transaction). Method "dpo" trains on
preference pairs with TRL's DPOTrainer (functions/dpo.py), method "grpo" on prompts and reward functions with TRL's
GRPOTrainer (functions/grpo.py); the rest of the job is the same.

A retried job (its worker died and the queue re-delivered the event once the lease expired, or the attempt
failed) resumes from its last checkpoint: the Trainer continues at that step with its optimizer and schedule,
and the metrics rows after that step, written by the attempt that died, are replaced rather than duplicated.
"""

import contextlib
import dataclasses
import logging
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import events, volume
from app.db import session_scope
from app.errors import Invalid
from app.models import AdapterVersion, Dataset, FinetuneJob
from app.queue import EventInfo, PermanentError
from app.settings import get_settings
from billing import alerts, ledger
from functions import checkpoints, repos, templated_rows
from functions.auto_config import MIN_ROWS_TO_HOLD_OUT
from functions.base_models import BaseModelUnavailable, load_tokenizer
from functions.catalog import get_model
from functions.checkpoints import TrainingTarget
from functions.classifier_head import build_classifier
from functions.dataset_files import parse_dataset
from functions.datasets import Example, ParsedDataset, detect_labels, single_class_message
from functions.dpo import build_dpo_trainer
from functions.finetune_config import FinetuneConfig
from functions.grpo import PromptRow, build_grpo_trainer, counted, prompt_rows
from functions.preference import PreferencePair, tokenize_pair
from functions.prompts import Tokenized, example_ids, tokenize_example
from functions.train_progress import Data, Progress
from functions.trainer import TrainingRun, build_trainer

log = logging.getLogger("loraplex.train")
FINAL = ("completed", "failed", "cancelled")


class Cancelled(Exception):
    pass


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
            events.publish(s, job.tenant_id, "finetune.job.failed", job.id)
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
        starting = job.status == "queued"  # not a retry of a job already training
        job.status, job.attempts = "training", event.attempt
        job.started_at = job.started_at or datetime.now(UTC)
        if job.version is None:  # taken once: retries train (and checkpoint) under the same number
            job.version = repos.allocate_version(s, job.repo_id)
        s.flush()
        if starting:
            events.publish(s, job.tenant_id, "finetune.job.started", job.id)
        s.refresh(job, ["dataset", "repo", "evaluation_dataset"])
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
    if config.method == "grpo":
        return _prompts(job, config, parsed)
    try:
        parsed = templated_rows.rendered(parsed, config)  # the rows a prompt_template builds, as the quote counted
    except Invalid as exc:
        raise PermanentError(exc.message) from exc
    examples = parsed.examples
    if job.evaluation_dataset is not None:  # its rows, all of them, are the evaluation split
        examples = [e for e in examples if e.split == "train"] + _evaluation_examples(job.evaluation_dataset, config)
    try:
        tokenizer = load_tokenizer(config.base_model)
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc

    max_seq_length = config.values().max_seq_length
    if config.method == "dpo":
        return _pairs(examples, tokenizer, config, max_seq_length)

    def tokenized(split: str) -> list[Tokenized]:
        rows = [
            tokenize_example(e, tokenizer, config.apply_chat_template, max_seq_length)
            for e in examples
            if e.split == split
        ]
        # A row whose prompt fills the window has no completion token: the job's summary counted it as dropped.
        return [t for t in rows if any(label >= 0 for label in t.labels)]

    train, evaluation = _held_out(tokenized("train"), tokenized("evaluation"), config)
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


def _pairs(examples: list[Example], tokenizer: object, config: FinetuneConfig, max_seq_length: int) -> Data:
    """A preference-tuning job's pairs, held out as _tokenize holds rows out; a pair whose prompt fills the window
    (an answer with no token left) is dropped, as the job's summary counted."""

    def tokenized(split: str) -> list[PreferencePair]:
        pairs = [
            tokenize_pair(e, tokenizer, config.apply_chat_template, max_seq_length)
            for e in examples
            if e.split == split
        ]
        return [p for p in pairs if p.chosen_ids and p.rejected_ids]

    train, evaluation = _held_out(tokenized("train"), tokenized("evaluation"), config)
    if not train:
        raise PermanentError(f"no preference rows with answer tokens within max_seq_length {max_seq_length}")
    return Data(train, evaluation, None)


def _held_out(train: list[Any], evaluation: list[Any], config: FinetuneConfig) -> tuple[list[Any], list[Any]]:
    """(train, evaluation): without an evaluation split, `eval_fraction` of the training rows (or pairs) is held out,
    a seeded draw, when there are at least MIN_ROWS_TO_HOLD_OUT of them."""
    if evaluation or config.eval_fraction <= 0 or len(train) < MIN_ROWS_TO_HOLD_OUT:
        return train, evaluation
    shuffled = random.Random(config.seed).sample(train, len(train))
    held_out = max(1, round(len(train) * config.eval_fraction))
    return shuffled[held_out:], shuffled[:held_out]


def _prompts(job: FinetuneJob, config: FinetuneConfig, parsed: ParsedDataset) -> Data:
    """A reinforcement fine-tuning job's prompts (functions/grpo.py), held out as _tokenize holds rows out."""
    try:
        rows = prompt_rows(parsed, job.dataset.name)
        if job.evaluation_dataset is not None:  # its rows, all of them, are the evaluation split
            extra = prompt_rows(templated_rows.read(job.evaluation_dataset), job.evaluation_dataset.name)
            rows = [r for r in rows if r.split == "train"]
            rows += [dataclasses.replace(r, index=len(rows) + i, split="evaluation") for i, r in enumerate(extra)]
        rows = counted(rows, load_tokenizer(config.base_model), config)
    except Invalid as exc:
        raise PermanentError(exc.message) from exc
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc
    train: list[PromptRow] = [r for r in rows if r.split == "train"]
    evaluation: list[PromptRow] = [r for r in rows if r.split == "evaluation"]
    return Data(*_held_out(train, evaluation, config), None)


def _evaluation_examples(dataset: Dataset, config: FinetuneConfig) -> list[Example]:
    """Every row of the job's evaluation dataset as an evaluation row, built as the train rows are."""
    try:
        parsed = templated_rows.rendered(templated_rows.read(dataset), config)
    except Invalid as exc:
        raise PermanentError(f"evaluation_dataset: {exc.message}") from exc
    return [dataclasses.replace(e, split="evaluation") for e in parsed.examples]


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
    run: TrainingRun
    try:
        if config.method == "grpo":  # prompts and rewards: TRL's GRPOTrainer
            run = build_grpo_trainer(config, data.train, workdir, init_from=init_from, checkpoints=True)  # type: ignore[arg-type]
        elif config.method == "dpo":  # preference pairs: TRL's DPOTrainer
            run = build_dpo_trainer(config, data.train, workdir, init_from=init_from, checkpoints=True)  # type: ignore[arg-type]
        elif config.values().task == "classification" and data.labels:  # a classification head over the prompt
            run = build_classifier(config, data.train, data.labels, workdir, init_from=init_from, checkpoints=True)  # type: ignore[arg-type]
        else:
            run = build_trainer(config, data.train, workdir, init_from=init_from, checkpoints=True)  # type: ignore[arg-type]
    except BaseModelUnavailable as exc:
        raise PermanentError(str(exc)) from exc
    except ValueError as exc:  # a classification head these labels cannot have (functions/classifier_head.py)
        raise PermanentError(f"task: {exc}") from exc
    with contextlib.closing(run):  # a GRPO run's engine is freed however the run ends
        epoch_tokens = sum(t.tokens for t in data.train)  # after truncation
        progress = Progress(job.id, attempt, epoch_tokens, run.steps_per_epoch, config, data, target, run, workdir)
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
        processed = progress.tokens_done(run.trainer.state.epoch or 0.0)
        if config.method == "grpo":  # the prompt and completion tokens TRL ran, counted per completion
            processed = int(run.trainer.state.num_input_tokens_seen)
        return {
            "tokens_processed": processed,
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
        amount = ledger.price_book(s, job.tenant_id).finetune(params, config.price_technique, stats["tokens_processed"])
        current.status, current.finished_at = "completed", datetime.now(UTC)
        current.adapter_version_id = adapter.id
        usage = ledger.record(
            s,
            ledger.Usage(
                idempotency_key=f"finetune:{job.id}",
                tenant_id=job.tenant_id,
                kind="finetune",
                technique=f"{config.method}_{config.technique}",  # sft_lora, dpo_lora (priced alike), grpo_lora
                base_model=config.base_model,
                adapter=f"{job.repo.name}/{adapter.version}",
                input_tokens=stats["tokens_processed"],
                compute_ms=int(stats["seconds"] * 1000),
                amount_micro_usd=amount,
                reference=job.id,
            ),
        )
        alerts.charged(s, usage)  # billing.charge, and billing.credit_low if it made the credit fall
        events.publish(s, job.tenant_id, "finetune.job.succeeded", job.id)  # with its adapter and charge

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
