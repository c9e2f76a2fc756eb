"""/v1/deployments: private deployments (create, list, get, update, stop, standby, delete), their status
transitions and health metrics. Inference on them is in deployment_inference.py; their replicas are run by
functions/deployments/runtime.py.
"""

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Deployment, DeploymentTransition, Tenant
from app.settings import get_settings
from billing.prices import PriceError
from functions.deployments.config import (
    DELETED,
    ERRORED,
    LOCAL_ACCELERATORS,
    PENDING,
    REPLICA_FIELDS,
    STANDBY,
    STOPPED,
    DeploymentConfig,
    DeploymentUpdate,
    Refused,
    check_references,
    check_replica_range,
    limits_message,
)
from functions.deployments.rules import being_deleted
from functions.deployments.runtime import DeploymentRuntime, replica_price
from web.deps import CurrentTenant, Db, Runtime
from web.errors import APIError
from web.schemas import Money

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])
HOUR_MS = 3_600_000




class TransitionOut(BaseModel):
    at: str
    from_status: str | None  # null: the record was created
    to_status: str  # the same as from_status for a scaling event
    reason: str
    replicas: int | None  # replicas wanted after an autoscaler decision

    @classmethod
    def of(cls, t: DeploymentTransition) -> "TransitionOut":
        return cls(
            at=t.at.isoformat(), from_status=t.from_status, to_status=t.to_status, reason=t.reason, replicas=t.replicas
        )


class DeploymentOut(BaseModel):
    id: str
    name: str
    description: str
    base_model: str
    accelerator: str
    engine: str
    min_replicas: int
    max_replicas: int
    scale_up_threshold: int
    cooldown_time: float
    preloaded_adapters: list[str]
    status: str  # Pending | Initializing | Ready | Standby | Stopped | Errored | Updating | Deleted
    status_reason: str
    config_version: int
    replicas: int  # up now (ready or draining)
    cold_start_ms: int | None  # the last wake from zero replicas: first request to a ready replica
    price_per_replica_hour: Money
    endpoint: str  # base_url for the openai SDK, relative to the server
    live: dict[str, Any]  # replicas (state, in-flight requests, adapters held), requests waiting
    transitions: list[TransitionOut]  # the last 20, oldest first
    created_at: str
    updated_at: str
    deleted_at: str | None

    @classmethod
    def of(cls, db: Session, d: Deployment, runtime: DeploymentRuntime | None) -> "DeploymentOut":
        live = runtime.describe(d.id) if runtime is not None else {"replicas": [], "in_flight": 0, "waiting": 0}
        recent = db.scalars(
            select(DeploymentTransition)
            .where(DeploymentTransition.deployment_id == d.id)
            .order_by(DeploymentTransition.id.desc())
            .limit(20)
        ).all()
        try:
            price = replica_price(db, d.tenant_id, d.accelerator, HOUR_MS)
        except PriceError:
            price = 0
        return cls(
            id=d.id,
            name=d.name,
            description=d.description,
            base_model=d.base_model,
            accelerator=d.accelerator,
            engine=d.engine,
            min_replicas=d.min_replicas,
            max_replicas=d.max_replicas,
            scale_up_threshold=d.scale_up_threshold,
            cooldown_time=d.cooldown_time,
            preloaded_adapters=list(d.preloaded_adapters or []),
            status=d.status,
            status_reason=d.status_reason,
            config_version=d.config_version,
            replicas=sum(1 for r in live["replicas"] if r["state"] in ("ready", "draining")),
            cold_start_ms=d.cold_start_ms,
            price_per_replica_hour=Money.of(price),
            endpoint=f"/v1/deployments/{d.name}",
            live=live,
            transitions=[TransitionOut.of(t) for t in reversed(recent)],
            created_at=d.created_at.isoformat(),
            updated_at=d.updated_at.isoformat(),
            deleted_at=d.deleted_at.isoformat() if d.deleted_at else None,
        )


# ---- CRUD -------------------------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeploymentOut)
def create_deployment(config: DeploymentConfig, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    _check_platform(db, tenant, config.accelerator, config.max_replicas)
    if find(db, tenant.id, config.name, missing_ok=True) is not None:
        raise APIError(409, f"name: a deployment named {config.name!r} exists", param="name", code="name_taken")
    adapters = _references(db, tenant.id, config.base_model, config.preloaded_adapters)
    deployment = Deployment(
        tenant_id=tenant.id,
        name=config.name,
        description=config.description,
        base_model=config.base_model,
        accelerator=config.accelerator,
        engine=config.engine,
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        scale_up_threshold=config.scale_up_threshold,
        cooldown_time=config.cooldown_time,
        preloaded_adapters=adapters,
        status=PENDING,
        status_reason="created",
    )
    db.add(deployment)
    db.flush()
    db.add(DeploymentTransition(deployment_id=deployment.id, from_status=None, to_status=PENDING, reason="created"))
    db.commit()
    runtime.notify()
    return DeploymentOut.of(db, deployment, runtime)


@router.get("", response_model=list[DeploymentOut])
def list_deployments(
    tenant: CurrentTenant, db: Db, runtime: Runtime, include_deleted: bool = False
) -> list[DeploymentOut]:
    query = select(Deployment).where(Deployment.tenant_id == tenant.id)
    if not include_deleted:
        query = query.where(Deployment.status != DELETED)
    return [DeploymentOut.of(db, d, runtime) for d in db.scalars(query.order_by(Deployment.created_at))]


@router.get("/{name}", response_model=DeploymentOut)
def get_deployment(name: str, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    return DeploymentOut.of(db, find(db, tenant.id, name), runtime)


@router.patch("/{name}", response_model=DeploymentOut)
def update_deployment(
    name: str, update: DeploymentUpdate, tenant: CurrentTenant, db: Db, runtime: Runtime
) -> DeploymentOut:
    """Change the config. Scaling knobs apply at once; a change of accelerator, engine or preloaded adapters rolls
    the replicas (status Updating): a new replica starts, takes the traffic, then an old one drains, so requests in
    flight finish where they run. An Errored deployment is moved to Standby to try again with its new config."""
    deployment = find(db, tenant.id, name)
    _not_deleting(deployment)
    if update.base_model is not None and update.base_model != deployment.base_model:
        raise APIError(
            422,
            f"base_model: a deployment keeps its base model ({deployment.base_model!r}); create another deployment",
            param="base_model",
            code="invalid_value",
        )
    fields = update.model_dump(exclude_unset=True, exclude={"base_model"})
    merged = {k: getattr(deployment, k) for k in ("min_replicas", "max_replicas", "accelerator")} | fields
    try:
        check_replica_range(merged["min_replicas"], merged["max_replicas"])
    except ValueError as exc:
        param = "min_replicas" if "min_replicas" in fields else "max_replicas"
        raise APIError(422, str(exc), param=param, code="invalid_value") from None
    _check_platform(db, tenant, merged["accelerator"], merged["max_replicas"])
    if "preloaded_adapters" in fields:
        fields["preloaded_adapters"] = _references(db, tenant.id, deployment.base_model, fields["preloaded_adapters"])
    changed = {k for k, v in fields.items() if getattr(deployment, k) != v}
    for key, value in fields.items():
        setattr(deployment, key, value)
    if changed & set(REPLICA_FIELDS):
        deployment.config_version += 1
    if deployment.status == ERRORED and changed:
        _move(db, deployment, STANDBY, f"config updated ({', '.join(sorted(changed))}): trying again")
    db.commit()
    runtime.notify()
    return DeploymentOut.of(db, deployment, runtime)


@router.post("/{name}/stop", response_model=DeploymentOut)
def stop_deployment(name: str, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    """Drain every replica and stay at zero: requests are refused until the deployment is moved to Standby."""
    deployment = find(db, tenant.id, name)
    _not_deleting(deployment)
    deployment.target_state = "stopped"
    if deployment.status == ERRORED:
        _move(db, deployment, STOPPED, "stopped by the tenant")
    db.commit()
    runtime.notify()
    return DeploymentOut.of(db, deployment, runtime)


@router.post("/{name}/standby", response_model=DeploymentOut)
def standby_deployment(name: str, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    """Move a Stopped or Errored deployment to Standby: it scales up again on the next request (or at once to
    min_replicas)."""
    deployment = find(db, tenant.id, name)
    _not_deleting(deployment)
    deployment.target_state = "active"
    if deployment.status in (STOPPED, ERRORED):
        _move(db, deployment, STANDBY, "moved to Standby by the tenant")
    db.commit()
    runtime.notify()
    return DeploymentOut.of(db, deployment, runtime)


@router.delete("/{name}", response_model=DeploymentOut)
async def delete_deployment(
    name: str,
    tenant: CurrentTenant,
    db: Db,
    runtime: Runtime,
    response: Response,
    wait: Annotated[float, Query(ge=0, le=600, description="Seconds to wait for the drain to finish.")] = 60,
) -> DeploymentOut:
    """New requests are refused at once; those in flight finish, then the replicas stop and the status becomes
    Deleted. Answers 200 once Deleted, or 202 while still draining after `wait` seconds."""
    deployment = find(db, tenant.id, name)
    deployment_id = deployment.id
    deployment.target_state = "deleted"
    db.commit()
    runtime.notify()
    deadline = time.monotonic() + wait
    while True:
        db.expire_all()
        deployment = db.get_one(Deployment, deployment_id)
        if deployment.status == DELETED or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    if deployment.status != DELETED:
        response.status_code = status.HTTP_202_ACCEPTED
    return DeploymentOut.of(db, deployment, runtime)


@router.get("/{name}/transitions", response_model=list[TransitionOut])
def transitions(name: str, tenant: CurrentTenant, db: Db) -> list[TransitionOut]:
    """Every status change, oldest first, with its time and reason."""
    deployment = find(db, tenant.id, name)
    rows = db.scalars(
        select(DeploymentTransition)
        .where(DeploymentTransition.deployment_id == deployment.id)
        .order_by(DeploymentTransition.id)
    )
    return [TransitionOut.of(t) for t in rows]


@router.get("/{name}/metrics")
def metrics(
    name: str,
    tenant: CurrentTenant,
    db: Db,
    runtime: Runtime,
    minutes: Annotated[float, Query(gt=0, le=60)] = 15,
) -> dict[str, Any]:
    """Health time series, one point per LORAPLEX_DEPLOYMENT_METRICS_INTERVAL seconds: requests/s, generated
    tokens/s, mean inference time and queue duration, replicas, utilization (share of replica time serving a
    request) and the replicas' CPU share; `adapters` has the request figures per adapter ("base": no adapter)."""
    deployment = find(db, tenant.id, name)
    return {"deployment": deployment.name, "status": deployment.status} | runtime.metrics.series(deployment.id, minutes)


# ---- helpers -----------------------------------------------------------------------------------------------


def find(db: Session, tenant_id: str, name: str, missing_ok: bool = False) -> Deployment:
    """The tenant's deployment of that name that is not Deleted (another tenant's reads as missing)."""
    deployment = db.scalar(
        select(Deployment)
        .where(Deployment.tenant_id == tenant_id, Deployment.name == name, Deployment.status != DELETED)
        .order_by(Deployment.created_at.desc())
        .limit(1)
    )
    if deployment is None and not missing_ok:
        raise APIError(404, f"The deployment '{name}' does not exist", param="name", code="deployment_not_found")
    return deployment  # type: ignore[return-value]


def _not_deleting(deployment: Deployment) -> None:
    if deployment.target_state == "deleted":
        raise being_deleted(deployment.name)


def _check_platform(db: Session, tenant: Tenant, accelerator: str, max_replicas: int) -> None:
    settings = get_settings()
    message = limits_message(max_replicas, settings.deployment_max_replicas)
    if message:
        raise APIError(422, message, param="max_replicas", code="invalid_value")
    try:
        replica_price(db, tenant.id, accelerator, HOUR_MS)
    except PriceError:
        raise APIError(
            422,
            f"accelerator: {accelerator!r} is offered on enterprise terms; your plan has no price for it",
            param="accelerator",
            code="invalid_value",
        ) from None
    if settings.runtime == "local" and accelerator not in LOCAL_ACCELERATORS:
        raise APIError(
            422,
            f"accelerator: {accelerator!r} replicas run on the Modal runtime (LORAPLEX_RUNTIME=modal); this local "
            f"runtime runs {', '.join(LOCAL_ACCELERATORS)} replicas",
            param="accelerator",
            code="invalid_value",
        )


def _references(db: Session, tenant_id: str, base_model: str, adapters: list[str]) -> list[str]:
    try:
        return check_references(db, tenant_id, base_model, adapters)
    except Refused as exc:
        raise APIError(exc.status, exc.message, param=exc.field, code="invalid_value") from None


def _move(db: Session, deployment: Deployment, to: str, reason: str) -> None:
    db.add(
        DeploymentTransition(deployment_id=deployment.id, from_status=deployment.status, to_status=to, reason=reason)
    )
    deployment.status, deployment.status_reason = to, reason
