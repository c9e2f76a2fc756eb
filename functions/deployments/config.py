"""The deployment config users send (create and update) and its checks.

Checks that need no database (ranges, min <= max, a known base model, accelerator and engine) are pydantic
validators; those of an update against the deployment it changes are `check_update`; those that need the
database are `check_platform` (the replica limit, an accelerator the tenant's plan prices and this runtime runs,
a GPU whose memory holds the model: functions/accelerators.py) and `check_references` (preloaded adapters are the
tenant's, of the same base model and of a rank the engines serve). Every error names the field at fault; the last
three raise domain refusals (app/errors.py).
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound
from app.models import Deployment
from app.names import DEPLOYMENT_NAME
from app.settings import get_settings
from billing.prices import PriceError
from functions import accelerators, adapter_check, repos
from functions.catalog import get_model
from functions.deployments.metering import HOUR_MS, replica_price

# Accelerators a deployment may ask for. Only `cpu` runs on the local runtime; the GPUs are Modal's.
ACCELERATORS = ("cpu", "a10g", "l40s", "a100-80gb", "h100")
LOCAL_ACCELERATORS = ("cpu",)
ENGINES = ("native", "vllm")
# Fields whose change needs new replicas (the others, the scaling knobs, apply at once).
REPLICA_FIELDS = ("accelerator", "engine", "preloaded_adapters")

HOUR = 3600.0
# Upper bounds of the scaling knobs: far beyond any use, and within the database's 32-bit integer columns.
MAX_THRESHOLD = 10_000  # concurrent requests per replica
MAX_COOLDOWN = 7 * 24 * HOUR
# A field we do not implement is refused, naming it, rather than silently dropped.
NO_UNKNOWN_FIELDS = ConfigDict(extra="forbid")


class ScalingFields(BaseModel):
    model_config = NO_UNKNOWN_FIELDS

    min_replicas: int = Field(default=0, ge=0, description="Replicas kept up even when idle; 0 allows Standby.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas the autoscaler starts.")
    scale_up_threshold: int = Field(
        default=1,
        ge=1,
        le=MAX_THRESHOLD,
        description="Concurrent requests per replica above which another replica is started.",
    )
    cooldown_time: float = Field(
        default=HOUR, ge=0, le=MAX_COOLDOWN, description="Seconds the load must stay lower before replicas are stopped."
    )


class DeploymentConfig(ScalingFields):
    """POST /v1/deployments."""

    name: str = Field(description="Lowercase letters, digits and dashes; unique among your deployments.")
    base_model: str = Field(description="Catalog name of the base model, e.g. 'smollm2-135m'.")
    accelerator: str = Field(default="cpu", description="cpu here; a10g, l40s, a100-80gb, h100 on Modal.")
    engine: str = Field(default="native", description="native (our batched multi-LoRA engine) or vllm.")
    preloaded_adapters: list[str] = Field(
        default_factory=list, description="Adapters ('repo/3' or 'repo') loaded on every replica as it starts."
    )
    description: str = Field(default="", max_length=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return DEPLOYMENT_NAME.check(value)

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, value: str) -> str:
        return check_accelerator(value)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        return check_engine(value)

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str) -> str:
        try:
            return get_model(value).name
        except KeyError:
            raise ValueError(f"unknown base model {value!r}; GET /v1/models lists them") from None

    @model_validator(mode="after")
    def _replicas(self) -> "DeploymentConfig":
        check_replica_range(self.min_replicas, self.max_replicas)
        return self


class DeploymentUpdate(BaseModel):
    """PATCH /v1/deployments/{name}: the fields given replace the deployment's; the base model stays."""

    model_config = NO_UNKNOWN_FIELDS

    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    scale_up_threshold: int | None = Field(default=None, ge=1, le=MAX_THRESHOLD)
    cooldown_time: float | None = Field(default=None, ge=0, le=MAX_COOLDOWN)
    accelerator: str | None = None
    engine: str | None = None
    preloaded_adapters: list[str] | None = None
    description: str | None = Field(default=None, max_length=1000)
    base_model: str | None = Field(default=None, description="Refused when it differs: create a new deployment.")

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, value: str | None) -> str | None:
        return None if value is None else check_accelerator(value)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str | None) -> str | None:
        return None if value is None else check_engine(value)


def check_accelerator(value: str) -> str:
    value = value.lower()
    if value not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {value!r}; one of {', '.join(ACCELERATORS)}")
    return value


def check_engine(value: str) -> str:
    if value not in ENGINES:
        raise ValueError(f"unknown engine {value!r}; one of {', '.join(ENGINES)}")
    return value


def check_replica_range(min_replicas: int, max_replicas: int) -> None:
    if min_replicas > max_replicas:
        raise ValueError(f"min_replicas: {min_replicas} is more than max_replicas ({max_replicas})")


def check_update(session: Session, tenant_id: str, deployment: Deployment, update: DeploymentUpdate) -> dict[str, Any]:
    """The fields the update sets, checked against the deployment it changes: its base model stays, the merged
    config holds (min_replicas <= max_replicas, naming the field the update gave) and fits the platform, and the
    preloaded adapters given are returned by their canonical names."""
    if update.base_model is not None and update.base_model != deployment.base_model:
        raise Invalid(
            f"base_model: a deployment keeps its base model ({deployment.base_model!r}); create another deployment",
            field="base_model",
            code="invalid_value",
        )
    fields = update.model_dump(exclude_unset=True, exclude={"base_model"})
    merged = {k: getattr(deployment, k) for k in ("min_replicas", "max_replicas", "accelerator")} | fields
    try:
        check_replica_range(merged["min_replicas"], merged["max_replicas"])
    except ValueError as exc:
        field = "min_replicas" if "min_replicas" in fields else "max_replicas"
        raise Invalid(str(exc), field=field, code="invalid_value") from None
    check_platform(session, tenant_id, merged["accelerator"], merged["max_replicas"], base_model=deployment.base_model)
    if "preloaded_adapters" in fields:
        fields["preloaded_adapters"] = check_references(
            session, tenant_id, deployment.base_model, fields["preloaded_adapters"]
        )
    return fields


def check_platform(session: Session, tenant_id: str, accelerator: str, max_replicas: int, *, base_model: str) -> None:
    """What this platform offers the tenant: at most LORAPLEX_DEPLOYMENT_MAX_REPLICAS replicas, an accelerator
    the tenant's plan has a price for, on the local runtime only the accelerators it runs, and a GPU whose memory
    holds `base_model` (a replica that cannot load it would fail to start, and be billed while it tried)."""
    settings = get_settings()
    limit = settings.deployments.deployment_max_replicas
    if max_replicas > limit:
        raise Invalid(
            f"max_replicas: at most {limit} on this platform (LORAPLEX_DEPLOYMENT_MAX_REPLICAS)",
            field="max_replicas",
            code="invalid_value",
        )
    try:
        replica_price(session, tenant_id, accelerator, HOUR_MS)
    except PriceError:
        raise Invalid(
            f"accelerator: {accelerator!r} is offered on enterprise terms; your plan has no price for it",
            field="accelerator",
            code="invalid_value",
        ) from None
    if settings.runtime == "local" and accelerator not in LOCAL_ACCELERATORS:
        raise Invalid(
            f"accelerator: {accelerator!r} replicas run on the Modal runtime (LORAPLEX_RUNTIME=modal); this local "
            f"runtime runs {', '.join(LOCAL_ACCELERATORS)} replicas",
            field="accelerator",
            code="invalid_value",
        )
    if settings.runtime == "modal" and accelerator not in accelerators.GPUS:
        raise Invalid(  # the Modal runtime's replicas are containers of the GPU serving class (app/modal_app.py)
            f"accelerator: {accelerator!r} replicas run on the local runtime; the Modal runtime serves on "
            f"{', '.join(accelerators.GPUS)}",
            field="accelerator",
            code="invalid_value",
        )
    if accelerator in accelerators.GPUS:
        need = accelerators.serving_need(base_model)
        if not accelerators.fits(need, accelerator):
            raise Invalid(
                f"accelerator: {accelerators.misfit(need, accelerator)}", field="accelerator", code="invalid_value"
            )


def check_references(session: Session, tenant_id: str, base_model: str, adapters: list[str]) -> list[str]:
    """The preloaded adapters as canonical names ('repo' becomes its latest 'repo/N'). Another tenant's adapter
    reads exactly like one that does not exist."""
    names: list[str] = []
    for reference in adapters:
        weights = repos.find(session, tenant_id, reference)
        if weights is None:
            raise NotFound(
                f"preloaded_adapters: the adapter {reference!r} does not exist",
                field="preloaded_adapters",
                code="invalid_value",
            )
        if weights.kind != "lora":
            raise Invalid(
                f"preloaded_adapters: {reference!r} is a full fine-tuned model, not an adapter of {base_model!r}",
                field="preloaded_adapters",
                code="invalid_value",
            )
        if weights.base_model != base_model:
            raise Invalid(
                f"preloaded_adapters: {reference!r} is an adapter of {weights.base_model!r}, not of {base_model!r}",
                field="preloaded_adapters",
                code="invalid_value",
            )
        # Every replica would fail to start on it: an import refuses such a rank, but training may make one, and
        # the operator may lower the limit after an import. One small file read (a checkpoint's row has no rank).
        rank, max_rank = adapter_check.stored_rank(weights.path), get_settings().engine.max_lora_rank
        if rank > max_rank:
            raise Invalid(
                f"preloaded_adapters: {reference!r} has rank {rank}; the engines serve ranks up to {max_rank} "
                "(LORAPLEX_MAX_LORA_RANK)",
                field="preloaded_adapters",
                code="invalid_value",
            )
        if weights.name not in names:
            names.append(weights.name)
    return names
