"""Our rows in OpenAI's fine-tuning shapes (web/openai_ft_schemas.py): a dataset as a file, a job as a
`fine_tuning.job` with its events and checkpoints, and our refusals in OpenAI's terms (its field names, 400).

Ids are ours with OpenAI's prefixes, so either dialect finds the other's: `file-<dataset id>`, `ftjob-<job id>`,
`ftckpt-<checkpoint id>`. A job's events are derived from its rows, never stored twice: its creation, start, every
metrics row of its current attempt, every checkpoint, and its end.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import errors as domain
from app.models import Checkpoint, Dataset, FinetuneJob, JobMetric, UsageRecord
from functions import auto_config
from functions.finetune_config import DPO_BETA, FinetuneConfig
from functions.model_targets import fine_tuned_name
from web.errors import APIError, status_of
from web.openai_ft_schemas import (
    CheckpointMetrics,
    DpoHyperparametersOut,
    DpoMethodOut,
    DpoOut,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobError,
    JobEvent,
    JobHyperparameters,
    MethodOut,
    SupervisedOut,
)

FILE_PREFIX, JOB_PREFIX, CHECKPOINT_PREFIX, EVENT_PREFIX = "file-", "ftjob-", "ftckpt-", "ftevent-"
FILE_STATUS = {"validating": "uploaded", "ready": "processed", "invalid": "error"}
JOB_STATUS = {"queued": "queued", "training": "running", "completed": "succeeded", "failed": "failed"}
JOB_STATUS |= {"cancelled": "cancelled"}
# Our config's fields by OpenAI's names (a refusal of a job names what the caller sent); the hyperparameters' prefix
# is where the caller gave them ("hyperparameters", "method.supervised.hyperparameters" or "method.dpo...").
JOB_FIELDS = {"base_model": "model", "dataset": "training_file", "evaluation_dataset": "validation_file"}
JOB_FIELDS |= {"repo": "suffix", "seed": "seed", "job_id": "fine_tuning_job_id"}
HYPERPARAMETERS = {"epochs": "n_epochs", "effective_batch_size": "batch_size"}
HYPERPARAMETERS |= {"learning_rate": "learning_rate_multiplier", "beta": "beta"}

Item = TypeVar("Item")
Level = Literal["info", "warn", "error"]


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def our_id(given: str, prefix: str) -> str:
    """The row id in an OpenAI id ('file-ds_...' -> 'ds_...'); our own id is taken as it is."""
    return given.removeprefix(prefix)


# ---- files ---------------------------------------------------------------------------------------------


def file_object(dataset: Dataset) -> FileObject:
    details = None
    if dataset.status == "invalid" and dataset.errors:
        first = dataset.errors[0]
        details = (f"line {first['line']}: " if first.get("line") else "") + str(first["message"])
    return FileObject(
        id=FILE_PREFIX + dataset.id,
        bytes=dataset.size_bytes,
        created_at=unix(dataset.created_at),
        filename=f"{dataset.name}.{dataset.file_format}",
        status=FILE_STATUS.get(dataset.status, "error"),  # type: ignore[arg-type]  # one of the three
        status_details=details,
    )


# ---- jobs ----------------------------------------------------------------------------------------------


def job_object(db: Session, job: FinetuneJob) -> FineTuningJob:
    config = job.config
    adapter = job.adapter_version
    hyperparameters = JobHyperparameters(
        n_epochs=config.get("epochs") if config.get("train_steps") is None else None,
        batch_size=config.get("effective_batch_size"),
        learning_rate_multiplier=_multiplier(job),
    )
    trained = db.scalar(select(UsageRecord.input_tokens).where(UsageRecord.idempotency_key == f"finetune:{job.id}"))
    error = JobError(code="job_failed", message=job.error or "failed") if job.status == "failed" else None
    return FineTuningJob(
        id=JOB_PREFIX + job.id,
        created_at=unix(job.created_at),
        finished_at=unix(job.finished_at) if job.finished_at else None,
        model=job.base_model,
        fine_tuned_model=fine_tuned_name(job.base_model, adapter.name) if adapter is not None else None,
        organization_id=job.tenant_id,
        status=JOB_STATUS[job.status],  # type: ignore[arg-type]  # one of OpenAI's six
        training_file=FILE_PREFIX + job.dataset_id,
        validation_file=FILE_PREFIX + job.evaluation_dataset_id if job.evaluation_dataset_id else None,
        hyperparameters=hyperparameters,
        method=_method(config, hyperparameters),
        trained_tokens=trained,
        error=error,
        seed=int(config.get("seed", 42)),
        user_provided_suffix=job.repo.name,
    )


def _method(config: dict[str, Any], hyperparameters: JobHyperparameters) -> MethodOut | DpoMethodOut:
    """OpenAI's `method`: 'dpo' for our method 'dpo' (with the beta it trains with), else 'supervised'."""
    if config.get("method") == "dpo":
        beta = config.get("beta")
        resolved = DpoHyperparametersOut(**hyperparameters.model_dump(), beta=DPO_BETA if beta is None else beta)
        return DpoMethodOut(dpo=DpoOut(hyperparameters=resolved))
    return MethodOut(supervised=SupervisedOut(hyperparameters=hyperparameters))


def _multiplier(job: FinetuneJob) -> float | None:
    rate = job.config.get("learning_rate")
    if not isinstance(rate, int | float):
        return None
    shape = FinetuneConfig.model_construct(
        base_model=job.base_model, adapter=job.config.get("adapter", "lora"), method=job.config.get("method", "sft")
    )
    try:
        return float(f"{rate / auto_config.learning_rate(shape):.6g}")  # 3e-3 / 1e-3 is 3.0, not 2.9999999999999996
    except KeyError:  # its base model left the catalog
        return None


def job_events(db: Session, job: FinetuneJob) -> list[JobEvent]:
    """The job's events, newest first."""
    at, job_id = job.created_at, JOB_PREFIX + job.id
    events: list[tuple[datetime, int, JobEvent]] = [(at, 0, _event(job, "created", at, f"Created job {job_id}"))]
    if job.started_at is not None:
        events.append((job.started_at, 1, _event(job, "started", job.started_at, "Fine-tuning job started")))
    metrics = db.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job.id, JobMetric.attempt == max(job.attempts, 1))
        .order_by(JobMetric.id)
    )
    events += [(m.created_at, 2, _metric_event(job, m)) for m in metrics]
    for checkpoint in job.checkpoints:
        name = fine_tuned_name(job.base_model, checkpoint.name)
        message = f"Checkpoint created at step {checkpoint.step}: {name}"
        events.append((checkpoint.created_at, 3, _event(job, f"c{checkpoint.number}", checkpoint.created_at, message)))
    if job.finished_at is not None:
        events += [(job.finished_at, 4 + i, event) for i, event in enumerate(_end_events(job, job.finished_at))]
    # By time, then by kind (a job's end after its last metrics); rows of one kind and time in the order read.
    ordered = sorted(enumerate(events), key=lambda item: (item[1][0], item[1][1], item[0]), reverse=True)
    return [event for _, (_, _, event) in ordered]


def _end_events(job: FinetuneJob, at: datetime) -> list[JobEvent]:
    if job.status == "completed" and job.adapter_version is not None:
        model = fine_tuned_name(job.base_model, job.adapter_version.name)
        return [
            _event(job, "model", at, f"New fine-tuned model created: {model}"),
            _event(job, "succeeded", at, "The job has successfully completed"),
        ]
    if job.status == "failed":
        return [_event(job, "failed", at, f"Fine-tuning job failed: {job.error}", level="error")]
    return [_event(job, "cancelled", at, "Fine-tuning job cancelled")]


def _event(job: FinetuneJob, key: str, at: datetime, message: str, level: Level = "info") -> JobEvent:
    return JobEvent(
        id=f"{EVENT_PREFIX}{job.id}-{key}", created_at=unix(at), level=level, message=message, type="message"
    )


def _metric_event(job: FinetuneJob, row: JobMetric) -> JobEvent:
    train = row.kind == "train"
    side = "train" if train else "valid"
    data: dict[str, Any] = {"step": row.step, "total_steps": job.total_steps, f"{side}_loss": row.loss}
    if row.token_accuracy is not None:
        data[f"{side}_mean_token_accuracy"] = row.token_accuracy
    if train:
        data |= {"learning_rate": row.learning_rate, "epoch": row.epoch}
    of = f"/{job.total_steps}" if job.total_steps else ""
    message = f"Step {row.step}{of}: {'training' if train else 'validation'} loss={row.loss:.4f}"
    return JobEvent(
        id=f"{EVENT_PREFIX}{job.id}-m{row.id}",
        created_at=unix(row.created_at),
        level="info",
        message=message,
        type="metrics",
        data=data,
    )


def job_checkpoints(db: Session, job: FinetuneJob) -> list[JobCheckpoint]:
    """The job's checkpoints, newest first, with the losses of their step."""
    rows = db.scalars(
        select(JobMetric).where(JobMetric.job_id == job.id, JobMetric.attempt == max(job.attempts, 1))
    ).all()
    at_step = {(m.kind, m.step): m for m in rows}
    checkpoints: Sequence[Checkpoint] = sorted(job.checkpoints, key=lambda c: c.number, reverse=True)
    return [
        JobCheckpoint(
            id=CHECKPOINT_PREFIX + c.id,
            created_at=unix(c.created_at),
            fine_tuned_model_checkpoint=fine_tuned_name(job.base_model, c.name),
            fine_tuning_job_id=JOB_PREFIX + job.id,
            step_number=c.step,
            metrics=_checkpoint_metrics(c.step, at_step.get(("train", c.step)), at_step.get(("eval", c.step))),
        )
        for c in checkpoints
    ]


def _checkpoint_metrics(step: int, train: JobMetric | None, valid: JobMetric | None) -> CheckpointMetrics:
    metrics = CheckpointMetrics(step=float(step))
    if train is not None:
        metrics.train_loss, metrics.train_mean_token_accuracy = train.loss, train.token_accuracy
    if valid is not None:
        metrics.valid_loss, metrics.valid_mean_token_accuracy = valid.loss, valid.token_accuracy
        metrics.full_valid_loss, metrics.full_valid_mean_token_accuracy = valid.loss, valid.token_accuracy
    return metrics


# ---- lists and refusals --------------------------------------------------------------------------------


def page(items: Sequence[Item], after: str | None, limit: int) -> tuple[list[Item], bool]:
    """(the `limit` items following the one whose id is `after`, or the first ones; whether more follow); 400
    naming `after` when no item has that id."""
    start = 0
    if after is not None:
        ids = [getattr(item, "id", None) for item in items]
        if after not in ids:
            raise APIError(400, f"after: {after!r} is not an item of this list", param="after", code="invalid_value")
        start = ids.index(after) + 1
    return list(items[start : start + limit]), len(items) > start + limit


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise APIError(400, f"limit: between 1 and {most}, got {limit}", param="limit", code="invalid_value")
    return limit


def in_openai_terms(exc: Exception, renamed: Mapping[str, str]) -> APIError:
    """A refusal of ours (APIError, a domain Refusal or a config's ValidationError) as OpenAI answers it: a 400
    (a 4xx other than 422 keeps its status) naming OpenAI's field in `param` and at the message's start."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if not loc and ": " in message:  # a cross-field check names its field first
            field, _, message = message.partition(": ")
            loc = [field]
        exc = APIError(422, f"{'.'.join(loc)}: {message}", param=".".join(loc) or None, code="invalid_value")
    elif isinstance(exc, domain.Refusal):
        exc = APIError(status_of(exc), exc.message, param=exc.field, code=exc.code)
    if not isinstance(exc, APIError):
        raise TypeError(f"not a refusal: {exc!r}")
    param, message = exc.param, exc.message
    if param is not None and param in renamed:
        message = renamed[param] + message.removeprefix(param) if message.startswith(f"{param}:") else message
        param = renamed[param]
    status = 400 if exc.status == 422 else exc.status
    return APIError(status, message, param=param, code=exc.code, headers=exc.headers, **exc.extra)


def job_fields(hyperparameters_at: str) -> dict[str, str]:
    """Our config's field names -> OpenAI's, the hyperparameters under `hyperparameters_at`."""
    return JOB_FIELDS | {ours: f"{hyperparameters_at}.{theirs}" for ours, theirs in HYPERPARAMETERS.items()}
