"""The shared endpoints' engine processes as every API process on this machine sees them: one `shared_engines` row
per base model (or full fine-tuned version) and machine, so N API processes share one engine process per model
instead of starting one each.

    no row, or its owner went silent  ->  reserve it (url ""), start the engine, publish its address
    a row being started               ->  wait for its address (up to LORAPLEX_ENGINE_START_TIMEOUT)
    a row with an address             ->  stream from it (a RemoteEngine with no process of ours)

The process that started an engine owns it: its supervisor (supervisor.py) watches and replaces it, and renews
the row's heartbeat every poll; an owner that stops removes its rows; one that dies takes its engines with it
(--parent-pid), its heartbeat stops, and the next process to need the model starts it again. Reserving is one
conditional UPDATE (only a silent row) or the row's INSERT, so two processes never both start one.
"""

import socket
import time
from datetime import timedelta

import httpx
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from app.control_lease import this_process
from app.db import session_scope
from app.models import SharedEngine, utcnow
from app.settings import get_settings

WAIT_POLL = 0.2  # seconds between looks while another process starts the engine


def _host() -> str:
    return socket.gethostname()


def silent_after() -> float:
    """Seconds without a heartbeat after which an engine's owner counts as gone (three of its health polls)."""
    return max(15.0, 3 * get_settings().engine.engine_health_interval)


def address(key: str) -> tuple[str, int] | None:
    """(url, context length) of the model's engine that another process of this machine runs and that answers,
    waiting while one is being started; None when there is none to use (the caller starts it: `reserve` first)."""
    deadline = time.monotonic() + get_settings().engine.engine_start_timeout
    me = this_process()
    while True:
        with session_scope() as s:
            row = s.get(SharedEngine, (_host(), key))
            if row is None or row.holder == me:
                return None
            now = utcnow()
            if row.url:
                if now - row.heartbeat_at > timedelta(seconds=silent_after()):
                    return None
                url, context_length = row.url, row.context_length
            elif now - row.started_at > timedelta(seconds=get_settings().engine.engine_start_timeout):
                return None  # its start was abandoned
            else:
                url, context_length = "", 0
        if url and _answers(url):
            return url, context_length
        if time.monotonic() > deadline:
            return None
        time.sleep(WAIT_POLL)  # being started, or being replaced by its owner


def current_url(key: str) -> str | None:
    """The address the model's row gives now (None: no row), to notice an engine its owner replaced."""
    with session_scope() as s:
        row = s.get(SharedEngine, (_host(), key))
        return row.url if row is not None else None


def reserve(key: str, base_model: str) -> bool:
    """Claim the right to start the model's engine: True when the row was absent, silent, abandoned or ours."""
    now = utcnow()
    silent = now - timedelta(seconds=silent_after())
    abandoned = now - timedelta(seconds=get_settings().engine.engine_start_timeout)
    me = this_process()
    values = {"base_model": base_model, "url": "", "pid": 0, "holder": me, "context_length": 0}
    try:
        with session_scope() as s:
            taken = s.execute(
                update(SharedEngine)
                .where(SharedEngine.host == _host(), SharedEngine.key == key)
                .where(
                    (SharedEngine.holder == me)
                    | ((SharedEngine.url != "") & (SharedEngine.heartbeat_at < silent))
                    | ((SharedEngine.url == "") & (SharedEngine.started_at < abandoned))
                )
                .values(**values, started_at=now, heartbeat_at=now)
            ).rowcount  # type: ignore[attr-defined]  # a CursorResult
            if not taken and s.get(SharedEngine, (_host(), key)) is None:
                s.add(SharedEngine(host=_host(), key=key, started_at=now, heartbeat_at=now, **values))
                s.flush()
                taken = 1
    except IntegrityError:  # another process inserted it a moment before
        return False
    return bool(taken)


def publish(key: str, url: str, pid: int, context_length: int) -> None:
    """The engine this process started answers at `url`."""
    with session_scope() as s:
        s.execute(
            update(SharedEngine)
            .where(SharedEngine.host == _host(), SharedEngine.key == key)
            .values(url=url, pid=pid, holder=this_process(), context_length=context_length, heartbeat_at=utcnow())
        )


def beat(keys: list[str]) -> None:
    """This process still watches these engines (its supervisor, every poll)."""
    if keys:
        with session_scope() as s:
            s.execute(
                update(SharedEngine)
                .where(SharedEngine.host == _host(), SharedEngine.key.in_(keys))
                .where(SharedEngine.holder == this_process())
                .values(heartbeat_at=utcnow())
            )


def withdraw(keys: list[str]) -> None:
    """This process stops its engines: their rows go, and the next process to need one starts it."""
    if keys:
        with session_scope() as s:
            s.execute(
                delete(SharedEngine).where(
                    SharedEngine.host == _host(), SharedEngine.key.in_(keys), SharedEngine.holder == this_process()
                )
            )


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
