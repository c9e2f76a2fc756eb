"""Response bodies, one per entity. Users see names (`repo/3`, dataset names), never paths."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from app.models import AdapterVersion, Checkpoint, Dataset, FinetuneJob, JobMetric, Repo, UsageRecord
from billing.prices import usd


class Money(BaseModel):
    micro_usd: int
    usd: str

    @classmethod
    def of(cls, micro_usd: int) -> "Money":
        return cls(micro_usd=micro_usd, usd=usd(micro_usd))


class DatasetOut(BaseModel):
    id: str
    name: str
    status: str  # validating | ready | invalid
    file_format: str
    data_format: str | None
    base_model: str
    size_bytes: int
    stats: dict[str, Any]
    errors: list[dict[str, Any]]
    created_at: datetime

    @classmethod
    def of(cls, d: Dataset) -> "DatasetOut":
        return cls(
            id=d.id,
            name=d.name,
            status=d.status,
            file_format=d.file_format,
            data_format=d.data_format,
            base_model=d.base_model,
            size_bytes=d.size_bytes,
            stats=d.stats,
            errors=d.errors,
            created_at=d.created_at,
        )


class Estimate(BaseModel):
    tokens: int  # dataset training tokens x epochs
    cost: Money


class JobOut(BaseModel):
    id: str
    status: str  # queued | training | completed | failed | cancelled
    base_model: str
    dataset: str
    repo: str
    adapter: str | None  # "repo/3" once completed
    version: int | None  # the version number it trains, taken when training starts
    checkpoints: list[str]  # "repo/3@1", ... as they are saved
    config: dict[str, Any]
    estimate: Estimate
    charge: Money | None  # the actual charge once completed
    error: str | None
    attempts: int
    total_steps: int | None
    summary: dict[str, Any]  # steps_done, stopped_early, baseline / best / final evaluation
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: FinetuneJob, charge_micro_usd: int | None = None) -> "JobOut":
        adapter = job.adapter_version
        return cls(
            id=job.id,
            status=job.status,
            base_model=job.base_model,
            dataset=job.dataset.name,
            repo=job.repo.name,
            adapter=f"{job.repo.name}/{adapter.version}" if adapter else None,
            version=job.version,
            checkpoints=[f"{job.repo.name}/{c.version}@{c.number}" for c in job.checkpoints],
            config=job.config,
            estimate=Estimate(tokens=job.estimated_tokens, cost=Money.of(job.estimate_micro_usd)),
            charge=Money.of(charge_micro_usd) if charge_micro_usd is not None else None,
            error=job.error,
            attempts=job.attempts,
            total_steps=job.total_steps,
            summary=job.summary or {},
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class MetricOut(BaseModel):
    kind: str  # train: one row per optimizer step; eval: one row per evaluation (step 0: before training)
    step: int
    epoch: float
    loss: float  # training loss, or evaluation loss on eval rows
    learning_rate: float
    tokens_per_second: float
    perplexity: float | None = None
    token_accuracy: float | None = None
    sequence_accuracy: float | None = None
    char_error_rate: float | None = None
    # Classification datasets: {"labels", "accuracy", "per_class": {label: {"accuracy", "support"}},
    # "confusion_matrix": {"rows": reference labels, "columns": answered labels + "(other)", "counts"}}
    classification: dict[str, Any] | None = None
    attempt: int
    at: datetime

    @classmethod
    def of(cls, m: JobMetric) -> "MetricOut":
        return cls(
            kind=m.kind,
            step=m.step,
            epoch=m.epoch,
            loss=m.loss,
            learning_rate=m.learning_rate,
            tokens_per_second=m.tokens_per_second,
            perplexity=m.perplexity,
            token_accuracy=m.token_accuracy,
            sequence_accuracy=m.sequence_accuracy,
            char_error_rate=m.char_error_rate,
            classification=m.classification,
            attempt=m.attempt,
            at=m.created_at,
        )


class CheckpointOut(BaseModel):
    name: str  # "repo/3@2": servable and downloadable like a version
    version: int
    checkpoint: int
    step: int
    epoch: float
    kind: str  # lora | full
    base_model: str
    job_id: str
    created_at: datetime

    @classmethod
    def of(cls, c: Checkpoint) -> "CheckpointOut":
        return cls(
            name=c.name,
            version=c.version,
            checkpoint=c.number,
            step=c.step,
            epoch=c.epoch,
            kind=c.kind,
            base_model=c.base_model,
            job_id=c.job_id,
            created_at=c.created_at,
        )


class AdapterOut(BaseModel):
    name: str  # "repo/3"
    version: int
    kind: str  # lora: a PEFT adapter of base_model | full: a whole model (full fine-tuning)
    base_model: str
    adapter_type: str  # lora | none
    rank: int  # 0 for a full model
    target_modules: list[str]
    job_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, a: AdapterVersion) -> "AdapterOut":
        return cls(
            name=a.name,
            version=a.version,
            kind=a.kind,
            base_model=a.base_model,
            adapter_type=a.adapter_type,
            rank=a.rank,
            target_modules=a.target_modules,
            job_id=a.job_id,
            created_at=a.created_at,
        )


class RepoOut(BaseModel):
    name: str
    description: str
    versions: list[AdapterOut]
    checkpoints: list[CheckpointOut]  # of published versions and of versions still training
    created_at: datetime

    @classmethod
    def of(cls, r: Repo) -> "RepoOut":
        return cls(
            name=r.name,
            description=r.description,
            versions=[AdapterOut.of(v) for v in r.versions],
            checkpoints=[CheckpointOut.of(c) for c in r.checkpoints],
            created_at=r.created_at,
        )


class UsageOut(BaseModel):
    kind: str
    technique: str
    base_model: str
    adapter: str | None
    input_tokens: int
    output_tokens: int
    compute_ms: int
    cost: Money
    reference: str | None
    created_at: datetime

    @classmethod
    def of(cls, u: UsageRecord) -> "UsageOut":
        return cls(
            kind=u.kind,
            technique=u.technique,
            base_model=u.base_model,
            adapter=u.adapter,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            compute_ms=u.compute_ms,
            cost=Money.of(u.amount_micro_usd),
            reference=u.reference,
            created_at=u.created_at,
        )
