"""LoRAX's answer shapes, as lorax-client's pydantic types (lorax/types.py) parse them:

    /generate          {"generated_text", "details": null | {"finish_reason", "prompt_tokens", "generated_tokens",
                         "seed", "prefill": [{"id", "text", "logprob"}], "tokens": [Token], "best_of_sequences"}}
    /generate_stream   data:{"token": Token, "generated_text": null, "details": null}   one event per token; the last
                       data:{"token": Token, "generated_text": "...", "details": {"finish_reason", "prompt_tokens",
                                                                              "generated_tokens", "seed"}}
    errors             {"error": "message", "error_type": "validation" | "overloaded" | "generation", ...}

where Token is {"id", "text", "logprob", "special", "alternative_tokens": null | [{"id", "text", "logprob"}]}.

finish_reason is LoRAX's: "length", "eos_token" (the model ended: the end-of-sequence token is the last token), or
"stop_sequence" (a `stop` string ended it). The tokens are every token generated, the end-of-sequence one included
(special: true), so generated_tokens counts it as LoRAX does; generated_text leaves it out, and ends before a stop
sequence, as the OpenAI routes do. The prefill's tokens are the prompt's ids and texts; their logprobs are null: the
engines score generated tokens only.
"""

import json
from typing import Any

from functions.engine.protocol import FinishReason, TokenLogprob
from web.errors import TYPES


class LoraxReply:
    """One request's answer in LoRAX's shapes. `prompt_ids`: the tokens the engine was given; `seed`: the seed
    sampling used (None: greedy)."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        seed: int | None,
        stops: tuple[str, ...],
        prefix: str = "",  # return_full_text: the inputs, put before the generated text
    ) -> None:
        self.tokenizer, self.prompt_ids, self.seed, self.stops, self.prefix = tokenizer, prompt_ids, seed, stops, prefix
        self.special = set(tokenizer.all_special_ids)
        self.eos = tokenizer.eos_token_id

    def token(self, lp: TokenLogprob) -> dict[str, Any]:
        alternatives = [
            {"id": tid, "text": text, "logprob": logprob}
            for tid, (text, logprob) in zip(lp.top_ids, lp.top, strict=True)
        ]
        return {
            "id": lp.id,
            "text": lp.token,
            "logprob": lp.logprob,
            "special": lp.id in self.special,
            "alternative_tokens": alternatives or None,
        }

    def finish_reason(self, reason: FinishReason, tokens: list[TokenLogprob]) -> str:
        """LoRAX's finish reason from the engine's ("stop" is the model's end, or a stop sequence's)."""
        if reason == "length":
            return "length"
        if tokens and tokens[-1].id == self.eos:
            return "eos_token"
        return "stop_sequence" if self.stops else "eos_token"

    def details(
        self, reason: FinishReason, prompt_tokens: int, tokens: list[TokenLogprob], prefill: bool
    ) -> dict[str, Any]:
        return self.stream_details(reason, prompt_tokens, tokens) | {
            "prefill": self._prefill() if prefill else [],
            "tokens": [self.token(lp) for lp in tokens],
            "best_of_sequences": None,
        }

    def stream_details(self, reason: FinishReason, prompt_tokens: int, tokens: list[TokenLogprob]) -> dict[str, Any]:
        return {
            "finish_reason": self.finish_reason(reason, tokens),
            "prompt_tokens": prompt_tokens,
            "generated_tokens": len(tokens),
            "seed": self.seed,
        }

    def full(self, text: str, details: dict[str, Any] | None) -> dict[str, Any]:
        return {"generated_text": self.prefix + text, "details": details}

    def _prefill(self) -> list[dict[str, Any]]:
        decode = self.tokenizer.decode
        return [{"id": tid, "text": decode([tid]), "logprob": None} for tid in self.prompt_ids]


def event(payload: dict[str, Any]) -> str:
    """One server-sent event as LoRAX writes it."""
    return f"data:{json.dumps(payload)}\n\n"


# LoRAX's error types; lorax-client raises ValidationError, OverloadedError or GenerationError by them, and by the
# status (BadRequestError, NotFoundError, ...) for an error without one.
ERROR_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, **extra: Any) -> dict:
    """LoRAX's error shape ({"error": message, "error_type"}), with the platform's param, code and type beside it;
    the error handler answers with it on LoRAX's routes (web/errors.py)."""
    error_type = ERROR_TYPES.get(status, "generation" if status >= 500 else None)
    kind = {"error_type": error_type} if error_type else {}
    return {"error": message, **kind, "type": TYPES.get(status, "api_error"), "param": param, "code": code} | extra
