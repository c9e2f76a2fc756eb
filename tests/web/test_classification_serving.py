"""Classification adapters answer from their labels: an adapter version published with labels (as training publishes
one fine-tuned on a classification dataset) answers only one of them through the official `openai` SDK, chat and
text completions, streamed or not, with each label's probability in the first token's logprobs; the same weights
published without labels answer free text; the labels show on the repo API; a stop that would cut a label is
refused. On SQLite and PostgreSQL; migration 0008 comes and goes."""

import math
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import TINY_MODEL, Platform
from conftest import openai_sdk as sdk
from functions.prompts import encode_text
from lora_helpers import build_lora

LABELS = ["billing", "shipping", "account access"]
TICKET: list[Any] = [{"role": "user", "content": "Triage this support ticket: my parcel arrived damaged."}]


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora(tiny_model_dir, tmp_path_factory.mktemp("classifier") / "adapter", seed=11)


def publish(tenant: str, repo: str, lora_dir: Path, labels: list[str] | None) -> str:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Tenant
    from functions.repos import publish_adapter

    with session_scope() as s:
        tenant_id = s.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
    published = publish_adapter(
        tenant_id,
        repo,
        lora_dir,
        base_model=TINY_MODEL,
        adapter_type="lora",
        rank=4,
        target_modules=["q_proj", "v_proj"],
        labels=labels,
    )
    assert published is not None
    return f"{repo}/{published.version}"


def test_a_classification_adapter_answers_only_its_labels(client: Any, alice: dict[str, str], lora_dir: Path) -> None:
    classifier = publish("alice", "triage", lora_dir, LABELS)
    free = publish("alice", "triage", lora_dir, None)  # the same weights, no labels: version 2
    api = sdk(client, alice)

    versions = {v["name"]: v for v in client.get("/v1/repos/triage", headers=alice).json()["versions"]}
    assert versions[classifier]["labels"] == LABELS and versions[free]["labels"] is None

    rambling = api.chat.completions.create(model=free, messages=TICKET, temperature=0, max_tokens=12)
    assert rambling.choices[0].message.content not in LABELS

    reply = api.chat.completions.create(
        model=classifier,
        messages=TICKET,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    choice = reply.choices[0]
    assert choice.message.content in LABELS and choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.content
    first = choice.logprobs.content[0]
    tokenizer = _tokenizer()
    first_tokens = {tokenizer.decode(encode_text(tokenizer, label)[:1]) for label in LABELS}
    assert {alt.token for alt in first.top_logprobs} == first_tokens  # the labels' first tokens, nothing else
    assert math.fsum(math.exp(alt.logprob) for alt in first.top_logprobs) == pytest.approx(1.0, abs=1e-4)
    assert first.logprob == max(alt.logprob for alt in first.top_logprobs)  # greedy took the likeliest label

    sampled = {
        api.chat.completions.create(model=classifier, messages=TICKET, temperature=1.5, seed=seed)
        .choices[0]
        .message.content
        for seed in range(4)
    }
    assert sampled <= set(LABELS)

    streamed = api.chat.completions.create(model=classifier, messages=TICKET, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == choice.message.content

    completion = api.completions.create(model="triage/1", prompt="Ticket: I was charged twice.\nCategory:", logprobs=3)
    assert completion.choices[0].text in LABELS
    assert completion.choices[0].logprobs is not None

    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=classifier, messages=TICKET, stop=[" "])
    assert refused.value.body["param"] == "stop"  # type: ignore[index]
    # a stop no label contains changes nothing
    kept = api.chat.completions.create(model=classifier, messages=TICKET, temperature=0, stop=["\n"])
    assert kept.choices[0].message.content == choice.message.content


def _tokenizer() -> Any:
    from functions.base_models import load_tokenizer

    return load_tokenizer(TINY_MODEL)


def test_migration_0008_adds_and_removes_the_labels_column(platform: Platform, lora_dir: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from app.db import MIGRATIONS_DIR, get_engine, session_scope

    def columns() -> set[str]:
        return {c["name"] for c in inspect(get_engine()).get_columns("adapter_versions")}

    def alembic(revision: str, down: bool = False) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with get_engine().begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)

    from conftest import make_tenant
    from functions.repos import find

    tenant_id = make_tenant("carol")[0]
    publish("carol", "triage", lora_dir, LABELS)
    assert "labels" in columns()
    alembic("0007", down=True)  # with a version (and its labels) in the table
    assert "labels" not in columns()
    alembic("head")
    assert "labels" in columns()
    with session_scope() as s:
        weights = find(s, tenant_id, "triage/1")
        assert weights is not None and weights.labels == ()  # the version is kept; its labels went with the column


def test_a_deployment_answers_a_labelled_adapter_with_a_label(
    sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch, lora_dir: Path
) -> None:
    """On a private deployment the request crosses to a replica process (the engine process's HTTP API): the
    labels go with it."""
    import httpx

    from app.settings import get_settings
    from conftest import make_tenant
    from deployment_helpers import FAST_ENV, serve_app, wait_status

    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    _, headers = make_tenant("acme")
    classifier = publish("acme", "triage", lora_dir, LABELS)
    with serve_app() as served, httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        r = http.post("/v1/deployments", json={"name": "triage", "base_model": TINY_MODEL, "min_replicas": 1})
        assert r.status_code == 201, r.text
        wait_status(http, "triage", "Ready")
        api = openai.OpenAI(base_url=f"{served.url}/v1/deployments/triage", api_key=headers["Authorization"][7:])
        reply = api.chat.completions.create(model=classifier, messages=TICKET, temperature=0, logprobs=True)
        assert reply.choices[0].message.content in LABELS and reply.choices[0].finish_reason == "stop"
        assert http.delete("/v1/deployments/triage").status_code in (200, 202, 204)
