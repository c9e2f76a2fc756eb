"""Answering a LoRAX request (web/lorax_schemas.py) on an engine, whole or as LoRAX's token events, on the path the
OpenAI routes take (web/inference.py): the same wait that leaves the engine when the client goes, the same usage
record (shared endpoints), the same labels for a classification adapter; only the shapes are LoRAX's
(web/lorax_replies.py).

The prompt is `inputs` as plain text (no chat template, as LoRAX), encoded here so that `truncate` can keep its last
tokens and `decoder_input_details` can show exactly what the engine was given.
"""

import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.errors import Refusal
from app.models import Tenant
from functions.engine.protocol import (
    Delta,
    Engine,
    EngineUnavailable,
    GenerationRequest,
    RequestFailed,
    TokenLogprob,
)
from functions.model_targets import Target
from functions.prompts import encode_text
from web.errors import APIError, status_of
from web.inference import Meter, chain, for_target, until_answered
from web.lorax_replies import LoraxReply, error_body, event
from web.lorax_schemas import GenerateRequest

# The engine's names for a request's fields, as LoRAX's request names them (an EngineError's field).
FIELDS = {
    "prompt": "inputs",
    "max_tokens": "parameters.max_new_tokens",
    "temperature": "parameters.temperature",
    "seed": "parameters.seed",
    "top_logprobs": "parameters.return_k_alternatives",
    "stop": "parameters.stop",
    "response_format": "parameters.response_format",
    "model": "parameters.adapter_id",
}


async def respond(
    body: GenerateRequest,
    stream: bool,
    target: Target,
    engine: Engine,
    tenant: Tenant,
    http: Request,
    metered: bool = True,
    listed: bool = False,
) -> Any:
    """Run the request on `engine` and answer it, streamed or whole. `metered`: write a priced usage record (the
    shared endpoints). `listed`: the whole answer as a one-item list, as LoRAX's root route answers."""
    params = body.parameters
    sampling = for_target(params.sampling(), target)
    prompt_ids = encode_text(engine.tokenizer, body.inputs)[-(params.truncate or 0) :]
    gen = GenerationRequest(prompt=tuple(prompt_ids), params=sampling, adapter=target.adapter)
    prefix = body.inputs if params.return_full_text else ""
    reply = LoraxReply(engine.tokenizer, prompt_ids, sampling.seed, sampling.stop, prefix)
    meter = Meter(f"lorax-{uuid.uuid4().hex}", target, tenant, engine, metered)
    deltas = engine.generate(gen)
    first = await _answered(anext(deltas), http)
    if stream:
        return StreamingResponse(_events(reply, meter, first, deltas), media_type="text/event-stream")
    text, tokens, last = await _answered(_collect(chain(first, deltas)), http)
    await run_in_threadpool(meter.record, last.prompt_tokens, last.completion_tokens)
    assert last.finish_reason is not None  # _collect ends only with one
    details = reply.details(last.finish_reason, last.prompt_tokens, tokens, params.decoder_input_details)
    answer = reply.full(text, details if params.details else None)
    return JSONResponse([answer] if listed else answer)


async def _answered(awaitable: Any, http: Request) -> Any:
    """web/inference.until_answered, with the refused field named as LoRAX's request names it."""
    try:
        return await until_answered(awaitable, http, chat=False)
    except APIError as exc:
        if exc.param in FIELDS:
            exc.param = FIELDS[exc.param]
            exc.message = f"{exc.param}: {exc.message}"
        raise


async def _collect(deltas: AsyncIterator[Delta]) -> tuple[str, list[TokenLogprob], Delta]:
    """(text, every generated token, the last delta). A stream that ends without a finish reason was cut short."""
    text: list[str] = []
    tokens: list[TokenLogprob] = []
    last = Delta("")
    async for delta in deltas:
        text.append(delta.text)
        tokens.extend(_tokens(delta))
        last = delta
    if last.finish_reason is None:
        raise EngineUnavailable("the engine ended the answer before it was complete")
    return "".join(text), tokens, last


def _tokens(delta: Delta) -> list[TokenLogprob]:
    return [*delta.logprobs, *([delta.end_token] if delta.end_token else [])]


async def _events(
    reply: LoraxReply, meter: Meter, first: Delta, deltas: AsyncGenerator[Delta, None]
) -> AsyncIterator[str]:
    """One event per token, each sent once the next is known, so that the last one carries generated_text and
    details. As on the OpenAI routes (web/inference.py): a client that goes away closes the engine stream and is
    charged for the tokens generated until then; a stream that cannot complete ends with an error event (lorax-client
    raises it), charged likewise."""
    last = first
    text: list[str] = []
    tokens: list[TokenLogprob] = []
    held: TokenLogprob | None = None  # the newest token, sent with the next one's arrival or with the end
    try:
        delta: Delta | None = first
        while delta is not None:
            last = delta
            text.append(delta.text)
            for token in _tokens(delta):
                tokens.append(token)
                if held is not None:
                    yield event({"token": reply.token(held), "generated_text": None, "details": None})
                held = token
            if delta.finish_reason is not None:
                break
            try:
                delta = await anext(deltas, None)
            except Exception as exc:  # noqa: BLE001 - whatever ended it, the client is told, in LoRAX's shape
                yield _error_event(exc)
                return
        if last.finish_reason is None or held is None:  # cut short, or no token at all: never passed off as whole
            yield _error_event(EngineUnavailable("the engine ended the answer before it was complete"))
            return
        await run_in_threadpool(meter.record, last.prompt_tokens, last.completion_tokens)
        details = reply.stream_details(last.finish_reason, last.prompt_tokens, tokens)
        yield event(
            {
                "token": reply.token(held),
                "generated_text": reply.full("".join(text), None)["generated_text"],
                "details": details,
            }
        )
    finally:
        with anyio.CancelScope(shield=True):  # a disconnect cancels this task; the clean-up must still run
            await deltas.aclose()
            if last.finish_reason is None:  # torn down mid-stream: charge what was generated until now
                await run_in_threadpool(meter.record, last.prompt_tokens, last.completion_tokens)


def _error_event(exc: Exception) -> str:
    failed = exc if isinstance(exc, Refusal) else RequestFailed(f"{type(exc).__name__}: {exc}")
    return event(error_body(status_of(failed), failed.message, failed.field, failed.code))
