"""Preference tuning (method "dpo") through the real API, worker and TRL's DPOTrainer on the tiny model: a preference
dataset's validation, the job end to end with its reward metrics, the version it publishes served by
/v1/chat/completions, its price (SFT LoRA's rate on prompt+chosen and prompt+rejected tokens), and the refusals."""

import json
import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.models import UsageRecord
from conftest import TINY_MODEL, InProcessWorker, Platform
from finetune_helpers import finish, metrics, ready_dataset, refusal, start_job, version_dir

WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "gray", "navy", "teal", "lime", "rose", "sand"]
# A preference dataset: a polite answer chosen over a curt one; the last two rows are its evaluation split.
PAIRS = [{"prompt": f"Say {w}", "chosen": f"Gladly: {w}.", "rejected": "No."} for w in WORDS[:10]] + [
    {"prompt": f"Say {w}", "chosen": f"Gladly: {w}.", "rejected": "No.", "split": "evaluation"} for w in WORDS[10:]
]
# The chat form: the prompt a conversation ending with the user's turn, each answer one assistant message.
CHAT_PAIRS = [
    {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Name a {w} thing"}],
        "chosen": [{"role": "assistant", "content": f"A {w} flower."}],
        "rejected": [{"role": "assistant", "content": "Whatever."}],
    }
    for w in WORDS[:4]
]


def _upload(client: TestClient, headers: dict[str, str], name: str, data: bytes, suffix: str = "jsonl") -> dict:
    r = client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (f"{name}.{suffix}", data)},
        data={"base_model": TINY_MODEL, "wait": "false"},
    )
    assert r.status_code == 202, r.text
    InProcessWorker().drain()
    return client.get(f"/v1/datasets/{name}", headers=headers).json()


def _jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


# --- the dataset ----------------------------------------------------------------------------------------------


def test_a_preference_dataset_validates_with_token_stats(client: TestClient, alice: dict[str, str]) -> None:
    dataset = ready_dataset(client, alice, PAIRS, "prefs")
    assert dataset["data_format"] == "preference"
    stats = dataset["stats"]
    assert (stats["train_rows"], stats["evaluation_rows"]) == (10, 2)
    # Each row counts its prompt twice (with each answer): more tokens than the prompt, chosen and rejected once.
    assert stats["total_tokens"] > stats["completion_tokens"] > 0
    rows = client.get("/v1/datasets/prefs/rows", headers=alice).json()
    first = rows[0] if isinstance(rows, list) else rows["data"][0]
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("Say red", "Gladly: red.", "No.")


def test_the_chat_form_and_csv_validate(client: TestClient, alice: dict[str, str]) -> None:
    chat = _upload(client, alice, "chat", _jsonl(CHAT_PAIRS))
    assert (chat["status"], chat["data_format"], chat["stats"]["train_rows"]) == ("ready", "preference", 4)
    csv = b'prompt,chosen,rejected,split\nSay hi,"Hello, friend.",No.,\nSay bye,Goodbye!,No.,evaluation\n'
    table = _upload(client, alice, "table", csv, "csv")
    assert (table["status"], table["data_format"], table["stats"]["evaluation_rows"]) == ("ready", "preference", 1)


def test_bad_preference_rows_are_named_by_line_and_field(client: TestClient, alice: dict[str, str]) -> None:
    rows = [
        {"prompt": "Say hi", "chosen": "Hello.", "rejected": "No."},
        {"prompt": "Say hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "", "chosen": "Hello.", "rejected": "No."},
        {"chosen": "Hello.", "rejected": "No."},
        {"prompt": "Say hi", "chosen": 3, "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "A",
         "rejected": "B"},
        {"prompt": "Say hi", "chosen": [{"role": "user", "content": "Hi"}], "rejected": "No."},
        {"prompt": "Say hi", "chosen": "Hello.", "rejected": [{"role": "assistant", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]},
    ]  # fmt: skip
    dataset = _upload(client, alice, "bad", _jsonl(rows))
    assert dataset["status"] == "invalid"
    assert [(e["line"], e["field"]) for e in dataset["errors"]] == [
        (2, "rejected"),
        (3, "prompt"),
        (4, "prompt"),
        (5, "chosen"),
        (6, "prompt[1].role"),
        (7, "chosen[0].role"),
        (8, "rejected"),
    ]
    messages = {e["line"]: e["message"] for e in dataset["errors"]}
    assert "same answer" in messages[2] and "empty" in messages[3] and "missing field 'prompt'" in messages[4]
    assert "must be a string, got number" in messages[5] and "'user'" in messages[6]
    csv = b"prompt,chosen,rejected\nSay hi,Hello.,No.\nSay hi,,No.\n"
    table = _upload(client, alice, "badcsv", csv, "csv")
    assert [(e["line"], e["field"]) for e in table["errors"]] == [(3, "chosen")]


# --- the job --------------------------------------------------------------------------------------------------


def test_a_dpo_job_end_to_end(client: TestClient, alice: dict[str, str]) -> None:
    dataset = ready_dataset(client, alice, PAIRS, "prefs")
    config = {"dataset": "prefs", "repo": "polite", "method": "dpo", "epochs": 2, "effective_batch_size": 2}
    quote = client.post("/v1/finetuning/jobs/quote", headers=alice, json={"base_model": TINY_MODEL} | config).json()
    assert quote["config"]["method"] == "dpo" and quote["auto"]["learning_rate"] == 1e-4  # a tenth of SFT's 1e-3
    job = start_job(client, alice, **config, eval_steps=2)
    # Priced as SFT LoRA: $0.50 per million tokens of prompt+chosen and prompt+rejected, per epoch.
    tokens = dataset["stats"]["train_tokens"] * 2
    assert job["estimate"]["tokens"] == quote["estimate"]["tokens"] == tokens
    assert job["estimate"]["cost"]["micro_usd"] == math.ceil(tokens * 500_000 / 1_000_000)

    job = finish(client, alice, job["id"], timeout=300)
    assert job["status"] == "completed", job
    assert job["adapter"] == "polite/1" and job["total_steps"] == 10  # 10 pairs in steps of 2, twice

    train = metrics(client, alice, job["id"])
    assert [m["step"] for m in train] == list(range(1, 11))
    for m in train:
        assert m["loss"] > 0 and m["reward_accuracy"] is not None and m["reward_margin"] is not None
        assert m["reward_margin"] == pytest.approx(m["chosen_reward"] - m["rejected_reward"], abs=1e-5)
    evals = metrics(client, alice, job["id"], "eval")
    assert [m["step"] for m in evals] == [0, 2, 4, 6, 8, 10]
    baseline = evals[0]  # the adapter starts at zero: the policy is its reference
    assert baseline["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert baseline["reward_margin"] == pytest.approx(0, abs=1e-6) and baseline["reward_accuracy"] == 0
    assert all(m["perplexity"] is None and m["sequence_accuracy"] is None for m in evals)
    assert any(m["reward_margin"] != 0 for m in evals[1:])  # training moved the rewards
    summary = job["summary"]
    assert summary["kept"]["metric"] == "reward_accuracy" and summary["best"]["reward_accuracy"] is not None

    # Charged at the SFT LoRA rate on the tokens processed, recorded as dpo_lora.
    with session_scope() as s:
        usage = s.scalars(select(UsageRecord).where(UsageRecord.reference == job["id"])).one()
    assert usage.technique == "dpo_lora" and usage.input_tokens == tokens
    assert usage.amount_micro_usd == job["charge"]["micro_usd"] == math.ceil(tokens * 500_000 / 1_000_000)

    # The version is an adapter like any other: served through the OpenAI route.
    r = client.post(
        "/v1/chat/completions",
        headers=alice,
        json={"model": "polite/1", "messages": [{"role": "user", "content": "Say red"}], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "polite/1" and r.json()["usage"]["completion_tokens"] > 0


def test_a_dpo_job_on_the_chat_form(client: TestClient, alice: dict[str, str]) -> None:
    _upload(client, alice, "chat", _jsonl(CHAT_PAIRS))
    job = finish(client, alice, start_job(client, alice, dataset="chat", repo="kind", method="dpo", train_steps=2,
                                          effective_batch_size=2, beta=0.5)["id"], timeout=300)  # fmt: skip
    assert job["status"] == "completed", job
    assert job["config"]["beta"] == 0.5
    assert [m["step"] for m in metrics(client, alice, job["id"])] == [1, 2]


# --- refusals -------------------------------------------------------------------------------------------------


def test_methods_and_datasets_that_do_not_fit_are_refused(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, PAIRS, "prefs")
    ready_dataset(client, alice, [{"prompt": f"Say {w}", "completion": w} for w in WORDS], "words")
    error = refusal(client, alice, dataset="words", repo="r", method="dpo")
    assert error["param"] == "dataset" and "preference dataset" in error["message"]
    error = refusal(client, alice, dataset="prefs", repo="r")
    assert error["param"] == "method" and "'dpo'" in error["message"]
    error = refusal(client, alice, dataset="prefs", repo="r", method="dpo", evaluation_dataset="words")
    assert error["param"] == "evaluation_dataset"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"beta": 0.1}, "beta"),  # a DPO field with method "sft"
        ({"method": "dpo", "adapter": "none"}, "adapter"),
        ({"method": "dpo", "task": "classification"}, "task"),
        ({"method": "dpo", "prompt_template": "Say {word}"}, "prompt_template"),
        ({"method": "dpo", "beta": 0}, "beta"),
        ({"method": "grpo"}, "reward_functions"),
    ],
)
def test_config_fields_of_another_method_are_refused(
    client: TestClient, alice: dict[str, str], config: dict, field: str
) -> None:
    r = client.post(
        "/v1/finetuning/jobs", headers=alice, json={"base_model": TINY_MODEL, "dataset": "d", "repo": "r"} | config
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field or error["message"].startswith(f"{field}:"), error


def test_dpo_continues_an_sft_version(client: TestClient, alice: dict[str, str], platform: Platform) -> None:
    """SFT then DPO: the SFT version is the starting point and the reference (TRL copies its adapter as "ref");
    the DPO version holds the trained adapter only, and a full-model version cannot be continued with DPO."""
    ready_dataset(client, alice, [{"prompt": f"Say {w}", "completion": f"Gladly: {w}."} for w in WORDS], "words")
    sft = finish(client, alice, start_job(client, alice, dataset="words", repo="polite", train_steps=2, rank=4,
                                          effective_batch_size=2)["id"])  # fmt: skip
    assert sft["status"] == "completed", sft
    ready_dataset(client, alice, PAIRS, "prefs")
    dpo = start_job(client, alice, dataset="prefs", repo="polite", method="dpo", train_steps=2, effective_batch_size=2,
                    continue_from_version="polite/1")  # fmt: skip
    assert dpo["config"]["rank"] == 4  # the SFT adapter's shape carries over
    dpo = finish(client, alice, dpo["id"], timeout=300)
    assert dpo["status"] == "completed" and dpo["adapter"] == "polite/2", dpo
    files = sorted(p.name for p in version_dir(platform, "polite", 2).iterdir())
    assert "adapter_config.json" in files and "ref" not in files
    evals = metrics(client, alice, dpo["id"], "eval")
    assert evals[0]["step"] == 0 and evals[0]["reward_margin"] == pytest.approx(0, abs=1e-6)  # the reference itself

    full = finish(client, alice, start_job(client, alice, dataset="words", repo="whole", adapter="none",
                                           train_steps=1, effective_batch_size=2)["id"])  # fmt: skip
    assert full["status"] == "completed", full
    error = refusal(client, alice, dataset="prefs", repo="whole", method="dpo", continue_from_version="whole/1")
    assert error["param"] == "continue_from_version"
