"""Preference tuning through OpenAI's fine-tuning API, driven by the official `openai` SDK unchanged: a file in
OpenAI's preference format uploaded with `files.create`, a job with `method={"type": "dpo", ...}` trained by the
worker (TRL's DPOTrainer on the tiny model) and its fine-tuned model answering a chat completion; the format's bad
rows named by line and field; and the refusals (a file of the other shape, hyperparameters given twice, an unknown
field, 'reinforcement') each naming OpenAI's field, before any compute and with nothing created."""

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from conftest import TINY_MODEL, InProcessWorker
from conftest import openai_sdk as sdk
from finetune_helpers import finish

WORDS = ["red", "green", "blue", "cyan", "pink", "gold"]


def preference(word: str, system: bool = False) -> dict[str, Any]:
    """A row of OpenAI's preference format, as its DPO guide writes it (an empty `tools`, `parallel_tool_calls`)."""
    messages = [{"role": "system", "content": "Be kind."}] if system else []
    messages.append({"role": "user", "content": f"Say {word}"})
    return {
        "input": {"messages": messages, "tools": [], "parallel_tool_calls": True},
        "preferred_output": [{"role": "assistant", "content": f"Gladly: {word}."}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }


PAIRS = [preference(w, system=i % 2 == 0) for i, w in enumerate(WORDS)]
CHATS = [
    {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"Gladly: {w}."}]}
    for w in WORDS
]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture
def files(bundled_model: Path, client: TestClient, alice: dict[str, str]) -> dict[str, Any]:
    """Alice's preference file and chat file, validated by a worker stopped afterwards (jobs stay queued until a
    test runs one). Files are counted with the default base model's tokenizer: the bundled SmolLM2."""
    api = sdk(client, alice)
    with InProcessWorker():
        pairs = api.files.create(file=("prefs.jsonl", jsonl(PAIRS)), purpose="fine-tune")
        chats = api.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    return {"api": api, "pairs": pairs, "chats": chats.id}


def test_openai_sdk_runs_a_dpo_job_on_an_openai_preference_file(
    files: dict[str, Any], client: TestClient, alice: dict[str, str]
) -> None:
    api, pairs = files["api"], files["pairs"]
    assert (pairs.status, pairs.filename) == ("processed", "prefs.jsonl")
    ours = client.get("/v1/datasets/prefs", headers=alice).json()  # the same file as one of our datasets
    assert (ours["data_format"], ours["stats"]["train_rows"]) == ("preference", len(PAIRS))
    rows = client.get("/v1/datasets/prefs/rows", headers=alice).json()
    first = rows[0] if isinstance(rows, list) else rows["data"][0]
    assert first["messages"] == PAIRS[0]["input"]["messages"]  # the prompt: the conversation up to the reply
    assert (first["chosen"], first["rejected"]) == ("Gladly: red.", "No.")

    job = api.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )
    assert (job.status, job.method.type) == ("queued", "dpo")
    given = job.method.dpo.hyperparameters
    assert (given.beta, given.n_epochs, given.learning_rate_multiplier) == (0.2, 1, 1.0)
    assert job.method.supervised is None
    mine = client.get(f"/v1/finetuning/jobs/{job.id.removeprefix('ftjob-')}", headers=alice).json()
    assert (mine["config"]["method"], mine["config"]["beta"], mine["config"]["epochs"]) == ("dpo", 0.2, 1)
    assert mine["config"]["learning_rate"] == pytest.approx(1e-4)  # DPO's 'auto' rate: a tenth of SFT's

    done = finish(client, alice, job.id.removeprefix("ftjob-"), timeout=300)
    assert done["status"] == "completed", done
    job = api.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model == f"ft:{TINY_MODEL}:ft-{TINY_MODEL}:1"
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.batch_size == done["config"]["effective_batch_size"]
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" and "train_loss" in (e.data or {}) for e in events)

    reply = api.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say red"}], max_tokens=4, temperature=0
    )
    assert reply.model == job.fine_tuned_model and reply.usage and reply.usage.completion_tokens > 0
    assert isinstance(reply.choices[0].message.content, str)


def test_dpo_hyperparameters_auto_and_supervised_jobs_as_before(files: dict[str, Any]) -> None:
    """'auto' beta is our default (0.1); a learning_rate_multiplier multiplies DPO's own 'auto' rate; top-level
    hyperparameters apply to a DPO job too; a supervised job reads as it always did."""
    api, pairs = files["api"], files["pairs"].id
    auto = api.fine_tuning.jobs.create(
        model=TINY_MODEL, training_file=pairs, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}
    )
    assert auto.method.dpo.hyperparameters.beta == 0.1
    bare = api.fine_tuning.jobs.create(model=TINY_MODEL, training_file=pairs, method={"type": "dpo"}, suffix="bare")
    assert bare.method.type == "dpo" and bare.method.dpo.hyperparameters.beta == 0.1
    top = api.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=pairs,
        suffix="top",
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 3},
        method={"type": "dpo", "dpo": {}},
    )
    resolved = top.method.dpo.hyperparameters
    assert (resolved.n_epochs, resolved.learning_rate_multiplier, resolved.beta) == (2, 3.0, 0.1)
    assert top.hyperparameters.model_dump() == resolved.model_dump(exclude={"beta"})  # the same, but beta

    supervised = api.fine_tuning.jobs.create(model=TINY_MODEL, training_file=files["chats"], suffix="sft")
    assert supervised.method.type == "supervised" and supervised.method.dpo is None
    assert supervised.method.supervised.hyperparameters.n_epochs == supervised.hyperparameters.n_epochs
    for job in (auto, bare, top, supervised):
        api.fine_tuning.jobs.cancel(job.id)


def test_refusals_name_openai_fields_and_create_nothing(
    files: dict[str, Any], client: TestClient, alice: dict[str, str]
) -> None:
    api, pairs, chats = files["api"], files["pairs"].id, files["chats"]
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    refused = [
        ({"training_file": chats, "method": dpo}, "training_file"),  # a chat (SFT) file for DPO
        ({"training_file": pairs, "method": dpo, "validation_file": chats}, "validation_file"),
        ({"training_file": pairs}, "training_file"),  # a preference file, supervised (the default)
        ({"training_file": pairs, "method": {"type": "supervised"}}, "training_file"),
        ({"training_file": chats, "validation_file": pairs}, "validation_file"),
        ({"training_file": pairs, "method": dpo, "hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}},
         "method.dpo.hyperparameters.gamma"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"epochs": 1}}}, "method.dpo.epochs"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
         "method.dpo.hyperparameters.beta"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}},
         "method.dpo.hyperparameters.beta"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
         "method.dpo.hyperparameters.n_epochs"),
        ({"training_file": pairs, "method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        ({"training_file": pairs, "method": {"type": "reinforcement", "reinforcement": {}}}, "method.type"),
        ({"training_file": pairs, "method": {"type": "unsupervised"}}, "method.type"),
    ]  # fmt: skip
    for change, param in refused:
        r = client.post("/v1/fine_tuning/jobs", headers=alice, json={"model": TINY_MODEL} | change)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), (change, r.text)
        assert r.json()["error"]["message"].startswith(f"{param}: "), r.text
    with pytest.raises(openai.BadRequestError) as rl:  # through the SDK: where reinforcement fine-tuning is offered
        api.fine_tuning.jobs.create(model=TINY_MODEL, training_file=pairs, method={"type": "reinforcement"})
    message = rl.value.body["message"]  # type: ignore[index]
    assert "POST /v1/finetuning/jobs" in message and '"method": "grpo"' in message, message
    with pytest.raises(openai.BadRequestError) as wrong_file:
        api.fine_tuning.jobs.create(model=TINY_MODEL, training_file=chats, method={"type": "dpo"})
    assert wrong_file.value.body["param"] == "training_file"  # type: ignore[index]
    assert "preference" in wrong_file.value.body["message"]  # type: ignore[index]
    assert api.fine_tuning.jobs.list().data == []
    assert client.get("/v1/finetuning/jobs", headers=alice).json() == []
    assert client.get("/v1/repos", headers=alice).json() == []


def test_bad_rows_of_the_openai_preference_format_are_named_by_line_and_field(
    files: dict[str, Any], client: TestClient, alice: dict[str, str]
) -> None:
    good = preference("red")
    rows = [
        good,
        good | {"non_preferred_output": good["preferred_output"]},  # 2: the same answer twice
        good | {"input": {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}},
        good | {"preferred_output": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
        {k: v for k, v in good.items() if k != "input"},  # 5: no input
        good | {"input": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}},
        good | {"non_preferred_output": [{"role": "user", "content": "No."}]},
        good | {"preferred_output": [{"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]},
        good | {"input": {"messages": [{"role": "tool", "content": "42"}]}},
        good | {"input": "Say red"},
        {"prompt": "Say red", "chosen": "Gladly.", "rejected": "No."},  # 11: our form in a file of OpenAI's
    ]
    r = client.post(
        "/v1/datasets",
        headers=alice,
        files={"file": ("bad.jsonl", jsonl(rows))},
        data={"base_model": TINY_MODEL, "wait": "false"},
    )
    assert r.status_code == 202, r.text
    InProcessWorker().drain()
    dataset = client.get("/v1/datasets/bad", headers=alice).json()
    assert (dataset["status"], dataset["data_format"]) == ("invalid", "preference")
    assert [(e["line"], e["field"]) for e in dataset["errors"]] == [
        (2, "non_preferred_output"),
        (3, "input.tools"),
        (4, "preferred_output[0].tool_calls"),
        (5, "input"),
        (6, "input.messages[1].role"),
        (7, "non_preferred_output[0].role"),
        (8, "preferred_output"),
        (9, "input.messages[0].role"),
        (10, "input"),
        (11, "input"),
        (11, "preferred_output"),
        (11, "non_preferred_output"),
    ]
    messages = {e["line"]: e["message"] for e in dataset["errors"]}
    assert "same answer" in messages[2] and "function calling" in messages[3] and "function calling" in messages[4]
    assert "'user'" in messages[6] and "unknown role 'tool'" in messages[9] and "must be an object" in messages[10]

    api = files["api"]  # through /v1/files: refused naming the first bad line, nothing kept
    with InProcessWorker(), pytest.raises(openai.BadRequestError) as invalid:
        api.files.create(file=("bad.jsonl", jsonl([good, rows[2]])), purpose="fine-tune")
    error = invalid.value.body
    assert error["param"] == "file"  # type: ignore[index]
    assert error["message"].startswith("file: line 2, field 'input.tools': function calling"), error  # type: ignore[index]
    # OpenAI's format is JSON Lines: a CSV with its columns is refused with the way out.
    csv = b"input,preferred_output,non_preferred_output\nSay red,Gladly.,No.\n"
    with InProcessWorker(), pytest.raises(openai.BadRequestError) as table:
        api.files.create(file=("prefs.csv", csv), purpose="fine-tune")
    assert ".jsonl" in table.value.body["message"]  # type: ignore[index]
    listed = [(f.filename, f.status) for f in api.files.list()]  # our upload keeps its invalid dataset; OpenAI's not
    assert listed == [("bad.jsonl", "error"), ("chats.jsonl", "processed"), ("prefs.jsonl", "processed")]
