"""/v1/deployments: private deployments (create, list, get, update, stop, standby, delete), their status
transitions and health metrics. Inference on them is in deployment_inference.py; their replicas are run by
functions/deployments/runtime.py.
"""

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound, PaymentRequired
from app.models import Deployment
from billing import credits
from functions.deployments.config import (
    REPLICA_FIELDS,
    DeploymentConfig,
    DeploymentUpdate,
    check_platform,
    check_references,
    check_update,
)
from functions.deployments.metering import hourly_price
from functions.deployments.rules import being_deleted
from functions.deployments.runtime import DeploymentRuntime
from functions.deployments.status import DELETED, ERRORED, STANDBY, STOPPED, history, move, record_created
from web.deployment_schemas import DeploymentOut, TransitionOut
from web.deps import CurrentTenant, Db, Runtime

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])


# ---- CRUD -------------------------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeploymentOut)
def create_deployment(config: DeploymentConfig, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    check_platform(db, tenant.id, config.accelerator, config.max_replicas, base_model=config.base_model)
    if _named(db, tenant.id, config.name) is not None:
        raise Conflict(f"name: a deployment named {config.name!r} exists", field="name", code="name_taken")
    adapters = check_references(db, tenant.id, config.base_model, config.preloaded_adapters)
    unpaid = credits.paid_work_refusal(db, tenant.id, 1)  # replicas are billed by the second
    if unpaid is not None:
        raise PaymentRequired(f"a private deployment is billed per replica-second: {unpaid}", code="payment_required")
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
    )
    record_created(db, deployment)
    db.commit()
    runtime.notify()
    return _shown(db, deployment, runtime)


@router.get("", response_model=list[DeploymentOut])
def list_deployments(
    tenant: CurrentTenant, db: Db, runtime: Runtime, include_deleted: bool = False
) -> list[DeploymentOut]:
    query = select(Deployment).where(Deployment.tenant_id == tenant.id)
    if not include_deleted:
        query = query.where(Deployment.status != DELETED)
    return [_shown(db, d, runtime) for d in db.scalars(query.order_by(Deployment.created_at))]


@router.get("/{name}", response_model=DeploymentOut)
def get_deployment(name: str, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    return _shown(db, find(db, tenant.id, name), runtime)


@router.patch("/{name}", response_model=DeploymentOut)
def update_deployment(
    name: str, update: DeploymentUpdate, tenant: CurrentTenant, db: Db, runtime: Runtime
) -> DeploymentOut:
    """Change the config. Scaling knobs apply at once; a change of accelerator, engine or preloaded adapters rolls
    the replicas (status Updating): a new replica starts, takes the traffic, then an old one drains, so requests in
    flight finish where they run. An Errored deployment is moved to Standby to try again with its new config."""
    deployment = find(db, tenant.id, name)
    _not_deleting(deployment)
    fields = check_update(db, tenant.id, deployment, update)
    changed = {k for k, v in fields.items() if getattr(deployment, k) != v}
    for key, value in fields.items():
        setattr(deployment, key, value)
    if changed & set(REPLICA_FIELDS):
        deployment.config_version += 1
    if deployment.status == ERRORED and changed:
        move(db, deployment, STANDBY, f"config updated ({', '.join(sorted(changed))}): trying again")
    db.commit()
    runtime.notify()
    return _shown(db, deployment, runtime)


@router.post("/{name}/stop", response_model=DeploymentOut)
def stop_deployment(name: str, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    """Drain every replica and stay at zero: requests are refused until the deployment is moved to Standby."""
    deployment = find(db, tenant.id, name)
    _not_deleting(deployment)
    deployment.target_state = "stopped"
    if deployment.status == ERRORED:
        move(db, deployment, STOPPED, "stopped by the tenant")
    db.commit()
    runtime.notify()
    return _shown(db, deployment, runtime)


@router.post("/{name}/standby", response_model=DeploymentOut)
def standby_deployment(name: str, tenant: CurrentTenant, db: Db, runtime: Runtime) -> DeploymentOut:
    """Move a Stopped or Errored deployment to Standby: it scales up again on the next request (or at once to
    min_replicas)."""
    deployment = find(db, tenant.id, name)
    _not_deleting(deployment)
    deployment.target_state = "active"
    if deployment.status in (STOPPED, ERRORED):
        move(db, deployment, STANDBY, "moved to Standby by the tenant")
    db.commit()
    runtime.notify()
    return _shown(db, deployment, runtime)


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
    return _shown(db, deployment, runtime)


@router.get("/{name}/transitions", response_model=list[TransitionOut])
def transitions(name: str, tenant: CurrentTenant, db: Db) -> list[TransitionOut]:
    """Every status change, oldest first, with its time and reason."""
    deployment = find(db, tenant.id, name)
    return [TransitionOut.model_validate(t) for t in history(db, deployment.id)]


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


def find(db: Session, tenant_id: str, name: str) -> Deployment:
    """The tenant's deployment of that name that is not Deleted (another tenant's reads as missing)."""
    deployment = _named(db, tenant_id, name)
    if deployment is None:
        raise NotFound(f"The deployment '{name}' does not exist", field="name", code="deployment_not_found")
    return deployment


def _named(db: Session, tenant_id: str, name: str) -> Deployment | None:
    return db.scalar(
        select(Deployment)
        .where(Deployment.tenant_id == tenant_id, Deployment.name == name, Deployment.status != DELETED)
        .order_by(Deployment.created_at.desc())
        .limit(1)
    )


def _not_deleting(deployment: Deployment) -> None:
    if deployment.target_state == "deleted":
        raise being_deleted(deployment.name)


def _shown(db: Session, deployment: Deployment, runtime: DeploymentRuntime) -> DeploymentOut:
    return shown(db, deployment, runtime.describe(deployment.id))


def shown(db: Session, deployment: Deployment, live: dict[str, Any]) -> DeploymentOut:
    """The deployment as the API shows it: its row, what runs of it now (`live`, a runtime's describe()), its
    price, its last 20 transitions. Also the `data` of its events (web/event_renderers.py)."""
    price = hourly_price(db, deployment.tenant_id, deployment.accelerator)
    return DeploymentOut.of(deployment, live, price, history(db, deployment.id, last=20))
