"""LoRAX's API, for code written against LoRAX's server and `lorax-client`:

    POST {prefix}/generate          one answer: {"generated_text", "details"}
    POST {prefix}/generate_stream   server-sent token events
    POST {prefix}                   what lorax-client's Client(base_url=prefix) posts to: `stream` picks one of the
                                    above (the whole answer as a one-item list, as LoRAX's root route answers)

Which base model serves it: LoRAX runs one base model per server; we run many, so the prefix says which one.

    prefix ""                       the shared endpoints; the base model is the one `parameters.adapter_id` names
                                    (a repo, version or checkpoint is of one base model; a base model's name is that
                                    model alone); without adapter_id, 400 pointing to the prefix below
    prefix /v1/models/{base_model}  the shared endpoints, that base model; no adapter_id: the base model alone
    prefix /v1/deployments/{name}   a private deployment, its base model; no adapter_id: the base model alone

The shared prefixes run under the same free-tier limits and usage records as /v1/chat/completions; a deployment is
billed by the replica-second, as its OpenAI routes are. Errors come in LoRAX's shape (web/lorax_replies.py), which
lorax-client raises as its own error types.
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound, Refusal
from app.models import Tenant
from functions.catalog import get_model
from functions.model_targets import Target, resolve_model
from web import lorax_replies
from web.deps import CurrentTenant, Db, Runtime
from web.errors import APIError
from web.inference import merged_target, shared_engine
from web.lorax_inference import respond
from web.lorax_schemas import CompatRequest, GenerateRequest
from web.routers.deployment_inference import deployment_engine, serving_deployment

ADAPTER_ID = "parameters.adapter_id"
MERGED = "parameters.merged_adapters"

Model = TypeVar("Model", bound=BaseModel)


def _lorax_errors(request: Request) -> None:
    """Every error of these routes, from authentication on, in LoRAX's shape (web/errors.py reads this)."""
    request.state.error_body = lorax_replies.error_body


def _body(model: type[Model]) -> Callable[[Request], Awaitable[Model]]:
    """The body as `model`; a field LoRAX does not have is a 400 naming it, a parameter asking for what this server
    does not do too (Parameters.refusal); a value of the wrong type or range a 422 naming it."""

    async def parse(request: Request) -> Model:
        try:
            body = model.model_validate(await request.json())
        except ValidationError as exc:
            unknown = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
            if unknown:
                message = f"{unknown[0]}: not a field of LoRAX's request (unknown, or not implemented here)"
                raise APIError(400, message, param=unknown[0], code="unknown_parameter") from None
            raise RequestValidationError(exc.errors()) from None
        refusal = body.parameters.refusal() if isinstance(body, GenerateRequest) else None
        if refusal is not None:
            raise refusal
        return body

    return parse


Generate = Annotated[GenerateRequest, Depends(_body(GenerateRequest))]
Compat = Annotated[CompatRequest, Depends(_body(CompatRequest))]

router = APIRouter(tags=["lorax"], dependencies=[Depends(_lorax_errors)])


# ---- the shared endpoints, the base model named by adapter_id ---------------------------------------------------


@router.post("/", response_model=None)
async def compat(body: Compat, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _shared(body, None, body.stream, tenant, db, request, listed=not body.stream)


@router.post("/generate", response_model=None)
async def generate(body: Generate, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _shared(body, None, False, tenant, db, request)


@router.post("/generate_stream", response_model=None)
async def generate_stream(body: Generate, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _shared(body, None, True, tenant, db, request)


# ---- the shared endpoints, one base model ------------------------------------------------------------------------


@router.post("/v1/models/{base_model}", response_model=None)
async def model_compat(base_model: str, body: Compat, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _shared(body, base_model, body.stream, tenant, db, request, listed=not body.stream)


@router.post("/v1/models/{base_model}/generate", response_model=None)
async def model_generate(base_model: str, body: Generate, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    return await _shared(body, base_model, False, tenant, db, request)


@router.post("/v1/models/{base_model}/generate_stream", response_model=None)
async def model_generate_stream(
    base_model: str, body: Generate, tenant: CurrentTenant, db: Db, request: Request
) -> Any:
    return await _shared(body, base_model, True, tenant, db, request)


# ---- a private deployment ----------------------------------------------------------------------------------------


@router.post("/v1/deployments/{name}", response_model=None)
async def deployment_compat(
    name: str, body: Compat, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    return await _private(name, body, body.stream, tenant, db, request, runtime, listed=not body.stream)


@router.post("/v1/deployments/{name}/generate", response_model=None)
async def deployment_generate(
    name: str, body: Generate, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    return await _private(name, body, False, tenant, db, request, runtime)


@router.post("/v1/deployments/{name}/generate_stream", response_model=None)
async def deployment_generate_stream(
    name: str, body: Generate, tenant: CurrentTenant, db: Db, request: Request, runtime: Runtime
) -> Any:
    return await _private(name, body, True, tenant, db, request, runtime)


# ---- answering --------------------------------------------------------------------------------------------------


async def _shared(
    body: GenerateRequest,
    base_model: str | None,
    stream: bool,
    tenant: Tenant,
    db: Session,
    request: Request,
    listed: bool = False,
) -> Any:
    """As /v1/chat/completions: the free tier's limits, the target, the shared engine, a usage record."""
    limiter = getattr(request.app.state, "shared_limiter", None)
    if limiter is not None:
        limiter.check(db, tenant)
    target = _shared_target(db, tenant.id, base_model, body.parameters.adapter_id)
    target = await merged_target(db, tenant.id, body.parameters.merged_adapters, target, MERGED, ADAPTER_ID)
    db.close()  # hand the connection back now: a stream may last minutes, and usage is written on its own session
    engine = await shared_engine(target, request)
    return await respond(body, stream, target, engine, tenant, request, listed=listed)


async def _private(
    name: str,
    body: GenerateRequest,
    stream: bool,
    tenant: Tenant,
    db: Session,
    request: Request,
    runtime: Runtime,
    listed: bool = False,
) -> Any:
    """As a deployment's /chat/completions: its base model or one of its adapters, on its replicas, not metered per
    token."""
    deployment = serving_deployment(db, tenant.id, name)
    adapter_id = body.parameters.adapter_id
    target = _adapter_target(db, tenant.id, adapter_id, deployment.base_model, f"the deployment '{name}' serves")
    target = await merged_target(db, tenant.id, body.parameters.merged_adapters, target, MERGED, ADAPTER_ID)
    engine = await deployment_engine(runtime, deployment, target)
    return await respond(body, stream, target, engine, tenant, request, metered=False, listed=listed)


def _shared_target(db: Session, tenant_id: str, base_model: str | None, adapter_id: str | None) -> Target:
    if base_model is None:
        if not adapter_id:
            raise APIError(
                400,
                f"{ADAPTER_ID}: name an adapter ('repo/version', 'repo') or a base model; to call a base model alone "
                "without one, post to /v1/models/{base_model}/generate (or use it as lorax-client's base_url)",
                param=ADAPTER_ID,
                code="adapter_required",
            )
        return _resolve(db, tenant_id, adapter_id)
    try:
        get_model(base_model)
    except KeyError:
        raise NotFound(f"base_model: the model '{base_model}' does not exist", field="base_model") from None
    return _adapter_target(db, tenant_id, adapter_id, base_model, f"/v1/models/{base_model} serves")


def _adapter_target(db: Session, tenant_id: str, adapter_id: str | None, base_model: str, serves: str) -> Target:
    """On a route of one base model: that model alone without adapter_id (or with its name), else an adapter of it."""
    if adapter_id in (None, "", base_model):
        return Target(base_model, base_model, None, None)
    target = _resolve(db, tenant_id, adapter_id)
    if target.adapter is None or target.base_model != base_model:
        of = f"an adapter of {target.base_model!r}" if target.adapter else "another model"
        raise Invalid(
            f"{ADAPTER_ID}: {adapter_id!r} is {of}; {serves} {base_model!r} and its LoRA adapters",
            field=ADAPTER_ID,
            code="model_not_served",
        )
    return target


def _resolve(db: Session, tenant_id: str, adapter_id: str) -> Target:
    """What adapter_id names, as the OpenAI routes' `model`; refusals name adapter_id."""
    try:
        return resolve_model(db, tenant_id, adapter_id)
    except Refusal as exc:
        raise type(exc)(f"{ADAPTER_ID}: {exc.message}", field=ADAPTER_ID, code=exc.code) from None
