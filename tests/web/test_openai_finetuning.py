"""OpenAI's fine-tuning API (/v1/files, /v1/fine_tuning/jobs) driven by the official `openai` SDK, unchanged: the
whole flow against a real `loraplex serve` process with its worker (upload, create, events until it succeeds, chat
with `fine_tuned_model`), and in-process the files' and jobs' refusals, pagination, cancel and checkpoints. The same
files, jobs and adapters are read back through our own routes (one store, two dialects)."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import TINY_MODEL, InProcessWorker, Platform, Processes, make_tenant
from conftest import openai_sdk as sdk
from finetune_helpers import finish


def chat(name: str) -> dict[str, Any]:
    """A multi-turn conversation: system, user, assistant, user, assistant."""
    return {
        "messages": [
            {"role": "system", "content": "You greet people."},
            {"role": "user", "content": f"Say hi to {name}"},
            {"role": "assistant", "content": f"Hi {name}!"},
            {"role": "user", "content": "And once more?"},
            {"role": "assistant", "content": f"Hello again, {name}!"},
        ]
    }


TRAIN = [chat(n) for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")]  # too few to hold any out: only the file evaluates
VALID = [chat(n) for n in ("Gus", "Hal")]


def ended(newest_event: str) -> bool:
    return newest_event.startswith(
        ("The job has successfully completed", "Fine-tuning job failed", "Fine-tuning job cancelled")
    )


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture
def bundled(bundled_model: Path) -> Path:
    """Files are counted with the default base model's tokenizer: the bundled SmolLM2, converted once."""
    return bundled_model


# --- the whole flow against a real server -------------------------------------------------------------


@pytest.fixture
def served(bundled: Path, platform: Platform) -> Iterator[tuple[str, str]]:
    """(url, API key) of `loraplex serve --workers 1` on this test's platform (SQLite or PostgreSQL)."""
    key = make_tenant("alice")[1]["Authorization"].removeprefix("Bearer ")
    processes = Processes(platform, {})
    try:
        yield processes.server(workers=1), key
    finally:
        processes.stop()


def test_openai_sdk_fine_tunes_and_serves_against_a_real_server(served: tuple[str, str]) -> None:
    url, key = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    training = client.files.create(file=("greetings.jsonl", jsonl(TRAIN)), purpose="fine-tune")
    assert (training.object, training.status, training.purpose) == ("file", "processed", "fine-tune")
    assert (training.filename, training.bytes) == ("greetings.jsonl", len(jsonl(TRAIN)))
    validation = client.files.create(file=("greetings-eval.jsonl", jsonl(VALID)), purpose="fine-tune")

    job = client.fine_tuning.jobs.create(
        training_file=training.id,
        validation_file=validation.id,
        model=TINY_MODEL,
        suffix="greeter",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 2},
    )
    assert (job.object, job.status, job.model, job.seed) == ("fine_tuning.job", "queued", TINY_MODEL, 7)
    assert (job.training_file, job.validation_file, job.fine_tuned_model) == (training.id, validation.id, None)
    assert job.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 2.0}

    deadline = time.monotonic() + 300
    while not ended((events := client.fine_tuning.jobs.list_events(job.id, limit=100).data)[0].message):
        assert time.monotonic() < deadline, [e.message for e in events]
        time.sleep(0.5)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{TINY_MODEL}:greeter:1" and done.trained_tokens and done.finished_at
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert steps == [4, 3, 2, 1]  # 6 rows in batches of 3, two epochs; newest first
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)  # the validation file evaluates
    assert events[1].message == f"New fine-tuned model created: {done.fine_tuned_model}"
    assert events[-1].message == f"Created job {job.id}"

    reply = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "Say hi to Ann"}],
        max_tokens=4,
        temperature=0,
    )
    assert reply.model == done.fine_tuned_model and reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError) as missing:  # a version that does not exist
        client.chat.completions.create(model=f"ft:{TINY_MODEL}:greeter:2", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["param"] == "model"  # type: ignore[index]

    # One store, two dialects: the job, its files and its adapter through our own routes.
    ours = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
    [mine] = ours.get("/v1/finetuning/jobs").json()
    assert (mine["id"], mine["status"], mine["adapter"]) == (job.id.removeprefix("ftjob-"), "completed", "greeter/1")
    assert (mine["dataset"], mine["config"]["evaluation_dataset"]) == ("greetings", "greetings-eval")
    assert mine["summary"]["evaluation_rows"] == len(VALID) and mine["config"]["learning_rate"] == pytest.approx(2e-3)
    assert [d["name"] for d in ours.get("/v1/datasets").json()] == ["greetings", "greetings-eval"]
    assert ours.get("/v1/repos/greeter").json()["versions"][0]["name"] == "greeter/1"
    same = ours.post(
        "/v1/chat/completions",
        json={"model": "greeter/1", "messages": [{"role": "user", "content": "Say hi to Ann"}], "max_tokens": 4}
        | {"temperature": 0},
    )
    assert same.json()["choices"][0]["message"]["content"] == reply.choices[0].message.content


# --- in process ----------------------------------------------------------------------------------------


@pytest.fixture
def uploaded(bundled: Path, client: TestClient, alice: dict[str, str]) -> dict[str, Any]:
    """Alice's training and validation files, validated by a worker that is stopped afterwards (jobs stay queued
    until a test runs one)."""
    api = sdk(client, alice)
    with InProcessWorker():
        training = api.files.create(file=("greetings.jsonl", jsonl(TRAIN)), purpose="fine-tune")
        validation = api.files.create(file=("greetings-eval.jsonl", jsonl(VALID)), purpose="fine-tune")
    return {"api": api, "training": training.id, "validation": validation.id}


def test_files_upload_list_retrieve_content_and_delete(
    uploaded: dict[str, Any], client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    api = uploaded["api"]
    with InProcessWorker():
        again = api.files.create(file=("greetings.jsonl", jsonl(TRAIN[:2])), purpose="fine-tune")
        plain = api.files.create(file=("no extension", jsonl(TRAIN[:1])), purpose="fine-tune")
    assert (again.filename, plain.filename) == ("greetings-2.jsonl", "no-extension.jsonl")  # names made unique
    listed = api.files.list()
    assert [f.id for f in listed.data] == [plain.id, again.id, uploaded["validation"], uploaded["training"]]
    assert api.files.retrieve(uploaded["training"]).bytes == len(jsonl(TRAIN))
    assert api.files.content(uploaded["training"]).content == jsonl(TRAIN)
    names = [d["name"] for d in client.get("/v1/datasets", headers=alice).json()]
    assert names == ["greetings", "greetings-eval", "greetings-2", "no-extension"]

    first = api.files.list(limit=2)  # newest first, paged on by the last id
    assert [f.id for f in first.data] == [plain.id, again.id] and first.has_more
    rest = api.files.list(limit=2, after=again.id)
    assert [f.id for f in rest.data] == [uploaded["validation"], uploaded["training"]] and not rest.has_more
    assert [f.id for f in api.files.list(limit=1, order="asc")] == [f.id for f in reversed(listed.data)]  # all pages

    deleted = api.files.delete(again.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (again.id, "file", True)
    assert client.get("/v1/datasets/greetings-2", headers=alice).status_code == 404

    read = client.post("/v1/api_keys", headers=alice, json={"name": "reader", "scope": "read"}).json()["key"]
    reader = sdk(client, {"Authorization": f"Bearer {read}"})  # a `read` key reads files, never writes them
    assert reader.files.retrieve(uploaded["training"]).id == uploaded["training"]
    with pytest.raises(openai.PermissionDeniedError):
        reader.files.create(file=("greetings.jsonl", jsonl(TRAIN)), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        reader.fine_tuning.jobs.create(model=TINY_MODEL, training_file=uploaded["training"])

    theirs = sdk(client, bob)  # another tenant's file reads as one that does not exist
    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as hidden:
            call(uploaded["training"])
        assert hidden.value.body["param"] == "file_id"  # type: ignore[index]
    assert theirs.files.list().data == []


def test_bad_files_are_refused_and_nothing_is_kept(
    uploaded: dict[str, Any], client: TestClient, alice: dict[str, str]
) -> None:
    api = uploaded["api"]
    before = ([f.id for f in api.files.list()], client.get("/v1/datasets", headers=alice).json())
    with pytest.raises(openai.BadRequestError) as purpose:
        api.files.create(file=("greetings.jsonl", jsonl(TRAIN)), purpose="batch")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]

    no_assistant = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    wrong_order = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}
    for bad_row in (no_assistant, wrong_order):
        with InProcessWorker(), pytest.raises(openai.BadRequestError) as invalid:
            api.files.create(file=("bad.jsonl", jsonl([*TRAIN[:2], bad_row])), purpose="fine-tune")
        error = invalid.value.body
        assert error["param"] == "file" and error["message"].startswith("file: line 3"), error  # type: ignore[index]
    # Columns of its own (a 'columns' dataset of ours, which trains only with a prompt_template): not an OpenAI file.
    with InProcessWorker(), pytest.raises(openai.BadRequestError) as columns:
        api.files.create(file=("tickets.jsonl", jsonl([{"ticket": "t", "team": "a"}] * 2)), purpose="fine-tune")
    assert columns.value.body["param"] == "file" and "ticket, team" in columns.value.body["message"]  # type: ignore[index]
    assert ([f.id for f in api.files.list()], client.get("/v1/datasets", headers=alice).json()) == before


def test_job_refusals_name_openai_fields_and_create_nothing(
    uploaded: dict[str, Any], client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    api = uploaded["api"]
    with InProcessWorker():
        bobs = sdk(client, bob).files.create(file=("theirs.jsonl", jsonl(TRAIN)), purpose="fine-tune").id
    good = {"model": TINY_MODEL, "training_file": uploaded["training"]}
    refused = [
        ({"model": "gpt-4o-mini"}, "model", 400),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", 400),
        ({"hyperparameters": {"batch_size": 2000}}, "hyperparameters.batch_size", 400),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier", 400),
        ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", 400),
        ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method.type", 400),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 101}}}},
            "method.supervised.hyperparameters.n_epochs",
            400,
        ),
        ({"metadata": {"team": "a"}}, "metadata", 400),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", 400),
        ({"suffix": "not a name"}, "suffix", 400),
        ({"seed": -1}, "seed", 400),
        ({"training_file": "file-ds_0000000000000000"}, "training_file", 404),
        ({"training_file": bobs}, "training_file", 404),
        ({"validation_file": bobs}, "validation_file", 404),
    ]
    for change, param, status in refused:
        r = client.post("/v1/fine_tuning/jobs", headers=alice, json=good | change)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (change, r.text)
        assert r.json()["error"]["message"].startswith(f"{param}: "), r.text
    with pytest.raises(openai.BadRequestError) as unknown:  # through the SDK: a field it lets through unchecked
        api.fine_tuning.jobs.create(**good, extra_body={"learning_rate": 1})
    assert unknown.value.body["param"] == "learning_rate"  # type: ignore[index]
    assert api.fine_tuning.jobs.list().data == []
    assert client.get("/v1/finetuning/jobs", headers=alice).json() == []
    assert client.get("/v1/repos", headers=alice).json() == []


def test_jobs_list_cancel_events_and_checkpoints(
    uploaded: dict[str, Any], client: TestClient, alice: dict[str, str]
) -> None:
    api = uploaded["api"]
    jobs = [
        api.fine_tuning.jobs.create(model=TINY_MODEL, training_file=uploaded["training"], suffix=f"s{n}")
        for n in range(3)
    ]
    assert jobs[0].user_provided_suffix == "s0"
    default = api.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=uploaded["training"],
        validation_file=uploaded["validation"],
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
    )
    assert default.user_provided_suffix == f"ft-{TINY_MODEL}" and default.method.type == "supervised"  # type: ignore[union-attr]
    newest_first = [default.id, *(j.id for j in reversed(jobs))]
    page = api.fine_tuning.jobs.list(limit=3)
    assert [j.id for j in page.data] == newest_first[:3] and page.has_more
    rest = api.fine_tuning.jobs.list(limit=3, after=page.data[-1].id)
    assert [j.id for j in rest.data] == newest_first[3:] and not rest.has_more
    assert [j.id for j in api.fine_tuning.jobs.list(limit=1)] == newest_first  # the SDK pages on by itself

    for job in jobs:  # three never start
        cancelled = api.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.get(f"/v1/finetuning/jobs/{jobs[0].id.removeprefix('ftjob-')}", headers=alice).json()["status"] == (
        "cancelled"
    )
    messages = [e.message for e in api.fine_tuning.jobs.list_events(jobs[0].id)]
    assert messages == ["Fine-tuning job cancelled", f"Created job {jobs[0].id}"]
    with pytest.raises(openai.ConflictError) as in_use:  # a file a job names is kept for the job's record
        api.files.delete(uploaded["validation"])
    assert in_use.value.body["param"] == "file_id"  # type: ignore[index]

    done = finish(client, alice, default.id.removeprefix("ftjob-"))
    assert done["status"] == "completed", done
    assert api.fine_tuning.jobs.retrieve(default.id).status == "succeeded"
    events = api.fine_tuning.jobs.list_events(default.id, limit=100)
    assert not events.has_more and len(events.data) > 5
    first = api.fine_tuning.jobs.list_events(default.id, limit=5)
    assert [e.id for e in first.data] == [e.id for e in events.data[:5]] and first.has_more
    following = api.fine_tuning.jobs.list_events(default.id, limit=5, after=first.data[-1].id)
    assert [e.id for e in following.data] == [e.id for e in events.data[5:10]]
    assert [e.id for e in api.fine_tuning.jobs.list_events(default.id, limit=2)] == [e.id for e in events.data]
    assert [e.created_at for e in events.data] == sorted((e.created_at for e in events.data), reverse=True)

    checkpoints = api.fine_tuning.jobs.checkpoints.list(default.id)  # one per epoch, newest first
    assert [c.fine_tuned_model_checkpoint for c in checkpoints.data] == [
        f"ft:{TINY_MODEL}:ft-{TINY_MODEL}:1:ckpt-2",
        f"ft:{TINY_MODEL}:ft-{TINY_MODEL}:1:ckpt-1",
    ]
    assert [c.step_number for c in checkpoints.data] == [6, 3]  # 6 rows in batches of 2
    assert checkpoints.data[0].metrics.train_loss is not None and checkpoints.data[0].metrics.valid_loss is not None
    one = api.fine_tuning.jobs.checkpoints.list(default.id, limit=1)
    assert one.has_more and [c.id for c in one.data] == [checkpoints.data[0].id]
    reply = api.chat.completions.create(
        model=checkpoints.data[-1].fine_tuned_model_checkpoint,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
    )
    assert reply.model == checkpoints.data[-1].fine_tuned_model_checkpoint
    lorax = client.post(  # LoRAX's routes take the name as adapter_id
        "/generate",
        headers=alice,
        json={"inputs": "hi", "parameters": {"adapter_id": f"ft:{TINY_MODEL}:ft-{TINY_MODEL}:1", "max_new_tokens": 2}},
    )
    assert lorax.status_code == 200 and isinstance(lorax.json()["generated_text"], str), lorax.text
    with pytest.raises(openai.NotFoundError):  # a version's name with another base model names nothing
        api.chat.completions.create(
            model=f"ft:smollm2-135m:ft-{TINY_MODEL}:1", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(openai.NotFoundError) as missing:
        api.fine_tuning.jobs.retrieve("ftjob-ft_0000000000000000")
    assert missing.value.body["param"] == "fine_tuning_job_id"  # type: ignore[index]


def test_our_dialect_takes_an_evaluation_dataset_with_the_same_checks(
    uploaded: dict[str, Any], client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    """Our config's `evaluation_dataset` is OpenAI's `validation_file`: ready, the tenant's own, named when not."""
    with InProcessWorker():
        sdk(client, bob).files.create(file=("theirs.jsonl", jsonl(VALID)), purpose="fine-tune")
    pending = client.post(  # no worker: it stays validating
        "/v1/datasets",
        headers=alice,
        files={"file": ("later.jsonl", jsonl(VALID))},
        data={"base_model": TINY_MODEL, "wait": "false"},
    )
    assert pending.status_code == 202
    job = {"base_model": TINY_MODEL, "dataset": "greetings", "repo": "ours"}
    for name, status in (("theirs", 404), ("missing", 404), ("later", 409)):
        r = client.post("/v1/finetuning/jobs", headers=alice, json=job | {"evaluation_dataset": name})
        assert (r.status_code, r.json()["error"]["param"]) == (status, "evaluation_dataset"), r.text
    assert client.get("/v1/finetuning/jobs", headers=alice).json() == []

    created = client.post("/v1/finetuning/jobs", headers=alice, json=job | {"evaluation_dataset": "greetings-eval"})
    assert created.status_code == 201, created.text
    assert created.json()["summary"]["warnings"] == []  # no "no evaluation" warning: the other dataset evaluates
    shown = uploaded["api"].fine_tuning.jobs.retrieve("ftjob-" + created.json()["id"])
    assert (shown.training_file, shown.validation_file) == (uploaded["training"], uploaded["validation"])
    assert shown.user_provided_suffix == "ours" and shown.hyperparameters.learning_rate_multiplier == 1.0
    r = client.delete("/v1/datasets/greetings-eval", headers=alice)  # kept for the job's record
    assert r.status_code == 409, r.text
