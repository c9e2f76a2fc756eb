"""/v1/fine_tuning/jobs, OpenAI's dialect of /v1/finetuning/jobs: the same jobs, created by the same function
(web/routers/finetuning.start_job), shown in OpenAI's shapes and status names (web/openai_ft_replies.py).

OpenAI's request maps onto our config: `training_file` is the dataset, `validation_file` the evaluation dataset,
`suffix` the adapter repository (`ft-<model>` if unset), `seed` the seed, and the hyperparameters `n_epochs`,
`batch_size` and `learning_rate_multiplier` our `epochs`, `effective_batch_size` and `learning_rate` (the rate 'auto'
derives times the multiplier), each 'auto' as ours. Every refusal names OpenAI's field; nothing is created then.

`method` {"type": "dpo"} is our method 'dpo' (preference tuning) on a preference file, its hyperparameters
(method.dpo.hyperparameters) those above and `beta` ours ('auto': our default, 0.1). A preference file trains with
'dpo' only, and 'dpo' trains on nothing else: refused naming the file before any compute. OpenAI's 'reinforcement'
is refused, pointing to our own API's method 'grpo'.
"""

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import ValidationError
from sqlalchemy import select

from app import errors as domain
from app.models import Dataset, FinetuneJob
from functions import auto_config
from functions.catalog import get_model
from functions.finetune_config import FinetuneConfig
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.openai_ft_replies import (
    EVENT_PREFIX,
    FILE_PREFIX,
    JOB_PREFIX,
    check_limit,
    in_openai_terms,
    job_checkpoints,
    job_events,
    job_fields,
    job_object,
    our_id,
    page,
)
from web.openai_ft_schemas import DpoHyperparameters, FineTuningJob, JobCheckpoint, JobCreate, JobEvent, Page
from web.routers import finetuning
from web.routers.openai_files import find_file

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai fine-tuning"])
MAX_LIST = 100  # items in one page of jobs, events or checkpoints
After = Annotated[str | None, Query(description="The last id of the previous page.")]


@router.post("", response_model=FineTuningJob)
def create_job(body: JobCreate, tenant: CurrentTenant, db: Db) -> FineTuningJob:
    hyperparameters, where = body.chosen()
    renamed = job_fields(where)
    try:
        get_model(body.model)
    except KeyError:
        raise APIError(
            400, f"model: unknown base model {body.model!r}", param="model", code="model_not_found"
        ) from None
    training = find_file(db, tenant.id, body.training_file, "training_file")
    validation = find_file(db, tenant.id, body.validation_file, "validation_file") if body.validation_file else None
    _fits_supervised(body, training, "training_file")
    if validation is not None:
        _fits_supervised(body, validation, "validation_file")
    method = "dpo" if body.dpo else "sft"
    fields: dict[str, object] = {
        "base_model": body.model,
        "method": method,
        "dataset": training.name,
        "evaluation_dataset": validation.name if validation is not None else None,
        "repo": body.suffix or f"ft-{body.model}"[:100],
        "epochs": hyperparameters.n_epochs,
        "effective_batch_size": hyperparameters.batch_size,
    }
    if body.seed is not None:
        fields["seed"] = body.seed
    if isinstance(hyperparameters, DpoHyperparameters) and hyperparameters.beta != "auto":
        fields["beta"] = hyperparameters.beta
    if hyperparameters.learning_rate_multiplier != "auto":
        # the rate of LoRA, our default technique, for this base model and method
        auto = auto_config.learning_rate(FinetuneConfig.model_construct(base_model=body.model, method=method))
        fields["learning_rate"] = auto * hyperparameters.learning_rate_multiplier
    try:
        job = finetuning.start_job(db, tenant.id, FinetuneConfig.model_validate(fields))
    except (APIError, domain.Refusal, ValidationError) as refused:
        db.rollback()
        raise in_openai_terms(refused, renamed) from None
    return job_object(db, job)


@router.get("", response_model=Page[FineTuningJob])
def list_jobs(tenant: CurrentTenant, db: Db, after: After = None, limit: int = 20) -> Page[FineTuningJob]:
    """The tenant's jobs, newest first; page on with `after` = the last id."""
    check_limit(limit, MAX_LIST)
    jobs = select(FinetuneJob).where(FinetuneJob.tenant_id == tenant.id)
    rows = db.scalars(jobs.order_by(FinetuneJob.created_at.desc(), FinetuneJob.id.desc())).all()
    shown, more = page(rows, our_id(after, JOB_PREFIX) if after else None, limit)
    return Page[FineTuningJob](data=[job_object(db, job) for job in shown], has_more=more)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_job(fine_tuning_job_id: str, tenant: CurrentTenant, db: Db) -> FineTuningJob:
    return job_object(db, _find(db, tenant.id, fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(fine_tuning_job_id: str, tenant: CurrentTenant, db: Db) -> FineTuningJob:
    """As POST /v1/finetuning/jobs/{id}/cancel: a queued job never starts, a running one stops at its next step."""
    job = _find(db, tenant.id, fine_tuning_job_id)
    finetuning.cancel_job(job.id, tenant, db)
    db.refresh(job)
    return job_object(db, job)


@router.get("/{fine_tuning_job_id}/events", response_model=Page[JobEvent])
def list_events(
    fine_tuning_job_id: str, tenant: CurrentTenant, db: Db, after: After = None, limit: int = 20
) -> Page[JobEvent]:
    """Newest first: its creation, start, every step's training loss and evaluation, checkpoints and its end."""
    check_limit(limit, MAX_LIST)
    job = _find(db, tenant.id, fine_tuning_job_id)
    if after is not None and not after.startswith(f"{EVENT_PREFIX}{job.id}-"):
        raise APIError(400, f"after: {after!r} is not an event of this job", param="after", code="invalid_value")
    shown, more = page(job_events(db, job), after, limit)
    return Page[JobEvent](data=shown, has_more=more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=Page[JobCheckpoint])
def list_checkpoints(
    fine_tuning_job_id: str, tenant: CurrentTenant, db: Db, after: After = None, limit: int = 10
) -> Page[JobCheckpoint]:
    """Newest first; each is servable as `model` by its `fine_tuned_model_checkpoint`."""
    check_limit(limit, MAX_LIST)
    job = _find(db, tenant.id, fine_tuning_job_id)
    shown, more = page(job_checkpoints(db, job), after, limit)
    return Page[JobCheckpoint](data=shown, has_more=more)


def _fits_supervised(body: JobCreate, file: Dataset, param: str) -> None:
    """A preference file trains with method 'dpo' only: refused naming the file (our own API names `method`, which
    an OpenAI job may not have given). The other way round, 'dpo' on a file of another shape, is our own check
    (web/routers/finetuning.py), which names the dataset: `training_file` or `validation_file` here."""
    if not body.dpo and file.data_format == "preference":
        message = (
            f"{param}: {FILE_PREFIX + file.id!r} is a preference file (a preferred and a non-preferred answer per "
            'row): train on it with method {"type": "dpo"}; supervised fine-tuning learns one answer per row'
        )
        raise APIError(400, message, param=param, code="invalid_value")


def _find(db: Db, tenant_id: str, fine_tuning_job_id: str) -> FinetuneJob:
    try:
        return finetuning.find_job(db, tenant_id, our_id(fine_tuning_job_id, JOB_PREFIX))
    except APIError as refused:
        raise in_openai_terms(refused, {"job_id": "fine_tuning_job_id"}) from None
