"""GET /v1/finetuning/jobs/{id}/events through the real app, with the real trainer on the tiny model: every
metrics row as a server-sent event while the job runs, status changes, the end of the stream with the final
status, resuming (after_step, Last-Event-ID), cancellation mid-stream, a client going away, tenant isolation."""

import json
import time
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient
from test_finetuning_api import create_job, ready_dataset_without_worker

from conftest import InProcessWorker

Event = tuple[str, dict[str, Any], str | None]  # (event, data, id)


def events_of(lines: Iterator[str]) -> Iterator[Event]:
    """The wire format, read independently of the SDK's parser: `id:`, `event:`, `data:` lines, blank line ends
    an event, `:` lines are comments."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield fields.get("event", "message"), json.loads(fields["data"]), fields.get("id")
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def stream(client: TestClient, headers: dict[str, str], job_id: str, **kwargs: Any) -> Any:
    return client.stream("GET", f"/v1/finetuning/jobs/{job_id}/events", headers=headers, timeout=60, **kwargs)


def train_steps(events: list[Event]) -> list[int]:
    return [data["step"] for name, data, _ in events if name == "metric" and data.get("kind", "train") == "train"]


def test_live_stream_of_a_training_job(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset_without_worker(client, alice)
    job = create_job(client, alice, epochs=2, effective_batch_size=2, rank=4, learning_rate=1e-3)
    started = time.monotonic()
    with stream(client, alice, job["id"]) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(events_of(lines))  # read before any worker runs: the job is still queued
        assert first[0] == "status" and first[1]["status"] == "queued" and first[1]["id"] == job["id"]
        with InProcessWorker():
            events = [first, *events_of(lines)]  # returns only once the server ended the stream
    assert time.monotonic() - started < 60

    statuses = [data for name, data, _ in events if name == "status"]
    assert [s["status"] for s in statuses][0] == "queued"
    assert "training" in [s["status"] for s in statuses]
    assert events[-1][0] == "status" and events[-1][1]["status"] == "completed"  # the last event, then the end
    final = events[-1][1]
    assert final["adapter"] == "greet/1" and final["charge"] is not None
    assert final == client.get(f"/v1/finetuning/jobs/{job['id']}", headers=alice).json()  # a JobOut, as GET has it
    # A status event only when something changed: no two in a row say the same.
    keys = [(s["status"], s["attempts"], s["total_steps"]) for s in statuses]
    assert all(a != b for a, b in zip(keys, keys[1:], strict=False)), keys

    # One metric event per optimizer step, in order, each as GET /metrics serializes it, ids increasing.
    assert final["total_steps"] == 6
    assert train_steps(events) == list(range(1, 7))
    metrics = [(data, event_id) for name, data, event_id in events if name == "metric"]
    assert all(event_id is not None and event_id.isdigit() for _, event_id in metrics)
    ids = [int(event_id) for _, event_id in metrics]  # type: ignore[arg-type]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    rows = client.get(f"/v1/finetuning/jobs/{job['id']}/metrics", headers=alice).json()
    assert sorted((m for m, _ in metrics), key=json.dumps) == sorted(rows, key=json.dumps)
    assert all(m["attempt"] == 1 for m, _ in metrics)
    training_at = next(i for i, e in enumerate(events) if e[0] == "status" and e[1]["status"] == "training")
    first_metric_at = next(i for i, e in enumerate(events) if e[0] == "metric")
    assert training_at < first_metric_at  # "training" is announced before its first step

    # Resume with ?after_step: the rows after that step, then the final status, then the end.
    with stream(client, alice, job["id"], params={"after_step": 3}) as r:
        resumed = list(events_of(r.iter_lines()))
    assert train_steps(resumed) == [4, 5, 6]
    assert [name for name, _, _ in resumed].count("status") == 1 and resumed[-1][1] == final

    # Resume with Last-Event-ID (what EventSource sends on reconnect): strictly after that event.
    step4_id = next(
        event_id for data, event_id in metrics if data["step"] == 4 and data.get("kind", "train") == "train"
    )
    with stream(client, alice | {"Last-Event-ID": step4_id}, job["id"]) as r:
        resumed = list(events_of(r.iter_lines()))
    assert train_steps(resumed) == [5, 6]
    assert [int(i) for _, _, i in resumed if i] == [i for i in ids if i > int(step4_id)]
    assert resumed[-1][1] == final
    # The header wins over the query (a reconnecting EventSource repeats the URL it started with).
    with stream(client, alice | {"Last-Event-ID": str(ids[-1])}, job["id"], params={"after_step": 0}) as r:
        assert list(events_of(r.iter_lines())) == [("status", final, None)]

    r = client.get(f"/v1/finetuning/jobs/{job['id']}/events", headers=alice | {"Last-Event-ID": "step-4"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "Last-Event-ID", r.text


def test_cancelling_ends_the_stream_with_cancelled(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset_without_worker(client, alice)
    job = create_job(client, alice, epochs=1)
    with stream(client, alice, job["id"]) as r:
        lines = r.iter_lines()
        assert next(events_of(lines))[1]["status"] == "queued"
        cancel = client.post(f"/v1/finetuning/jobs/{job['id']}/cancel", headers=alice)  # while the stream is open
        assert cancel.status_code == 200, cancel.text
        rest = list(events_of(lines))
    assert rest == [("status", cancel.json(), None)]
    assert rest[0][1]["status"] == "cancelled"


def test_a_client_going_away_stops_the_stream(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset_without_worker(client, alice)
    job = create_job(client, alice, epochs=1)  # stays queued: no worker runs, so the stream would go on forever
    with stream(client, alice, job["id"]) as r:
        assert next(events_of(r.iter_lines()))[1]["status"] == "queued"
        leaving = time.monotonic()
    # Leaving the block closes the connection; the TestClient waits for the app to finish its response.
    assert time.monotonic() - leaving < 2


def test_other_tenants_and_unknown_jobs_get_404(client: TestClient, alice: dict[str, str], bob: dict[str, str]) -> None:
    ready_dataset_without_worker(client, alice)
    job = create_job(client, alice, epochs=1)
    for headers, job_id in ((bob, job["id"]), (alice, "ft_0000000000000000")):
        r = client.get(f"/v1/finetuning/jobs/{job_id}/events", headers=headers)
        assert r.status_code == 404, r.text
        assert r.json()["error"] == {
            "message": f"fine-tuning job {job_id!r} not found",
            "type": "not_found_error",
            "param": "job_id",
            "code": "job_not_found",
        }
    assert client.get(f"/v1/finetuning/jobs/{job['id']}/events").status_code == 401
