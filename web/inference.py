"""Answering an OpenAI-shaped completion request on an engine, end to end, for the shared endpoints
(web/routers/openai_compat.py) and private deployments (web/routers/deployment_inference.py) alike.

`respond` submits the request, waits for its first delta (or its whole answer) while watching for the client to
leave, and answers whole or as server-sent events (web/replies.py builds the shapes); on the shared endpoints it
writes a priced usage record. What the engine refuses or fails with is a domain refusal (app/errors.py) which
reaches the API's error handler as it is, except where the API adds context: a refused request's field and status.

Classification adapters answer from their labels: when the version behind `model` was trained on a classification
dataset (its labels are on its row, functions/model_targets.Target.labels), the engine is asked for exactly one of
them (SamplingParams.choices), whatever the prompt; with logprobs, the first token's top_logprobs give each label's
probability (over the labels alone) when the labels differ at their first token. A stop sequence that would cut a
label short is refused; max_tokens below a label's length ends the answer with finish_reason "length".
"""

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.errors import Refusal
from app.models import Tenant
from billing import ledger
from functions.adapter_merge import MergeRefused, MergeSpec, merged_ref
from functions.base_models import BaseModelUnavailable
from functions.catalog import get_model
from functions.engine import get_engine
from functions.engine.protocol import (
    ClientGone,
    Completion,
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    RequestFailed,
    SamplingParams,
    collect,
    unless_gone,
)
from functions.model_targets import Target
from functions.prompts import encode_chat
from web.errors import APIError
from web.openai_schemas import ChatCompletionRequest, CompletionRequest
from web.replies import DONE, Reply, error_event, event

T = TypeVar("T")


async def loading(load: Callable[..., T], *args: Any) -> T:
    """Run `load` (an engine's start, a tokenizer's read) on a worker thread; weights that cannot be had here are
    the user's error on `model`."""
    try:
        return await run_in_threadpool(load, *args)
    except BaseModelUnavailable as exc:
        raise APIError(400, str(exc), param="model", code="model_unavailable") from None


async def shared_engine(target: Target, http: Request) -> Engine:
    """The shared engine of the target's base model (or full fine-tuning), started on first use; where the API loads
    no model (Modal), the serving pool's (web/main.py)."""
    pools = getattr(http.app.state, "shared_pools", None)
    if pools is not None:
        return await loading(pools.engine, target.base_model, target.model_dir)
    return await loading(get_engine, target.base_model, target.model_dir)


def merged_fields(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any] | None:
    """The OpenAI routes' `merged_adapters` as LoRAX spells them (what `merged_target` reads)."""
    return body.merged_adapters.model_dump() if body.merged_adapters is not None else None


async def merged_target(
    db: Session,
    tenant_id: str,
    merged: Mapping[str, Any] | None,
    target: Target,
    field: str = "merged_adapters",
    model_param: str = "model",
) -> Target:
    """The target served by a merge of the request's `merged_adapters` (LoRAX's: computed once per recipe and
    cached, functions/adapter_merge.py), whose base model `model_param` names; the target as it is without them. A
    merge that cannot be made is the API's 400 naming the field (`field` is where the request carries it: the
    OpenAI routes' `merged_adapters`, LoRAX's `parameters.merged_adapters`)."""
    if merged is None:
        return target
    if target.adapter is not None or target.model_dir is not None:
        raise APIError(
            400,
            f"{model_param}: with {field}, {model_param} names the base model of the adapters merged "
            f"({target.base_model!r}), not {target.model!r}",
            param=model_param,
            code="invalid_request",
        )
    try:
        spec = MergeSpec.from_request(merged, field)
        adapter = await run_in_threadpool(merged_ref, db, tenant_id, spec, target.base_model)
    except MergeRefused as exc:
        raise APIError(400, exc.message, param=exc.field, code=exc.code) from None
    return replace(target, adapter=adapter, adapter_name=spec.name)


async def respond(
    body: ChatCompletionRequest | CompletionRequest,
    target: Target,
    engine: Engine,
    tenant: Tenant,
    http: Request,
    metered: bool = True,
) -> Any:
    """Run the request on `engine` and answer it, streamed or whole. `metered`: write a priced usage record (the
    shared endpoints); private deployments are billed per replica-second instead."""
    chat = isinstance(body, ChatCompletionRequest)
    prompt: tuple[int, ...] | str  # the chat template's token ids, or a completion's text
    if isinstance(body, ChatCompletionRequest):
        prompt = encode_chat(engine.tokenizer, [{"role": m.role, "content": m.text} for m in body.messages])
    else:
        prompt = body.prompt_text
    gen = GenerationRequest(prompt=prompt, params=_params(body, target), adapter=target.adapter)
    reply = Reply(target.model, chat)
    meter = Meter(reply.id, target, tenant, engine, metered)
    stream = engine.generate(gen)
    first = await until_answered(anext(stream), http, chat)
    if body.stream:
        events = _events(reply, meter, first, stream, body.include_usage, gen.params.n)
        return StreamingResponse(events, media_type="text/event-stream")
    answers = await until_answered(collect_answers(chain(first, stream), gen.params.n), http, chat)
    generated = sum(answer.completion_tokens for answer in answers)  # the prompt counts once, for every answer
    cost = await run_in_threadpool(meter.record, answers[0].prompt_tokens, generated)
    return reply.full(answers, cost)


def _params(body: ChatCompletionRequest | CompletionRequest, target: Target) -> SamplingParams:
    """The request's sampling, restricted to the target's labels when it is a classification adapter."""
    return for_target(body.sampling(body.requested_max_tokens), target)


def for_target(params: SamplingParams, target: Target) -> SamplingParams:
    """`params` restricted to the target's labels when it is a classification adapter (also LoRAX's routes)."""
    labels = tuple(label for label in target.labels if label)  # an empty answer is no label to constrain to
    if not labels:
        return params
    cut = [stop for stop in params.stop if any(stop in label for label in labels)]
    if cut:
        raise APIError(
            400,
            f"stop: {cut[0]!r} occurs within a label of {target.model!r}, a classification adapter that answers "
            "only with one of its labels: it would cut the answer short",
            param="stop",
            code="invalid_request",
        )
    return replace(params, choices=labels)


async def until_answered(awaitable: Any, http: Request, chat: bool) -> Any:
    """Await a request's first delta, or a whole non-streaming answer; a request whose client went away leaves the
    engine's queue. What the engine refuses before queueing (EngineError) is the API's 400 on the user's field (a
    chat's prompt is its messages); any other refusal reaches the error handler as it is."""
    try:
        return await unless_gone(awaitable, http.is_disconnected)
    except ClientGone:
        raise APIError(499, "the client closed the request", code="client_closed") from None
    except EngineError as exc:
        param = "messages" if chat and exc.field == "prompt" else exc.field
        raise APIError(400, exc.message, param=param, code="invalid_request") from None


async def chain(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for delta in rest:
        yield delta


async def collect_answers(deltas: AsyncIterator[Delta], n: int) -> list[Completion]:
    """Run a stream of `n` answers (each delta names its answer: Delta.index) to its end, each answer joined as
    protocol.collect joins one (an answer without its end is an EngineUnavailable), in index order."""
    parts: list[list[Delta]] = [[] for _ in range(n)]
    async for delta in deltas:
        parts[delta.index].append(delta)
    return [await collect(_replay(part)) for part in parts]


async def _replay(deltas: list[Delta]) -> AsyncIterator[Delta]:
    for delta in deltas:
        yield delta


class Meter:
    """Writes one request's priced usage record, under the reply's id; nothing when not `metered`. (Also LoRAX's
    routes: web/lorax_inference.py.)"""

    def __init__(self, reply_id: str, target: Target, tenant: Tenant, engine: Engine, metered: bool) -> None:
        self.reply_id, self.target, self.tenant, self.engine, self.metered = reply_id, target, tenant, engine, metered
        self.started = time.monotonic()

    def record(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The request's price in micro-USD (0 when not metered)."""
        if not self.metered:
            return 0
        params = get_model(self.engine.base_model).params
        with session_scope() as s:
            amount = ledger.inference_charge(s, self.tenant.id, params, prompt_tokens + completion_tokens)
            ledger.record(
                s,
                ledger.Usage(
                    idempotency_key=f"inference:{self.reply_id}",
                    tenant_id=self.tenant.id,
                    kind="inference",
                    technique="inference",
                    base_model=self.target.base_model,
                    adapter=self.target.adapter_name,
                    input_tokens=prompt_tokens,
                    output_tokens=completion_tokens,
                    compute_ms=int((time.monotonic() - self.started) * 1000),
                    amount_micro_usd=amount,
                    reference=self.reply_id,
                ),
            )
        return amount


async def _events(
    reply: Reply, meter: Meter, first: Delta, stream: AsyncGenerator[Delta, None], include_usage: bool, n: int = 1
) -> AsyncIterator[str]:
    """Server-sent events. A client that goes away cancels this generator: the engine stream is closed, which frees
    the request's batch slot at once, and the tokens generated until then are charged. A stream that cannot complete
    ends with an error event (replies.error_event), and the tokens sent until then are charged. With n answers, each
    chunk names its answer (index) and each answer ends with its own finish chunk; the last one's comes after the
    charge, then the usage (the prompt once, every answer's tokens)."""
    latest: dict[int, Delta] = {first.index: first}  # each answer's latest delta: its token counts so far
    ended: set[int] = set()

    def counts() -> tuple[int, int]:
        return max(d.prompt_tokens for d in latest.values()), sum(d.completion_tokens for d in latest.values())

    try:
        if reply.chat:
            for index in range(n):
                yield event(reply.chunk(Delta("", index=index), None, role=True))
        delta: Delta | None = first
        while delta is not None:
            latest[delta.index] = delta
            if delta.text or delta.logprobs:
                yield event(reply.chunk(delta, None))
            if delta.finish_reason is not None:
                ended.add(delta.index)
                if len(ended) == n:
                    break
                yield event(reply.chunk(None, delta.finish_reason, index=delta.index))
            try:
                delta = await anext(stream, None)
            except Exception as exc:  # noqa: BLE001 - whatever ended it, the client is told, in the API's shape
                failed = exc if isinstance(exc, Refusal) else RequestFailed(f"{type(exc).__name__}: {exc}")
                yield error_event(failed)
                return
        if delta is None or len(ended) < n:  # the stream ran dry without an end: cut short, never passed off as whole
            yield error_event(EngineUnavailable("the engine ended the answer before it was complete"))
            return
        cost = await run_in_threadpool(meter.record, *counts())
        yield event(reply.chunk(None, delta.finish_reason or "stop", index=delta.index))
        if include_usage:
            yield event(reply.usage_chunk(*counts(), cost))
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):  # a disconnect cancels this task; the clean-up must still run
            await stream.aclose()
            if len(ended) < n:  # torn down mid-stream: charge what was generated until now
                await run_in_threadpool(meter.record, *counts())
