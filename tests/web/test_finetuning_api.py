"""/v1/finetuning/jobs through the real app and the real training handler on the tiny model: config errors,
estimates, completed jobs with versioned adapters, per-step metrics, the ledger charge, and cancellation."""

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.models import Event, UsageRecord
from conftest import TINY_MODEL, InProcessWorker, Platform

ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")] + [
    {"prompt": "Say hi to Gus", "completion": "Hi Gus!", "split": "evaluation"}
]
BASE = {"base_model": TINY_MODEL, "dataset": "greetings", "repo": "greet"}


def upload(client: TestClient, headers: dict[str, str], name: str = "greetings", wait: bool = True) -> httpx.Response:
    data = "\n".join(json.dumps(r) for r in ROWS).encode()
    return client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (f"{name}.jsonl", data)},
        data={"base_model": TINY_MODEL, "wait": str(wait).lower()},
    )


def ready_dataset_without_worker(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    """Upload, then validate by draining the queue here, so no worker is left running afterwards."""
    r = upload(client, headers, wait=False)
    assert r.status_code == 202, r.text
    assert InProcessWorker().drain() == 1
    dataset = client.get("/v1/datasets/greetings", headers=headers).json()
    assert dataset["status"] == "ready", dataset
    return dataset


def create_job(client: TestClient, headers: dict[str, str], **config: Any) -> dict[str, Any]:
    r = client.post("/v1/finetuning/jobs", headers=headers, json=BASE | config)
    assert r.status_code == 201, r.text
    return r.json()


def wait_for_job(client: TestClient, headers: dict[str, str], job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/finetuning/jobs/{job_id}", headers=headers).json()
        if job["status"] not in ("queued", "training"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout} s"
        time.sleep(0.05)


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    return err


def adapter_dirs(platform: Platform) -> list[Path]:
    """Every adapter version directory on the volume: adapters/<tenant>/<repo>/<version>."""
    root = Path(platform.data_dir) / "volume" / "adapters"
    return sorted(p for p in root.glob("*/*/*") if p.is_dir())


def micro_usd_for(tokens: int) -> int:
    """$0.50 per million tokens for LoRA up to 16B parameters, rounded up to a whole micro-dollar."""
    return math.ceil(tokens * 500_000 / 1_000_000)


# --- config errors ------------------------------------------------------------------------------------


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"rank": 0}, "rank", "greater than or equal to 1"),
    ({"rank": "auto"}, "rank", "'auto' cannot be derived from a dataset for this field"),
    ({"epochs": "many"}, "epochs", "valid integer"),
    ({"learning_rate": 0}, "learning_rate", "greater than 0"),
    ({"learning_rate": -1e-4}, "learning_rate", "greater than 0"),
    ({"epochs": 0}, "epochs", "greater than or equal to 1"),
    ({"target_modules": ["q_proj", "attn_proj"]}, "target_modules", "'attn_proj'"),
    ({"base_model": "gpt-17"}, "base_model", "'gpt-17'"),
    ({"max_seq_length": 4096}, "max_seq_length", "2048"),
    ({"turbo": True}, "turbo", "not a field of this request"),
    ({"adapter": "turbo_lora"}, "adapter", "not available yet"),
    ({"adapter": "qlora"}, "adapter", "'lora'"),
    ({"repo": "my repo!"}, "repo", "letters, digits"),
    ({"repo": "-leading-dash"}, "repo", "letters, digits"),
    ({"dataset": None}, "dataset", "valid string"),
]


def test_config_errors_name_the_field(client: TestClient, alice: dict[str, str]) -> None:
    for change, param, fragment in CONFIG_ERRORS:
        err = error_of(client.post("/v1/finetuning/jobs", headers=alice, json=BASE | change), 422)
        assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, "invalid_value"), change
        assert err["message"].startswith(f"{param}: "), err
        assert fragment in err["message"], err
    # The largest context the tiny model has is accepted (the request then fails on the missing dataset).
    error_of(client.post("/v1/finetuning/jobs", headers=alice, json=BASE | {"max_seq_length": 2048}), 404)
    assert client.get("/v1/finetuning/jobs", headers=alice).json() == []
    assert client.get("/v1/repos", headers=alice).json() == []


def test_dataset_not_ready_or_unknown(client: TestClient, alice: dict[str, str]) -> None:
    r = upload(client, alice, wait=False)  # no worker runs: the dataset stays "validating"
    assert r.status_code == 202 and r.json()["status"] == "validating", r.text
    err = error_of(client.post("/v1/finetuning/jobs", headers=alice, json=BASE), 409)
    assert (err["type"], err["param"], err["code"]) == ("conflict_error", "dataset", "dataset_not_ready")
    assert "validating" in err["message"]
    err = error_of(client.post("/v1/finetuning/jobs", headers=alice, json=BASE | {"dataset": "nope"}), 404)
    assert (err["type"], err["param"], err["code"]) == ("not_found_error", "dataset", "dataset_not_found")
    assert "'nope'" in err["message"]
    assert client.get("/v1/finetuning/jobs", headers=alice).json() == []
    assert client.get("/v1/repos", headers=alice).json() == []
    error_of(client.get("/v1/finetuning/jobs/ft_0000000000000000", headers=alice), 404)
    error_of(client.post("/v1/finetuning/jobs/ft_0000000000000000/cancel", headers=alice), 404)
    error_of(client.get("/v1/finetuning/jobs/ft_0000000000000000/metrics", headers=alice), 404)


# --- the whole flow -----------------------------------------------------------------------------------


def test_train_two_versions_with_metrics_adapter_files_and_charges(
    client: TestClient, alice: dict[str, str], worker: InProcessWorker, platform: Platform
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = upload(client, alice)
    assert r.status_code == 201, r.text
    train_tokens = r.json()["stats"]["train_tokens"]
    assert r.json()["stats"]["train_rows"] == 6 and train_tokens > 0

    job = create_job(client, alice, epochs=2, effective_batch_size=2, rank=4, learning_rate=1e-3, eval_steps=None)
    tokens = train_tokens * 2  # max_seq_length "auto" fits the longest row: nothing is cut
    assert job["estimate"]["tokens"] == tokens
    assert job["estimate"]["cost"]["micro_usd"] == micro_usd_for(tokens)
    assert job["estimate"]["cost"]["usd"] == f"${micro_usd_for(tokens) / 1e6:.6f}"
    assert (job["status"], job["adapter"], job["charge"], job["dataset"], job["repo"]) == (
        "queued",
        None,
        None,
        "greetings",
        "greet",
    )
    assert job["config"]["rank"] == 4 and job["config"]["epochs"] == 2 and job["config"]["adapter"] == "lora"
    assert job["config"]["target_modules"] is None  # defaults are recorded as sent
    # The fields left "auto": the task (not a classification dataset) and max_seq_length.
    assert job["summary"]["auto"] == {"task": "completion", "max_seq_length": job["config"]["max_seq_length"]}

    done = wait_for_job(client, alice, job["id"])
    assert done["status"] == "completed", done
    assert done["adapter"] == "greet/1"
    assert done["error"] is None and done["attempts"] == 1
    assert done["started_at"] is not None and done["finished_at"] >= done["started_at"]
    # 6 rows, 2 per step, 2 epochs.
    assert done["total_steps"] == 6
    assert done["charge"] == done["estimate"]["cost"]

    metrics = client.get(f"/v1/finetuning/jobs/{job['id']}/metrics", headers=alice)
    assert metrics.status_code == 200
    everything = metrics.json()
    rows = [m for m in everything if m["kind"] == "train"]
    assert [m["step"] for m in rows] == list(range(1, done["total_steps"] + 1))
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in rows), rows
    assert all(m["attempt"] == 1 and m["tokens_per_second"] >= 0 for m in rows)
    assert [m["epoch"] for m in rows] == sorted(m["epoch"] for m in rows) and rows[-1]["epoch"] == pytest.approx(2)
    assert max(m["learning_rate"] for m in rows) > rows[-1]["learning_rate"]  # cosine decay after warmup
    # The evaluation split (one row) is evaluated before training (step 0) and at the end of each epoch.
    evals = [m for m in everything if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 3, 6]
    for m in evals:
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
        assert 0 <= m["token_accuracy"] <= 1 and m["sequence_accuracy"] in (0, 1) and m["char_error_rate"] >= 0
    summary = done["summary"]
    assert summary["steps_done"] == 6 and summary["stopped_early"] is False and summary["evaluation_rows"] == 1
    assert summary["baseline"]["step"] == 0 and summary["final"]["step"] == 6
    assert summary["final"]["loss"] == pytest.approx(evals[-1]["loss"])
    later = client.get(f"/v1/finetuning/jobs/{job['id']}/metrics?after_step=4", headers=alice).json()
    assert [(m["kind"], m["step"]) for m in later] == [("train", 5), ("train", 6), ("eval", 6)]

    second = create_job(client, alice, epochs=1, effective_batch_size=4, rank=8, target_modules=["q_proj", "o_proj"])
    assert second["estimate"]["tokens"] == train_tokens
    second = wait_for_job(client, alice, second["id"])
    assert second["status"] == "completed", second
    assert second["adapter"] == "greet/2"

    repo = client.get("/v1/repos/greet", headers=alice)
    assert repo.status_code == 200
    versions = repo.json()["versions"]
    assert [(v["name"], v["version"], v["rank"], v["job_id"]) for v in versions] == [
        ("greet/1", 1, 4, job["id"]),
        ("greet/2", 2, 8, second["id"]),
    ]
    assert [v["target_modules"] for v in versions] == [
        ALL_LINEAR,
        ["q_proj", "o_proj"],
    ]  # every linear layer unless chosen
    assert all(v["base_model"] == TINY_MODEL and v["adapter_type"] == "lora" for v in versions)
    assert [r["name"] for r in client.get("/v1/repos", headers=alice).json()] == ["greet"]
    assert [j["id"] for j in client.get("/v1/finetuning/jobs", headers=alice).json()] == [job["id"], second["id"]]
    model_ids = {m["id"] for m in client.get("/v1/models", headers=alice).json()["data"]}
    assert {"greet/1", "greet/2", TINY_MODEL} <= model_ids

    # The adapter on the volume is a PEFT directory that loads on the base model, with trained weights.
    dirs = adapter_dirs(platform)
    assert [(d.parent.name, d.name) for d in dirs] == [("greet", "1"), ("greet", "2")]
    base = AutoModelForCausalLM.from_pretrained(Path(platform.data_dir) / "volume" / "base_models" / TINY_MODEL)
    model = PeftModel.from_pretrained(base, dirs[0])
    assert model.peft_config["default"].r == 4
    assert sorted(model.peft_config["default"].target_modules) == sorted(ALL_LINEAR)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # 2 layers x every linear layer
    assert all(torch.count_nonzero(p) > 0 for p in lora_b)  # zero at init: these were trained

    # The ledger holds one finetune record per job; `charge` is its amount, and the totals add up.
    with session_scope() as s:
        ledger = {u.reference: u for u in s.scalars(select(UsageRecord).where(UsageRecord.kind == "finetune")).all()}
    assert set(ledger) == {job["id"], second["id"]}
    assert ledger[job["id"]].amount_micro_usd == done["charge"]["micro_usd"] == micro_usd_for(tokens)
    assert ledger[second["id"]].amount_micro_usd == second["charge"]["micro_usd"] == micro_usd_for(train_tokens)
    assert ledger[job["id"]].input_tokens == tokens and ledger[job["id"]].adapter == "greet/1"
    assert ledger[job["id"]].idempotency_key == f"finetune:{job['id']}"
    usage = client.get("/v1/usage", headers=alice).json()
    total = done["charge"]["micro_usd"] + second["charge"]["micro_usd"]
    assert usage["totals"]["records"] == 2
    assert usage["totals"]["cost"]["micro_usd"] == total
    assert usage["totals"]["input_tokens"] == tokens + train_tokens
    assert usage["by_kind"]["finetune"]["cost"]["micro_usd"] == total
    assert usage["by_kind"]["inference"]["records"] == 0
    assert [(u["kind"], u["technique"], u["adapter"], u["reference"]) for u in usage["records"]] == [
        ("finetune", "sft_lora", "greet/2", second["id"]),
        ("finetune", "sft_lora", "greet/1", job["id"]),
    ]

    # Cancelling a finished job changes nothing.
    r = client.post(f"/v1/finetuning/jobs/{job['id']}/cancel", headers=alice)
    assert r.status_code == 200, r.text
    assert r.json() == done
    assert client.get(f"/v1/finetuning/jobs/{job['id']}", headers=alice).json() == done


# --- cancellation -------------------------------------------------------------------------------------


def test_cancelled_queued_job_never_trains(client: TestClient, alice: dict[str, str], platform: Platform) -> None:
    ready_dataset_without_worker(client, alice)
    job = create_job(client, alice, epochs=1)
    assert job["status"] == "queued"
    r = client.post(f"/v1/finetuning/jobs/{job['id']}/cancel", headers=alice)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert cancelled["started_at"] is None

    # A worker now takes the event and drops it: the job stays cancelled and nothing was trained.
    assert InProcessWorker().drain() == 1
    with session_scope() as s:
        assert s.scalars(select(Event.status).where(Event.subject_id == job["id"])).all() == ["done"]
        assert s.scalars(select(UsageRecord)).all() == []
    after = client.get(f"/v1/finetuning/jobs/{job['id']}", headers=alice).json()
    assert after == cancelled
    assert (after["adapter"], after["charge"], after["total_steps"], after["attempts"]) == (None, None, None, 0)
    assert client.get(f"/v1/finetuning/jobs/{job['id']}/metrics", headers=alice).json() == []
    assert client.get("/v1/repos/greet", headers=alice).json()["versions"] == []
    assert adapter_dirs(platform) == []
    assert client.get("/v1/usage", headers=alice).json()["totals"]["records"] == 0
    # Cancelling again is harmless.
    again = client.post(f"/v1/finetuning/jobs/{job['id']}/cancel", headers=alice)
    assert again.status_code == 200 and again.json() == cancelled
