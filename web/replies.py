"""OpenAI's reply shapes for one completion request, chat or legacy: the whole body, a stream's chunks, usage and
logprobs, and server-sent events, down to the error event that ends a stream which could not complete."""

import json
import time
import uuid
from typing import Any

from app.errors import Refusal
from functions.engine.protocol import Completion, Delta, TokenLogprob
from web.errors import error_body, status_of

DONE = "data: [DONE]\n\n"  # a stream's last event when it completed


class Reply:
    """The bodies and chunks of one request's answer, under one id; `model` is echoed as the request gave it."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}  # characters sent so far, per answer (legacy completions logprobs)

    def usage(self, prompt_tokens: int, completion_tokens: int, cost: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "cost_micro_usd": cost,
        }

    def logprobs(self, logprobs: tuple[TokenLogprob, ...], text: str, index: int = 0) -> dict[str, Any] | None:
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
        offsets, at = [], self.text_offsets.get(index, 0)
        for lp in logprobs:
            offsets.append(at)
            at += len(lp.token)
        self.text_offsets[index] = self.text_offsets.get(index, 0) + len(text)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) for lp in logprobs],
            "text_offset": offsets,
        }

    def full(self, completion: Completion | list[Completion], cost: int) -> dict[str, Any]:
        """The whole answer of a request that was not streamed: one completion per answer (n), in index order. The
        usage counts the prompt once and every answer's tokens."""
        completions = completion if isinstance(completion, list) else [completion]
        choices = []
        for index, answer in enumerate(completions):
            logprobs = self.logprobs(answer.logprobs, answer.text, index)
            if self.chat:
                choice = {
                    "index": index,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": answer.finish_reason,
                    "logprobs": logprobs,
                }
            else:
                choice = {
                    "index": index,
                    "text": answer.text,
                    "finish_reason": answer.finish_reason,
                    "logprobs": logprobs,
                }
            choices.append(choice)
        generated = sum(answer.completion_tokens for answer in completions)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(completions[0].prompt_tokens, generated, cost),
        }

    def chunk(self, delta: Delta | None, finish: str | None, role: bool = False, index: int = 0) -> dict[str, Any]:
        """One chunk of a stream: `delta`'s text (None: none), `finish` on an answer's last, `role` on a chat's
        first; for answer `index` (the delta's own when there is one)."""
        index = delta.index if delta is not None else index
        text = delta.text if delta is not None else None
        logprobs = self.logprobs(delta.logprobs, delta.text, index) if delta is not None else None
        if self.chat:
            content: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                content["content"] = text
            choice = {"index": index, "delta": content, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cost: int) -> dict[str, Any]:
        """The chunk after the last one when the client asked for usage (stream_options.include_usage)."""
        return self.chunk(None, None) | {
            "choices": [],
            "usage": self.usage(prompt_tokens, completion_tokens, cost),
        }


def event(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


def error_event(refusal: Refusal) -> str:
    """The event that ends a stream which cannot complete, in OpenAI's streaming shape ({"error": {...}}, no
    finish_reason, no [DONE]: the openai SDK raises it)."""
    return event(error_body(status_of(refusal), refusal.message, refusal.field, refusal.code))
