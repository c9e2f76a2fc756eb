"""The platform's settings, read from the environment (prefix LORAPLEX_; a .env file too), grouped by concern.

Every LORAPLEX_* variable the platform reads is a field here: `get_settings().engine.kv_cache_mb` is
LORAPLEX_KV_CACHE_MB. Each group reads its own fields from the environment, so a variable's name is the field's
name with the prefix, whatever its group. The SDK and CLI client (loraplex/) read their own three variables
(LORAPLEX_API_URL, LORAPLEX_API_KEY, LORAPLEX_MAX_RETRIES): they run on a user's machine without the platform.
"""

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024
FROM_ENV = SettingsConfigDict(env_prefix="LORAPLEX_", env_file=".env", extra="ignore")


class LimitSettings(BaseSettings):
    """What one request may ask: sizes, rows, tokens, and the shared endpoints' request rate."""

    model_config = FROM_ENV

    max_upload_bytes: int = Field(default=50 * MB, gt=0, description="Largest dataset file accepted.")
    max_json_body_bytes: int = Field(
        default=1 * MB, gt=0, description="Largest JSON request body (inference, jobs, deployments, billing)."
    )
    max_dataset_rows: int = Field(default=200_000, gt=0, description="Most rows in one dataset.")
    max_new_tokens_limit: int = Field(
        default=2048, gt=0, description="Largest max_tokens an inference request may ask."
    )
    upload_wait_seconds: float = Field(
        default=60.0, ge=0, description="How long an upload waits for validation before answering 202."
    )
    # The shared endpoints' token limits are the free allowance (BillingSettings.free_tokens_per_*).
    shared_requests_per_second: float = Field(
        default=10.0, ge=0, description="Requests a tenant may send the shared endpoints a second; 0: no limit."
    )


class EngineSettings(BaseSettings):
    """The serving engines: which, where, their memory and batch sizes, and how they are watched."""

    model_config = FROM_ENV

    kind: Literal["native", "vllm"] = Field(
        default="native",
        validation_alias="LORAPLEX_ENGINE",
        description="native: our batched multi-LoRA engine (CPU, CUDA); vllm: vLLM (GPU deployments).",
    )
    engine_process: bool = Field(
        default=True, description="Run each base model's engine in its own process (false: inside the API process)."
    )
    engine_dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on GPUs and on CPUs with native bf16, else fp32."
    )
    adapter_cache_size: int = Field(default=32, gt=0, description="Adapters resident per engine (LRU, pinned in use).")
    max_lora_rank: int = Field(default=16, gt=0, description="Largest adapter rank an engine serves.")
    kv_cache_mb: int = Field(default=1024, gt=0, description="Memory for each engine's KV cache, MiB.")
    max_batch_size: int = Field(default=128, gt=0, description="Requests an engine decodes at once.")
    max_queued_requests: int = Field(
        default=512, gt=0, description="Requests an engine holds waiting; more get 429 with Retry-After."
    )
    prefill_chunk_tokens: int = Field(default=256, gt=0, description="Prompt tokens an engine prefills per step.")
    engine_start_timeout: float = Field(default=180.0, gt=0, description="Seconds to wait for an engine process.")
    engine_stall_seconds: float = Field(
        default=30.0, gt=0, description="An engine with requests queued and no progress this long is unhealthy."
    )
    engine_health_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between health polls of each engine and deployment replica (also how long one poll "
        "waits, at least 1 s); one unhealthy 3 polls in a row, or dead, is replaced.",
    )


class DeploymentSettings(BaseSettings):
    """Private deployments (functions/deployments/): replicas are engine processes the API process starts and
    stops."""

    model_config = FROM_ENV

    deployment_tick_seconds: float = Field(default=0.25, gt=0, description="How often the autoscaler looks.")
    deployment_wake_timeout: float = Field(
        default=120.0, gt=0, description="How long a request waits for a replica (a wake from Standby) before a 503."
    )
    deployment_drain_timeout: float = Field(
        default=600.0, gt=0, description="Longest wait for a draining replica's requests before it is stopped anyway."
    )
    deployment_metering_seconds: float = Field(
        default=60.0, gt=0, description="A running replica's time is written to the ledger at least this often."
    )
    deployment_metrics_interval: float = Field(default=10.0, gt=0, description="Width of a time-series point, s.")
    deployment_max_replicas: int = Field(default=8, gt=0, description="Largest max_replicas a deployment may ask.")
    deployment_lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Of the API processes sharing a database, one runs the replicas: it renews its lease every half "
        "of this, and another takes over once it has not renewed it for this long.",
    )
    deployment_prewarm: bool = Field(
        default=True,
        description="Keep one engine interpreter with torch and transformers imported, ready to become a replica "
        "(a wake from Standby then only loads weights).",
    )


class QueueSettings(BaseSettings):
    """The event queue's workers: threads, leases, retries."""

    model_config = FROM_ENV

    worker_threads: int = Field(default=2, gt=0, description="Handler threads per worker process.")
    lease_seconds: float = Field(
        default=60.0, gt=0, description="A running event is retaken after this long without a heartbeat."
    )
    reap_interval_seconds: float = Field(default=5.0, gt=0, description="How often workers look for expired leases.")
    max_attempts: int = Field(default=3, gt=0, description="Tries of one event before its resource fails.")
    retry_base_seconds: float = Field(
        default=2.0, ge=0, description="Backoff before retry n is base * 2**(n-1) seconds."
    )


class TrainingSettings(BaseSettings):
    model_config = FROM_ENV

    train_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 base weights with autocast on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX).",
    )
    train_threads: int | None = Field(default=None, description="torch threads for training; all cores when unset.")


class BillingSettings(BaseSettings):
    """Credits, the free tier, prices set by the operator, and Stripe."""

    model_config = FROM_ENV

    signup_credit_micro_usd: int = Field(default=25_000_000, ge=0, description="Free credits for a new tenant.")
    signup_credit_days: int = Field(default=30, gt=0, description="Days before the sign-up credits expire.")
    # The free tier of the shared endpoints: these tokens are free; a tenant on enterprise terms pays for what is
    # beyond them, any other tenant is refused (429) beyond them. 0 turns one off (nothing free, no limit).
    free_tokens_per_day: int = Field(default=1_000_000, ge=0, description="Free shared-endpoint tokens a UTC day.")
    free_tokens_per_month: int = Field(default=10_000_000, ge=0, description="Free shared-endpoint tokens a month.")
    # billing.credit_low is sent once when spendable credit falls below this, and once more when it reaches zero;
    # at zero without a card in good standing, private deployments are held in Standby (deployments/suspension.py).
    credit_low_micro_usd: int = Field(
        default=5_000_000, ge=0, description="Credit below which billing.credit_low is sent, micro-USD."
    )
    credit_check_seconds: float = Field(
        default=30.0, gt=0, description="How often credit, expiries and unpaid deployments are looked at, seconds."
    )
    cpu_replica_micro_usd_per_hour: int = Field(
        default=100_000, ge=0, description="Price of a CPU replica-hour, micro-USD (the GPU rates are in prices.py)."
    )
    stripe_api_key: SecretStr | None = Field(default=None, description="Stripe secret key; unset: no Stripe sync.")
    stripe_webhook_secret: SecretStr | None = Field(
        default=None, description="Signing secret of the webhook endpoint; unset: webhooks are refused."
    )
    stripe_api_base: str = Field(default="https://api.stripe.com", description="Stripe API address.")
    stripe_billing_api_base: str | None = Field(
        default=None,
        description="Address for meter events, credit grants, Checkout and portal (Stripe's own if unset).",
    )
    stripe_meter_event_name: str = Field(default="loraplex_usage", description="Meter that sums usage, micro-USD.")
    public_url: str = Field(default="http://127.0.0.1:8000", description="Where Checkout and portal return to.")


class WebhookSettings(BaseSettings):
    """Outgoing webhooks (functions/webhooks.py): which addresses they may reach, how long a receiver may take, when
    an endpoint that keeps failing is disabled."""

    model_config = FROM_ENV

    webhooks_allow_loopback: bool = Field(
        default=False,
        description="Let endpoints resolve to loopback (127.0.0.0/8, ::1): tests and one-machine setups. Private, "
        "link-local and metadata addresses stay refused.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Longest one delivery may take (connect, send, answer), seconds."
    )
    webhook_disable_after_days: float = Field(
        default=5.0, gt=0, description="An endpoint whose deliveries fail this long without a success is disabled."
    )


class ImportSettings(BaseSettings):
    """Datasets imported from a URL (functions/dataset_fetch.py): where S3 and GCS are, whose credentials an import
    without its own may use, which addresses an https import may reach, and how long it may take."""

    model_config = FROM_ENV

    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint for s3:// imports (MinIO, R2, a test server); unset: AWS's own, or what "
        "botocore reads from AWS_ENDPOINT_URL. Never taken from a request.",
    )
    gcs_endpoint_url: str | None = Field(
        default=None, description="GCS endpoint for gs:// imports; unset: Google's own. Never taken from a request."
    )
    import_server_credentials: bool = Field(
        default=False,
        description="Let an import that brings no credentials use the server's own (AWS_*/GOOGLE_* variables, an "
        "instance role): any tenant can then import what the server can read. Off: such imports are anonymous.",
    )
    import_allow_loopback: bool = Field(
        default=False,
        description="Let http(s) imports reach loopback (127.0.0.0/8, ::1), and plain http:// only there: tests "
        "and one-machine setups. Private, link-local and metadata addresses stay refused.",
    )
    import_timeout_seconds: float = Field(
        default=120.0, gt=0, le=900, description="Longest one import may take to fetch its file, seconds."
    )


class Settings(BaseSettings):
    """Where the platform keeps its state and runs its work, and the groups above."""

    model_config = FROM_ENV

    data_dir: Path = Field(default=Path(".data"), description="Root of the volume and the default SQLite files.")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "LORAPLEX_DATABASE_URL"),
        description="SQLAlchemy URL; a SQLite file under data_dir when unset.",
    )
    queue_url: str | None = Field(
        default=None,
        description="Event queue: sqlite:///path (default, under data_dir) or redis://host:port/db to scale out.",
    )
    runtime: Literal["local", "modal"] = Field(default="local", description="Where handlers run.")
    log_level: str = Field(default="INFO", description="Python logging level of the server, workers and engines.")
    metrics_token: SecretStr | None = Field(
        default=None, description="Bearer token GET /metrics asks for; unset: it is closed unless metrics_public."
    )
    metrics_public: bool = Field(
        default=False,
        description="Serve GET /metrics without a token when none is set (only on a port that tenants cannot reach: "
        "it names tenants, deployments and adapters).",
    )
    console_secret: SecretStr | None = Field(
        default=None,
        description="Key that signs the web console's session cookies (32+ characters); unset on the local runtime: "
        "one is made once and kept in data_dir/console_secret; required on Modal, where containers share no disk.",
    )

    # The groups, each read from the environment when first used (not fields: a field named `engine` would read
    # LORAPLEX_ENGINE as the whole group).
    @cached_property
    def limits(self) -> LimitSettings:
        return LimitSettings()

    @cached_property
    def engine(self) -> EngineSettings:
        return EngineSettings()

    @cached_property
    def deployments(self) -> DeploymentSettings:
        return DeploymentSettings()

    @cached_property
    def queue(self) -> QueueSettings:
        return QueueSettings()

    @cached_property
    def training(self) -> TrainingSettings:
        return TrainingSettings()

    @cached_property
    def billing(self) -> BillingSettings:
        return BillingSettings()

    @cached_property
    def webhooks(self) -> WebhookSettings:
        return WebhookSettings()

    @cached_property
    def imports(self) -> ImportSettings:
        return ImportSettings()

    @property
    def volume_dir(self) -> Path:
        return self.data_dir / "volume"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loraplex.db').resolve()}"

    @property
    def resolved_queue_url(self) -> str:
        return self.queue_url or f"sqlite:///{(self.data_dir / 'queue.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
