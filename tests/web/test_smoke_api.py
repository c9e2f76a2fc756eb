import json

from conftest import TINY_MODEL


def test_upload_train_and_chat(client, alice, worker) -> None:
    rows = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di")]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    r = client.post("/v1/datasets", headers=alice, files={"file": ("hi.jsonl", data)}, data={"base_model": TINY_MODEL})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "ready"
    r = client.post(
        "/v1/finetuning/jobs",
        headers=alice,
        json={"base_model": TINY_MODEL, "dataset": "hi", "repo": "greet", "epochs": 1},
    )
    assert r.status_code == 201, r.text
    job = r.json()
    import time

    for _ in range(300):
        job = client.get(f"/v1/finetuning/jobs/{job['id']}", headers=alice).json()
        if job["status"] not in ("queued", "training"):
            break
        time.sleep(0.1)
    assert job["status"] == "completed", job
    r = client.post(
        "/v1/chat/completions",
        headers=alice,
        json={"model": "greet/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
