"""Database tables (SQLAlchemy 2). Every user-facing row belongs to one tenant."""

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Public ids are random, so they reveal nothing about other tenants' rows."""
    return f"{prefix}_{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC in every database, read back as aware UTC (SQLite keeps no time zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, shown in listings
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    name: Mapped[str] = mapped_column(String(100), default="", server_default="")
    scope: Mapped[str] = mapped_column(String(20), default="all", server_default="all")  # all | inference | read
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # None: never
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)  # written at most once a minute
    tenant: Mapped[Tenant] = relationship()


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(100))  # tokenizer used for counting
    file_format: Mapped[str] = mapped_column(String(10))  # jsonl | csv
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default="validating")  # validating | ready | invalid
    data_format: Mapped[str | None] = mapped_column(String(30), default=None)  # prompt_completion | messages | text
    errors: Mapped[list[Any]] = mapped_column(default=list)  # [{"line": 3, "field": "prompt", "message": ...}]
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)  # rows, tokens, ... (functions/validate_dataset.py)
    # [[prompt tokens, completion tokens], ...] per training row, for a job's "auto" values and truncation
    # (functions/auto_config.py). Deferred: up to max_dataset_rows pairs, read only when a job is created.
    train_lengths: Mapped[list[Any] | None] = mapped_column(default=None, deferred=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Repo(Base):
    """A named series of adapter versions: `repo/1`, `repo/2`, ..."""

    __tablename__ = "repos"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("repo"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    # The last version number handed out (to an import, or to a job when it starts training). Bumped with one
    # UPDATE, so the repo row is what serializes concurrent publishers and jobs (functions/repos.py).
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    versions: Mapped[list["AdapterVersion"]] = relationship(back_populates="repo", order_by="AdapterVersion.version")
    checkpoints: Mapped[list["Checkpoint"]] = relationship(
        back_populates="repo", order_by=lambda: [Checkpoint.version, Checkpoint.number], viewonly=True
    )


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("repo_id", "version"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ad"))
    repo_id: Mapped[str] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(100))
    adapter_type: Mapped[str] = mapped_column(String(20))  # lora | none (full fine-tuning)
    kind: Mapped[str] = mapped_column(String(10), default="lora", server_default="lora")  # lora | full (a whole model)
    rank: Mapped[int] = mapped_column(Integer)  # 0 for a full model
    target_modules: Mapped[list[Any]] = mapped_column(default=list)
    job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    # A classification adapter's label set (its dataset's labels: functions/datasets.detect_labels): serving then
    # answers only one of them (SamplingParams.choices). None for any other adapter.
    labels: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    repo: Mapped[Repo] = relationship(back_populates="versions")

    @property
    def name(self) -> str:
        return f"{self.repo.name}/{self.version}"


class FinetuneJob(Base):
    __tablename__ = "finetune_jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ft"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    # Rows of the evaluation split (`evaluation_dataset`, OpenAI's `validation_file`); None: the dataset's own.
    evaluation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), default=None)
    repo_id: Mapped[str] = mapped_column(ForeignKey("repos.id"))
    base_model: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # FinetuneConfig as JSON
    status: Mapped[str] = mapped_column(String(20), default="queued")  # queued|training|completed|failed|cancelled
    error: Mapped[str | None] = mapped_column(Text, default=None)
    estimated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # dataset tokens x epochs
    estimate_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)  # steps done, early stop, best/last evaluation
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The version this job trains (`repo/N`), taken when training first starts, so that its checkpoints are
    # addressable (`repo/N@k`) before the version itself is published.
    version: Mapped[int | None] = mapped_column(Integer, default=None)
    adapter_version_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    repo: Mapped[Repo] = relationship()
    dataset: Mapped[Dataset] = relationship(foreign_keys=[dataset_id])
    evaluation_dataset: Mapped[Dataset | None] = relationship(foreign_keys=[evaluation_dataset_id])
    adapter_version: Mapped[AdapterVersion | None] = relationship()
    checkpoints: Mapped[list["Checkpoint"]] = relationship(order_by="Checkpoint.number", viewonly=True)


class Checkpoint(Base):
    """A snapshot of a job's weights taken while it trains: `repo/3@2` is checkpoint 2 of version 3. Its files are
    under the version's directory (app/volume.py); it is servable and downloadable like a version."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("repo_id", "version", "number"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ck"))
    job_id: Mapped[str] = mapped_column(ForeignKey("finetune_jobs.id", ondelete="CASCADE"), index=True)
    repo_id: Mapped[str] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)  # the job's version number
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the version
    step: Mapped[int] = mapped_column(Integer)  # optimizer steps done when it was taken
    epoch: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(10))  # lora | full
    base_model: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    repo: Mapped[Repo] = relationship(back_populates="checkpoints")

    @property
    def name(self) -> str:
        return f"{self.repo.name}/{self.version}@{self.number}"


class JobMetric(Base):
    """One row per optimizer step (and per evaluation), written while the job runs."""

    __tablename__ = "job_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("finetune_jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    learning_rate: Mapped[float] = mapped_column(Float)
    tokens_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    kind: Mapped[str] = mapped_column(String(10), default="train", server_default="train")  # train | eval
    # Evaluation rows (kind "eval"; loss above is the evaluation loss). Step 0 is the model before training.
    perplexity: Mapped[float | None] = mapped_column(Float, default=None)
    token_accuracy: Mapped[float | None] = mapped_column(Float, default=None)  # next-token argmax on completions
    sequence_accuracy: Mapped[float | None] = mapped_column(Float, default=None)  # greedy answer == reference
    char_error_rate: Mapped[float | None] = mapped_column(Float, default=None)  # edit distance / reference length
    # Classification datasets only: accuracy per class and the confusion matrix (functions/evaluate.py).
    classification: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # Preference tuning (method "dpo") only, on train and eval rows: the implicit rewards beta * (log p - log p_ref)
    # of the chosen and the rejected answers, averaged over the rows, their margin, and the share of rows whose
    # chosen answer out-rewards the rejected one.
    chosen_reward: Mapped[float | None] = mapped_column(Float, default=None)
    rejected_reward: Mapped[float | None] = mapped_column(Float, default=None)
    reward_margin: Mapped[float | None] = mapped_column(Float, default=None)
    reward_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    # Reinforcement fine-tuning (method "grpo") only (functions/grpo.py): the weighted total reward's mean and spread
    # over the step's completions (an evaluation's: one greedy completion per held-out prompt), the KL to the
    # reference (train rows), the completions' mean length in tokens, {"graders": {name: {"mean", "std"}},
    # "failures": {"grader: reason": items}}, and on eval rows sample completions with their rewards.
    reward: Mapped[float | None] = mapped_column(Float, default=None)
    reward_std: Mapped[float | None] = mapped_column(Float, default=None)
    kl: Mapped[float | None] = mapped_column(Float, default=None)
    completion_length: Mapped[float | None] = mapped_column(Float, default=None)
    rewards: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    samples: Mapped[list[Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageRecord(Base):
    """The ledger: one priced row per fine-tuning job and per inference request. Source of truth for billing."""

    __tablename__ = "usage_records"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(100), unique=True)  # a retried event never charges twice
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # finetune | inference
    technique: Mapped[str] = mapped_column(String(30))  # sft_lora | inference | ...
    base_model: Mapped[str] = mapped_column(String(100))
    adapter: Mapped[str | None] = mapped_column(String(200), default=None)  # "repo/3"
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_ms: Mapped[int] = mapped_column(BigInteger, default=0)  # replica time for deployments
    accelerator: Mapped[str | None] = mapped_column(String(30), default=None)  # deployments: a10g, l40s, cpu, ...
    amount_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    reference: Mapped[str | None] = mapped_column(String(64), default=None)  # job id or request id
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Event(Base):
    """Durable record of one unit of work. The queue only carries the id; this row is the truth."""

    __tablename__ = "events"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ev"))
    name: Mapped[str] = mapped_column(String(50))  # dataset.uploaded | finetune.requested
    subject_id: Mapped[str] = mapped_column(String(32), index=True)  # dataset or job id
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)  # pending | running | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[datetime] = mapped_column(default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(100), default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class BillingAccount(Base):
    """How a tenant pays: plan, Stripe customer, card on file, and enterprise prices."""

    __tablename__ = "billing_accounts"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    plan: Mapped[str] = mapped_column(String(20), default="developer")  # developer | enterprise
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), default=None)
    payment_method: Mapped[str | None] = mapped_column(String(100), default=None)  # "visa ending 4242"
    payment_status: Mapped[str] = mapped_column(String(20), default="ok")  # ok | past_due (last payment failed)
    prices: Mapped[dict[str, Any]] = mapped_column(default=dict)  # enterprise overrides, see billing/prices.py
    credit_state: Mapped[str] = mapped_column(String(20), default="ok", server_default="ok")  # ok|low|exhausted, told
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CreditGrant(Base):
    """Credits a tenant may spend: free sign-up credits, top-ups, promotions. Append-only."""

    __tablename__ = "credit_grants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("cg"))
    idempotency_key: Mapped[str] = mapped_column(String(100), unique=True)  # "signup:<tenant>", "topup:<session>"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    amount_micro_usd: Mapped[int] = mapped_column(BigInteger)
    category: Mapped[str] = mapped_column(String(20))  # promotional | paid
    reason: Mapped[str] = mapped_column(String(100))
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StripeOutbox(Base):
    """Calls owed to Stripe, written in the same transaction as the ledger row they mirror. A Stripe outage
    delays them; it never loses them, and their idempotency keys make a resend harmless."""

    __tablename__ = "stripe_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(120), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(30))  # meter_event | credit_grant
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)  # pending | sent | skipped
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)


class StripeWebhookEvent(Base):
    """Stripe event ids already handled: a replayed webhook is acknowledged and ignored."""

    __tablename__ = "stripe_webhook_events"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)  # Stripe's evt_...
    type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A private deployment: one base model served by 0..max_replicas engine processes that an autoscaler starts
    and stops (functions/deployments/). `status` is what the runtime observed; `target_state` is what the tenant
    asked for (active, stopped, deleted). Deleted rows stay, with their transitions, so their history is kept."""

    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("dep"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))  # unique per tenant among deployments not deleted
    description: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(String(100))
    accelerator: Mapped[str] = mapped_column(String(30))  # cpu | a10g | l40s | a100-80gb | h100
    engine: Mapped[str] = mapped_column(String(10))  # native | vllm
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    scale_up_threshold: Mapped[int] = mapped_column(Integer)  # concurrent requests per replica before scaling up
    cooldown_time: Mapped[float] = mapped_column(Float)  # seconds of lower load before scaling down
    preloaded_adapters: Mapped[list[Any]] = mapped_column(default=list)  # ["repo/3", ...], loaded on every replica
    # Pending | Initializing | Ready | Standby | Stopped | Errored | Updating | Deleted
    status: Mapped[str] = mapped_column(String(20), default="Pending")
    status_reason: Mapped[str] = mapped_column(Text, default="")
    target_state: Mapped[str] = mapped_column(String(10), default="active")  # active | stopped | deleted
    # Bumped when a change needs new replicas (engine, accelerator, preloaded adapters): the replicas roll.
    config_version: Mapped[int] = mapped_column(Integer, default=1)
    replicas: Mapped[int] = mapped_column(Integer, default=0)  # replicas up, as last observed
    cold_start_ms: Mapped[int | None] = mapped_column(Integer, default=None)  # the last wake from zero
    cold_starts: Mapped[list[Any]] = mapped_column(default=list)  # the last 20 wakes' records (seconds, breakdown)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    # Why the platform holds it in Standby (its tenant cannot pay); None once credit or a card returns
    suspended_reason: Mapped[str | None] = mapped_column(Text, default=None)
    transitions: Mapped[list["DeploymentTransition"]] = relationship(order_by="DeploymentTransition.id", viewonly=True)


class DeploymentTransition(Base):
    """Every status change of a deployment, with when and why, and every scaling event (the same status on both
    sides, the replica count changed). Append-only."""

    __tablename__ = "deployment_transitions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(20), default=None)  # None: the record was created
    to_status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    replicas: Mapped[int | None] = mapped_column(Integer, default=None)  # replicas wanted after it (scaling)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class ReplicaRecord(Base):
    """One replica of a private deployment, as every API process sees it: a local engine process (started by the
    API process that holds the deployment runtime's lease) or a Modal container (which writes its own row when it
    starts, becomes ready and stops). Its time up is billed from these rows (`metered_until`), so a replica whose
    holder died is still billed for the time it ran, and never twice."""

    __tablename__ = "replicas"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rep"))
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), index=True)
    runtime: Mapped[str] = mapped_column(String(10))  # local | modal
    accelerator: Mapped[str] = mapped_column(String(30))  # what it runs on, as priced: cpu | a10g | l40s | ...
    config_version: Mapped[int] = mapped_column(Integer)  # the deployment's config it serves
    state: Mapped[str] = mapped_column(String(12), default="starting")  # starting | ready | draining | stopped | failed
    url: Mapped[str | None] = mapped_column(String(200), default=None)  # a local engine server's address
    process: Mapped[str | None] = mapped_column(String(100), default=None)  # "host:pid", or Modal's container id
    holder: Mapped[str | None] = mapped_column(String(100), default=None)  # the API process that runs it ("host:pid")
    in_flight: Mapped[int] = mapped_column(Integer, default=0)  # requests it serves now, as last reported
    reason: Mapped[str] = mapped_column(Text, default="")  # why it stopped or failed
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(default=None)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)  # its last report: a silent replica is gone
    metered_until: Mapped[datetime | None] = mapped_column(default=None)  # its time up to here is in the ledger
    adapters: Mapped[list[Any]] = mapped_column(default=list)  # [[key, name], ...] it holds, least recent first
    served: Mapped[int] = mapped_column(Integer, default=0)  # requests it took, as last reported


class ControlLease(Base):
    """Who runs a control loop now (one row per loop, e.g. "deployments"): the API process that holds it renews
    `expires_at`; another takes it over once that passed (app/control_lease.py)."""

    __tablename__ = "control_leases"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100))  # "host:pid"
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class LoadReport(Base):
    """One API process's load on one deployment, rewritten while it changes: requests waiting for a replica,
    requests it streams per replica, adapters it sent to each. The holder of the deployments lease adds them up
    for the autoscaler; a report not renewed for a while is a process gone, and ignored."""

    __tablename__ = "load_reports"
    process: Mapped[str] = mapped_column(String(100), primary_key=True)  # "host:pid"
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    waiting: Mapped[int] = mapped_column(Integer, default=0)
    in_flight: Mapped[dict[str, Any]] = mapped_column(default=dict)  # replica id -> requests
    adapters: Mapped[dict[str, Any]] = mapped_column(default=dict)  # replica id -> [[key, name], ...] sent to it
    reported_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeploymentPoint(Base):
    """A deployment's health figures over one time bucket (`period` = epoch seconds // the metrics interval; -1:
    running totals since it was created), per adapter label ("" is the deployment's own row: replica samples).
    Every API process adds to them with `SET x = x + n` (app/counters.py) and reads the same figures."""

    __tablename__ = "deployment_points"
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(200), primary_key=True)
    period: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    generated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    inference_ms: Mapped[float] = mapped_column(Float, default=0.0)  # summed over requests
    queue_ms: Mapped[float] = mapped_column(Float, default=0.0)
    samples: Mapped[int] = mapped_column(Integer, default=0)  # replica samples taken (one per runtime tick)
    replicas_sum: Mapped[float] = mapped_column(Float, default=0.0)  # replicas up, summed over samples
    busy_sum: Mapped[float] = mapped_column(Float, default=0.0)  # share of them serving, summed over samples
    cpu_samples: Mapped[int] = mapped_column(Integer, default=0)
    cpu_sum: Mapped[float] = mapped_column(Float, default=0.0)
    replica_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class DeploymentLatency(Base):
    """Requests per inference-time bucket (Prometheus histogram), per deployment and adapter label, since created."""

    __tablename__ = "deployment_latency"
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(200), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)  # index into INFERENCE_BUCKETS; last: +Inf
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class RateLog(Base):
    """Requests let through under one key ("shared:<tenant id>"), by the microsecond they arrived (`at`), for a
    per-second limit that holds across every API process (web/shared_limits.py). The row at -1 is the key's lock:
    each check first writes it, so one key's checks run one at a time whichever process makes them."""

    __tablename__ = "rate_log"
    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    at: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # epoch microseconds; -1: the lock row
    count: Mapped[int] = mapped_column(Integer, default=0)  # requests let through at that microsecond


class SharedEngine(Base):
    """The shared endpoints' engine process of one base model (or full fine-tuned version) on this machine, as
    every API process sees it: the process that started it watches it and renews `heartbeat_at`; the others
    stream from it by `url` instead of starting their own (functions/engine/registry.py)."""

    __tablename__ = "shared_engines"
    host: Mapped[str] = mapped_column(String(100), primary_key=True)  # its machine: only that one's processes reach it
    key: Mapped[str] = mapped_column(String(500), primary_key=True)  # the base model, or the version's directory
    base_model: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(String(200))  # "": being started (by `holder`, since `started_at`)
    pid: Mapped[int] = mapped_column(Integer)
    holder: Mapped[str] = mapped_column(String(100))  # the API process that started and watches it ("host:pid")
    context_length: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
