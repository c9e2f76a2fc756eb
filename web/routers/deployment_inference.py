"""Inference on a private deployment with OpenAI's bodies:

    POST /v1/deployments/{name}/chat/completions     (openai SDK: base_url=".../v1/deployments/{name}")
    POST /v1/deployments/{name}/completions

where `model` is the deployment's base model (or "") for the base model alone, or one of the tenant's adapters
of that base model ("repo/3", "repo/3@2", "repo"). The replicas are run by functions/deployments/runtime.py.
"""

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.models import Deployment, Tenant
from functions.base_models import BaseModelUnavailable, load_tokenizer
from functions.catalog import get_model
from functions.deployments.rules import serving_refusal
from functions.deployments.runtime import DeploymentEngine, DeploymentRuntime
from functions.prompts import encode_chat
from web.deps import CurrentTenant, Db, Runtime
from web.errors import APIError
from web.openai_schemas import ChatCompletionRequest, CompletionRequest
from web.routers.deployments import find
from web.routers.openai_compat import Target, _respond, resolve_model

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])


@router.post("/{name}/chat/completions", response_model=None)
async def chat_completions(
    name: str, body: ChatCompletionRequest, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    deployment = _serving(db, tenant.id, name)
    target = _target(db, tenant.id, deployment, body.model)
    engine = await _engine(runtime, deployment, target)
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    prompt = encode_chat(engine.tokenizer, messages)
    return await _serve(body, body.requested_max_tokens, prompt, target, engine, tenant, request, chat=True)


@router.post("/{name}/completions", response_model=None)
async def completions(
    name: str, body: CompletionRequest, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    deployment = _serving(db, tenant.id, name)
    target = _target(db, tenant.id, deployment, body.model)
    engine = await _engine(runtime, deployment, target)
    return await _serve(body, body.requested_max_tokens, body.prompt_text, target, engine, tenant, request, chat=False)


async def _serve(
    body: Any,
    max_tokens: int | None,
    prompt: tuple[int, ...] | str,  # the chat template's token ids, or a completion's text
    target: Target,
    engine: DeploymentEngine,
    tenant: Tenant,
    request: Request,
    chat: bool,
) -> Any:
    return await _respond(body, max_tokens, prompt, target, engine, tenant, request, chat=chat, metered=False)


def _serving(db: Session, tenant_id: str, name: str) -> Deployment:
    """The deployment, refusing at once what cannot serve (the runtime refuses the same a moment later)."""
    deployment = find(db, tenant_id, name)
    refusal = serving_refusal(name, deployment.status, deployment.target_state, deployment.status_reason)
    if refusal is not None:
        raise refusal
    return deployment


def _target(db: Session, tenant_id: str, deployment: Deployment, model: str) -> Target:
    """`model`: "" or the base model for the base model alone; else one of the tenant's adapters of it."""
    if model in ("", deployment.base_model):
        return Target(model or deployment.base_model, deployment.base_model, None, None)
    target = resolve_model(db, tenant_id, model)
    if target.adapter is None:
        raise APIError(
            422,
            f"model: the deployment '{deployment.name}' serves {deployment.base_model!r} and its LoRA adapters; "
            f"{model!r} is another model",
            param="model",
            code="model_not_served",
        )
    if target.base_model != deployment.base_model:
        raise APIError(
            422,
            f"model: {model!r} is an adapter of {target.base_model!r}; the deployment '{deployment.name}' serves "
            f"{deployment.base_model!r}",
            param="model",
            code="model_not_served",
        )
    return target


async def _engine(runtime: DeploymentRuntime, deployment: Deployment, target: Target) -> DeploymentEngine:
    try:
        tokenizer = await run_in_threadpool(load_tokenizer, deployment.base_model)
    except BaseModelUnavailable as exc:
        raise APIError(400, str(exc), param="model", code="model_unavailable") from None
    engine = DeploymentEngine(
        runtime, deployment.id, deployment.base_model, tokenizer, get_model(deployment.base_model).context_length
    )
    engine.adapter_name = target.adapter_name
    return engine


