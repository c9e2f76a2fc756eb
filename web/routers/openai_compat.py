"""OpenAI-compatible inference: /v1/models, /v1/chat/completions, /v1/completions (streaming or not).

`model` is a base model ("smollm2-135m"), an adapter version ("repo/3"), or a repo ("repo": its latest).
These are the shared endpoints, under the free tier's per-tenant limits (web/shared_limits.py); private
deployments answer the same bodies under /v1/deployments/{name}/ (web/routers/deployments.py).
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.models import AdapterVersion, Repo, Tenant
from billing import ledger
from functions import checkpoints
from functions.base_models import BaseModelUnavailable
from functions.catalog import get_model, list_models
from functions.engine import get_engine
from functions.engine.protocol import (
    AdapterRef,
    ClientGone,
    Delta,
    Engine,
    EngineBusy,
    EngineError,
    GenerationRequest,
    RequestFailed,
    TokenLogprob,
    collect,
    unless_gone,
)
from functions.engine.remote import EngineUnavailable
from functions.prompts import encode_chat
from web.deps import CurrentTenant, Db
from web.errors import APIError, error_body
from web.openai_schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter(prefix="/v1", tags=["openai"])


@dataclass(frozen=True)
class Target:
    """What a `model` string resolved to."""

    model: str  # echoed back as given
    base_model: str  # for a full fine-tuning's version or checkpoint: the base model it was trained from
    adapter: AdapterRef | None
    adapter_name: str | None  # "repo/3", "repo/3@2"
    # A full fine-tuning's model directory, which the engine loads as its weights in place of base_model's;
    # None for catalog base models and adapters.
    model_dir: Path | None = None


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
    _shared_limits(request, db, tenant)
    target = resolve_model(db, tenant.id, body.model)
    db.close()  # hand the connection back now: a stream may last minutes, and usage is written on its own session
    engine = await _engine(target)
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    prompt = encode_chat(engine.tokenizer, messages)
    return await _respond(body, body.requested_max_tokens, prompt, target, engine, tenant, request, chat=True)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    _shared_limits(request, db, tenant)
    target = resolve_model(db, tenant.id, body.model)
    db.close()  # as above
    engine = await _engine(target)
    return await _respond(
        body, body.requested_max_tokens, body.prompt_text, target, engine, tenant, request, chat=False
    )


def _shared_limits(request: Request, db: Db, tenant: Tenant) -> None:
    """429 with Retry-After when the tenant is over a free-tier limit of the shared endpoints."""
    limiter = getattr(request.app.state, "shared_limiter", None)
    if limiter is not None:
        limiter.check(db, tenant)


def resolve_model(db: Db, tenant_id: str, model: str) -> Target:
    """`model` is a catalog base model, a version ("repo/3"), a checkpoint ("repo/3@2": checkpoint 2 of version 3)
    or a repo ("repo": its latest version). An adapter resolves to an AdapterRef keyed by its version's or
    checkpoint's row id; a full fine-tuning to its model directory. Another tenant's adapter resolves exactly like
    one that does not exist (404, same message)."""
    not_found = APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    reference = model
    if "/" not in model:
        try:
            return Target(model, get_model(model).name, None, None)
        except KeyError:
            pass
        repo = db.scalar(select(Repo).where(Repo.tenant_id == tenant_id, Repo.name == model))
        if repo is None or not repo.versions:
            raise not_found
        reference = repo.versions[-1].name
    weights = checkpoints.find(db, tenant_id, reference)
    if weights is None:
        raise not_found
    if weights.kind == "full":
        return Target(model, weights.base_model, None, weights.name, model_dir=weights.path)
    adapter = AdapterRef(weights.key, weights.path, weights.base_model)
    return Target(model, weights.base_model, adapter, weights.name)


async def _engine(target: Target) -> Engine:
    try:
        return await run_in_threadpool(get_engine, target.base_model, target.model_dir)
    except BaseModelUnavailable as exc:
        raise APIError(400, str(exc), param="model", code="model_unavailable") from None
    except EngineUnavailable as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from None


async def _until_answered(awaitable: Any, http: Request, chat: bool) -> Any:
    """Await a request's first delta, or a whole non-streaming answer, as an API error when it fails: what the engine
    refuses is a 4xx before any body is sent; a request whose client went away leaves the engine's queue."""
    try:
        return await unless_gone(awaitable, http.is_disconnected)
    except ClientGone:
        raise APIError(499, "the client closed the request", code="client_closed") from None
    except EngineError as exc:
        param = "messages" if chat and exc.param == "prompt" else exc.param
        raise APIError(400, str(exc), param=param, code="invalid_request") from None
    except EngineBusy as exc:
        retry = max(1, round(exc.retry_after))
        raise APIError(
            429, f"{exc}; retry after {retry} s", code="engine_busy", headers={"Retry-After": str(retry)}
        ) from None
    except RequestFailed as exc:
        raise _failure(exc) from None


def _failure(exc: RequestFailed) -> APIError:
    """A request the engine could not finish (its adapter's numbers broke, its engine went away), in the API's shape.
    param "model" where the adapter is at fault."""
    return APIError(exc.status, str(exc), param="model" if exc.status < 500 else None, code=exc.code)


async def _respond(
    body: SamplingFields,
    max_tokens: int | None,
    prompt: tuple[int, ...] | str,  # the chat template's token ids, or a completion's text
    target: Target,
    engine: Engine,
    tenant: Tenant,
    http: Request,
    chat: bool,
    metered: bool = True,
) -> Any:
    """Run the request on `engine` and answer it, streamed or whole. `metered`: write a priced usage record (the
    shared endpoints); private deployments are billed per replica-second instead."""
    gen = GenerationRequest(prompt=prompt, params=body.sampling(max_tokens), adapter=target.adapter)
    reply = _Reply(target, tenant, chat, metered)
    stream = engine.generate(gen)
    first = await _until_answered(anext(stream), http, chat)
    if body.stream:
        return StreamingResponse(reply.sse(first, stream, engine, body.include_usage), media_type="text/event-stream")
    completion = await _until_answered(collect(_chain(first, stream)), http, chat)
    cost = await run_in_threadpool(reply.record_usage, completion.prompt_tokens, completion.completion_tokens, engine)
    return reply.full(completion, cost)


async def _chain(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for delta in rest:
        yield delta


class _Reply:
    """Builds OpenAI-shaped bodies and chunks for one request and writes its usage record."""

    def __init__(self, target: Target, tenant: Tenant, chat: bool, metered: bool = True) -> None:
        self.target, self.tenant, self.chat, self.metered = target, tenant, chat, metered
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = time.monotonic()
        self.text_offset = 0  # characters sent so far (legacy completions logprobs)

    def record_usage(self, prompt_tokens: int, completion_tokens: int, engine: Engine) -> int:
        if not self.metered:
            return 0
        params = get_model(engine.base_model).params
        with session_scope() as s:
            amount = ledger.inference_charge(s, self.tenant.id, params, prompt_tokens + completion_tokens)
            ledger.record(
                s,
                ledger.Usage(
                    idempotency_key=f"inference:{self.id}",
                    tenant_id=self.tenant.id,
                    kind="inference",
                    technique="inference",
                    base_model=self.target.base_model,
                    adapter=self.target.adapter_name,
                    input_tokens=prompt_tokens,
                    output_tokens=completion_tokens,
                    compute_ms=int((time.monotonic() - self.started) * 1000),
                    amount_micro_usd=amount,
                    reference=self.id,
                ),
            )
        return amount

    def _usage(self, prompt_tokens: int, completion_tokens: int, cost: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "cost_micro_usd": cost,
        }

    def _logprobs(self, logprobs: tuple[TokenLogprob, ...], text: str) -> dict[str, Any] | None:
        """OpenAI's shapes: chat {"content": [...]}; legacy completions {"tokens", "token_logprobs", ...}."""
        if not logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": lp.token,
                        "logprob": lp.logprob,
                        "bytes": list(lp.token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top],
                    }
                    for lp in logprobs
                ]
            }
        offsets, at = [], self.text_offset
        for lp in logprobs:
            offsets.append(at)
            at += len(lp.token)
        self.text_offset += len(text)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) for lp in logprobs],
            "text_offset": offsets,
        }

    def full(self, completion: Any, cost: int) -> dict[str, Any]:
        logprobs = self._logprobs(completion.logprobs, completion.text)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": logprobs,
            }
        else:
            choice = {
                "index": 0,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "logprobs": logprobs,
            }
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.target.model,
            "choices": [choice],
            "usage": self._usage(completion.prompt_tokens, completion.completion_tokens, cost),
        }

    def chunk(self, delta: Delta | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        text = delta.text if delta is not None else None
        logprobs = self._logprobs(delta.logprobs, delta.text) if delta is not None else None
        if self.chat:
            content: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                content["content"] = text
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.target.model,
            "choices": [choice],
        }

    async def sse(
        self, first: Delta, stream: AsyncIterator[Delta], engine: Engine, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events. A client that goes away cancels this generator: the engine stream is closed, which
        frees the request's batch slot at once, and the tokens generated until then are charged. A stream that cannot
        complete ends with an error event in OpenAI's streaming shape ({"error": {...}}, no finish_reason, no [DONE]:
        the openai SDK raises it), and the tokens sent until then are charged."""
        last = first
        try:
            if self.chat:
                yield _sse(self.chunk(Delta(""), None, role=True))
            delta: Delta | None = first
            while delta is not None:
                last = delta
                if delta.text or delta.logprobs:
                    yield _sse(self.chunk(delta, None))
                if delta.finish_reason is not None:
                    break
                try:
                    delta = await anext(stream, None)
                except Exception as exc:  # noqa: BLE001 - whatever ended it, the client is told, in the API's shape
                    failed = exc if isinstance(exc, RequestFailed) else RequestFailed(f"{type(exc).__name__}: {exc}")
                    yield _sse(_error_event(failed))
                    return
            if last.finish_reason is None:  # the stream ran dry without an end: cut short, never passed off as whole
                yield _sse(_error_event(EngineUnavailable("the engine ended the answer before it was complete")))
                return
            cost = await run_in_threadpool(self.record_usage, last.prompt_tokens, last.completion_tokens, engine)
            yield _sse(self.chunk(None, last.finish_reason or "stop"))
            if include_usage:
                final = self.chunk(None, None) | {
                    "choices": [],
                    "usage": self._usage(last.prompt_tokens, last.completion_tokens, cost),
                }
                yield _sse(final)
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect cancels this task; the clean-up must still run
                await stream.aclose()
                if last.finish_reason is None:  # torn down mid-stream: charge what was generated until now
                    await run_in_threadpool(self.record_usage, last.prompt_tokens, last.completion_tokens, engine)


def _error_event(failed: RequestFailed) -> dict[str, Any]:
    error = _failure(failed)
    return error_body(error.status, error.message, error.param, error.code)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
