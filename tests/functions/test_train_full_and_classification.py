"""Full fine-tuning (adapter "none") and classification datasets, trained for real on the tiny model, and the
config refusals that come before any compute."""

import json
import math
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.models import Dataset, Tenant, UsageRecord
from conftest import TINY_MODEL, Platform
from finetune_helpers import SENTIMENT, finish, metrics, ready_dataset, refusal, start_job, train, untar, version_dir
from functions.datasets import Example, detect_labels
from functions.evaluate import classification_report

GREETINGS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")] + [
    {"prompt": "Say hi to Gus", "completion": "Hi Gus!", "split": "evaluation"}
]


def _tenant_id(name: str) -> str:
    with session_scope() as s:
        return s.scalars(select(Tenant.id).where(Tenant.name == name)).one()


# ---- full fine-tuning ------------------------------------------------------------------------------------


def test_full_fine_tuning_publishes_a_whole_servable_model(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    from transformers import AutoModelForCausalLM

    from functions.model_targets import resolve_model

    ready_dataset(client, alice, GREETINGS, "greetings")
    full = {"dataset": "greetings", "repo": "full", "adapter": "none", "effective_batch_size": 3}
    job = train(client, alice, epochs=1, checkpoint_every=1, **full)
    assert job["config"]["adapter"] == "none" and "rank" not in job["config"]  # LoRA settings do not apply
    assert job["checkpoints"] == ["full/1@1", "full/1@2"]
    [version] = client.get("/v1/repos/full", headers=alice).json()["versions"]
    assert (version["name"], version["kind"], version["adapter_type"], version["rank"], version["target_modules"]) == (
        "full/1",
        "full",
        "none",
        0,
        [],
    )

    # The version is a model directory: weights, config and tokenizer; every weight was trained.
    root = version_dir(platform, "full", 1)
    files = sorted(p.name for p in root.iterdir() if p.is_file())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not [name for name in files if name.startswith("adapter_")]
    tuned = AutoModelForCausalLM.from_pretrained(root)
    base = AutoModelForCausalLM.from_pretrained(Path(platform.data_dir) / "volume" / "base_models" / TINY_MODEL)
    base_weights = dict(base.named_parameters())
    unchanged = [n for n, p in tuned.named_parameters() if torch.equal(p, base_weights[n])]
    assert unchanged == []
    summary = job["summary"]
    assert math.isfinite(summary["final"]["loss"]) and summary["final"]["loss"] != summary["baseline"]["loss"]

    # Served as its own model: the engine gets the directory, adapter None, base model for the architecture.
    with session_scope() as s:
        for asked in ("full/1", "full"):
            target = resolve_model(s, _tenant_id("alice"), asked)
            assert (target.base_model, target.adapter, target.adapter_name, target.model_dir) == (
                TINY_MODEL,
                None,
                "full/1",
                root,
            )
        checkpoint = resolve_model(s, _tenant_id("alice"), "full/1@1")
    assert (checkpoint.adapter, checkpoint.model_dir) == (None, root / "checkpoints" / "1")
    assert AutoModelForCausalLM.from_pretrained(root / "checkpoints" / "1") is not None  # a model directory too
    assert (root / "checkpoints" / "1" / "tokenizer.json").is_file()

    # Downloaded as the model directory (no checkpoints or resume state in it).
    r = client.get("/v1/repos/full/versions/1/download", headers=alice)
    assert r.status_code == 200, r.text
    archive = untar(r.content)
    assert sorted(archive) == [f"full-1/{name}" for name in files]
    assert archive["full-1/model.safetensors"] == (root / "model.safetensors").read_bytes()

    # Charged as full fine-tuning: $1.00 per 1M tokens up to 16B parameters.
    with session_scope() as s:
        record = s.scalars(select(UsageRecord).where(UsageRecord.reference == job["id"])).one()
    assert (record.technique, record.adapter) == ("sft_full", "full/1")
    assert record.amount_micro_usd == math.ceil(record.input_tokens * 1_000_000 / 1_000_000)

    # Continued: the whole model trains on from the version's weights.
    more = train(client, alice, dataset="greetings", repo="full", continue_from_version="full/1", train_steps=1)
    assert more["adapter"] == "full/2" and more["config"]["adapter"] == "none"
    assert more["summary"]["baseline"]["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-4)


# ---- classification --------------------------------------------------------------------------------------


def test_a_classification_head_job_is_served_through_the_same_api(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    ready_dataset(client, alice, SENTIMENT, "sentiment")
    job = train(
        client, alice, dataset="sentiment", repo="head", task="classification", epochs=2, effective_batch_size=3
    )
    assert job["config"]["task"] == "classification" and job["summary"]["kept"]["metric"] == "accuracy"
    assert job["summary"]["labels"] == ["negative", "positive"]
    assert (version_dir(platform, "head", 1) / "classifier_head.safetensors").exists()
    # The download carries the head beside the LoRA: without it the version is not the model that was trained.
    r = client.get("/v1/repos/head/versions/1/download", headers=alice)
    assert r.status_code == 200, r.text
    files = untar(r.content)
    stored = ["adapter_config.json", "adapter_model.safetensors", "classifier_head.json", "classifier_head.safetensors"]
    assert sorted(files) == [f"head-1/{name}" for name in stored]
    assert json.loads(files["head-1/classifier_head.json"])["labels"] == ["negative", "positive"]
    # Importing it back is refused, naming the head, rather than publishing the LoRA without it.
    r = client.post(
        "/v1/repos/imported/versions",
        headers=alice,
        files={"archive": ("head-1.tar.gz", r.content)},
        data={"base_model": TINY_MODEL},
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "classifier_head.safetensors", r.text
    r = client.post(
        "/v1/chat/completions",
        headers=alice,
        json={
            "model": "head/1",
            "messages": [{"role": "user", "content": "What a lovely day!"}],
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] in ("negative", "positive")  # the head's answer, a label
    first = choice["logprobs"]["content"][0]["top_logprobs"]  # each label's first token: the head's softmax
    assert sum(math.exp(t["logprob"]) for t in first) == pytest.approx(1.0, abs=1e-4)


def test_classification_datasets_report_accuracy_per_class_and_a_confusion_matrix(
    client: TestClient, alice: dict[str, str]
) -> None:
    dataset = ready_dataset(client, alice, SENTIMENT, "sentiment")
    assert dataset["stats"]["labels"] == {"negative": 3, "positive": 3}
    job = train(client, alice, dataset="sentiment", repo="sentiment", epochs=2, effective_batch_size=3, eval_steps=None)
    assert job["summary"]["labels"] == ["negative", "positive"]
    evals = metrics(client, alice, job["id"], "eval")
    assert [m["step"] for m in evals] == [0, 2, 4]
    for row in evals:
        report = row["classification"]
        classes = ["negative", "positive", "neutral"]  # the training labels, then the evaluation's own
        assert report["labels"] == classes
        matrix = report["confusion_matrix"]
        assert (matrix["rows"], matrix["columns"]) == (classes, [*classes, "(other)"])
        assert [sum(counts) for counts in matrix["counts"]] == [1, 2, 1]  # evaluation rows per reference class
        assert {label: c["support"] for label, c in report["per_class"].items()} == {
            "negative": 1,
            "positive": 2,
            "neutral": 1,
        }
        diagonal = [matrix["counts"][i][i] for i in range(3)]
        assert report["accuracy"] == pytest.approx(sum(diagonal) / 4) == pytest.approx(row["sequence_accuracy"])
        assert report["per_class"]["positive"]["accuracy"] == pytest.approx(diagonal[1] / 2)
    assert job["summary"]["final"]["classification"] == evals[-1]["classification"]


def test_a_single_class_dataset_is_refused_before_any_compute(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    rows = [row | {"completion": "positive"} for row in SENTIMENT]
    assert ready_dataset(client, alice, rows, "upbeat")["stats"]["labels"] == {"positive": 6}
    error = refusal(client, alice, dataset="upbeat", repo="upbeat")
    assert error["param"] == "dataset" and "single class ('positive', 6 training rows)" in error["message"]
    # A dataset validated before labels were recorded: the worker refuses it before training, and does not retry.
    with session_scope() as s:
        old = s.scalars(select(Dataset).where(Dataset.name == "upbeat")).one()
        old.stats = {k: v for k, v in old.stats.items() if k != "labels"}
    job = finish(client, alice, start_job(client, alice, dataset="upbeat", repo="upbeat")["id"])
    assert (job["status"], job["attempts"], job["total_steps"]) == ("failed", 1, None)
    assert job["error"].startswith("dataset: 'upbeat' is a classification dataset with a single class")


def test_label_detection_rule() -> None:
    def rows(*answers: str, split: str = "train") -> list[Example]:
        return [Example(i, split, prompt="text", completion=a) for i, a in enumerate(answers)]  # type: ignore[arg-type]

    assert detect_labels(rows("yes", "no", "yes", " no ")) == {"no": 2, "yes": 2}
    assert detect_labels(rows("1", "0", "1", "0", "1")) == {"0": 2, "1": 3}  # binary output
    assert detect_labels(rows("yes", "yes")) == {"yes": 2}  # one class: detected, so that it can be refused
    assert detect_labels(rows("yes", "no", "yes")) is None  # 'no' once: short free text, not a label
    assert detect_labels(rows("a b c d e f", "a b c d e f")) is None  # more than 5 words
    assert detect_labels(rows(*[f"class {i}" for i in range(51)] * 2)) is None  # more than 50 classes
    assert detect_labels(rows("yes", "no", "yes", "no") + rows("maybe", split="evaluation")) == {"no": 2, "yes": 2}
    assert detect_labels([Example(1, "train", text="raw text"), Example(2, "train", text="raw text")]) is None
    chat = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "greeting"})
    assert detect_labels([Example(i, "train", messages=chat) for i in range(2)]) == {"greeting": 2}


def test_classification_report() -> None:
    answers = [("cat", "cat"), ("dog", "cat"), ("cat ", "dog"), ("a bird?", "dog"), ("dog", "dog")]
    report = classification_report(answers, ["cat", "dog", "fish"])
    assert report["accuracy"] == pytest.approx(2 / 5)
    assert report["per_class"] == {
        "cat": {"accuracy": 0.5, "support": 2},
        "dog": {"accuracy": pytest.approx(1 / 3), "support": 3},
        "fish": {"accuracy": None, "support": 0},
    }
    assert report["confusion_matrix"] == {
        "rows": ["cat", "dog", "fish"],
        "columns": ["cat", "dog", "fish", "(other)"],
        "counts": [[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0]],
    }


# ---- refused before any compute --------------------------------------------------------------------------


REFUSED: list[tuple[dict, str, str]] = [
    ({"adapter": "none", "rank": 8}, "rank", "LoRA adapters only"),
    ({"adapter": "none", "target_modules": ["q_proj"]}, "target_modules", "LoRA adapters only"),
    ({"checkpoint_every": 0}, "checkpoint_every", "'epoch' or a number"),
    ({"checkpoint_every": "hourly"}, "checkpoint_every", "'epoch' or a number"),
    ({"checkpoint_every": True}, "checkpoint_every", "'epoch' or a number"),
    ({"continue_from_version": "greetings/one"}, "continue_from_version", "'repo/N@K'"),
    ({"rank": 0}, "rank", "greater than or equal to 1"),
    ({"learning_rate": 0}, "learning_rate", "greater than 0"),
    ({"epochs": 2, "train_steps": 4}, "train_steps", "not both"),
    ({"max_seq_length": 4096}, "max_seq_length", "exceeds the model's context"),
    ({"target_modules": ["lm_head"]}, "target_modules", "not in the model"),
    ({"task": "classification"}, "task", "needs a classification dataset"),  # greetings: free-text completions
]


def test_configs_that_cannot_work_are_refused(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, GREETINGS, "greetings")
    for config, param, words in REFUSED:
        error = refusal(client, alice, dataset="greetings", repo="greet", **config)
        assert error["param"] == param and words in error["message"], (config, error)
    job = train(client, alice, dataset="greetings", repo="greet", checkpoint_every=1, train_steps=1)
    assert job["checkpoints"] == ["greet/1@1"]  # while a number of steps is accepted
