"""Structured output (SamplingParams.json_schema) on the native engine with the tiny Llama: every answer parses and
validates against its schema (nested objects, arrays, enums, numbers, required and optional fields), greedy and
sampled; constrained, free and adapter rows decode in one batch and the free rows' tokens are those they get alone;
a cut answer says "length"; schemas llguidance cannot enforce, and what cannot go with a schema, are refused naming
the field before anything is queued, while the engine goes on serving; compiled schemas are cached (LRU); the field
crosses the engine process's wire format."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import TINY_MODEL
from functions.engine.grammar import SchemaGrammars
from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import (
    JSON_OBJECT_SCHEMA,
    AdapterRef,
    Completion,
    EngineError,
    GenerationRequest,
    SamplingParams,
    canonical_schema,
    collect,
    request_from_dict,
    request_to_dict,
)
from functions.prompts import encode_chat
from lora_helpers import build_lora

NAME = {"type": "string", "maxLength": 12}
# A number's digits are unbounded in JSON; a random model keeps adding them, so the tests' numbers are steps of 1/4
# (a real model ends its numbers; the figures of a cut answer are tested below)
QUARTER = {"type": "number", "multipleOf": 0.25}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": NAME,
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": NAME},
                "required": ["id", "email"],
                "additionalProperties": False,
            },
            "meta": {
                "type": "object",
                "properties": {"source": {"enum": ["web", "mail"]}},
                "required": ["source"],
                "additionalProperties": False,
            },
        },
        "required": ["user", "meta"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
            "scores": {"type": "array", "items": QUARTER | {"minimum": 0, "maximum": 1}, "maxItems": 4},
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "priority": {"type": "integer", "enum": [1, 2, 3]},
        },
        "required": ["label", "priority"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {"title": NAME, "note": NAME, "count": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["title"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"x": QUARTER | {"minimum": -10, "maximum": 10}, "y": {"enum": [True, False, None]}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora(tiny_model_dir, tmp_path_factory.mktemp("structured") / "a", seed=11)


@pytest.fixture
def engine(sqlite_platform: object) -> Iterator[NativeEngine]:
    engine = NativeEngine(TINY_MODEL, config=EngineConfig(dtype="fp32", adapter_slots=2, kv_cache_bytes=16 * 2**20))
    yield engine
    engine.close()


def chat(engine: NativeEngine, text: str = "Answer in JSON.") -> tuple[int, ...]:
    return encode_chat(engine.tokenizer, [{"role": "user", "content": text}])


def ask(engine: NativeEngine, prompt: tuple[int, ...] | str, adapter: AdapterRef | None = None, **kw: Any) -> Any:
    """The coroutine of one request's whole answer (greedy, 200 new tokens unless told)."""
    params = SamplingParams(**({"max_new_tokens": 200, "temperature": 0.0} | kw))
    return collect(engine.generate(GenerationRequest(prompt, params, adapter)))


def run(
    engine: NativeEngine, prompt: tuple[int, ...] | str, adapter: AdapterRef | None = None, **kw: Any
) -> Completion:
    return asyncio.run(ask(engine, prompt, adapter, **kw))


def valid(completion: Completion, schema: dict[str, Any]) -> Any:
    """The answer's JSON, checked against the schema (a complete answer: ended by the grammar, not max_tokens)."""
    assert completion.finish_reason == "stop", completion
    value = json.loads(completion.text)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_answer_validates_greedy_and_sampled(engine: NativeEngine, name: str, adapter_dir: Path) -> None:
    schema = SCHEMAS[name]
    text = canonical_schema(schema)
    adapter = AdapterRef("s", adapter_dir, TINY_MODEL)
    valid(run(engine, chat(engine), json_schema=text), schema)
    valid(run(engine, chat(engine), adapter, json_schema=text), schema)
    valid(run(engine, "Plain text prompt:", json_schema=text), schema)  # a completion's text prompt too
    for seed in range(3):
        valid(run(engine, chat(engine), json_schema=text, temperature=1.0, top_p=0.95, seed=seed), schema)
    with_logprobs = run(engine, chat(engine), json_schema=text, logprobs=True, top_logprobs=3)
    valid(with_logprobs, schema)
    for lp in with_logprobs.logprobs:  # renormalised over the allowed tokens; no masked token is an alternative
        assert all(v > -float("inf") for _, v in lp.top)
        assert sum(pow(2.718281828, v) for _, v in lp.top) <= 1.0 + 1e-4


def test_json_object_is_any_object(engine: NativeEngine) -> None:
    got = run(engine, chat(engine), json_schema=JSON_OBJECT_SCHEMA, max_new_tokens=400)
    if got.finish_reason == "stop":  # a random model may keep adding keys: then it is cut, and says so
        assert isinstance(json.loads(got.text), dict)
    else:
        assert got.finish_reason == "length" and got.text.startswith("{")


def test_a_cut_answer_says_length(engine: NativeEngine) -> None:
    got = run(engine, chat(engine), json_schema=canonical_schema(SCHEMAS["nested"]), max_new_tokens=3)
    assert got.finish_reason == "length" and got.completion_tokens == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(got.text)


def test_constrained_free_and_adapter_rows_share_one_batch(engine: NativeEngine, adapter_dir: Path) -> None:
    """Constrained and free requests of different adapters decode in the same steps; a free row's tokens are those it
    gets alone (a constrained neighbour changes nothing of it), and so are a constrained row's."""
    adapter = AdapterRef("mixed", adapter_dir, TINY_MODEL)
    flat, enums = canonical_schema(SCHEMAS["flat"]), canonical_schema(SCHEMAS["enums"])
    asks: list[tuple[AdapterRef | None, dict[str, Any]]] = [
        (None, {"json_schema": flat}),
        (adapter, {"json_schema": enums}),
        (None, {}),
        (adapter, {}),
        (adapter, {"json_schema": flat, "temperature": 0.8, "seed": 3}),
        (None, {"temperature": 0.8, "seed": 3}),
    ]
    prompt = chat(engine, "Describe a person.")
    run(engine, prompt, adapter, max_new_tokens=1)  # resident first: a loading adapter's request joins later
    run(engine, prompt, json_schema=flat, max_new_tokens=1)  # and both schemas compiled
    run(engine, prompt, json_schema=enums, max_new_tokens=1)

    async def together() -> list[Completion]:
        return list(await asyncio.gather(*(ask(engine, prompt, a, max_new_tokens=40, **kw) for a, kw in asks)))

    steps = engine.steps
    mixed = asyncio.run(together())
    assert engine.steps - steps <= 40 + 1  # one batch: the longest answer's steps, not one run after another
    for (adapter_ref, kw), got in zip(asks, mixed, strict=True):
        alone = run(engine, prompt, adapter_ref, max_new_tokens=40, **kw)
        assert got.text == alone.text
        assert got.finish_reason == alone.finish_reason
    valid(mixed[0], SCHEMAS["flat"])
    valid(mixed[1], SCHEMAS["enums"])
    valid(mixed[4], SCHEMAS["flat"])
    free = run(engine, prompt, max_new_tokens=40)
    assert mixed[2].text == free.text and not free.text.startswith("{")  # free text is not JSON-shaped


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "foo"}, "Invalid type"),
        ({"type": "object", "properties": 5}, "properties"),
        ({"type": "string", "pattern": "[a-z"}, "regex"),
        ({"$ref": "#/definitions/missing"}, "does not exist"),
        ({"not": {"type": "string"}}, "not"),  # valid JSON Schema that llguidance cannot enforce
        ([1, 2], "not a JSON object"),
    ],
)
def test_schemas_that_cannot_be_enforced_are_refused(engine: NativeEngine, schema: Any, why: str) -> None:
    with pytest.raises(EngineError) as caught:
        run(engine, chat(engine), json_schema=canonical_schema(schema))
    assert caught.value.field == "response_format"
    assert why in caught.value.message
    assert engine.stats()["waiting"] == 0 and engine.stats()["running"] == 0  # nothing was queued
    valid(run(engine, chat(engine), json_schema=canonical_schema(SCHEMAS["flat"])), SCHEMAS["flat"])  # still serving


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": ("}",)}, "stop"),
        ({"min_new_tokens": 5}, "min_tokens"),
        ({"num_beams": 2}, "num_beams"),
        ({"choices": ("yes", "no")}, "response_format"),
    ],
)
def test_what_cannot_go_with_a_schema_is_refused(engine: NativeEngine, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(EngineError) as caught:
        run(engine, chat(engine), json_schema=JSON_OBJECT_SCHEMA, **fields)
    assert caught.value.field == param


def test_compiled_schemas_are_cached_least_recently_used(engine: NativeEngine) -> None:
    grammars = SchemaGrammars(engine.tokenizer, engine.model.vocab, capacity=2)
    a, b, c = (canonical_schema(SCHEMAS[n]) for n in ("flat", "enums", "nested"))
    grammars.start(a)
    grammars.start(b)
    grammars.start(a)  # a is now the most recently used
    grammars.start(c)  # drops b
    assert grammars.cached(a) and grammars.cached(c) and not grammars.cached(b)
    run(engine, chat(engine), json_schema=a, max_new_tokens=2)
    assert engine.grammars.cached(a)
    # one schema, its keys in any order: one canonical text, one cache entry
    assert canonical_schema(json.loads(json.dumps(SCHEMAS["flat"], sort_keys=True))) == a


def test_the_schema_crosses_the_wire_format() -> None:
    request = GenerationRequest((1, 2, 3), SamplingParams(json_schema=JSON_OBJECT_SCHEMA))
    assert request_from_dict(json.loads(json.dumps(request_to_dict(request)))) == request
