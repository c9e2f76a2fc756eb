"""The durable queue: events go out only after commit, run once, retry with backoff, fail with a reason,
and come back after their worker dies (lease expiry)."""

import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import queue
from app.db import session_scope
from app.models import Event
from app.settings import get_settings

# This module is the handler of the "test.event" events below: the queue imports it by name.
CALLS: list[tuple[str, int]] = []
FAILURES: list[tuple[str, str]] = []
BEHAVIOUR = {"mode": "ok"}  # ok | raise | permanent | slow


def run(event: queue.EventInfo) -> None:
    CALLS.append((event.subject_id, event.attempt))
    if BEHAVIOUR["mode"] == "raise":
        raise RuntimeError("boom")
    if BEHAVIOUR["mode"] == "permanent":
        raise queue.PermanentError("the dataset has no rows")
    if BEHAVIOUR["mode"] == "slow":
        time.sleep(0.5)


def fail(event: queue.EventInfo, reason: str) -> None:
    FAILURES.append((event.subject_id, reason))


@pytest.fixture(autouse=True)
def test_handler(platform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(queue.HANDLERS, "test.event", lambda: sys.modules[__name__])
    CALLS.clear()
    FAILURES.clear()
    BEHAVIOUR["mode"] = "ok"


def _emit(subject: str = "subj_1") -> str:
    with session_scope() as s:
        return queue.emit(s, "test.event", subject).id


def _event(event_id: str) -> Event:
    with session_scope() as s:
        return s.get_one(Event, event_id)


def test_event_is_sent_only_after_commit() -> None:
    huey = queue.get_huey()
    before = huey.pending_count()
    with pytest.raises(RuntimeError), session_scope() as s:
        queue.emit(s, "test.event", "never")
        raise RuntimeError("the request failed before commit")
    assert huey.pending_count() == before
    _emit()
    assert huey.pending_count() == before + 1


def test_unknown_event_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event"), session_scope() as s:
        queue.emit(s, "no.such.event", "x")


def test_handler_runs_once_even_if_delivered_twice() -> None:
    event_id = _emit()
    queue.process_event(event_id)
    queue.process_event(event_id)
    assert CALLS == [("subj_1", 1)]
    assert _event(event_id).status == "done"


def test_concurrent_deliveries_run_the_handler_once() -> None:
    BEHAVIOUR["mode"] = "slow"
    event_id = _emit()
    threads = [threading.Thread(target=queue.process_event, args=(event_id,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(CALLS) == 1


def test_failures_retry_with_backoff_then_fail_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_RETRY_BASE_SECONDS", "10")
    monkeypatch.setenv("LORAPLEX_MAX_ATTEMPTS", "3")
    get_settings.cache_clear()
    BEHAVIOUR["mode"] = "raise"
    event_id = _emit()
    queued_before = queue.get_huey().pending_count()

    queue.process_event(event_id)
    ev = _event(event_id)
    assert (ev.status, ev.attempts) == ("pending", 1)
    assert "RuntimeError: boom" in (ev.last_error or "")
    assert timedelta(seconds=9) < ev.run_after - queue.now() <= timedelta(seconds=10)  # base * 2**0
    assert queue.get_huey().pending_count() == queued_before + 1  # a delayed message: Huey holds it until its eta
    queue.process_event(event_id)  # delivered early: not due yet, nothing runs
    assert len(CALLS) == 1

    for attempt, backoff in ((2, 20), (3, None)):
        with session_scope() as s:  # skip the wait
            s.execute(update(Event).where(Event.id == event_id).values(run_after=queue.now()))
        queue.process_event(event_id)
        ev = _event(event_id)
        assert ev.attempts == attempt
        if backoff:
            assert timedelta(seconds=backoff - 1) < ev.run_after - queue.now() <= timedelta(seconds=backoff)
    assert ev.status == "failed"
    assert FAILURES == [("subj_1", "failed after 3 attempts: RuntimeError: boom")]


def test_permanent_error_fails_at_once() -> None:
    BEHAVIOUR["mode"] = "permanent"
    event_id = _emit()
    queue.process_event(event_id)
    ev = _event(event_id)
    assert (ev.status, ev.attempts) == ("failed", 1)
    assert FAILURES == [("subj_1", "the dataset has no rows")]


def _die_while_running(event_id: str, attempts: int) -> None:
    """What a worker killed mid-run leaves behind: a running event whose lease ran out."""
    with session_scope() as s:
        s.execute(
            update(Event)
            .where(Event.id == event_id)
            .values(
                status="running",
                attempts=attempts,
                worker="dead:1:1",
                lease_expires_at=queue.now() - timedelta(seconds=1),
            )
        )


def test_expired_lease_is_reaped_and_run_again() -> None:
    event_id = _emit()
    _die_while_running(event_id, attempts=1)
    queue.process_event(event_id)  # a live lease would refuse this; an expired one is taken over
    assert CALLS == [("subj_1", 2)]
    assert _event(event_id).status == "done"


def test_reaper_resends_expired_and_fails_exhausted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    retry_id, exhausted_id, live_id = _emit("a"), _emit("b"), _emit("c")
    _die_while_running(retry_id, attempts=1)
    _die_while_running(exhausted_id, attempts=2)
    with session_scope() as s:  # a healthy running event: its lease is in the future
        s.execute(
            update(Event)
            .where(Event.id == live_id)
            .values(status="running", attempts=1, lease_expires_at=queue.now() + timedelta(seconds=60))
        )
    huey = queue.get_huey()
    before = huey.pending_count()
    assert queue.reap() == 2
    assert huey.pending_count() == before + 1  # only the retryable one is re-sent
    assert _event(exhausted_id).status == "failed"
    assert FAILURES == [("b", "worker stopped responding during attempt 2; no tries left")]
    assert _event(live_id).status == "running"


def test_heartbeat_keeps_a_long_handler_leased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_LEASE_SECONDS", "0.3")
    get_settings.cache_clear()
    BEHAVIOUR["mode"] = "slow"  # 0.5 s: longer than the lease, kept alive by the heartbeat
    event_id = _emit()
    seen: list[bool] = []

    def watch() -> None:
        time.sleep(0.4)
        ev = _event(event_id)
        seen.append(ev.status == "running" and ev.lease_expires_at > queue.now())

    watcher = threading.Thread(target=watch)
    watcher.start()
    queue.process_event(event_id)
    watcher.join()
    assert seen == [True]
    assert _event(event_id).status == "done"
