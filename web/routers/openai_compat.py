"""OpenAI-compatible inference on the shared endpoints: /v1/models, /v1/chat/completions, /v1/completions.

`model` is a base model, an adapter version or checkpoint, or a repo (functions/model_targets.py). These run under
the free tier's per-tenant limits (web/shared_limits.py); private deployments answer the same bodies under
/v1/deployments/{name}/ (web/routers/deployment_inference.py). web/inference.py answers both.

Classification adapters answer from their labels: a version trained on a classification dataset answers exactly one
of its labels (AdapterOut.labels), with each label's probability in the first token's logprobs.
"""

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select

from app.models import AdapterVersion, Repo, Tenant
from functions.catalog import list_models
from functions.model_targets import resolve_model
from web.deps import CurrentTenant, Db
from web.inference import merged_fields, merged_target, respond, shared_engine
from web.openai_schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
def list_models_endpoint(tenant: CurrentTenant, db: Db) -> dict[str, Any]:
    data = [
        {"id": m.name, "object": "model", "created": 0, "owned_by": "loraplex", "parameters": m.params}
        for m in list_models()
    ]
    for version in db.scalars(
        select(AdapterVersion).join(Repo).where(Repo.tenant_id == tenant.id).order_by(Repo.name, AdapterVersion.version)
    ):
        data.append(
            {
                "id": version.name,
                "object": "model",
                "created": int(version.created_at.timestamp()),
                "owned_by": tenant.name,
                "root": version.base_model,
                "parent": version.base_model,
            }
        )
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _answer(body, tenant, db, request)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _answer(body, tenant, db, request)


async def _answer(body: ChatCompletionRequest | CompletionRequest, tenant: Tenant, db: Db, request: Request) -> Any:
    _shared_limits(request, db, tenant)
    target = await merged_target(db, tenant.id, merged_fields(body), resolve_model(db, tenant.id, body.model))
    db.close()  # hand the connection back now: a stream may last minutes, and usage is written on its own session
    engine = await shared_engine(target, request)
    return await respond(body, target, engine, tenant, request)


def _shared_limits(request: Request, db: Db, tenant: Tenant) -> None:
    """429 with Retry-After when the tenant is over a free-tier limit of the shared endpoints."""
    limiter = getattr(request.app.state, "shared_limiter", None)
    if limiter is not None:
        limiter.check(db, tenant)
