"""Inference on a private deployment with OpenAI's bodies:

    POST /v1/deployments/{name}/chat/completions     (openai SDK: base_url=".../v1/deployments/{name}")
    POST /v1/deployments/{name}/completions

where `model` is the deployment's base model (or "") for the base model alone, or one of the tenant's adapters
of that base model ("repo/3", "repo/3@2", "repo"). The replicas are run by functions/deployments/runtime.py.
"""

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from app.models import Deployment, Tenant
from functions.base_models import load_tokenizer
from functions.catalog import get_model
from functions.deployments.rules import serving_refusal
from functions.deployments.runtime import DeploymentEngine, DeploymentRuntime
from functions.deployments.suspension import wake_refusal
from functions.model_targets import Target, deployment_target
from web.deps import CurrentTenant, Db, Runtime
from web.inference import loading, merged_fields, merged_target, respond
from web.openai_schemas import ChatCompletionRequest, CompletionRequest
from web.routers.deployments import find

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])


@router.post("/{name}/chat/completions", response_model=None)
async def chat_completions(
    name: str, body: ChatCompletionRequest, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    return await _answer(name, body, tenant, db, request, runtime)


@router.post("/{name}/completions", response_model=None)
async def completions(
    name: str, body: CompletionRequest, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    return await _answer(name, body, tenant, db, request, runtime)


async def _answer(
    name: str,
    body: ChatCompletionRequest | CompletionRequest,
    tenant: Tenant,
    db: Session,
    request: Request,
    runtime: DeploymentRuntime,
) -> Any:
    """Refuse what the deployment cannot serve, resolve `model` on it, and answer through one of its replicas
    (not metered per token: its replicas are billed by the second)."""
    deployment = serving_deployment(db, tenant.id, name)
    target = deployment_target(db, tenant.id, deployment.name, deployment.base_model, body.model)
    target = await merged_target(db, tenant.id, merged_fields(body), target)
    engine = await deployment_engine(runtime, deployment, target)
    return await respond(body, target, engine, tenant, request, metered=False)


def serving_deployment(db: Session, tenant_id: str, name: str) -> Deployment:
    """The deployment, refusing at once what cannot serve (the runtime refuses the same a moment later), and a
    wake its tenant cannot pay for (402)."""
    deployment = find(db, tenant_id, name)
    refusal = serving_refusal(
        name, deployment.status, deployment.target_state, deployment.status_reason, deployment.suspended_reason
    ) or wake_refusal(db, deployment)
    if refusal is not None:
        raise refusal
    return deployment


async def deployment_engine(runtime: DeploymentRuntime, deployment: Deployment, target: Target) -> DeploymentEngine:
    """The Engine protocol over the deployment's replicas, for this request's adapter."""
    tokenizer = await loading(load_tokenizer, deployment.base_model)
    engine = DeploymentEngine(
        runtime, deployment.id, deployment.base_model, tokenizer, get_model(deployment.base_model).context_length
    )
    engine.adapter_name = target.adapter_name
    return engine
