"""/v1/finetuning/jobs: create (with a price estimate), list, get, cancel, per-step metrics."""

from fastapi import APIRouter, status
from sqlalchemy import select, update

from app.models import FinetuneJob, JobMetric, Repo, UsageRecord, utcnow
from app.queue import emit
from billing import credits, ledger
from functions.catalog import get_model
from functions.finetune_config import FinetuneConfig
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.routers.datasets import find_dataset
from web.schemas import JobOut, MetricOut

router = APIRouter(prefix="/v1/finetuning/jobs", tags=["fine-tuning"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(config: FinetuneConfig, tenant: CurrentTenant, db: Db) -> JobOut:
    dataset = find_dataset(db, tenant.id, config.dataset)
    if dataset.status != "ready":
        raise APIError(
            409,
            f"dataset: {config.dataset!r} is {dataset.status}, not ready",
            param="dataset",
            code="dataset_not_ready",
        )
    if not dataset.stats.get("train_rows"):
        raise APIError(422, f"dataset: {config.dataset!r} has no rows in the train split", param="dataset")
    tokens = int(dataset.stats["train_tokens"]) * config.epochs
    estimate = ledger.price_book(db, tenant.id).finetune(get_model(config.base_model).params, config.adapter, tokens)
    refusal = credits.paid_work_refusal(db, tenant.id, estimate)
    if refusal is not None:
        raise APIError(402, refusal, code="payment_required", estimate_micro_usd=estimate)
    repo = db.scalar(select(Repo).where(Repo.tenant_id == tenant.id, Repo.name == config.repo))
    if repo is None:
        repo = Repo(tenant_id=tenant.id, name=config.repo)
        db.add(repo)
        db.flush()
    job = FinetuneJob(
        tenant_id=tenant.id,
        dataset_id=dataset.id,
        repo_id=repo.id,
        base_model=config.base_model,
        config=config.model_dump(),
        estimated_tokens=tokens,
        estimate_micro_usd=estimate,
    )
    db.add(job)
    db.flush()
    emit(db, "finetune.requested", job.id)
    db.commit()
    return JobOut.of(job)


@router.get("", response_model=list[JobOut])
def list_jobs(tenant: CurrentTenant, db: Db) -> list[JobOut]:
    jobs = db.scalars(select(FinetuneJob).where(FinetuneJob.tenant_id == tenant.id).order_by(FinetuneJob.created_at))
    return [_out(db, job) for job in jobs]


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, tenant: CurrentTenant, db: Db) -> JobOut:
    return _out(db, find_job(db, tenant.id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, tenant: CurrentTenant, db: Db) -> JobOut:
    """Cancel in any state: a queued job never starts, a training job stops at its next step; a finished job
    is left as it is."""
    job = find_job(db, tenant.id, job_id)
    if job.status in ("queued", "training"):
        # Conditional UPDATE: a worker may complete the job between the read above and this write, and a
        # published, charged adapter must not be overwritten as "cancelled".
        db.execute(
            update(FinetuneJob)
            .where(FinetuneJob.id == job.id, FinetuneJob.status.in_(("queued", "training")))
            .values(status="cancelled", finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        db.commit()
        db.refresh(job)
    return _out(db, job)


@router.get("/{job_id}/metrics", response_model=list[MetricOut])
def job_metrics(job_id: str, tenant: CurrentTenant, db: Db, after_step: int = -1) -> list[MetricOut]:
    """Per-step training metrics, readable while the job runs (poll with after_step for new rows)."""
    job = find_job(db, tenant.id, job_id)
    rows = db.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job.id, JobMetric.attempt == max(job.attempts, 1), JobMetric.step > after_step)
        .order_by(JobMetric.step)
    )
    return [MetricOut.of(m) for m in rows]


def find_job(db: Db, tenant_id: str, job_id: str) -> FinetuneJob:
    job = db.get(FinetuneJob, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise APIError(404, f"fine-tuning job {job_id!r} not found", param="job_id", code="job_not_found")
    return job


def _out(db: Db, job: FinetuneJob) -> JobOut:
    charge = db.scalar(select(UsageRecord.amount_micro_usd).where(UsageRecord.idempotency_key == f"finetune:{job.id}"))
    return JobOut.of(job, charge)
