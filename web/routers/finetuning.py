"""/v1/finetuning/jobs: create (with a price estimate), list, get, cancel, per-step metrics, live events (SSE)."""

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import events
from app.db import sessions
from app.models import Dataset, FinetuneJob, JobMetric, UsageRecord, utcnow
from app.queue import emit
from billing import credits, ledger
from functions import auto_config, checkpoints, grpo, templated_rows
from functions.catalog import get_model
from functions.datasets import single_class_message
from functions.finetune_config import MAX_STEPS, FinetuneConfig
from functions.repos import get_or_create_repo
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.routers.datasets import find_dataset
from web.schemas import Estimate, JobOut, MetricOut, Money, job_out

# The step after which metrics are wanted (-1: all): beyond the most steps a job may take it would name none, and
# overflow the database's integers.
AfterStep = Annotated[int, Query(ge=-1, le=MAX_STEPS)]
router = APIRouter(prefix="/v1/finetuning/jobs", tags=["fine-tuning"])
FINAL_STATUSES = ("completed", "failed", "cancelled")
EVENTS_POLL_SECONDS = 0.5  # how often a live event stream re-reads the job and its metrics
KEEPALIVE_SECONDS = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream


class QuoteOut(BaseModel):
    """POST /v1/finetuning/jobs/quote: a job's price and resolved config before it is started."""

    estimate: Estimate  # as the job would be created with
    config: dict[str, Any]  # as the job would keep it: "auto" fields resolved
    auto: dict[str, Any]  # the fields that were "auto", with the values they take
    warnings: list[str]
    truncation: dict[str, Any]  # what max_seq_length cuts: rows, rows_cut, rows_dropped, completion tokens lost
    can_start: bool  # the tenant's credit (or card) covers the estimate
    refusal: str | None  # when it does not: the 402's message, with the way out


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(config: FinetuneConfig, tenant: CurrentTenant, db: Db) -> JobOut:
    return job_out(start_job(db, tenant.id, config))


@router.post("/quote", response_model=QuoteOut)
def quote_job(config: FinetuneConfig, tenant: CurrentTenant, db: Db) -> QuoteOut:
    """What POST /v1/finetuning/jobs would do with this config, without starting anything: the price estimate,
    the config with its "auto" fields resolved, and whether the tenant's credit covers it (if not, the 402's
    message). Refused as that route refuses a config (422/404/409 naming the field)."""
    quote = price_job(db, tenant.id, config)
    db.commit()  # keeps only what dataset_profile counted once for a dataset validated before lengths were kept
    return QuoteOut(
        estimate=Estimate(tokens=quote.tokens, cost=Money.of(quote.estimate_micro_usd)),
        config=quote.resolved.config.stored(),
        auto=quote.resolved.auto,
        warnings=quote.resolved.warnings,
        truncation=quote.resolved.truncation.record(),
        can_start=quote.refusal is None,
        refusal=quote.refusal,
    )


def start_job(db: Session, tenant_id: str, config: FinetuneConfig) -> FinetuneJob:
    """Check a job's config against its dataset and the tenant's credit, resolve its "auto" fields, price it and
    queue it; nothing is kept when it is refused (APIError naming the field). Both dialects create jobs here: ours
    (POST /v1/finetuning/jobs) and OpenAI's (POST /v1/fine_tuning/jobs, web/routers/openai_finetuning.py)."""
    quote = price_job(db, tenant_id, config)
    if quote.refusal is not None:
        raise APIError(402, quote.refusal, code="payment_required", estimate_micro_usd=quote.estimate_micro_usd)
    config = quote.resolved.config
    repo = get_or_create_repo(db, tenant_id, config.repo)
    job = FinetuneJob(
        tenant_id=tenant_id,
        dataset_id=quote.dataset.id,
        evaluation_dataset_id=quote.evaluation.id if quote.evaluation is not None else None,
        repo_id=repo.id,
        base_model=config.base_model,
        config=config.stored(),
        estimated_tokens=quote.tokens,
        estimate_micro_usd=quote.estimate_micro_usd,
        summary=quote.resolved.record(),
    )
    db.add(job)
    db.flush()
    emit(db, "finetune.requested", job.id)
    db.commit()
    return job


@dataclasses.dataclass(frozen=True)
class Quote:
    """A job as it would start: its datasets, its config with the "auto" fields resolved, its price, and why the
    tenant's credit does not cover it (None when it does)."""

    dataset: Dataset
    evaluation: Dataset | None
    resolved: auto_config.Resolved
    tokens: int  # trained tokens, as priced
    estimate_micro_usd: int
    refusal: str | None  # the 402's message: why, and the way out


def price_job(db: Session, tenant_id: str, config: FinetuneConfig) -> Quote:
    """Every check start_job makes before it keeps anything (APIError naming the field), the resolved config and
    the price; what the credit check says is returned, not raised, so a quote can show it."""
    dataset = find_dataset(db, tenant_id, config.dataset)
    if dataset.status != "ready":
        raise APIError(
            409,
            f"dataset: {config.dataset!r} is {dataset.status}, not ready",
            param="dataset",
            code="dataset_not_ready",
        )
    if not dataset.stats.get("train_rows"):
        raise APIError(422, f"dataset: {config.dataset!r} has no rows in the train split", param="dataset")
    labels = dataset.stats.get("labels")  # set by validation for a classification dataset (text in, category out)
    if labels is not None and len(labels) < 2:
        raise APIError(422, f"dataset: {single_class_message(config.dataset, labels)}", param="dataset")
    _fits_method(config, config.dataset, dataset.data_format)
    evaluation = evaluation_dataset(db, tenant_id, config)
    try:
        config, _ = checkpoints.continuation(db, tenant_id, config)  # a continued adapter's LoRA settings carry over
    except checkpoints.Refused as exc:
        raise APIError(422, exc.message, param=exc.field, code="invalid_value") from None
    # "auto" fields from the dataset (the rows a prompt_template renders); refused here (naming max_seq_length) when
    # truncation would lose too much, or a template that does not fit the dataset (naming prompt_template).
    # A GRPO job's rows: each prompt with max_completion_length (functions/grpo.py).
    grpo_job = config.method == "grpo"
    profile = grpo.profile(dataset, config) if grpo_job else auto_config.dataset_profile(dataset, config)
    if evaluation is not None:  # its rows are the evaluation split: none is held out of the train split
        profile = dataclasses.replace(profile, evaluation_rows=int(evaluation.stats.get("rows", 0)))
    resolved = auto_config.resolve(config, profile)
    tokens = estimated_tokens(resolved.truncation, resolved.config)
    params = get_model(resolved.config.base_model).params
    estimate = ledger.price_book(db, tenant_id).finetune(params, resolved.config.price_technique, tokens)
    refusal = credits.paid_work_refusal(db, tenant_id, estimate)
    return Quote(dataset, evaluation, resolved, tokens, estimate, refusal)


@router.get("", response_model=list[JobOut])
def list_jobs(tenant: CurrentTenant, db: Db) -> list[JobOut]:
    jobs = db.scalars(select(FinetuneJob).where(FinetuneJob.tenant_id == tenant.id).order_by(FinetuneJob.created_at))
    return [shown(db, job) for job in jobs]


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, tenant: CurrentTenant, db: Db) -> JobOut:
    return shown(db, find_job(db, tenant.id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, tenant: CurrentTenant, db: Db) -> JobOut:
    """Cancel in any state: a queued job never starts, a training job stops at its next step; a finished job
    is left as it is."""
    job = find_job(db, tenant.id, job_id)
    if job.status in ("queued", "training"):
        # Conditional UPDATE: a worker may complete the job between the read above and this write, and a
        # published, charged adapter must not be overwritten as "cancelled".
        cancelled = db.execute(
            update(FinetuneJob)
            .where(FinetuneJob.id == job.id, FinetuneJob.status.in_(("queued", "training")))
            .values(status="cancelled", finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if cancelled.rowcount == 1:  # type: ignore[attr-defined]  # a CursorResult
            db.refresh(job)  # the event's data reads the row as the UPDATE left it
            events.publish(db, tenant.id, "finetune.job.cancelled", job.id)
        db.commit()
        db.refresh(job)
    return shown(db, job)


@router.get("/{job_id}/metrics", response_model=list[MetricOut])
def job_metrics(job_id: str, tenant: CurrentTenant, db: Db, after_step: AfterStep = -1) -> list[MetricOut]:
    """Per-step training metrics, readable while the job runs (poll with after_step for new rows)."""
    job = find_job(db, tenant.id, job_id)
    rows = db.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job.id, JobMetric.attempt == max(job.attempts, 1), JobMetric.step > after_step)
        .order_by(JobMetric.step, JobMetric.id)
    )
    return [MetricOut.model_validate(m) for m in rows]


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events until the job ends."}},
)
def job_events(
    job_id: str,
    tenant: CurrentTenant,
    db: Db,
    request: Request,
    after_step: AfterStep = -1,
    last_event_id: Annotated[str | None, Header(description="Resume after this metric event id.")] = None,
) -> StreamingResponse:
    """Live progress as server-sent events, so clients need not poll two endpoints: `event: status` (a JobOut)
    on connect and whenever status, attempt or total_steps change, `event: metric` (a MetricOut, `id:` a cursor)
    for each metrics row of the current attempt as it is written, and a last `status` once the job is completed,
    failed or cancelled, after which the stream ends. Resume with `Last-Event-ID` (what EventSource sends on
    reconnect) or with `?after_step=N` as for /metrics."""
    after_id: int | None = None
    if last_event_id is not None:
        if re.fullmatch(r"[0-9]{1,18}", last_event_id.strip()) is None:  # ASCII digits only, within 64 bits
            raise APIError(422, "Last-Event-ID: not an event id of this stream", param="Last-Event-ID")
        after_id = int(last_event_id)
    job = find_job(db, tenant.id, job_id)
    return StreamingResponse(
        _job_event_stream(job.id, request, after_step, after_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _job_event_stream(job_id: str, request: Request, after_step: int, after_id: int | None) -> AsyncIterator[str]:
    """Poll the rows the worker writes. Metric rows are followed by their id, not their step: an evaluation row
    may be committed before the train row of the same step, and a step cursor would then skip that train row."""
    db = sessions()()
    last_key: tuple[Any, ...] | None = None
    last_sent = time.monotonic()
    try:
        while True:
            polled = await run_in_threadpool(_poll_job, db, job_id, after_step, after_id)
            if polled is None:  # the job (or its tenant) was deleted while we watched
                return
            job, metrics = polled
            final = job["status"] in FINAL_STATUSES
            key = (job["status"], job["attempts"], job["total_steps"])
            if key != last_key and not final:
                yield _sse("status", job)
            for row_id, metric in metrics:
                yield _sse("metric", metric, row_id)
                after_id = row_id
            # A completed or failed job committed all its rows before its status, read first above; a
            # cancelled one may still log the step in flight, which no one watching needs.
            if final:
                yield _sse("status", job)
                return
            if key != last_key or metrics:
                last_key, last_sent = key, time.monotonic()
            elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"  # also how a server without disconnect events notices a gone client
                last_sent = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENTS_POLL_SECONDS)
    finally:
        db.close()  # not awaited: a cancelled stream (the client left) must still give its connection back


def _poll_job(
    db: Session, job_id: str, after_step: int, after_id: int | None
) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]] | None:
    """One fresh read of the job (as JobOut json) and of its new metrics rows of the current attempt."""
    db.rollback()  # end the previous read transaction so this one sees the worker's commits since
    job = db.get(FinetuneJob, job_id, populate_existing=True)
    if job is None:
        return None
    query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.attempt == max(job.attempts, 1))
    query = query.where(JobMetric.id > after_id) if after_id is not None else query.where(JobMetric.step > after_step)
    rows = db.scalars(query.order_by(JobMetric.id)).all()
    metrics = [(row.id, MetricOut.model_validate(row).model_dump(mode="json")) for row in rows]
    return shown(db, job).model_dump(mode="json"), metrics


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def estimated_tokens(truncation: auto_config.Truncation, config: FinetuneConfig) -> int:
    """Tokens the job will process: the train split as max_seq_length leaves it x epochs, or the rows train_steps
    will see. A preference row (method "dpo") is two sequences: its prompt with the chosen answer, and with the
    rejected one. A prompt (method "grpo") is num_generations sequences: (prompt + max_completion_length) x
    num_generations tokens per row and epoch."""
    values = config.values()
    sequences = config.grpo.num_generations if config.method == "grpo" else 1
    if config.train_steps is None:
        return truncation.tokens * values.epochs * sequences
    rows = config.train_steps * values.effective_batch_size
    return -(-truncation.tokens * rows * sequences // max(1, truncation.rows - truncation.rows_dropped))  # ceil


def evaluation_dataset(db: Session, tenant_id: str, config: FinetuneConfig) -> Dataset | None:
    """The dataset `evaluation_dataset` names, ready and of the same tenant (refusals name the field), checked as
    its rows will be read (a prompt_template must fit it too); None when the config names none."""
    if config.evaluation_dataset is None:
        return None
    dataset = find_dataset(db, tenant_id, config.evaluation_dataset, param="evaluation_dataset")
    if dataset.status != "ready":
        message = f"evaluation_dataset: {dataset.name!r} is {dataset.status}, not ready"
        raise APIError(409, message, param="evaluation_dataset", code="dataset_not_ready")
    _fits_method(config, dataset.name, dataset.data_format, param="evaluation_dataset")
    if config.method == "grpo":
        columns, specs = dataset.stats.get("columns") or [], config.grpo.reward_functions
        grpo.check_dataset(dataset.name, dataset.data_format, columns, specs, "evaluation_dataset")
        return dataset
    if templated_rows.applies(config, dataset.data_format):
        templated_rows.check(config, dataset.name, dataset.data_format, dataset.stats.get("columns") or [])
    return dataset


def _fits_method(config: FinetuneConfig, name: str, data_format: str | None, param: str = "dataset") -> None:
    """A preference dataset is for method 'dpo', and method 'dpo' takes nothing else (422 naming the field)."""
    preference = data_format == "preference"
    if config.method == "dpo" and not preference:
        raise APIError(
            422,
            f"{param}: method 'dpo' needs a preference dataset ('prompt', 'chosen', 'rejected' rows, or OpenAI's "
            f"'input', 'preferred_output', 'non_preferred_output'); {name!r} is a {data_format} dataset",
            param=param,
        )
    if config.method != "dpo" and preference:
        raise APIError(
            422,
            f"method: {name!r} is a preference dataset ('prompt', 'chosen', 'rejected'): train on it with method "
            f"'dpo' (method {config.method!r} learns one answer per row)",
            param="method",
        )


def find_job(db: Db, tenant_id: str, job_id: str) -> FinetuneJob:
    job = db.get(FinetuneJob, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise APIError(404, f"fine-tuning job {job_id!r} not found", param="job_id", code="job_not_found")
    return job


def shown(db: Session, job: FinetuneJob) -> JobOut:
    """The job as the API shows it, with its charge once completed; also the `data` of its events."""
    charge = db.scalar(select(UsageRecord.amount_micro_usd).where(UsageRecord.idempotency_key == f"finetune:{job.id}"))
    return job_out(job, charge)
