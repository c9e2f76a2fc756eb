"""End to end over real HTTP: `loraplex serve` and `loraplex worker` as separate processes, the Huey queue
between them, and the official openai SDK as the client."""

import json
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import TINY_MODEL, Platform, Processes, make_tenant, process_alive

SAMPLE = Path(__file__).parents[2] / "app" / "samples" / "support_triage.jsonl"


@pytest.fixture
def processes(sqlite_platform: Platform) -> Iterator[Processes]:
    procs = Processes(
        sqlite_platform,
        {"LORAPLEX_LEASE_SECONDS": "3", "LORAPLEX_REAP_INTERVAL_SECONDS": "0.5", "LORAPLEX_RETRY_BASE_SECONDS": "0.5"},
    )
    yield procs
    procs.stop()


def _wait_job(http: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/finetuning/jobs/{job_id}").json()
        if job["status"] not in ("queued", "training"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


@pytest.mark.slow
def test_openai_sdk_against_the_real_model(bundled_model: Path, processes: Processes) -> None:
    url = processes.server(workers=1)
    _, headers = make_tenant("e2e")
    http = httpx.Client(base_url=url, headers=headers, timeout=120)
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:24]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    r = http.post("/v1/datasets", files={"file": ("triage.jsonl", data)}, data={"base_model": "smollm2-135m"})
    assert r.status_code == 201, r.text
    assert r.json()["stats"]["rows"] == 24
    r = http.post(
        "/v1/finetuning/jobs",
        json={
            "base_model": "smollm2-135m",
            "dataset": "triage",
            "repo": "triage",
            "epochs": 2,
            "effective_batch_size": 4,
            "learning_rate": 2e-3,
            "rank": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "eval_steps": None,  # at the end of each epoch
        },
    )
    assert r.status_code == 201, r.text
    job = _wait_job(http, r.json()["id"])
    assert job["status"] == "completed", job
    assert job["adapter"] == "triage/1"
    metrics = http.get(f"/v1/finetuning/jobs/{job['id']}/metrics").json()
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, job["total_steps"] + 1))
    evals = [m for m in metrics if m["kind"] == "eval"]  # 10 of the 24 rows are the evaluation split
    assert [m["step"] for m in evals] == [0, job["total_steps"] // 2, job["total_steps"]]
    assert evals[-1]["loss"] < evals[0]["loss"]  # fine-tuning lowered the held-out loss

    client = OpenAI(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1], max_retries=0)
    assert {"smollm2-135m", "triage/1"} <= {m.id for m in client.models.list()}
    question = [{"role": "user", "content": "Triage this support ticket: My parcel arrived damaged."}]
    base = client.chat.completions.create(model="smollm2-135m", messages=question, max_tokens=24, temperature=0)
    tuned = client.chat.completions.create(model="triage/1", messages=question, max_tokens=24, temperature=0)
    assert base.choices[0].message.content and tuned.choices[0].message.content
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert tuned.usage is not None and tuned.usage.completion_tokens > 0
    streamed = client.chat.completions.create(
        model="triage/1", messages=question, max_tokens=24, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == tuned.choices[0].message.content
    usage = http.get("/v1/usage").json()
    assert usage["by_kind"]["inference"]["records"] == 3
    assert usage["by_kind"]["finetune"]["records"] == 1


def test_killed_worker_mid_training_job_still_finishes(processes: Processes) -> None:
    url = processes.server(workers=0)
    first = processes.start("worker")
    _, headers = make_tenant("crash")
    http = httpx.Client(base_url=url, headers=headers, timeout=60)
    rows = [{"prompt": f"Count to {i}", "completion": " ".join(str(n) for n in range(i))} for i in range(2, 66)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    assert (
        http.post("/v1/datasets", files={"file": ("count.jsonl", data)}, data={"base_model": TINY_MODEL}).status_code
        == 201
    )
    r = http.post(
        "/v1/finetuning/jobs",
        json={"base_model": TINY_MODEL, "dataset": "count", "repo": "count", "epochs": 2, "effective_batch_size": 4},
    )
    job_id = r.json()["id"]
    for _ in range(3000):  # wait until it is really training: some steps written (5 min on a loaded machine)
        if http.get(f"/v1/finetuning/jobs/{job_id}/metrics").json():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("training never started")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert http.get(f"/v1/finetuning/jobs/{job_id}").json()["status"] == "training"  # orphaned, lease running
    processes.start("worker")  # its reaper finds the expired lease and takes the job over
    job = _wait_job(http, job_id)
    assert job["status"] == "completed", job
    assert job["attempts"] == 2
    assert job["adapter"] == "count/1"
    metrics = [m for m in http.get(f"/v1/finetuning/jobs/{job_id}/metrics").json() if m["kind"] == "train"]
    assert {m["attempt"] for m in metrics} == {2} and len(metrics) == job["total_steps"]


def test_killed_worker_after_a_checkpoint_resumes_from_it(processes: Processes) -> None:
    """SIGKILL a worker once the job has saved a checkpoint: the next worker resumes at that checkpoint's step
    instead of starting over, and the metrics hold every step once."""
    url = processes.server(workers=0)
    first = processes.start("worker")
    _, headers = make_tenant("resume")
    http = httpx.Client(base_url=url, headers=headers, timeout=60)
    rows = [{"prompt": f"Count to {i}", "completion": " ".join(str(n) for n in range(i))} for i in range(2, 18)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    assert (
        http.post("/v1/datasets", files={"file": ("count.jsonl", data)}, data={"base_model": TINY_MODEL}).status_code
        == 201
    )
    config = {"base_model": TINY_MODEL, "dataset": "count", "repo": "count", "train_steps": 20}
    config |= {"effective_batch_size": 2, "checkpoint_every": 3, "eval_fraction": 0}
    job_id = http.post("/v1/finetuning/jobs", json=config).json()["id"]
    for _ in range(1200):  # until the first checkpoint is recorded
        if http.get("/v1/repos/count").json()["checkpoints"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no checkpoint was saved")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.time()
    saved = http.get("/v1/repos/count").json()["checkpoints"]  # nothing writes any more: the last is final
    job = http.get(f"/v1/finetuning/jobs/{job_id}").json()
    assert job["status"] == "training" and job["checkpoints"] == [c["name"] for c in saved]
    resume_step = saved[-1]["step"]
    assert 3 <= resume_step < 20

    processes.start("worker")  # its reaper finds the expired lease and takes the job over
    job = _wait_job(http, job_id)
    assert job["status"] == "completed" and job["attempts"] == 2, job
    assert job["summary"]["resumed_from"] == {"checkpoint": saved[-1]["name"], "step": resume_step, "attempt": 2}
    assert job["checkpoints"][: len(saved)] == [c["name"] for c in saved]  # kept, and numbered on from there
    assert len(job["checkpoints"]) == 7  # steps 3, 6, ..., 18 and the last, 20
    metrics = [m for m in http.get(f"/v1/finetuning/jobs/{job_id}/metrics").json() if m["kind"] == "train"]
    assert [m["step"] for m in metrics] == list(range(1, 21))  # every step once
    # The steps up to the checkpoint were trained before the kill; the second worker trained only those after it.
    after_kill = [m["step"] for m in metrics if datetime.fromisoformat(m["at"]).timestamp() > killed_at]
    assert after_kill == list(range(resume_step + 1, 21))


def _children(pid: int) -> list[int]:
    """Children of every thread of the process (serve's workers are started by its supervisor thread)."""
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_serve_stops_its_workers(processes: Processes, how: signal.Signals) -> None:
    processes.server(workers=1)
    serve = processes.children[-1]
    [worker_pid] = _children(serve.pid)
    serve.send_signal(how)
    serve.wait(timeout=30)
    deadline = time.monotonic() + 30
    while process_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker_pid), "the worker outlived its server"
