"""GET /v1/events and /v1/events/stream through the real app, the real worker handlers and the real deployment
runtime (SQLite and PostgreSQL): datasets validated or refused, fine-tuning jobs that succeed, are cancelled or fail,
their checkpoints and adapter, and a deployment moved through its statuses publish their events in order, each
with `data` as GET answers for that resource; the list pages and filters; the stream resumes exactly after its
Last-Event-ID; another tenant sees none of it. (A wake's cold start and a scaling event, which need replica
processes: tests/functions/deployments/test_deployment_replicas.py.)"""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_finetuning_api import create_job, upload, wait_for_job
from test_job_events import events_of

from app import volume
from app.db import session_scope
from app.models import Tenant
from conftest import TINY_MODEL, InProcessWorker, wait_for

BROKEN = b'{"prompt": "no completion"}\nnot json at all\n'
DEPLOYMENT = {"name": "prod", "base_model": TINY_MODEL}  # min_replicas 0: its statuses change without a replica


def feed(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    r = client.get("/v1/events", headers=headers, params=params)
    assert r.status_code == 200, r.text
    return list(r.json())


def types(events: list[dict[str, Any]]) -> list[str]:
    """The types this helper's part of issue 15 publishes (billing.* events are another's)."""
    return [e["type"] for e in events if not e["type"].startswith("billing.")]


def of_type(events: list[dict[str, Any]], type: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == type]


def get(client: TestClient, headers: dict[str, str], path: str) -> Any:
    r = client.get(path, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def tenant_id(name: str) -> str:
    """A tenant's id (the volume's paths are per tenant)."""
    with session_scope() as s:
        return s.scalars(select(Tenant.id).where(Tenant.name == name)).one()


def wait_deployment(client: TestClient, headers: dict[str, str], status: str) -> None:
    wait_for(lambda: get(client, headers, "/v1/deployments/prod")["status"] == status, 30, f"prod never {status}")


def test_resources_publish_their_events_as_the_api_shows_them(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    # Datasets: validated by the worker, ready or invalid.
    assert upload(client, alice, wait=False).status_code == 202
    form = {"base_model": TINY_MODEL, "wait": "false"}
    bad = client.post("/v1/datasets", headers=alice, files={"file": ("broken.jsonl", BROKEN)}, data=form)
    assert bad.status_code == 202, bad.text
    assert InProcessWorker().drain() == 2
    # Jobs: one trains to completion (checkpoints, an adapter), one is cancelled while queued, one fails.
    succeeded = create_job(client, alice, epochs=1)
    with InProcessWorker():
        assert wait_for_job(client, alice, succeeded["id"])["status"] == "completed"
    cancelled = create_job(client, alice, epochs=1)
    assert client.post(f"/v1/finetuning/jobs/{cancelled['id']}/cancel", headers=alice).status_code == 200
    failed = create_job(client, alice, epochs=1)
    ready = get(client, alice, "/v1/datasets/greetings")
    volume.dataset_path(tenant_id("alice"), ready["id"], "jsonl").write_bytes(BROKEN)  # it no longer validates
    assert InProcessWorker().drain() == 2  # the cancelled job's event is dropped; the other fails at once
    # A deployment: created (Pending), Standby (the runtime), stopped, moved to Standby, deleted.
    assert client.post("/v1/deployments", headers=alice, json=DEPLOYMENT).status_code == 201
    wait_deployment(client, alice, "Standby")
    assert client.post("/v1/deployments/prod/stop", headers=alice).status_code == 200
    wait_deployment(client, alice, "Stopped")
    assert client.post("/v1/deployments/prod/standby", headers=alice).status_code == 200
    deleted = client.delete("/v1/deployments/prod", headers=alice, params={"wait": 30})
    assert deleted.status_code == 200 and deleted.json()["status"] == "Deleted"

    events = feed(client, alice, limit=1000)
    checkpoints = get(client, alice, "/v1/repos/greet/versions/1/checkpoints")
    assert checkpoints
    assert types(events) == [
        "dataset.ready",
        "dataset.invalid",
        "finetune.job.started",
        *["finetune.checkpoint.created"] * len(checkpoints),
        "adapter.version.published",
        "finetune.job.succeeded",
        "finetune.job.cancelled",
        "finetune.job.started",
        "finetune.job.failed",
        *["deployment.status_changed"] * 5,
    ]
    # The envelope: ids in feed order, the webhook body's fields.
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["id"].startswith("evt_") and e["timestamp"].endswith("Z") for e in events)
    assert all(set(e) == {"seq", "id", "type", "timestamp", "data"} for e in events)

    # Each `data` is the resource as GET answers it (final states: nothing changed them since).
    assert of_type(events, "dataset.ready") == [ready]
    [invalid] = of_type(events, "dataset.invalid")
    assert invalid == get(client, alice, "/v1/datasets/broken") and invalid["errors"]
    assert of_type(events, "finetune.checkpoint.created") == checkpoints
    assert of_type(events, "adapter.version.published") == get(client, alice, "/v1/repos/greet")["versions"]
    job = get(client, alice, f"/v1/finetuning/jobs/{succeeded['id']}")
    assert of_type(events, "finetune.job.succeeded") == [job]
    assert job["adapter"] == "greet/1" and job["charge"] is not None  # what a receiver of the event needs
    assert of_type(events, "finetune.job.cancelled") == [get(client, alice, f"/v1/finetuning/jobs/{cancelled['id']}")]
    [failure] = of_type(events, "finetune.job.failed")
    assert failure == get(client, alice, f"/v1/finetuning/jobs/{failed['id']}")
    assert failure["status"] == "failed" and "no longer validates" in failure["error"]
    started = of_type(events, "finetune.job.started")
    assert [(s["id"], s["status"]) for s in started] == [(succeeded["id"], "training"), (failed["id"], "training")]
    changes = of_type(events, "deployment.status_changed")
    assert [d["status"] for d in changes] == ["Pending", "Standby", "Stopped", "Standby", "Deleted"]
    assert changes[-1] == deleted.json()
    assert [len(d["transitions"]) for d in changes] == [1, 2, 3, 4, 5]  # each as it was when it happened
    assert changes[2]["transitions"][-1]["reason"] == "stopped: every replica drained"

    # The list pages by `after` and filters by type.
    assert feed(client, alice, after=seqs[2], limit=3) == events[3:6]
    assert feed(client, alice, after=seqs[-1]) == []
    assert feed(client, alice, type="deployment.status_changed") == [
        e for e in events if e["type"] == "deployment.status_changed"
    ]
    # Another tenant sees none of it.
    assert feed(client, bob) == []


def stream(client: TestClient, headers: dict[str, str], **kwargs: Any) -> Any:
    return client.stream("GET", "/v1/events/stream", headers=headers, timeout=30, **kwargs)


def test_the_stream_resumes_after_last_event_id_and_keeps_tenants_apart(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    for name in ("one", "two", "three"):
        r = client.post("/v1/deployments", headers=alice, json=DEPLOYMENT | {"name": name})
        assert r.status_code == 201, r.text
    for name in ("one", "two", "three"):
        wait_for(lambda n=name: get(client, alice, f"/v1/deployments/{n}")["status"] == "Standby", 30, "no Standby")
    listed = feed(client, alice)
    assert len(listed) == 6

    # From the beginning, then live: an event published while the stream is open arrives on it.
    with stream(client, alice) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        received = events_of(r.iter_lines())
        first = [next(received) for _ in range(6)]
        assert client.post("/v1/deployments/one/stop", headers=alice).status_code == 200
        live = next(received)
    assert [(name, data, int(seq)) for name, data, seq in first] == [(e["type"], e, e["seq"]) for e in listed]  # type: ignore[arg-type]
    stopped = feed(client, alice, after=listed[-1]["seq"])
    assert len(stopped) == 1 and live == (stopped[0]["type"], stopped[0], str(stopped[0]["seq"]))
    assert stopped[0]["data"]["status"] == "Stopped"
    everything = listed + stopped

    # Resumed with Last-Event-ID (what EventSource sends on reconnect): exactly the events after it, in order.
    # Another event after the last one makes the stream say something once it has sent them all.
    resume_at = everything[3]["seq"]
    assert client.post("/v1/deployments/one/standby", headers=alice).status_code == 200
    everything += feed(client, alice, after=everything[-1]["seq"])
    with stream(client, alice | {"Last-Event-ID": str(resume_at)}, params={"after": 0}) as r:
        received = events_of(r.iter_lines())
        resumed = [next(received)[1] for _ in range(len(everything) - 4)]
    assert resumed == everything[4:]
    # `after` does the same without the header; `type` filters.
    with stream(client, alice, params={"after": resume_at, "type": "deployment.status_changed"}) as r:
        assert next(events_of(r.iter_lines()))[1] == everything[4]

    # bob's stream skips alice's events: the first it sends is bob's own.
    with stream(client, bob) as r:
        assert client.post("/v1/deployments", headers=bob, json=DEPLOYMENT).status_code == 201
        name, data, _ = next(events_of(r.iter_lines()))
    assert (name, data["data"]["name"], data["data"]["status"]) == ("deployment.status_changed", "prod", "Pending")
    assert data["seq"] > everything[-1]["seq"]
    assert {e["data"]["id"] for e in feed(client, bob)} == {data["data"]["id"]}  # only bob's deployment
    assert data["data"]["id"] not in {e["data"]["id"] for e in feed(client, alice)}


@pytest.mark.parametrize(
    ("path", "headers", "params", "param"),
    [
        ("/v1/events/stream", {"Last-Event-ID": "evt_123"}, {}, "Last-Event-ID"),
        ("/v1/events/stream", {"Last-Event-ID": "-1"}, {}, "Last-Event-ID"),
        ("/v1/events/stream", {"Last-Event-ID": "1" * 19}, {}, "Last-Event-ID"),
        ("/v1/events", {}, {"type": "dataset.exploded"}, "type"),
        ("/v1/events", {}, {"type": "webhook.test"}, "type"),
        ("/v1/events/stream", {}, {"type": "nope"}, "type"),
        ("/v1/events", {}, {"after": -1}, "after"),
        ("/v1/events", {}, {"limit": 0}, "limit"),
        ("/v1/events", {}, {"limit": 1001}, "limit"),
    ],
)
def test_bad_cursors_and_filters_are_refused_naming_them(
    client: TestClient, alice: dict[str, str], path: str, headers: dict[str, str], params: dict[str, Any], param: str
) -> None:
    r = client.get(path, headers=alice | headers, params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_the_feed_needs_an_api_key(client: TestClient) -> None:
    assert client.get("/v1/events").status_code == 401
    assert client.get("/v1/events/stream").status_code == 401
