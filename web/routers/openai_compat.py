"""OpenAI-compatible inference: /v1/models, /v1/chat/completions, /v1/completions (streaming or not).

`model` is a base model ("smollm2-135m"), an adapter version ("repo/3"), or a repo ("repo": its latest).
"""

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app import volume
from app.db import session_scope
from app.models import AdapterVersion, Repo, Tenant
from app.settings import get_settings
from billing import ledger
from functions.base_models import BaseModelUnavailable
from functions.catalog import get_model, list_models
from functions.engine import get_engine
from functions.engine.protocol import AdapterRef, Delta, Engine, EngineError, GenerationRequest, collect
from functions.prompts import chat_prompt
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.openai_schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter(prefix="/v1", tags=["openai"])


@dataclass(frozen=True)
class Target:
    """What a `model` string resolved to."""

    model: str  # echoed back as given
    base_model: str
    adapter: AdapterRef | None
    adapter_name: str | None  # "repo/3"


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
    target = resolve_model(db, tenant.id, body.model)
    engine = await _engine(target.base_model)
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    prompt = chat_prompt(engine.tokenizer, messages)  # type: ignore[attr-defined]
    return await _respond(body, body.requested_max_tokens, prompt, target, engine, tenant, request, chat=True)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, tenant: CurrentTenant, db: Db, request: Request) -> Any:
    target = resolve_model(db, tenant.id, body.model)
    engine = await _engine(target.base_model)
    return await _respond(
        body, body.requested_max_tokens, body.prompt_text, target, engine, tenant, request, chat=False
    )


def resolve_model(db: Db, tenant_id: str, model: str) -> Target:
    """Another tenant's adapter resolves exactly like one that does not exist (404, same message)."""
    not_found = APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    repo_name, _, version_text = model.partition("/")
    if not version_text:
        try:
            return Target(model, get_model(model).name, None, None)
        except KeyError:
            pass
    repo = db.scalar(select(Repo).where(Repo.tenant_id == tenant_id, Repo.name == repo_name))
    if repo is None or not repo.versions:
        raise not_found
    if version_text:
        version = next((v for v in repo.versions if str(v.version) == version_text), None)
        if version is None:
            raise not_found
    else:
        version = repo.versions[-1]
    path = volume.adapter_dir(tenant_id, repo.name, version.version)
    return Target(model, version.base_model, AdapterRef(version.id, path, version.base_model), version.name)


async def _engine(base_model: str) -> Engine:
    try:
        return await run_in_threadpool(get_engine, base_model, get_settings().adapter_cache_size)
    except BaseModelUnavailable as exc:
        raise APIError(400, str(exc), param="model", code="model_unavailable") from None


async def _respond(
    body: SamplingFields,
    max_tokens: int | None,
    prompt: str,
    target: Target,
    engine: Engine,
    tenant: Tenant,
    http: Request,
    chat: bool,
) -> Any:
    limit = get_settings().max_new_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens: at most {limit}", param="max_tokens", code="invalid_value")
    gen = GenerationRequest(prompt=prompt, params=body.sampling(max_tokens), adapter=target.adapter)
    reply = _Reply(target, tenant, chat)
    if not body.stream:
        try:
            completion = await run_in_threadpool(lambda: collect(engine.stream(gen)))
        except EngineError as exc:
            raise APIError(400, str(exc), param="messages" if chat else "prompt", code="invalid_request") from None
        cost = await run_in_threadpool(
            reply.record_usage, completion.prompt_tokens, completion.completion_tokens, engine
        )
        return reply.full(
            completion.text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens, cost
        )
    stream = engine.stream(gen, cancelled=reply.cancelled)
    try:  # run up to the first token here, so a refused request gets its 400 before the stream starts
        first = await run_in_threadpool(next, stream)
    except EngineError as exc:
        raise APIError(400, str(exc), param="messages" if chat else "prompt", code="invalid_request") from None
    return StreamingResponse(reply.sse(first, stream, http, engine, body.include_usage), media_type="text/event-stream")


class _Reply:
    """Builds OpenAI-shaped bodies and chunks for one request and writes its usage record."""

    def __init__(self, target: Target, tenant: Tenant, chat: bool) -> None:
        self.target, self.tenant, self.chat = target, tenant, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = time.monotonic()
        self.cancelled = threading.Event()

    def record_usage(self, prompt_tokens: int, completion_tokens: int, engine: Engine) -> int:
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

    def full(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int, cost: int) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.target.model,
            "choices": [choice],
            "usage": self._usage(prompt_tokens, completion_tokens, cost),
        }

    def chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.target.model,
            "choices": [choice],
        }

    async def sse(
        self, first: Delta, stream: Iterator[Delta], http: Request, engine: Engine, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events. A client that goes away stops generation at once (the cancel flag), and is
        still charged for the tokens generated until then."""
        last = first
        try:
            if self.chat:
                yield _sse(self.chunk("", None, role=True))
            delta: Delta | None = first
            while delta is not None:
                last = delta
                if delta.text:
                    yield _sse(self.chunk(delta.text, None))
                if delta.finish_reason is not None:
                    break
                if await http.is_disconnected():
                    self.cancelled.set()
                delta = await run_in_threadpool(next, stream, None)
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
            if last.finish_reason is None:  # the response was torn down mid-stream
                self.cancelled.set()
                rest = await run_in_threadpool(collect, stream)
                await run_in_threadpool(self.record_usage, rest.prompt_tokens, rest.completion_tokens, engine)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
