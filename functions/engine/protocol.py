"""The serving engine protocol: one base model, many adapters, requests in and text deltas out.

Every engine (the native batched engine, vLLM, a client of an engine process) implements `Engine`:
`generate(request)` is an async iterator of `Delta`s; closing it early (a client that went away) frees the
request's slot in the batch at once.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from functions.prompts import encode_text

T = TypeVar("T")


@dataclass(frozen=True)
class AdapterRef:
    key: str  # stable id of the adapter version (or checkpoint); users never see it
    path: Path  # PEFT directory on the volume
    base_model: str


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # end-of-sequence is masked until this many tokens are out
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # same seed, same prompt, same adapter: same tokens
    num_beams: int = 1  # > 1: beam search (deterministic; sampling fields are ignored)
    logprobs: bool = False  # per generated token: its log-probability under the model
    top_logprobs: int = 0  # and this many most likely alternatives (0-20)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    # Token ids (a chat request, its template applied by the caller: functions.prompts.encode_chat), or text, which
    # the engine encodes as plain text: a special token spelled in it is never a control token.
    prompt: tuple[int, ...] | str
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None  # None: the base model alone

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        return list(self.prompt) if isinstance(self.prompt, tuple) else encode_text(tokenizer, self.prompt)


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class Delta:
    """A piece of generated text; the last one carries finish_reason, token counts and timings."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token whose text is in this delta (when asked)
    queue_ms: float = 0.0  # time waiting for a batch slot, KV cache room or the adapter to load
    first_token_ms: float = 0.0  # from submission to the first generated token


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class EngineError(ValueError):
    """A request the engine refuses (too long, adapter of another base model); the message says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestFailed(RuntimeError):
    """The engine could not finish this one request (a numeric fault in its adapter's output, a step that failed
    for it alone, an engine that broke down under it); the engine goes on serving the others. `status` is the
    HTTP status the API answers with, `code` its machine-readable cause."""

    def __init__(self, message: str, code: str = "generation_failed", status: int = 500) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class EngineBusy(RuntimeError):
    """The engine's waiting queue is full: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Engine(Protocol):
    """What every engine offers. `tokenizer` is the base model's (a transformers tokenizer): callers encode chat
    prompts with it (functions.prompts.encode_chat) before `generate`.

    Two methods only some engines have, which callers look up with getattr/hasattr rather than through this
    protocol:
    - `alive() -> bool`: whether the engine's process still runs (engines in another process: RemoteEngine);
      an engine without it is taken as alive (functions/engine/__init__.py, functions/engine/supervisor.py).
    - `run() -> None`: the engine's own loop on the calling thread until close() (the native engine started with
      background=False); an engine without it runs its own loop (vLLM) (functions/engine/server.py).
    """

    base_model: str
    context_length: int
    tokenizer: Any

    def count_tokens(self, text: str) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Validates the request before the first delta (EngineError, EngineBusy) and then streams."""
        ...

    def stats(self) -> dict:
        """Load figures: running, waiting, kv_used_fraction, resident adapters, tokens generated."""
        ...

    def healthy(self) -> tuple[bool, str]:
        """(whether it makes progress, why not): an unhealthy engine is replaced by whoever started it."""
        ...

    def close(self) -> None:
        """Stop the engine (its thread or process); it serves nothing afterwards."""
        ...


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def check_request(prompt_ids: list[int], params: SamplingParams, context_length: int) -> None:
    """What every engine refuses before anything is queued: the EngineError names the field at fault."""
    if not prompt_ids:
        raise EngineError("the prompt is empty", "prompt")
    if len(prompt_ids) >= context_length:
        raise EngineError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {context_length}", "prompt"
        )
    if params.max_new_tokens < 1 or params.min_new_tokens > params.max_new_tokens:
        raise EngineError("max_tokens must be at least 1 and at least min_tokens", "max_tokens")
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0 or params.repetition_penalty <= 0:
        raise EngineError("temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0 and repetition_penalty > 0", "temperature")
    if not 0 <= params.top_logprobs <= 20:
        raise EngineError("top_logprobs must be between 0 and 20", "top_logprobs")
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise EngineError(f"seed must be between 0 and {MAX_SEED}", "seed")


class ClientGone(Exception):
    """The caller of a request went away before it was answered."""


async def unless_gone(awaitable: Awaitable[T], gone: Callable[[], Awaitable[bool]], poll: float = 0.5) -> T:
    """Await `awaitable` unless `gone()` (the HTTP caller disconnected) says so first: then it is cancelled, which
    takes a queued request out of the engine at once, and ClientGone is raised. Needed where nothing is being sent
    yet (a request before its first token, a non-streaming one): only a failed send tells a server the client left."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await gone():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):  # its own end (CancelledError, or an error nobody reads)
                await task


def request_to_dict(request: GenerationRequest) -> dict:
    from dataclasses import asdict

    data = asdict(request)
    if request.adapter is not None:
        data["adapter"]["path"] = str(request.adapter.path)
    return data


def request_from_dict(data: dict) -> GenerationRequest:
    """The inverse of request_to_dict, for engines reached over HTTP or RPC (engine process, Modal)."""
    params = dict(data.get("params") or {})
    params["stop"] = tuple(params.get("stop", ()))
    adapter = data.get("adapter")
    prompt = data["prompt"]
    return GenerationRequest(
        prompt=prompt if isinstance(prompt, str) else tuple(prompt),
        params=SamplingParams(**params),
        adapter=AdapterRef(adapter["key"], Path(adapter["path"]), adapter["base_model"]) if adapter else None,
    )


async def collect(deltas: AsyncIterator[Delta]) -> Completion:
    """Run a stream to its end and join it into one completion. A stream that ends without a finish reason was cut
    short (its engine went away): that is a RequestFailed, never a complete answer."""
    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    last = Delta("")
    async for delta in deltas:
        text.append(delta.text)
        logprobs.extend(delta.logprobs)
        last = delta
    if last.finish_reason is None:
        raise RequestFailed("the engine ended the answer before it was complete", "engine_unavailable", 503)
    return Completion("".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens, tuple(logprobs))
