"""Checkpoints of real training runs on the tiny model: recorded as `repo/N@k`, listed, served and downloaded; a
retried job resumes from its last one (and ends where an uninterrupted run ends); continue_from_version starts a
new job from a version or checkpoint, and is refused up front when it cannot work."""

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.models import AdapterVersion, Checkpoint, FinetuneJob, Tenant
from app.settings import get_settings
from conftest import TINY_MODEL, Platform, make_tenant
from finetune_helpers import (
    SENTIMENT,
    finish,
    metrics,
    ready_dataset,
    refusal,
    start_job,
    tensors,
    train,
    untar,
    version_dir,
)

NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")
ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in NAMES] + [
    {"prompt": "Say hi to Ivy", "completion": "Hi Ivy!", "split": "evaluation"}
]
# 8 rows, 2 per step: 4 steps an epoch, 8 in all; checkpoints at steps 3 and 6, and at the last step.
CONFIG = {
    "dataset": "greetings",
    "epochs": 2,
    "effective_batch_size": 2,
    "learning_rate": 1e-2,
    "rank": 4,
    "eval_steps": None,  # at the end of every epoch
}


def _tenant_id(name: str) -> str:
    with session_scope() as s:
        return s.scalars(select(Tenant.id).where(Tenant.name == name)).one()


def test_checkpoints_are_recorded_listed_served_and_downloaded(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    from functions.model_targets import resolve_model

    ready_dataset(client, alice, ROWS, "greetings")
    job = train(client, alice, repo="greet", checkpoint_every=3, **CONFIG)
    assert (job["adapter"], job["version"]) == ("greet/1", 1)
    assert job["checkpoints"] == ["greet/1@1", "greet/1@2", "greet/1@3"]
    listed = client.get("/v1/repos/greet", headers=alice).json()["checkpoints"]
    assert [(c["name"], c["version"], c["checkpoint"], c["step"], c["kind"]) for c in listed] == [
        ("greet/1@1", 1, 1, 3, "lora"),
        ("greet/1@2", 1, 2, 6, "lora"),
        ("greet/1@3", 1, 3, 8, "lora"),
    ]
    assert [c["epoch"] for c in listed] == [0.75, 1.5, 2.0] and {c["job_id"] for c in listed} == {job["id"]}
    assert client.get("/v1/repos/greet/versions/1/checkpoints", headers=alice).json() == listed

    # On the volume: a PEFT directory per checkpoint under the version; the resume state went with the job's end.
    root = version_dir(platform, "greet", 1)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert not list(root.glob("checkpoints/*/resume"))
    final, last, first = (
        tensors(path / "adapter_model.safetensors") for path in (root, root / "checkpoints/3", root / "checkpoints/1")
    )
    assert final.keys() == last.keys() == first.keys()
    # The version published is the evaluated step (4 or 8, each epoch's end) with the best task metric.
    kept = job["summary"]["kept"]["step"]
    assert all(torch.equal(final[k], last[k]) for k in final) == (kept == 8)  # checkpoint 3 is step 8
    assert not all(torch.equal(last[k], first[k]) for k in final)  # checkpoints are each their step's weights

    # Served like a version: its own adapter key and directory, on the version's base model.
    with session_scope() as s:
        target = resolve_model(s, _tenant_id("alice"), "greet/1@2")
        version = resolve_model(s, _tenant_id("alice"), "greet/1")
        checkpoint_id = s.scalars(select(Checkpoint.id).where(Checkpoint.number == 2)).one()
    assert target.adapter is not None and version.adapter is not None
    assert (target.adapter.key, target.adapter.path, target.adapter.base_model) == (
        checkpoint_id,
        root / "checkpoints" / "2",
        TINY_MODEL,
    )
    assert (target.adapter_name, target.base_model, target.model_dir) == ("greet/1@2", TINY_MODEL, None)
    assert version.adapter.key != checkpoint_id and version.adapter.path == root
    chat = {"model": "greet/1@1", "messages": [{"role": "user", "content": "Say hi to Ann"}], "max_tokens": 4}
    r = client.post("/v1/chat/completions", headers=alice, json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "greet/1@1"
    assert client.get("/v1/usage", headers=alice).json()["records"][0]["adapter"] == "greet/1@1"
    for missing in ("greet/1@4", "greet/2@1", "greet/1@", "greet/1@x"):
        r = client.post("/v1/chat/completions", headers=alice, json=chat | {"model": missing})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", missing

    # Downloaded like a version: the stored weights, and a config naming the base model rather than a path.
    r = client.get("/v1/repos/greet/versions/1/checkpoints/1/download", headers=alice)
    assert r.status_code == 200, r.text
    files = untar(r.content)
    assert sorted(files) == [
        "greet-1-checkpoint-1/adapter_config.json",
        "greet-1-checkpoint-1/adapter_model.safetensors",
    ]
    stored = (root / "checkpoints/1/adapter_model.safetensors").read_bytes()
    assert files["greet-1-checkpoint-1/adapter_model.safetensors"] == stored
    r = client.get("/v1/repos/greet/versions/1/checkpoints/9/download", headers=alice)
    assert r.status_code == 404 and r.json()["error"]["param"] == "checkpoint"
    bob = make_tenant("bob")[1]  # another tenant's checkpoints read as missing
    assert client.get("/v1/repos/greet/versions/1/checkpoints/1/download", headers=bob).status_code == 404
    assert client.get("/v1/repos/greet/versions/1/checkpoints", headers=bob).status_code == 404


def test_a_classification_jobs_checkpoints_answer_from_its_labels_before_its_version_is_published(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    ready_dataset(client, alice, SENTIMENT, "sentiment")
    config = {"dataset": "sentiment", "epochs": 1, "effective_batch_size": 2, "learning_rate": 1e-2, "rank": 4}
    job = train(client, alice, repo="mood", checkpoint_every=1, eval_steps=None, **config)
    assert job["checkpoints"][0] == "mood/1@1"
    # While a job trains, its version is not published yet: take the published row away to stand for that moment.
    with session_scope() as s:
        s.get_one(FinetuneJob, job["id"]).adapter_version_id = None
        s.flush()
        s.delete(s.scalars(select(AdapterVersion).where(AdapterVersion.version == 1)).one())
    chat = {"model": "mood/1@1", "messages": [{"role": "user", "content": "I love it."}], "max_tokens": 8}
    r = client.post("/v1/chat/completions", headers=alice, json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("positive", "negative")  # the dataset's labels


def test_a_retried_job_resumes_from_its_last_checkpoint(
    client: TestClient, alice: dict[str, str], platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt dies at step 5, after checkpoint 1 (step 3). The retry starts at step 3 with the
    Trainer's optimizer, schedule and data order, so it ends exactly where an uninterrupted run ends; the metrics
    rows of steps 4-5 the dead attempt wrote are replaced, not duplicated."""
    import functions.train_progress

    monkeypatch.setenv("LORAPLEX_RETRY_BASE_SECONDS", "0")
    get_settings.cache_clear()
    ready_dataset(client, alice, ROWS, "greetings")
    config = CONFIG | {"checkpoint_every": 3, "enable_early_stopping": False}
    uninterrupted = train(client, alice, repo="whole", **config)

    log_step = functions.train_progress.Progress.log

    def dies_at_step_5(self: functions.train_progress.Progress, step: int, logs: dict) -> None:
        if self.attempt == 1 and step == 5:
            raise RuntimeError("worker died")  # as a SIGKILL would, minus the lease wait (tests/e2e does that)
        log_step(self, step, logs)

    monkeypatch.setattr(functions.train_progress.Progress, "log", dies_at_step_5)
    job = finish(client, alice, start_job(client, alice, repo="resumed", **config)["id"])
    assert job["status"] == "completed" and job["attempts"] == 2, job
    assert job["summary"]["resumed_from"] == {"checkpoint": "resumed/1@1", "step": 3, "attempt": 2}
    assert job["checkpoints"] == ["resumed/1@1", "resumed/1@2", "resumed/1@3"]  # 6 and 8 taken after resuming

    rows = metrics(client, alice, job["id"])
    assert [m["step"] for m in rows] == list(range(1, 9))  # each step once, none lost, none twice
    assert {m["attempt"] for m in rows} == {2}
    first_attempt_rows = [m["at"] for m in rows[:3]]
    assert max(first_attempt_rows) < min(m["at"] for m in rows[3:])  # steps 1-3 kept, 4-8 trained again
    evals = metrics(client, alice, job["id"], "eval")
    assert [m["step"] for m in evals] == [0, 4, 8]  # the baseline carried over; step 4 (past the checkpoint) redone
    expected = [m["loss"] for m in metrics(client, alice, uninterrupted["id"])]
    assert [m["loss"] for m in rows] == pytest.approx(expected, rel=1e-4)
    ours = tensors(version_dir(platform, "resumed", 1) / "adapter_model.safetensors")
    theirs = tensors(version_dir(platform, "whole", 1) / "adapter_model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    assert job["summary"]["final"]["loss"] == pytest.approx(uninterrupted["summary"]["final"]["loss"], rel=1e-4)


def test_continue_from_a_version_or_checkpoint(client: TestClient, alice: dict[str, str], platform: Platform) -> None:
    ready_dataset(client, alice, ROWS, "greetings")
    first = train(client, alice, repo="greet", checkpoint_every=3, lora_alpha=16, **CONFIG)
    at_checkpoint_2 = next(m for m in metrics(client, alice, first["id"], "eval") if m["step"] == 8)

    # From checkpoint 3 (the last step): the LoRA settings carry over, and the new job's baseline evaluation is
    # that of the weights it starts from, not of the base model.
    config = {k: v for k, v in CONFIG.items() if k != "rank"} | {"epochs": 1}
    job = train(client, alice, repo="greet", continue_from_version="greet/1@3", **config)
    assert job["adapter"] == "greet/2"
    assert (job["config"]["rank"], job["config"]["lora_alpha"], job["config"]["target_modules"]) == (
        4,
        16,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    assert job["summary"]["baseline"]["loss"] == pytest.approx(at_checkpoint_2["loss"], rel=1e-4)
    assert job["summary"]["baseline"]["loss"] < first["summary"]["baseline"]["loss"]
    versions = client.get("/v1/repos/greet", headers=alice).json()["versions"]
    assert [(v["name"], v["rank"]) for v in versions] == [("greet/1", 4), ("greet/2", 4)]

    # From a version, with the same rank given explicitly: accepted.
    again = train(client, alice, repo="more", continue_from_version="greet/2", rank=4, **config)
    assert again["summary"]["baseline"]["loss"] == pytest.approx(job["summary"]["final"]["loss"], rel=1e-4)


def test_continue_from_version_refusals_name_the_field(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    ready_dataset(client, alice, ROWS, "greetings")
    train(client, alice, repo="greet", **CONFIG)
    # A second local base model (the same weights under another name) to continue across.
    other = Path(platform.data_dir) / "volume" / "base_models" / "tiny-llama-copy"
    other.symlink_to((Path(platform.data_dir) / "volume" / "base_models" / TINY_MODEL).resolve())
    base = {"repo": "next"} | {k: v for k, v in CONFIG.items() if k != "rank"}
    cases = [
        ({"continue_from_version": "greet"}, "continue_from_version", "repo/N"),
        ({"continue_from_version": "greet/9"}, "continue_from_version", "not one of your versions"),
        ({"continue_from_version": "greet/1@7"}, "continue_from_version", "not one of your versions"),
        ({"continue_from_version": "greet/1", "base_model": "tiny-llama-copy"}, "continue_from_version", TINY_MODEL),
        ({"continue_from_version": "greet/1@1", "rank": 8}, "rank", "trained with rank 4"),
        ({"continue_from_version": "greet/1", "target_modules": ["q_proj"]}, "target_modules", "conflicts"),
        ({"continue_from_version": "greet/1", "use_dora": True}, "use_dora", "conflicts"),
        ({"continue_from_version": "greet/1", "adapter": "none"}, "adapter", "is a LoRA adapter"),
    ]
    for change, param, words in cases:
        error = refusal(client, alice, **(base | change))
        assert error["param"] == param and words in error["message"], (change, error)
    bob = make_tenant("bob")[1]  # another tenant's version reads exactly like a missing one
    ready_dataset(client, bob, ROWS, "greetings")
    error = refusal(client, bob, **(base | {"continue_from_version": "greet/1"}))
    assert error["param"] == "continue_from_version" and "not one of your versions" in error["message"]


def test_a_job_keeps_the_version_number_it_took_when_it_started(
    client: TestClient, alice: dict[str, str], platform: Platform, tmp_path: Path
) -> None:
    """The number is taken when training starts (so checkpoints can be named); an import meanwhile takes the next."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.queue import EventInfo
    from functions.train import _start

    ready_dataset(client, alice, ROWS, "greetings")
    job = start_job(client, alice, repo="greet", **CONFIG)
    assert job["version"] is None
    assert _start(EventInfo("ev_test", "finetune.requested", job["id"], 1)) is not None  # as a worker starts it
    assert client.get(f"/v1/finetuning/jobs/{job['id']}", headers=alice).json()["version"] == 1

    base = AutoModelForCausalLM.from_pretrained(Path(platform.data_dir) / "volume" / "base_models" / TINY_MODEL)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = [("files", (name, (tmp_path / "lora" / name).read_bytes())) for name in names]
    r = client.post("/v1/repos/greet/versions", headers=alice, files=files, data={"base_model": TINY_MODEL})
    assert r.status_code == 201 and r.json()["name"] == "greet/2", r.text

    done = finish(client, alice, job["id"])
    assert (done["status"], done["adapter"]) == ("completed", "greet/1")
    assert done["checkpoints"] == ["greet/1@1", "greet/1@2"]
    versions = client.get("/v1/repos/greet", headers=alice).json()["versions"]
    assert [(v["name"], v["job_id"]) for v in versions] == [("greet/1", job["id"]), ("greet/2", None)]
