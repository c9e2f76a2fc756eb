"""Fine-tuning options through the real API and trainer on the tiny model: train_steps, held-out evaluation,
early stopping, rsLoRA and DoRA, and the refusals that happen before any compute."""

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_finetuning_api import create_job, wait_for_job

from conftest import TINY_MODEL, InProcessWorker, Platform
from finetune_helpers import ready_dataset

ROWS = [
    {"prompt": f"Repeat {w}", "completion": w}
    for w in ["red", "green", "blue", "cyan", "pink", "gold", "gray", "navy", "teal", "lime"]
]


def _job(client: TestClient, headers: dict[str, str], **config: object) -> dict:
    job = create_job(client, headers, dataset="words", repo="words", **config)
    with InProcessWorker():
        return wait_for_job(client, headers, job["id"])


@pytest.mark.parametrize(
    ("config", "param", "words"),
    [
        ({"epochs": 2, "train_steps": 5}, "train_steps", "not both"),
        ({"adapter": "adalora"}, "adapter", "LoRA only"),
        ({"adapter": "adaption_prompt"}, "adapter", "LoRA only"),
        ({"warmup_ratio": 1.5}, "warmup_ratio", "less than 1"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler", "cosine"),
        ({"eval_fraction": -0.1}, "eval_fraction", "greater than or equal"),
    ],
)
def test_configs_that_cannot_work_are_refused_before_any_compute(
    client: TestClient, alice: dict[str, str], config: dict, param: str, words: str
) -> None:
    ready_dataset(client, alice, ROWS, "words")
    r = client.post(
        "/v1/finetuning/jobs",
        headers=alice,
        json={"base_model": TINY_MODEL, "dataset": "words", "repo": "words"} | config,
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert client.get("/v1/finetuning/jobs", headers=alice).json() == []


def test_train_steps_with_a_held_out_fraction(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, ROWS, "words")  # 10 rows, no evaluation split: 10% (one row) is held out
    job = _job(client, alice, train_steps=3, effective_batch_size=2, eval_steps=1, enable_early_stopping=False)
    assert job["status"] == "completed", job
    assert job["total_steps"] == 3 and "epochs" not in job["config"]
    train_tokens = client.get("/v1/datasets/words", headers=alice).json()["stats"]["train_tokens"]
    assert job["estimate"]["tokens"] == -(-train_tokens * 3 * 2 // 10)  # the rows three steps of two will see
    assert job["summary"]["evaluation_rows"] == 1 and job["summary"]["steps_done"] == 3
    metrics = client.get(f"/v1/finetuning/jobs/{job['id']}/metrics", headers=alice).json()
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 1, 2, 3]


def test_early_stopping_when_the_evaluation_loss_stops_improving(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, ROWS, "words")
    # A learning rate too small to move the loss: the first evaluation after step 1 sets the best, the next one
    # does not beat it by 1e-4, and patience 1 stops training at step 2 of 10.
    job = _job(
        client,
        alice,
        train_steps=10,
        effective_batch_size=2,
        learning_rate=1e-9,
        eval_steps=1,
        early_stopping_patience=1,
    )
    assert job["status"] == "completed", job
    summary = job["summary"]
    assert summary["stopped_early"] is True and summary["steps_done"] == 2
    assert job["charge"]["micro_usd"] <= job["estimate"]["cost"]["micro_usd"]  # charged for what ran


@pytest.mark.parametrize("option", ["use_rslora", "use_dora"])
def test_rslora_and_dora_adapters(client: TestClient, alice: dict[str, str], platform: Platform, option: str) -> None:
    ready_dataset(client, alice, ROWS, "words")
    job = _job(client, alice, epochs=1, effective_batch_size=4, **{option: True})
    assert job["status"] == "completed", job
    adapter_dir = next((Path(platform.data_dir) / "volume" / "adapters").glob("*/words/1"))
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved[option] is True
    r = client.post(
        "/v1/chat/completions",
        headers=alice,
        json={"model": "words/1", "messages": [{"role": "user", "content": "Repeat red"}], "max_tokens": 3},
    )
    assert r.status_code == 200, r.text


def test_out_of_memory_fails_the_job_with_that_reason_and_frees_the_worker(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the allocation failure a too-large batch causes, raised where training starts."""
    import functions.train

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("cannot allocate 34359738368 bytes")

    ready_dataset(client, alice, ROWS, "words")
    monkeypatch.setattr(functions.train, "build_trainer", out_of_memory)
    job = _job(client, alice, epochs=1)
    assert job["status"] == "failed" and job["attempts"] == 1  # not retried: it would run out again
    assert "ran out of memory" in job["error"] and "effective_batch_size" in job["error"]
    monkeypatch.undo()
    assert _job(client, alice, epochs=1)["status"] == "completed"  # the worker serves on
