"""Request bodies of the OpenAI-compatible API (plus LoRAX's top_k and repetition_penalty), for the shared endpoints
and private deployments alike, so every route and dialect has the same limits.

Every number is kept within what the engines take, here at the edge, so a request can never fail inside an engine
step that other tenants' requests share. Types are strict, as OpenAI's are ("0.5" is no temperature, true no
max_tokens), and a field we do not implement is refused, naming it, rather than silently ignored.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.settings import get_settings
from functions.engine.protocol import (
    JSON_OBJECT_SCHEMA,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_SEED,
    SamplingParams,
    canonical_schema,
)

DEFAULT_MAX_TOKENS = 512
# Sampling from more than the 1000 likeliest tokens is no top-k at all; every served vocabulary is larger than
# this, so no engine is ever asked for more tokens than it has.
MAX_TOP_K = 1000


TOOLS_REFUSED = (
    "tool calling is not supported by this server: no answer carries tool_calls, and tool messages are not taken "
    "back. For output in a given shape, ask for JSON under a schema: "
    "response_format={'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
)
NOT_STORED = "this server does not store completions (store: false is the only value; metadata tags stored ones)"
# OpenAI's request fields this server does not implement: a request that names one is refused with a 400 naming it
# and saying why, never answered as if the field had not been sent. null, and the values in ASKS_NOTHING, ask for
# nothing and are taken as absent.
REFUSED: dict[str, str] = {
    **{name: TOOLS_REFUSED for name in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")},
    "store": NOT_STORED,
    "metadata": NOT_STORED,
    "audio": "answers are text only: audio output is not supported",
    "modalities": "answers are text only: modalities may only be ['text']",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "not supported: the served models answer without a separate reasoning phase",
    "verbosity": "not supported: use max_tokens (or max_completion_tokens) and the prompt",
    "web_search_options": "web search is not supported",
    "service_tier": "one service tier: only 'auto' or 'default'",
    "prompt_cache_key": "not supported: this server keeps no prompt cache between requests",
    "prompt_cache_retention": "not supported: this server keeps no prompt cache between requests",
    "moderation": "moderation is not supported",
    "suffix": "not supported: the answer continues the prompt, nothing is inserted before a suffix",
    "echo": "not supported: the answer holds the completion only (echo may only be false)",
    "best_of": "not supported beyond 1: every answer is returned; ask for n of them",
}
ASKS_NOTHING: dict[str, tuple[Any, ...]] = {
    "store": (False,),
    "echo": (False,),
    "best_of": (1,),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
}


class Body(BaseModel):
    """Strict types, and no field we do not implement (see above)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data: Any) -> Any:
        """A tool's answer (role "tool" or "function") or an assistant's tool call: tool calling is refused."""
        if isinstance(data, dict) and (
            data.get("role") in ("tool", "function") or data.get("tool_calls") or data.get("function_call")
        ):
            raise ValueError(TOOLS_REFUSED)
        return data

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class MergedAdapters(Body):
    """LoRAX's `merged_adapters` (a Loraplex extension here): the request is served by a merge of these adapters of
    the base model that `model` names, computed once per recipe (functions/adapter_merge.py, which checks the values
    and says the methods)."""

    ids: list[str] = Field(description="2 to 8 adapters of the base model: 'repo/3', 'repo/3@2' or 'repo'.")
    weights: list[float] | None = Field(default=None, description="One per id (default 1 each); negative subtracts.")
    merge_strategy: str | None = Field(default=None, description="linear (default), ties, dare_linear or dare_ties.")
    density: float | None = Field(default=None, description="ties and DARE: the fraction of weights kept, (0, 1].")
    majority_sign_method: str | None = Field(default=None, description="ties methods: total (default) or frequency.")


class JsonSchemaSpec(Body):
    """OpenAI's `json_schema` of a response_format: the answer is JSON valid under `schema`."""

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The schema's name (not used).")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON Schema (an object); enforced, strict or not.")
    strict: bool | None = Field(default=None, description="Accepted: the schema is always enforced exactly.")


class ResponseFormat(Body):
    """OpenAI's response_format: `text` (the default), `json_object` (any JSON object) or `json_schema`. The JSON
    ones are enforced by constrained decoding (SamplingParams.json_schema); a schema that cannot be enforced is a
    400 naming response_format, and so are stop sequences and min_tokens with it (the schema decides the end)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_for_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self

    def schema_text(self) -> str | None:
        """The schema as SamplingParams.json_schema holds it (canonical JSON text); None for free text."""
        if self.json_schema is not None:
            return canonical_schema(self.json_schema.schema_)
        return JSON_OBJECT_SCHEMA if self.type == "json_object" else None


class SamplingFields(Body):
    model: str = Field(description="A base model name, 'repo/version', or 'repo' for its latest version.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K, description="LoRAX extension; 0 disables top-k.")
    repetition_penalty: float = Field(default=1.0, gt=0, le=10, description="LoRAX extension.")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    min_tokens: int = Field(default=0, ge=0, description="vLLM extension: end-of-sequence is held off until then.")
    num_beams: int = Field(default=1, ge=1, le=8, description="Loraplex extension: beam search width (greedy).")
    n: int = Field(default=1, ge=1, le=MAX_N, description="Answers (choices) to the one prompt, decoded side by side.")
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (a decimal string) -> bias from -100 to 100, added to its logit."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id (OpenAI's abuse monitoring); accepted, not used for the answer
    safety_identifier: str | None = None  # the same, under its newer name
    merged_adapters: MergedAdapters | None = Field(
        default=None, description="LoRAX extension: serve a merge of these adapters; `model` names their base model."
    )
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        """OpenAI's fields this server does not implement (REFUSED), each refused by name and why."""
        if not isinstance(data, dict):
            return data
        for name, why in REFUSED.items():
            value = data.get(name)
            if value is not None and not any(
                value == ok and type(value) is type(ok) for ok in ASKS_NOTHING.get(name, ())
            ):
                raise ValueError(f"{name}: {why}")
        return {key: value for key, value in data.items() if key not in REFUSED}

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens, got {len(value)}")
        for token, bias in value.items():
            if not token.isdecimal():
                raise ValueError(f"keys are token ids written as decimal strings, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} must be between -100 and 100, not {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        limit = get_settings().limits.max_new_tokens_limit
        if value is not None and value > limit:
            raise ValueError(f"at most {limit} (LORAPLEX_MAX_NEW_TOKENS_LIMIT)")
        return value

    @model_validator(mode="after")
    def _min_tokens(self) -> "SamplingFields":
        most = self.requested_max_tokens or DEFAULT_MAX_TOKENS
        if self.min_tokens > most:
            unset = "" if self.requested_max_tokens else ", the default when max_tokens is unset"
            raise ValueError(f"min_tokens: at most max_tokens ({most}{unset})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_request(self) -> tuple[bool, int]:
        """(per-token logprobs wanted, alternatives per token)."""
        return False, 0

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, top = self.logprob_request()
        return SamplingParams(
            max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            seed=self.seed,
            min_new_tokens=self.min_tokens,
            num_beams=self.num_beams,
            logprobs=logprobs,
            top_logprobs=top,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items()),
            json_schema=self.response_format.schema_text() if self.response_format else None,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs, (self.top_logprobs or 0) if self.logprobs else 0

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Legacy: alternatives per token.")

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send exactly one prompt per request")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
