"""Structured output through the OpenAI-compatible API, driven by the official `openai` SDK: response_format
json_schema and json_object on chat and text completions, streamed or not, on the base model and an imported
adapter, every complete answer valid under its schema; schemas that cannot be enforced, and what cannot go with
one, are a 400 naming the field; `text` is the default. One test runs the real SmolLM2 with an adapter."""

import itertools
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import TINY_MODEL
from conftest import openai_sdk as sdk
from lora_helpers import build_lora

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "mood": {"enum": ["happy", "sad"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
AS_PERSON: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
HELLO: Any = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(autouse=True)
def no_free_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_FREE_TOKENS_PER_DAY", "0")


def import_lora(client: Any, headers: dict[str, str], repo: str, lora: Path, base_model: str = TINY_MODEL) -> str:
    files = [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = client.post(f"/v1/repos/{repo}/versions", headers=headers, files=files, data={"base_model": base_model})
    assert r.status_code == 201, r.text
    return str(r.json()["name"])


def validated(text: str, finish_reason: str | None, schema: dict[str, Any]) -> Any:
    assert finish_reason == "stop", text
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_chat_and_completions_answer_json_under_the_schema(
    client: Any, alice: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    api = sdk(client, alice)
    adapter = import_lora(client, alice, "shaped", build_lora(tiny_model_dir, tmp_path / "lora", seed=4))
    for model in (TINY_MODEL, adapter):
        reply = api.chat.completions.create(
            model=model, messages=HELLO, response_format=AS_PERSON, max_tokens=120, temperature=0
        )
        choice = reply.choices[0]
        validated(choice.message.content or "", choice.finish_reason, PERSON)

        chunks = list(
            api.chat.completions.create(
                model=model, messages=HELLO, response_format=AS_PERSON, max_tokens=120, temperature=0, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content  # the same greedy answer, streamed
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

        sampled = api.chat.completions.create(
            model=model, messages=HELLO, response_format=AS_PERSON, max_tokens=120, temperature=1.0, seed=7
        )
        validated(sampled.choices[0].message.content or "", sampled.choices[0].finish_reason, PERSON)

        text = api.completions.create(
            model=model,
            prompt="A person as JSON:",
            max_tokens=120,
            temperature=0,
            extra_body={"response_format": AS_PERSON},  # the SDK's completions take no response_format argument
        )
        validated(text.choices[0].text, text.choices[0].finish_reason, PERSON)
        streamed = "".join(
            c.choices[0].text
            for c in api.completions.create(
                model=model,
                prompt="A person as JSON:",
                max_tokens=120,
                temperature=0,
                stream=True,
                extra_body={"response_format": AS_PERSON},
            )
            if c.choices
        )
        assert streamed == text.choices[0].text


def test_json_object_and_text(client: Any, alice: dict[str, str]) -> None:
    api = sdk(client, alice)
    reply = api.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, response_format={"type": "json_object"}, max_tokens=200, temperature=0
    )
    content, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # a random model may add keys until max_tokens: the answer says it was cut
        assert finish == "length" and content.startswith("{")
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in api.chat.completions.create(
            model=TINY_MODEL,
            messages=HELLO,
            response_format={"type": "json_object"},
            max_tokens=200,
            temperature=0,
            stream=True,
        )
        if c.choices
    )
    assert streamed == content
    cut = api.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, response_format=AS_PERSON, max_tokens=4, temperature=0
    )
    assert cut.choices[0].finish_reason == "length"  # cut by max_tokens: says so, and is no valid JSON
    plain = api.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, temperature=0)
    as_text = api.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, max_tokens=8, temperature=0, response_format={"type": "text"}
    )
    assert as_text.choices[0].message.content == plain.choices[0].message.content  # text: the default


REFUSED: list[tuple[Any, dict[str, Any], str]] = [  # (response_format, other fields, the field named)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, {}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, {}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}, {}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, {}, "response_format"),
    ({"type": "json_schema"}, {}, "response_format"),
    ({"type": "xml"}, {}, "response_format"),
    ({"type": "json_object"}, {"stop": ["}"]}, "stop"),
    ({"type": "json_object"}, {"min_tokens": 3}, "min_tokens"),
]


def test_what_cannot_be_enforced_is_a_400_naming_the_field(client: Any, alice: dict[str, str]) -> None:
    for (response_format, extra, param), (route, body) in itertools.product(
        REFUSED, [("/v1/chat/completions", {"messages": HELLO}), ("/v1/completions", {"prompt": "JSON:"})]
    ):
        r = client.post(
            route,
            headers=alice,
            json={"model": TINY_MODEL, "max_tokens": 8, "response_format": response_format} | body | extra,
        )
        malformed = param == "response_format" and (
            response_format["type"] not in ("json_object", "json_schema")
            or not isinstance(response_format.get("json_schema", {}).get("schema"), dict)
        )
        # a schema that cannot be enforced: 400; a response_format of the wrong shape: the edge's 4xx for a field
        assert r.status_code in ((400, 422) if malformed else (400,)), r.text
        error = r.json()["error"]
        assert error["param"] is not None and error["param"].startswith(param), (response_format, error)
    time.sleep(1.1)  # the refusals above count against the shared endpoints' 10 requests a second per tenant
    ok = sdk(client, alice).chat.completions.create(  # and the engine goes on serving
        model=TINY_MODEL, messages=HELLO, response_format=AS_PERSON, max_tokens=120, temperature=0
    )
    validated(ok.choices[0].message.content or "", ok.choices[0].finish_reason, PERSON)


@pytest.mark.slow
def test_the_real_model_with_an_adapter_answers_under_the_schema(
    client: Any, alice: dict[str, str], bundled_model: Path, tmp_path: Path
) -> None:
    api = sdk(client, alice)
    adapter = import_lora(
        client, alice, "real", build_lora(bundled_model, tmp_path / "lora", seed=2, b_scale=0.02), "smollm2-135m"
    )
    ticket = {
        "type": "object",
        "properties": {
            "category": {"enum": ["billing", "shipping", "other"]},
            "urgent": {"type": "boolean"},
            "summary": {"type": "string", "maxLength": 60},
        },
        "required": ["category", "urgent", "summary"],
        "additionalProperties": False,
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": ticket}}
    messages: Any = [{"role": "user", "content": "Triage this ticket as JSON: my parcel arrived damaged."}]
    for model in ("smollm2-135m", adapter):
        reply = api.chat.completions.create(
            model=model, messages=messages, response_format=fmt, max_tokens=60, temperature=0
        )
        validated(reply.choices[0].message.content or "", reply.choices[0].finish_reason, ticket)
