"""Helpers for the training tests: upload a dataset, run a job to its end with the in-process worker, read the
volume."""

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from conftest import TINY_MODEL, InProcessWorker, Platform

# A classification dataset: six training rows, two labels; its evaluation split holds a class training lacks.
SENTIMENT = [
    {"prompt": text, "completion": label}
    for text, label in [
        ("I love this movie!", "positive"),
        ("This restaurant has amazing food.", "positive"),
        ("The weather is perfect today.", "positive"),
        ("The customer service was terrible.", "negative"),
        ("My order arrived broken.", "negative"),
        ("I regret buying this.", "negative"),
    ]
] + [
    {"prompt": "What a wonderful surprise.", "completion": "positive", "split": "evaluation"},
    {"prompt": "Best concert of my life.", "completion": "positive", "split": "evaluation"},
    {"prompt": "The room smelled awful.", "completion": "negative", "split": "evaluation"},
    {"prompt": "Not sure how I feel.", "completion": "neutral", "split": "evaluation"},  # a class training lacks
]


def ready_dataset(client: TestClient, headers: dict[str, str], rows: list[dict], name: str) -> dict[str, Any]:
    """Upload `rows` as JSONL and validate them here (no worker is left running)."""
    data = "\n".join(json.dumps(r) for r in rows).encode()
    r = client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (f"{name}.jsonl", data)},
        data={"base_model": TINY_MODEL, "wait": "false"},
    )
    assert r.status_code == 202, r.text
    InProcessWorker().drain()
    dataset = client.get(f"/v1/datasets/{name}", headers=headers).json()
    assert dataset["status"] == "ready", dataset
    return dataset


def start_job(client: TestClient, headers: dict[str, str], **config: Any) -> dict[str, Any]:
    r = client.post("/v1/finetuning/jobs", headers=headers, json={"base_model": TINY_MODEL} | config)
    assert r.status_code == 201, r.text
    return r.json()


def finish(client: TestClient, headers: dict[str, str], job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Run the worker until the job has ended; the job as the API then shows it."""
    deadline = time.monotonic() + timeout
    with InProcessWorker():
        while True:
            job = client.get(f"/v1/finetuning/jobs/{job_id}", headers=headers).json()
            if job["status"] not in ("queued", "training"):
                return job
            assert time.monotonic() < deadline, f"job still {job['status']} after {timeout} s"
            time.sleep(0.05)


def train(client: TestClient, headers: dict[str, str], **config: Any) -> dict[str, Any]:
    job = finish(client, headers, start_job(client, headers, **config)["id"])
    assert job["status"] == "completed", job
    return job


def refusal(client: TestClient, headers: dict[str, str], **config: Any) -> dict[str, Any]:
    """The 422 error of a job config that is refused before any compute (and no job is created)."""
    before = len(client.get("/v1/finetuning/jobs", headers=headers).json())
    r = client.post("/v1/finetuning/jobs", headers=headers, json={"base_model": TINY_MODEL} | config)
    assert r.status_code == 422, r.text
    assert len(client.get("/v1/finetuning/jobs", headers=headers).json()) == before
    return r.json()["error"]


def metrics(client: TestClient, headers: dict[str, str], job_id: str, kind: str = "train") -> list[dict[str, Any]]:
    rows = client.get(f"/v1/finetuning/jobs/{job_id}/metrics", headers=headers).json()
    return [m for m in rows if m["kind"] == kind]


def version_dir(platform: Platform, repo: str, version: int) -> Path:
    [found] = (Path(platform.data_dir) / "volume" / "adapters").glob(f"*/{repo}/{version}")
    return found


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(path)


def untar(body: bytes) -> dict[str, bytes]:
    """{member name: bytes} of a .tar.gz download."""
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]
