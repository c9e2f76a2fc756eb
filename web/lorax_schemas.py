"""Request bodies of LoRAX's API (`POST /generate`, `/generate_stream`, and the root route lorax-client posts to),
as LoRAX's own server and the `lorax-client` package (lorax/types.py) spell them.

lorax-client sends every parameter, unset ones as null or their default (`watermark: false`), so a field is refused
only when it asks for something: `typical_p`, `watermark: true`, `best_of` above 1, `adapter_source`, and `api_token`
answer 400 naming the field (web/routers/lorax.py), as does a field LoRAX does not have. The
numbers keep the limits of the OpenAI routes (web/openai_schemas.py), so every dialect has the same.
"""

import json
import secrets
from typing import Any, Literal

from pydantic import Field

from app.settings import get_settings
from functions.engine.protocol import MAX_SEED, SamplingParams
from web.errors import APIError
from web.openai_schemas import DEFAULT_MAX_TOKENS, MAX_TOP_K, Body

MAX_STOP = 4  # LoRAX's default --max-stop-sequences
MAX_ALTERNATIVES = 20  # the engines' most alternatives per token (top_logprobs)


class ResponseFormat(Body):
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="A JSON Schema the answer follows; none: any JSON object."
    )


class Parameters(Body):
    adapter_id: str | None = Field(
        default=None,
        description="'repo/version', 'repo' (its latest version), 'repo/version@checkpoint', or a base model's "
        "name; none: the base model of the route (/v1/models/{base_model}/..., a deployment's).",
    )
    adapter_source: str | None = Field(default=None, description="Refused: adapters are the tenant's own repos.")
    merged_adapters: dict[str, Any] | None = Field(
        default=None,
        description="Serve a merge of these adapters of the route's base model ({ids, weights, merge_strategy, "
        "density, majority_sign_method}; functions/adapter_merge.py); adapter_id then is unset or the base model.",
    )
    api_token: str | None = Field(default=None, description="Refused: the API key is the Authorization header.")
    do_sample: bool = Field(default=False, description="false: greedy, unless a sampling field is set (as LoRAX).")
    max_new_tokens: int | None = Field(default=None, ge=1, description=f"Default {DEFAULT_MAX_TOKENS}.")
    ignore_eos_token: bool = Field(default=False, description="Generate max_new_tokens, whatever the model says.")
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    return_full_text: bool = Field(default=False, description="generated_text starts with `inputs`.")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    top_p: float | None = Field(default=None, gt=0, le=1)
    truncate: int | None = Field(default=None, ge=1, description="Keep only the last `truncate` prompt tokens.")
    typical_p: float | None = Field(default=None, description="Refused: the engines do not implement it.")
    best_of: int | None = Field(default=None, ge=1, description="Only 1.")
    watermark: bool = Field(default=False, description="Refused when true.")
    details: bool = False
    decoder_input_details: bool = Field(default=False, description="details.prefill: the prompt's tokens.")
    return_k_alternatives: int | None = Field(default=None, ge=1, le=MAX_ALTERNATIVES)
    response_format: ResponseFormat | None = None

    def refusal(self) -> APIError | None:
        """The first parameter set to something this server does not do (400 naming it), or None."""
        refused = {
            "typical_p": (self.typical_p is not None, "typical decoding is not implemented by the engines"),
            "watermark": (self.watermark, "watermarking is not implemented"),
            "best_of": (
                (self.best_of or 1) > 1,
                "only 1: send several requests, each with its own seed, to sample several answers",
            ),
            "adapter_source": (
                self.adapter_source is not None,
                "adapters are your own repos here ('repo/version'): import a PEFT adapter with "
                "POST /v1/repos/{name}/versions, and leave adapter_source unset",
            ),
            "api_token": (
                self.api_token is not None,
                "the API key goes in the Authorization header; leave api_token unset",
            ),
        }
        for name, (asked, why) in refused.items():
            if asked:
                param = f"parameters.{name}"
                return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")
        return None

    @property
    def sampling_asked(self) -> bool:
        """LoRAX samples when do_sample is set or a sampling field departs from its neutral value; else greedy.
        A temperature of 0 is greedy whatever else is set."""
        if self.temperature == 0:
            return False
        warped = (self.temperature or 1.0) != 1.0 or self.top_k is not None or (self.top_p or 1.0) < 1.0
        return self.do_sample or warped

    def sampling(self) -> SamplingParams:
        """The engine's parameters. Logprobs are always asked: every token LoRAX answers carries its id and logprob.
        Sampling without a seed gets a random one, which details.seed reports, so the answer can be had again."""
        max_new = self.max_new_tokens or DEFAULT_MAX_TOKENS
        limit = get_settings().limits.max_new_tokens_limit
        if max_new > limit:
            param = "parameters.max_new_tokens"
            raise APIError(400, f"{param}: at most {limit} (LORAPLEX_MAX_NEW_TOKENS_LIMIT)", param=param)
        sample = self.sampling_asked
        seed = (self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)) if sample else None
        return SamplingParams(
            max_new_tokens=max_new,
            min_new_tokens=max_new if self.ignore_eos_token else 0,
            temperature=(self.temperature or 1.0) if sample else 0.0,
            top_p=(self.top_p or 1.0) if sample else 1.0,
            top_k=(self.top_k or 0) if sample else 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            stop=tuple(self.stop),
            seed=seed,
            logprobs=True,
            top_logprobs=self.return_k_alternatives or 0,
            json_schema=self.json_schema,
        )

    @property
    def json_schema(self) -> str | None:
        """response_format's schema as canonical JSON text (one schema, one text: the engines cache by it)."""
        if self.response_format is None:
            return None
        schema = self.response_format.schema_ if self.response_format.schema_ is not None else {"type": "object"}
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class GenerateRequest(Body):
    """`POST /generate` and `POST /generate_stream`."""

    inputs: str = Field(min_length=1, description="The prompt, as plain text (no chat template is applied).")
    parameters: Parameters = Field(default_factory=Parameters)


class CompatRequest(GenerateRequest):
    """The root route (`POST /`, `/v1/models/{base_model}`, `/v1/deployments/{name}`), which lorax-client's
    `generate` and `generate_stream` post to: `stream` picks the answer (LoRAX's compat_generate)."""

    stream: bool = False
