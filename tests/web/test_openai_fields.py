"""The rest of OpenAI's request through the official `openai` SDK, on the tiny model: n answers (plain and
streamed, the prompt charged once), presence/frequency penalties, logit_bias, max_completion_tokens, stop (up to
four), seed; tool calling refused in words that say what to use instead; every field the server does not implement
refused with a 400 naming it."""

from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from conftest import TINY_MODEL
from conftest import openai_sdk as sdk
from web.openai_schemas import REFUSED

HELLO: list[Any] = [{"role": "user", "content": "Say hi to Ann"}]


@pytest.fixture(autouse=True)
def no_free_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_FREE_TOKENS_PER_DAY", "0")


def refused(call: Any, param: str) -> str:
    """The message of the 400 that `call` gets, checking it names `param`."""
    with pytest.raises(openai.BadRequestError) as error:
        call()
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    return str(body["message"])


def token_of(tiny_model_dir: Any, text: str) -> int:
    return int(AutoTokenizer.from_pretrained(tiny_model_dir).encode(text, add_special_tokens=False)[0])


def test_n_answers_plain_and_streamed(client: Any, alice: dict[str, str]) -> None:
    api = sdk(client, alice)
    ask: dict[str, Any] = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    ask["extra_body"] = {"min_tokens": 6}
    one = api.chat.completions.create(**ask)
    reply = api.chat.completions.create(**ask, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert texts[0] == one.choices[0].message.content  # answer 0 samples with the seed itself
    assert len(set(texts)) == 3  # each answer its own seed (seed + index)
    assert api.chat.completions.create(**ask, n=3).choices[1].message.content == texts[1]  # reproducible
    assert reply.usage is not None and one.usage is not None
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert reply.usage.completion_tokens == 3 * 6  # every answer's tokens (min_tokens: none ends early)

    streamed: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    usage = None
    for chunk in api.chat.completions.create(**ask, n=3, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert [streamed[i] for i in range(3)] == texts
    assert sorted(finishes) == [0, 1, 2] and all(len(f) == 1 for f in finishes.values())
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )

    text = api.completions.create(model=TINY_MODEL, prompt="Once upon", max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [c.index for c in text.choices] == [0, 1]
    records = client.get("/v1/usage", headers=alice, params={"limit": 100}).json()["records"]
    charged = next(r for r in records if r["kind"] == "inference")  # the newest: the two-answer completion
    assert text.usage is not None
    assert (charged["input_tokens"], charged["output_tokens"]) == (
        text.usage.prompt_tokens,
        text.usage.completion_tokens,
    )


def test_greedy_n_answers_are_identical(client: Any, alice: dict[str, str]) -> None:
    reply = sdk(client, alice).chat.completions.create(
        model=TINY_MODEL, messages=HELLO, max_tokens=5, temperature=0, n=2
    )
    assert reply.choices[0].message.content == reply.choices[1].message.content


def test_logit_bias_penalties_max_completion_tokens_stop_and_seed(
    client: Any, alice: dict[str, str], tiny_model_dir: Any
) -> None:
    api = sdk(client, alice)
    dog = token_of(tiny_model_dir, " dog")
    ask = {"model": TINY_MODEL, "messages": HELLO, "temperature": 0}
    forced = api.chat.completions.create(**ask, max_completion_tokens=5, logit_bias={str(dog): 100})
    assert forced.choices[0].message.content == " dog" * 5
    assert forced.choices[0].finish_reason == "length" and forced.usage and forced.usage.completion_tokens == 5

    plain = api.chat.completions.create(**ask, max_tokens=12).choices[0].message.content
    banned_first = api.chat.completions.create(**ask, max_tokens=12, logit_bias={str(dog): -100})
    assert " dog" not in (banned_first.choices[0].message.content or "")
    penalized = api.chat.completions.create(**ask, max_tokens=12, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized.choices[0].message.content != plain  # the tiny model repeats itself; the penalty shows

    # a frequency penalty of -2 on a repeated token keeps it: the forced " dog" stays forced with a smaller bias
    kept = api.chat.completions.create(**ask, max_tokens=4, logit_bias={str(dog): 60}, frequency_penalty=-2.0)
    assert kept.choices[0].message.content == " dog" * 4

    stops = [" dog dog", "x", "y", "z"]
    cut = api.chat.completions.create(**ask, max_tokens=6, logit_bias={str(dog): 100}, stop=stops)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("", "stop")
    message = refused(
        lambda: api.chat.completions.create(**ask, max_tokens=4, stop=[*stops, "w"]),
        "stop",
    )
    assert "4" in message

    sampled = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 1.0}
    again = [api.chat.completions.create(**sampled, seed=99).choices[0].message.content for _ in range(2)]
    assert again[0] == again[1]


def test_tool_calling_is_refused_saying_what_to_use(client: Any, alice: dict[str, str]) -> None:
    api = sdk(client, alice)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ask: dict[str, Any] = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 4}
    message = refused(lambda: api.chat.completions.create(**ask, tools=[tool]), "tools")  # type: ignore[list-item]
    assert "tool calling is not supported" in message and "response_format" in message and "json_schema" in message
    refused(lambda: api.chat.completions.create(**ask, tool_choice="auto"), "tool_choice")
    refused(lambda: api.chat.completions.create(**ask, parallel_tool_calls=False), "parallel_tool_calls")
    function = {"name": "f", "parameters": {"type": "object"}}
    refused(lambda: api.chat.completions.create(**ask, functions=[function]), "functions")  # type: ignore[list-item]
    refused(lambda: api.chat.completions.create(**ask, function_call="auto"), "function_call")
    answer = [*HELLO, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    message = refused(lambda: api.chat.completions.create(**(ask | {"messages": answer})), "messages.1")
    assert "tool calling is not supported" in message


def test_fields_not_implemented_are_refused_by_name(client: Any, alice: dict[str, str], tiny_model_dir: Any) -> None:
    api = sdk(client, alice)
    ask: dict[str, Any] = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 2}
    values: dict[str, Any] = {
        "store": True,
        "metadata": {"a": "b"},
        "audio": {"voice": "alloy", "format": "wav"},
        "modalities": ["text", "audio"],
        "prediction": {"type": "content", "content": "x"},
        "reasoning_effort": "low",
        "verbosity": "low",
        "web_search_options": {},
        "service_tier": "flex",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "moderation": {"model": "m"},
        "suffix": "x",
        "echo": True,
        "best_of": 2,
    }
    assert set(values) | {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"} == set(REFUSED)
    for name, value in values.items():
        r = client.post("/v1/chat/completions", headers=alice, json=ask | {name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
        assert r.json()["error"]["message"].startswith(f"{name}: "), r.text
    for name in ("suffix", "echo", "best_of"):
        r = client.post(
            "/v1/completions", headers=alice, json={"model": TINY_MODEL, "prompt": "Hi", name: values[name]}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    # unknown fields: refused the same way, by name; the documented extensions are not
    assert "not a field" in refused(lambda: api.chat.completions.create(**ask, extra_body={"mystery": 1}), "mystery")
    extensions = {"top_k": 5, "repetition_penalty": 1.1, "min_tokens": 1, "num_beams": 1}
    assert api.chat.completions.create(**ask, extra_body=extensions).choices[0].message.content is not None
    # what asks for nothing is accepted: identifiers, store false, text only, the default tier, best_of 1
    harmless = {"user": "u1", "safety_identifier": "s1", "store": False, "modalities": ["text"], "service_tier": "auto"}
    assert client.post("/v1/chat/completions", headers=alice, json=ask | harmless).status_code == 200
    completion = {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 2, "echo": False, "best_of": 1}
    assert client.post("/v1/completions", headers=alice, json=completion).status_code == 200


def test_bad_values_name_their_field_and_the_engine_serves_on(
    client: Any, alice: dict[str, str], tiny_model_dir: Any
) -> None:
    api = sdk(client, alice)
    ask: dict[str, Any] = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 2}
    assert "8" in refused(lambda: api.chat.completions.create(**ask, n=9), "n")
    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert "vocabulary" in refused(
        lambda: api.chat.completions.create(**ask, logit_bias={str(vocab + 10): 5}), "logit_bias"
    )
    refused(lambda: api.chat.completions.create(**ask, logit_bias={"12": 101}), "logit_bias")
    refused(lambda: api.chat.completions.create(**ask, logit_bias={"dog": 1}), "logit_bias")
    refused(lambda: api.chat.completions.create(**ask, logit_bias={str(i): 1 for i in range(301)}), "logit_bias")
    refused(lambda: api.chat.completions.create(**ask, presence_penalty=2.5), "presence_penalty")
    refused(lambda: api.chat.completions.create(**ask, frequency_penalty=-3), "frequency_penalty")
    refused(lambda: api.chat.completions.create(**ask, n=2, extra_body={"num_beams": 2}), "n")
    refused(
        lambda: api.completions.create(model=TINY_MODEL, prompt="Hi", max_tokens=2, logit_bias={str(vocab + 1): 1}),
        "logit_bias",
    )
    assert api.chat.completions.create(**ask).choices[0].finish_reason in ("stop", "length")
    records = client.get("/v1/usage", headers=alice, params={"limit": 100}).json()["records"]
    assert len([r for r in records if r["kind"] == "inference"]) == 1  # nothing refused was charged
