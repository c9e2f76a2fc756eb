"""Text generation over LoRAX's API (web/routers/lorax.py), as `lorax-client` and Predibase's
`pb.deployments.client(name)` do it: `generate` answers a Response (`generated_text`, `details`), `generate_stream`
yields a StreamResponse per token (`token.text`; the last one also has `generated_text` and `details`).

Where the request goes: `name` a catalog base model -> the shared endpoints `/v1/models/{name}/generate...`;
otherwise the private deployment `/v1/deployments/{name}/generate...`. `adapter_id` ("repo/1", "repo") picks the
adapter; none: the base model alone."""

import json
from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from loraplex.api import Api
from loraplex.errors import LoraplexError
from loraplex.transport import parse_sse

GENERATE_READ_TIMEOUT = 600.0  # a cold deployment scales up from zero before it answers
# An error event mid-stream carries LoRAX's error_type, not a status: the status an answer of that type would have.
STREAM_ERROR_STATUS = {"validation": 422, "overloaded": 429}


class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields a newer server adds are kept


class AlternativeToken(_Reply):
    id: int
    text: str
    logprob: float


class Token(_Reply):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    alternative_tokens: list[AlternativeToken] | None = None


class StreamDetails(_Reply):
    finish_reason: str  # length | eos_token | stop_sequence
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class Details(StreamDetails):
    prefill: list[dict[str, Any]] = []
    tokens: list[Token] = []


class Response(_Reply):
    generated_text: str
    details: Details | None = None


class StreamResponse(_Reply):
    token: Token
    generated_text: str | None = None  # the last event only
    details: StreamDetails | None = None  # the last event only


class DeploymentClient:
    def __init__(self, client: Api, name: str) -> None:
        self._client, self.name = client, name
        self._prefix: str | None = None

    def generate(
        self,
        prompt: str,
        adapter_id: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        stop_sequences: list[str] | None = None,
        details: bool = True,
        **parameters: Any,
    ) -> Response:
        """One answer. `parameters`: LoRAX's others (top_p, top_k, seed, do_sample, repetition_penalty,
        return_full_text, truncate, decoder_input_details, return_k_alternatives, response_format, ...); one the
        server does not do is refused with a 400 naming it."""
        body = self._body(prompt, adapter_id, max_new_tokens, temperature, stop_sequences, details, parameters)
        timeout = httpx.Timeout(self._client.timeout, connect=10.0, read=GENERATE_READ_TIMEOUT)
        reply = self._client._request("POST", f"{self._route()}/generate", json=body, timeout=timeout)
        return Response.model_validate(reply.json())

    def generate_stream(
        self,
        prompt: str,
        adapter_id: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        stop_sequences: list[str] | None = None,
        details: bool = True,
        **parameters: Any,
    ) -> Iterator[StreamResponse]:
        """The answer token by token, as it is generated. An error before the first token raises LoraplexError
        (retried first when it is a 429 or 5xx); one mid-stream (the server's error event) raises it there."""
        body = self._body(prompt, adapter_id, max_new_tokens, temperature, stop_sequences, details, parameters)
        timeout = httpx.Timeout(self._client.timeout, connect=10.0, read=GENERATE_READ_TIMEOUT)
        response = self._client._transport.open_stream(
            "POST", f"{self._route()}/generate_stream", json=body, timeout=timeout
        )
        try:
            for _, data, _ in parse_sse(response.iter_lines()):
                payload = json.loads(data)
                if "error" in payload:  # the server's error event: the stream cannot complete
                    raise LoraplexError.from_body(STREAM_ERROR_STATUS.get(payload.get("error_type"), 500), payload)
                yield StreamResponse.model_validate(payload)
        finally:
            response.close()

    def _body(
        self,
        prompt: str,
        adapter_id: str | None,
        max_new_tokens: int | None,
        temperature: float | None,
        stop_sequences: list[str] | None,
        details: bool,
        parameters: dict[str, Any],
    ) -> dict[str, Any]:
        named = {"adapter_id": adapter_id, "max_new_tokens": max_new_tokens, "temperature": temperature}
        given = {k: v for k, v in (named | parameters).items() if v is not None}
        return {"inputs": prompt, "parameters": given | {"stop": stop_sequences or [], "details": details}}

    def _route(self) -> str:
        """The route prefix, decided once: a catalog base model's name (a /v1/models entry without `root`) is the
        shared endpoints', anything else a deployment's."""
        if self._prefix is None:
            base_models = {m["id"] for m in self._client.list_models() if not m.get("root")}
            kind = "models" if self.name in base_models else "deployments"
            self._prefix = f"/v1/{kind}/{self.name}"
        return self._prefix
