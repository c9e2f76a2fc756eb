"""The serving engine protocol: one base model, many adapters, requests in and text deltas out.

Every engine (the native batched engine, vLLM, a client of an engine process) implements `Engine`:
`generate(request)` is an async iterator of `Delta`s; closing it early (a client that went away) frees the
request's slot in the batch at once.

What an engine refuses or fails with is a domain refusal (app/errors.py): EngineError (Invalid, before anything is
queued), EngineBusy (Busy), RequestFailed (Failed) and its kinds AdapterFault (Invalid) and EngineUnavailable
(Unavailable). The engine process carries them to its client by kind (refusal_to_dict, refusal_from_dict); the API
maps the kind to its status (web/errors.py).
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from app.errors import KINDS, Busy, Failed, Invalid, Refusal, Unavailable, kind_of
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
    # n > 1: that many answers (OpenAI's choices), decoded side by side in the batch over one prefill of the prompt;
    # with a seed, answer i samples with seed + i (as vLLM's parallel sampling), so they differ and repeat
    n: int = 1
    # OpenAI's penalties (-2..2): logit -= presence * (count > 0) + frequency * count, count being how many times
    # the token was generated so far in this answer (the prompt does not count)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100) added to its logit at every step
    # When non-empty, the completion is exactly one of these strings, then the end of the sequence (a
    # classification adapter's labels): each step may only continue one of them, each encoded as plain text
    # (prompts.encode_text). min_new_tokens does not apply; logprobs are over the allowed tokens, renormalised.
    choices: tuple[str, ...] = ()
    # When set, the completion is JSON that validates against this JSON Schema (OpenAI's response_format; LoRAX's
    # too), decoded under its grammar (functions/engine/grammar.py): canonical JSON text (canonical_schema), which is
    # also the compiled grammar's cache key; {"type": "object"} for json_object. The grammar decides where the answer
    # ends: a stop sequence (which could cut the JSON) and min_new_tokens are refused with it, and so is beam search.
    json_schema: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or biases change the logits before the choice (sampling.choose)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def seed_of(self, index: int) -> int | None:
        """The seed of answer `index` (n > 1): seed + index, wrapped into what a torch generator takes; answer 0's
        is the seed itself."""
        if self.seed is None or index == 0:
            return self.seed
        return (self.seed + index) % (MAX_SEED + 1)


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
    id: int = -1  # the token's id in the base model's vocabulary (-1: not known)
    top_ids: tuple[int, ...] = ()  # the ids of `top`'s tokens, in its order (LoRAX's alternative tokens)


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
    index: int = 0  # which answer of the request it belongs to (0..n-1); each has its own last delta
    # On the last delta, when logprobs were asked: the end-of-sequence token that ended the answer, which the text
    # and `logprobs` leave out (LoRAX's details list it; web/lorax_replies.py)
    end_token: TokenLogprob | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class EngineError(Invalid):
    """A request the engine refuses before it is queued (too long, adapter of another base model); the message says
    why and `field` names the request's field at fault. The API answers it apart (web/inference.py)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)


class EngineBusy(Busy):
    """The engine's waiting queue is full: try again after `retry_after` seconds (whole, at least 1)."""

    def __init__(self, message: str, retry_after: float) -> None:
        wait = max(1, round(retry_after))
        super().__init__(f"{message}; retry after {wait} s", code="engine_busy", retry_after=wait)


class RequestFailed(Failed):
    """The engine could not finish this one request (a numeric fault in its output, a step that failed for it
    alone, an engine that broke down under it); the engine goes on serving the others. `code` is its
    machine-readable cause. The subclasses below are failures of another kind, named first among their bases (the
    kind app.errors.kind_of reads)."""

    def __init__(self, message: str, code: str = "generation_failed", field: str | None = None) -> None:
        super().__init__(message, field=field, code=code)


class AdapterFault(Invalid, RequestFailed):
    """The request's adapter is at fault (its output is not finite): the user's `model`, not the engine."""

    def __init__(self, message: str, code: str = "adapter_numeric_fault") -> None:
        super().__init__(message, code, field="model")


class EngineUnavailable(Unavailable, RequestFailed):
    """The engine did not start, went away, or is restarting; the message says why. Try again later."""

    def __init__(self, message: str, code: str = "engine_unavailable") -> None:
        super().__init__(message, code)


def refusal_to_dict(refusal: Refusal) -> dict[str, Any]:
    """A refusal as the engine process sends it (server.py): its kind by name (app.errors.KINDS), message, field,
    code and retry_after; `refused` marks an EngineError, which the API answers apart."""
    return {
        "error": refusal.message,
        "kind": kind_of(refusal).__name__,
        "field": refusal.field,
        "code": refusal.code,
        "retry_after": refusal.retry_after,
        "refused": isinstance(refusal, EngineError),
    }


def refusal_from_dict(data: dict[str, Any]) -> Refusal:
    """The inverse of refusal_to_dict, in the engine process's client (remote.py): an EngineError, or a refusal of
    the kind named."""
    if data.get("refused"):
        return EngineError(data["error"], data.get("field"))
    kind = KINDS[data["kind"]]
    return kind(data["error"], field=data.get("field"), code=data.get("code"), retry_after=data.get("retry_after"))


class Engine(Protocol):
    """What every engine offers. `tokenizer` is the base model's (a transformers tokenizer): callers encode chat
    prompts with it (functions.prompts.encode_chat) before `generate`. An engine class names Engine among its bases
    to take the defaults of `alive` and `run`."""

    base_model: str
    context_length: int
    tokenizer: Any

    def count_tokens(self, text: str) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Validates the request before the first delta (EngineError, EngineBusy) and then streams."""
        ...

    def stats(self) -> dict:
        """Load figures: running, waiting, kv_used_fraction, resident adapters, tokens generated."""
        ...

    def healthy(self) -> tuple[bool, str]:
        """(whether it makes progress, why not): an unhealthy engine is replaced by whoever started it."""
        ...

    def alive(self) -> bool:
        """Whether the engine can still serve at all: False once an engine's process exited (RemoteEngine), which
        is then replaced at once (functions/engine/__init__.py, supervisor.py). An engine in this process is."""
        return True

    def run(self) -> None:
        """Run the engine's loop on the calling thread until close() (the native engine started with
        background=False, in the engine process: server.py). An engine that runs its own loop returns at once."""
        return None

    def close(self) -> None:
        """Stop the engine (its thread or process); it serves nothing afterwards."""
        ...


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
MAX_CHOICES = 64  # a classification dataset has at most 50 labels (functions/datasets.MAX_CLASSES)
MAX_N = 8  # answers per request (n)
MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI's


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
    if len(params.choices) > MAX_CHOICES:
        raise EngineError(f"choices: at most {MAX_CHOICES}, got {len(params.choices)}", "choices")
    if not all(isinstance(choice, str) and choice for choice in params.choices):
        raise EngineError("choices must be non-empty strings", "choices")
    check_penalties(params)


def check_penalties(params: SamplingParams) -> None:
    """n, the penalties and logit_bias (its ids against a vocabulary: check_vocabulary)."""
    if not 1 <= params.n <= MAX_N:
        raise EngineError(f"n must be between 1 and {MAX_N}", "n")
    if params.n > 1 and params.num_beams > 1:
        raise EngineError("n > 1 cannot be combined with num_beams: beam search gives one answer", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(params, name) <= 2:
            raise EngineError(f"{name} must be between -2 and 2", name)
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise EngineError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(params.logit_bias)}", "logit_bias")
    if not all(-100 <= bias <= 100 for _, bias in params.logit_bias):
        raise EngineError("logit_bias: each bias must be between -100 and 100", "logit_bias")
    if params.num_beams > 1 and params.adjusts_logits:
        raise EngineError(
            "num_beams: beam search ranks the model's own log-probabilities; presence_penalty, frequency_penalty "
            "and logit_bias apply to sampling only",
            "num_beams",
        )


def check_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """Every token id of logit_bias is one the model scores (0 ≤ id < vocab_size)."""
    outside = [token for token, _ in params.logit_bias if not 0 <= token < vocab_size]
    if outside:
        raise EngineError(
            f"logit_bias: token id {outside[0]} is outside this model's vocabulary (0 to {vocab_size - 1})",
            "logit_bias",
        )
    if params.json_schema is not None:
        check_schema_request(params)


JSON_OBJECT_SCHEMA = '{"type":"object"}'  # response_format {"type": "json_object"}: any JSON object


def canonical_schema(schema: Any) -> str:
    """A JSON Schema as SamplingParams.json_schema holds it: compact JSON with sorted keys, so that one schema sent
    with its keys in any order is one cache entry."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_schema_request(params: SamplingParams) -> None:
    """What cannot go with a JSON schema, refused naming the field (whether the schema itself can be enforced, each
    engine's grammar library says: functions/engine/grammar.py)."""
    if params.choices:
        raise EngineError(
            "response_format: this model answers only with its labels (a classification adapter)", "response_format"
        )
    if params.stop:
        raise EngineError(
            "stop cannot be combined with response_format: a stop sequence could cut the JSON short; "
            "the schema decides where the answer ends",
            "stop",
        )
    if params.min_new_tokens:
        raise EngineError(
            "min_tokens cannot be combined with response_format: the schema decides where the answer ends", "min_tokens"
        )
    if params.num_beams > 1:
        raise EngineError("num_beams: beam search cannot be combined with response_format", "num_beams")


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
    params["choices"] = tuple(params.get("choices", ()))
    params["logit_bias"] = tuple((int(token), float(bias)) for token, bias in params.get("logit_bias", ()))
    adapter = data.get("adapter")
    prompt = data["prompt"]
    return GenerationRequest(
        prompt=prompt if isinstance(prompt, str) else tuple(prompt),
        params=SamplingParams(**params),
        adapter=AdapterRef(adapter["key"], Path(adapter["path"]), adapter["base_model"]) if adapter else None,
    )


def delta_from_dict(data: dict[str, Any]) -> Delta:
    """A Delta from its asdict() form, as engines reached over HTTP or RPC send it (remote.py, pool.py)."""
    end = data.get("end_token")
    return Delta(
        **(
            data
            | {
                "logprobs": tuple(_token_logprob(lp) for lp in data["logprobs"]),
                "end_token": _token_logprob(end) if end else None,
            }
        )
    )


def _token_logprob(data: dict[str, Any]) -> TokenLogprob:
    return TokenLogprob(
        data["token"],
        data["logprob"],
        tuple((t[0], t[1]) for t in data["top"]),
        data.get("id", -1),
        tuple(data.get("top_ids", ())),
    )


async def collect(deltas: AsyncIterator[Delta]) -> Completion:
    """Run a stream to its end and join it into one completion. A stream that ends without a finish reason was cut
    short (its engine went away): that is an EngineUnavailable, never a complete answer."""
    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    last = Delta("")
    async for delta in deltas:
        text.append(delta.text)
        logprobs.extend(delta.logprobs)
        last = delta
    if last.finish_reason is None:
        raise EngineUnavailable("the engine ended the answer before it was complete")
    return Completion("".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens, tuple(logprobs))
