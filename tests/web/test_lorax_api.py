"""LoRAX's API through the real `lorax-client` package, unchanged, over real HTTP (uvicorn): generate and
generate_stream on the shared endpoints (the base model named by the route or by adapter_id) and on a private
deployment, details (tokens, finish_reason, seed, prefill), an imported adapter, alternatives, seeds, LoRAX's error
types with our messages, an inference-scoped key, usage records, and raw-HTTP refusals naming the field."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lorax import Client, MergedAdapters
from lorax.errors import NotFoundError, ValidationError

from conftest import TINY_MODEL, Platform, make_tenant
from deployment_helpers import FAST_ENV, Served, import_lora, serve_app, wait_status
from functions.prompts import encode_text
from lora_helpers import build_lora
from web.key_scopes import INFERENCE_ROUTES

PROMPT = "Say hi to Ann"


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora(tiny_model_dir, tmp_path_factory.mktemp("lorax") / "adapter", seed=3)


@pytest.fixture
def served(sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    from app.settings import get_settings

    for key, value in (FAST_ENV | {"LORAPLEX_FREE_TOKENS_PER_DAY": "0"}).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    with serve_app() as s:
        yield s


def tokenizer() -> Any:
    from functions.base_models import load_tokenizer

    return load_tokenizer(TINY_MODEL)


def records(http: httpx.Client) -> list[dict[str, Any]]:
    """The tenant's inference usage records, oldest first."""
    report = http.get("/v1/usage", params={"limit": 1000}).json()
    return [r for r in reversed(report["records"]) if r["kind"] == "inference"]


def test_lorax_client_on_the_shared_endpoints(served: Served, lora_dir: Path) -> None:
    _, headers = make_tenant("acme")
    http = httpx.Client(base_url=served.url, headers=headers, timeout=120)
    adapter = import_lora(http, "greeter", lora_dir)
    base = Client(f"{served.url}/v1/models/{TINY_MODEL}", headers=headers, timeout=120)

    # generate: greedy, with every detail; the prefill is the prompt's tokens, the tokens spell the text
    reply = base.generate(PROMPT, max_new_tokens=8, details=True, decoder_input_details=True)
    details = reply.details
    assert details is not None and details.finish_reason in ("length", "eos_token")
    assert details.seed is None  # greedy: no seed was used
    assert [t.id for t in details.prefill] == encode_text(tokenizer(), PROMPT)
    assert details.prompt_tokens == len(details.prefill)
    assert details.generated_tokens == len(details.tokens) >= 1
    if details.finish_reason == "length":
        assert details.generated_tokens == 8
    assert all(t.logprob <= 0 and t.alternative_tokens is None for t in details.tokens)
    words = [t.id for t in details.tokens if not t.special]
    assert tokenizer().decode(words) == reply.generated_text

    # generate_stream: the same tokens, one event each; the last carries the text and the details
    events = list(base.generate_stream(PROMPT, max_new_tokens=8))
    assert [e.token.id for e in events] == [t.id for t in details.tokens]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == reply.generated_text
    assert events[-1].details is not None and events[-1].details.finish_reason == details.finish_reason
    assert "".join(e.token.text for e in events if not e.token.special) == reply.generated_text

    # an adapter, named by adapter_id on the root route (base_url = the server): its own answer, the one the
    # OpenAI completions route gives for the same prompt
    shared = Client(served.url, headers=headers, timeout=120)
    tuned = shared.generate(PROMPT, adapter_id=adapter, max_new_tokens=8)
    assert tuned.generated_text != reply.generated_text
    r = http.post("/v1/completions", json={"model": adapter, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tuned.generated_text
    usage = records(http)
    assert usage[-2]["adapter"] == adapter and usage[-2]["output_tokens"] == tuned.details.generated_tokens - (
        tuned.details.finish_reason == "eos_token"
    )

    # alternatives: greedy picks the likeliest, which leads its alternatives
    alt = base.generate(PROMPT, max_new_tokens=4, return_k_alternatives=3)
    for token in alt.details.tokens:
        assert token.alternative_tokens is not None and len(token.alternative_tokens) == 3
        assert token.alternative_tokens[0].id == token.id
        assert token.alternative_tokens[0].logprob == pytest.approx(token.logprob)

    # sampling: the seed given, or the one chosen and reported, gives the same text again
    seeded = base.generate(PROMPT, do_sample=True, seed=5, max_new_tokens=8)
    assert seeded.details.seed == 5
    assert base.generate(PROMPT, do_sample=True, seed=5, max_new_tokens=8).generated_text == seeded.generated_text
    chosen = base.generate(PROMPT, temperature=0.9, max_new_tokens=8)
    assert isinstance(chosen.details.seed, int)
    again = base.generate(PROMPT, do_sample=True, temperature=0.9, seed=chosen.details.seed, max_new_tokens=8)
    assert again.generated_text == chosen.generated_text

    # stop sequences and return_full_text
    first_word = reply.generated_text.strip().split(" ")[0]
    if first_word:
        stopped = base.generate(PROMPT, stop_sequences=[first_word], max_new_tokens=8)
        assert stopped.details.finish_reason == "stop_sequence" and first_word not in stopped.generated_text
    full = base.generate(PROMPT, max_new_tokens=8, return_full_text=True)
    assert full.generated_text == PROMPT + reply.generated_text

    # errors, as lorax-client's own types (a refused parameter is LoRAX's "validation" error), with our messages
    with pytest.raises(NotFoundError, match="parameters.adapter_id: The model 'nobody/1' does not exist"):
        shared.generate(PROMPT, adapter_id="nobody/1")
    with pytest.raises(ValidationError, match="parameters.watermark: watermarking is not implemented"):
        base.generate(PROMPT, watermark=True)
    with pytest.raises(ValidationError, match="parameters.typical_p"):
        base.generate(PROMPT, typical_p=0.5)
    with pytest.raises(ValidationError, match="parameters.adapter_id: name an adapter"):
        shared.generate(PROMPT)  # the shared root: no base model without adapter_id
    with pytest.raises(ValidationError, match=f"is an adapter of '{TINY_MODEL}'; /v1/models/smollm2-135m serves"):
        Client(f"{served.url}/v1/models/smollm2-135m", headers=headers).generate(PROMPT, adapter_id=adapter)

    # every request answered was metered, one usage record each (the refused ones not)
    assert len(records(http)) == 11  # 10 LoRAX answers (one streamed) and the OpenAI completion


def test_an_inference_key_and_raw_http_refusals(served: Served) -> None:
    _, headers = make_tenant("acme")
    http = httpx.Client(base_url=served.url, headers=headers, timeout=120)
    created = http.post("/v1/api_keys", json={"name": "serving", "scope": "inference"}).json()
    key = {"Authorization": f"Bearer {created['key']}"}
    reply = Client(f"{served.url}/v1/models/{TINY_MODEL}", headers=key).generate(PROMPT, max_new_tokens=3)
    assert reply.generated_text
    paths: dict[str, dict[str, Any]] = served.app.openapi()["paths"]
    lorax_paths = [
        p for p in paths if p.endswith(("generate", "generate_stream")) or p in ("/", "/v1/models/{base_model}")
    ]
    routes = {(method.upper(), path) for path in lorax_paths for method in paths[path]}
    assert len(routes) == 8 and routes <= INFERENCE_ROUTES

    def refused(status: int, body: dict[str, Any], path: str = f"/v1/models/{TINY_MODEL}/generate") -> dict:
        r = http.post(path, json=body)
        assert r.status_code == status, r.text
        return dict(r.json())

    error = refused(400, {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "frequency_penalty": 1}})
    assert error["error"].startswith("parameters.frequency_penalty: not a field")
    assert error["param"] == "parameters.frequency_penalty" and error["error_type"] == "validation"
    assert refused(400, {"inputs": PROMPT, "stream": True})["param"] == "stream"  # only the root route streams so
    assert refused(422, {"inputs": PROMPT, "parameters": {"top_p": 1.5}})["param"] == "parameters.top_p"
    assert refused(422, {"inputs": ""})["param"] == "inputs"
    assert refused(400, {"inputs": PROMPT, "parameters": {"best_of": 2}})["param"] == "parameters.best_of"
    assert refused(404, {"inputs": PROMPT}, "/v1/models/nope/generate")["param"] == "base_model"
    assert http.post("/generate", json={"inputs": PROMPT}, headers={"Authorization": "Bearer nope"}).json()[
        "error"
    ]  # authentication errors in LoRAX's shape too

    # the stream answers raw SSE in LoRAX's framing, and the root route a one-item list
    r = http.post(
        f"/v1/models/{TINY_MODEL}/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    )
    assert r.status_code == 200 and r.text.startswith('data:{"token": {')
    r = http.post(f"/v1/models/{TINY_MODEL}", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert isinstance(r.json(), list) and r.json()[0]["details"] is None


def test_lorax_client_on_a_private_deployment(served: Served, lora_dir: Path) -> None:
    _, headers = make_tenant("acme")
    http = httpx.Client(base_url=served.url, headers=headers, timeout=120)
    adapter = import_lora(http, "greeter", lora_dir)
    r = http.post("/v1/deployments", json={"name": "prod", "base_model": TINY_MODEL, "min_replicas": 1})
    assert r.status_code == 201, r.text
    wait_status(http, "prod", "Ready")

    client = Client(f"{served.url}/v1/deployments/prod", headers=headers, timeout=120)
    shared = Client(f"{served.url}/v1/models/{TINY_MODEL}", headers=headers, timeout=120)
    for adapter_id in (None, adapter):
        reply = client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=6)
        assert reply.generated_text == shared.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=6).generated_text
        events = list(client.generate_stream(PROMPT, adapter_id=adapter_id, max_new_tokens=6))
        assert events[-1].generated_text == reply.generated_text
    assert len(records(http)) == 2  # the shared endpoint's answers only: a deployment is billed by the second
    with pytest.raises(NotFoundError, match="deployment"):
        Client(f"{served.url}/v1/deployments/nope", headers=headers).generate(PROMPT)


def test_lorax_client_merges_adapters_and_follows_a_schema(
    served: Served, lora_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, headers = make_tenant("acme")
    http = httpx.Client(base_url=served.url, headers=headers, timeout=120)
    first = import_lora(http, "first", lora_dir)
    second = import_lora(http, "second", build_lora(tiny_model_dir, tmp_path / "second", seed=4))
    base = Client(f"{served.url}/v1/models/{TINY_MODEL}", headers=headers, timeout=120)

    # merged_adapters, as lorax-client sends it: the same merge (one recipe, cached) the OpenAI routes serve
    merge = MergedAdapters(ids=[first, second], weights=[0.7, 0.3], merge_strategy="ties", density=0.5)
    merged = base.generate(PROMPT, merged_adapters=merge, max_new_tokens=8)
    recipe = merge.model_dump()
    r = http.post(
        "/v1/completions",
        json={"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "merged_adapters": recipe},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == merged.generated_text
    assert merged.generated_text != base.generate(PROMPT, adapter_id=first, max_new_tokens=8).generated_text
    both = {"inputs": PROMPT, "parameters": {"adapter_id": first, "merged_adapters": recipe}}  # lorax-client refuses
    r = http.post(f"/v1/models/{TINY_MODEL}/generate", json=both)
    assert r.status_code == 400 and r.json()["param"] == "parameters.adapter_id", r.text
    with pytest.raises(ValidationError, match="parameters.merged_adapters.ids"):
        base.generate(PROMPT, merged_adapters=MergedAdapters(ids=[first, "nobody/1"], weights=[1, 1], density=1))

    # response_format (LoRAX's json_object with a schema): the answer is JSON of that schema
    names = {"type": "string", "enum": ["Ann", "Bo"]}
    schema = {"type": "object", "properties": {"name": names}, "required": ["name"], "additionalProperties": False}
    answer = base.generate(PROMPT, response_format={"type": "json_object", "schema": schema}, max_new_tokens=40)
    assert answer.details.finish_reason == "eos_token", answer.generated_text
    assert json.loads(answer.generated_text)["name"] in ("Ann", "Bo")
