"""One tenant never sees, changes or uses another's datasets, jobs, adapters or usage: everything of alice's
answers bob exactly as a thing that does not exist (404, never 403)."""

import json
from typing import Any

import httpx
from fastapi.testclient import TestClient

from conftest import TINY_MODEL, InProcessWorker

ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di")]
DATA = "\n".join(json.dumps(r) for r in ROWS).encode()


def upload(client: TestClient, headers: dict[str, str], data: bytes, wait: bool) -> httpx.Response:
    return client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": ("shared-name.jsonl", data)},
        data={"base_model": TINY_MODEL, "wait": str(wait).lower()},
    )


def not_found(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["type"] == "not_found_error", err
    return err


def chat(client: TestClient, headers: dict[str, str], model: str) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )


def test_tenants_see_nothing_of_each_other(client: TestClient, alice: dict[str, str], bob: dict[str, str]) -> None:
    # Alice: a dataset, validated; a job, still queued (no worker runs yet).
    r = upload(client, alice, DATA, wait=False)
    assert r.status_code == 202, r.text
    alice_dataset = r.json()
    worker = InProcessWorker()
    assert worker.drain() == 1
    r = client.post(
        "/v1/finetuning/jobs",
        headers=alice,
        json={"base_model": TINY_MODEL, "dataset": "shared-name", "repo": "alice-repo", "epochs": 1},
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    # Bob cannot cancel it: 404, and it is still queued; then it trains.
    err = not_found(client.post(f"/v1/finetuning/jobs/{job_id}/cancel", headers=bob))
    assert err["code"] == "job_not_found"
    assert client.get(f"/v1/finetuning/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    assert worker.drain() == 1
    job = client.get(f"/v1/finetuning/jobs/{job_id}", headers=alice).json()
    assert (job["status"], job["adapter"]) == ("completed", "alice-repo/1"), job
    r = chat(client, alice, "alice-repo/1")
    assert r.status_code == 200, r.text  # the adapter works for its owner

    # Everything of alice's is "not found" for bob, exactly like something that does not exist.
    assert not_found(client.get("/v1/datasets/shared-name", headers=bob))["code"] == "dataset_not_found"
    assert not_found(client.delete("/v1/datasets/shared-name", headers=bob))["code"] == "dataset_not_found"
    missing_job = not_found(client.get("/v1/finetuning/jobs/ft_0000000000000000", headers=bob))
    for path in (f"/v1/finetuning/jobs/{job_id}", f"/v1/finetuning/jobs/{job_id}/metrics"):
        err = not_found(client.get(path, headers=bob))
        assert (err["code"], err["param"]) == (missing_job["code"], missing_job["param"])
    assert not_found(client.get("/v1/repos/alice-repo", headers=bob))["code"] == "repo_not_found"
    for model in ("alice-repo/1", "alice-repo"):
        err = not_found(chat(client, bob, model))
        ghost = not_found(chat(client, bob, model.replace("alice", "ghost")))
        assert err == ghost | {"message": err["message"]}
        assert err["message"] == ghost["message"].replace("ghost", "alice")
        assert (err["param"], err["code"]) == ("model", "model_not_found")

    # Bob's lists hold nothing of alice's.
    assert client.get("/v1/datasets", headers=bob).json() == []
    assert client.get("/v1/finetuning/jobs", headers=bob).json() == []
    assert client.get("/v1/repos", headers=bob).json() == []
    bob_models = client.get("/v1/models", headers=bob).json()["data"]
    assert TINY_MODEL in {m["id"] for m in bob_models}
    assert not [m for m in bob_models if "alice" in json.dumps(m)]
    bob_usage = client.get("/v1/usage", headers=bob).json()
    assert bob_usage["records"] == []
    assert bob_usage["totals"]["records"] == 0 and bob_usage["totals"]["cost"]["micro_usd"] == 0
    alice_usage = client.get("/v1/usage", headers=alice).json()
    assert sorted(u["kind"] for u in alice_usage["records"]) == ["finetune", "inference"]

    # Bob may use the same dataset name; each tenant then sees only their own.
    bob_data = DATA + b"\n" + json.dumps({"prompt": "Say hi to Bob", "completion": "Hi Bob!"}).encode()
    r = upload(client, bob, bob_data, wait=False)
    assert r.status_code == 202, r.text
    assert worker.drain() == 1
    bob_dataset = client.get("/v1/datasets/shared-name", headers=bob).json()
    assert bob_dataset["id"] != alice_dataset["id"]
    assert (bob_dataset["status"], bob_dataset["stats"]["rows"]) == ("ready", 5)
    assert client.get("/v1/datasets/shared-name", headers=alice).json()["stats"]["rows"] == 4
    assert [d["id"] for d in client.get("/v1/datasets", headers=alice).json()] == [alice_dataset["id"]]
    assert [d["id"] for d in client.get("/v1/datasets", headers=bob).json()] == [bob_dataset["id"]]
    # And the same repo name: bob's first version is his own "alice-repo/1", not alice's.
    r = client.post(
        "/v1/finetuning/jobs",
        headers=bob,
        json={"base_model": TINY_MODEL, "dataset": "shared-name", "repo": "alice-repo", "epochs": 1},
    )
    assert r.status_code == 201, r.text
    assert worker.drain() == 1
    bob_job = client.get(f"/v1/finetuning/jobs/{r.json()['id']}", headers=bob).json()
    assert (bob_job["status"], bob_job["adapter"]) == ("completed", "alice-repo/1"), bob_job
    bob_versions = client.get("/v1/repos/alice-repo", headers=bob).json()["versions"]
    alice_versions = client.get("/v1/repos/alice-repo", headers=alice).json()["versions"]
    assert [v["job_id"] for v in bob_versions] == [bob_job["id"]]
    assert [v["job_id"] for v in alice_versions] == [job_id]
    # Alice's ledger is untouched by bob's training.
    assert client.get("/v1/usage", headers=alice).json()["totals"] == alice_usage["totals"]
    assert [j["id"] for j in client.get("/v1/finetuning/jobs", headers=alice).json()] == [job_id]
