"""Durable events between the API and the workers.

The `events` row is the truth; the queue only carries an event id to wake a worker. Huey moves the ids:
its SQLite storage needs no server for the embedded default, and its Redis storage lets many worker
machines share one queue (`LORAPLEX_QUEUE_URL=redis://...`). Huey has no leases, so they live on the
row: a worker claims an event with one conditional UPDATE, a heartbeat thread extends the lease while
the handler runs, and any worker's reaper re-sends events whose lease ran out (their worker died).
A lost or duplicated queue message is therefore harmless: a second claim of the same event fails.
"""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol, cast

from huey import Huey, RedisHuey, SqliteHuey
from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import Event, new_id
from app.settings import get_settings

log = logging.getLogger("loraplex.queue")

EVENTS = ("dataset.uploaded", "finetune.requested")  # every event the platform emits

# Filled by the entry points (app/worker_main.py's wire()), never looked up by name here: this module is the foundation
# and imports nothing above it.
HANDLERS: dict[str, "Callable[[], Handler]"] = {}  # event -> its handler, fetched when first needed (torch is slow)
_spawner: Callable[[str, str], None] | None = None  # the Modal runtime's spawn(event_id, name)
_periodic: list[Callable[[], None]] = []  # run on each pass of a worker's reaper (e.g. the Stripe outbox flush)


def register(
    handlers: dict[str, "Callable[[], Handler]"],
    spawner: Callable[[str, str], None] | None = None,
    periodic: tuple[Callable[[], None], ...] = (),
) -> None:
    """What the entry point running this process wires in: the handlers, Modal's spawn, the periodic work."""
    global _spawner
    HANDLERS.update(handlers)
    _spawner = spawner or _spawner
    _periodic[:] = list(periodic) or _periodic


class PermanentError(Exception):
    """The handler cannot succeed by trying again (bad input found late): fail at once with this message."""


@dataclass(frozen=True)
class EventInfo:
    id: str
    name: str
    subject_id: str  # the dataset or job the event is about
    attempt: int  # 1 on the first try


class Handler(Protocol):
    def run(self, event: EventInfo) -> None: ...
    def fail(self, event: EventInfo, reason: str) -> None: ...


def now() -> datetime:
    return datetime.now(UTC)


# ---- publishing (API side) -------------------------------------------------------------------------


def emit(session: Session, name: str, subject_id: str) -> Event:
    """Add an event in the caller's transaction; it is sent to a worker only once that transaction commits."""
    if name not in EVENTS and name not in HANDLERS:
        raise ValueError(f"unknown event {name!r}")
    ev = Event(id=new_id("ev"), name=name, subject_id=subject_id)
    session.add(ev)
    session.info.setdefault("loraplex_outbox", []).append(ev)
    return ev


@sa_event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    for ev in session.info.pop("loraplex_outbox", []):
        submit(ev.id, ev.name)


@sa_event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop("loraplex_outbox", None)


def submit(event_id: str, name: str, delay_seconds: float = 0.0) -> None:
    """Wake a worker for this event, in whichever runtime is configured."""
    if get_settings().runtime == "modal":
        if _spawner is None:
            raise RuntimeError("LORAPLEX_RUNTIME=modal, but no Modal spawner is wired in (app/modal_app.py does)")
        _spawner(event_id, name)
        return
    task = _huey_task()
    if delay_seconds > 0:
        task.schedule(args=(event_id,), delay=delay_seconds)
    else:
        task(event_id)


# ---- Huey wiring -------------------------------------------------------------------------------------


def make_huey(url: str) -> Huey:
    if url.startswith("redis://"):
        return RedisHuey("loraplex", url=url, results=False)
    path = url.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return SqliteHuey("loraplex", filename=path, results=False, timeout=30)


@lru_cache
def get_huey() -> Huey:
    return make_huey(get_settings().resolved_queue_url)


@lru_cache
def _huey_task() -> Any:  # huey's task wrapper (huey has no type information)
    return get_huey().task(name="process_event")(process_event)


# ---- processing (worker side) --------------------------------------------------------------------------


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def process_event(event_id: str) -> None:
    """Claim the event, run its handler under a heartbeat, then record the outcome. Safe to call twice."""
    settings = get_settings()
    me = worker_name()
    info = _claim(event_id, me, settings.queue.lease_seconds)
    if info is None:
        return  # done, taken by a live worker, or not due yet
    handler = _handler(info.name)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(event_id, me, settings.queue.lease_seconds, stop), daemon=True)
    beat.start()
    try:
        handler.run(info)
    except PermanentError as exc:
        _finish(info, handler, "failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - any handler error is retried, then reported on the resource
        log.exception("event %s (%s) attempt %d failed", info.id, info.name, info.attempt)
        reason = f"{type(exc).__name__}: {exc}"
        if info.attempt >= settings.queue.max_attempts:
            _finish(info, handler, "failed", f"failed after {info.attempt} attempts: {reason}")
        else:
            _retry_later(info, reason, settings.queue.retry_base_seconds * 2 ** (info.attempt - 1))
    else:
        _finish(info, handler, "done", None)
    finally:
        stop.set()


def _handler(name: str) -> Handler:
    if name not in HANDLERS:
        raise RuntimeError(f"no handler for {name!r} in this process: its entry point wires them (app/worker_main.py)")
    return HANDLERS[name]()


def _claim(event_id: str, me: str, lease_seconds: float) -> EventInfo | None:
    t = now()
    with session_scope() as s:
        claimable = or_(
            (Event.status == "pending") & (Event.run_after <= t + timedelta(seconds=1)),
            (Event.status == "running") & (Event.lease_expires_at < t),
        )
        # An UPDATE's result is a CursorResult (it has rowcount); Session.execute is typed for any statement.
        result = cast(
            "CursorResult[Any]",
            s.execute(
                update(Event)
                .where(Event.id == event_id, claimable)
                .values(
                    status="running",
                    attempts=Event.attempts + 1,
                    worker=me,
                    lease_expires_at=t + timedelta(seconds=lease_seconds),
                )
            ),
        )
        if result.rowcount != 1:
            return None
        ev = s.get_one(Event, event_id)
        return EventInfo(ev.id, ev.name, ev.subject_id, ev.attempts)


def _heartbeat(event_id: str, me: str, lease_seconds: float, stop: threading.Event) -> None:
    while not stop.wait(lease_seconds / 3):
        try:
            with session_scope() as s:
                s.execute(
                    update(Event)
                    .where(Event.id == event_id, Event.worker == me, Event.status == "running")
                    .values(lease_expires_at=now() + timedelta(seconds=lease_seconds))
                )
        except Exception:  # noqa: BLE001 - a missed beat is retried; the lease has slack for two
            log.warning("heartbeat for %s failed", event_id, exc_info=True)


def _finish(info: EventInfo, handler: Handler, status: str, reason: str | None) -> None:
    if status == "failed":
        handler.fail(info, reason or "failed")
    with session_scope() as s:
        s.execute(
            update(Event).where(Event.id == info.id).values(status=status, last_error=reason, lease_expires_at=None)
        )


def _retry_later(info: EventInfo, reason: str, delay_seconds: float) -> None:
    with session_scope() as s:
        s.execute(
            update(Event)
            .where(Event.id == info.id)
            .values(
                status="pending",
                last_error=reason,
                lease_expires_at=None,
                run_after=now() + timedelta(seconds=delay_seconds),
            )
        )
    submit(info.id, info.name, delay_seconds)


def reap() -> int:
    """Re-send events whose worker died (lease expired) or whose wake-up was lost; fail those out of tries.

    Returns how many events were re-sent or failed.
    """
    settings = get_settings()
    t = now()
    with session_scope() as s:
        stale = s.scalars(
            select(Event).where(
                or_(
                    (Event.status == "running") & (Event.lease_expires_at < t),
                    (Event.status == "pending")
                    & (Event.run_after < t - timedelta(seconds=settings.queue.lease_seconds)),
                )
            )
        ).all()
        found = [(ev.id, ev.name, ev.subject_id, ev.attempts, ev.status) for ev in stale]
    for event_id, name, subject_id, attempts, status in found:
        if status == "running" and attempts >= settings.queue.max_attempts:
            info = EventInfo(event_id, name, subject_id, attempts)
            _finish(
                info, _handler(name), "failed", f"worker stopped responding during attempt {attempts}; no tries left"
            )
        else:
            log.warning(
                "re-sending event %s (%s): %s",
                event_id,
                name,
                "lease expired" if status == "running" else "wake-up lost",
            )
            submit(event_id, name)
    return len(found)


def run_worker(threads: int | None = None) -> None:
    """The worker process: Huey consumer threads plus a reaper thread. Blocks until SIGINT/SIGTERM."""
    settings = get_settings()
    _huey_task()  # register the task before the consumer starts

    def reaper() -> None:
        while True:
            try:
                reap()
            except Exception:  # noqa: BLE001 - keep reaping; the database may be briefly locked
                log.warning("reaper pass failed", exc_info=True)
            for work in _periodic:
                try:
                    work()
                except Exception:  # noqa: BLE001 - keep reaping; periodic work is retried on the next pass
                    log.warning("periodic work %s failed", getattr(work, "__name__", work), exc_info=True)
            time.sleep(settings.queue.reap_interval_seconds)

    threading.Thread(target=reaper, daemon=True, name="reaper").start()
    consumer = get_huey().create_consumer(
        workers=threads or settings.queue.worker_threads,
        worker_type="thread",
        periodic=False,
        initial_delay=0.05,
        backoff=1.5,
        max_delay=0.5,  # poll often: jobs should start within a second
    )
    consumer.run()
