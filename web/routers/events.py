"""/v1/events: the tenant's event feed, every event its webhooks carry (app/events.py), listed or streamed.

`GET /v1/events` lists them oldest first; `GET /v1/events/stream` sends them as server-sent events as they happen,
resumable with `Last-Event-ID`. Each event is its webhook body (`id`, `type`, `timestamp`, `data`: the resource as
the API returned it then) plus `seq`, its place in the feed, which is the cursor of both: `?after=<seq>` for the
list and the stream, and the SSE `id:` (so an EventSource resumes by itself). Test deliveries ("webhook.test") go
to one endpoint only and are not on the feed.
"""

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import events
from app.db import sessions
from app.event_tables import TenantEvent
from web.deps import CurrentTenant, Db
from web.errors import APIError

router = APIRouter(prefix="/v1/events", tags=["events"])
TEST = "webhook.test"  # stored for its one delivery, never on the feed
FEED_TYPES = tuple(t for t in events.TYPES if t != TEST)  # the types the feed carries
POLL_SECONDS = 0.5  # how often a stream reads the table for new events
KEEPALIVE_SECONDS = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
STREAM_BATCH = 500  # events read per poll; a stream far behind catches up over several polls
MAX_SEQ = 10**18 - 1  # 18 digits: every id the table can give, and no overflow of the database's integers

# The event to start after: 0 (or unset) is the feed's beginning.
After = Annotated[int, Query(ge=0, le=MAX_SEQ, description="Return the events after this `seq`.")]
TypeFilter = Annotated[str | None, Query(description="Only events of this type, e.g. 'finetune.job.succeeded'.")]


class EventOut(BaseModel):
    seq: int  # its place in the tenant's feed (ascending, with gaps): the cursor for `after` and Last-Event-ID
    id: str  # "evt_...": the webhook-id of its deliveries
    type: str
    timestamp: str  # ISO 8601, UTC
    data: dict[str, Any]  # the resource as the API returned it when the event happened


@router.get("", response_model=list[EventOut])
def list_events(
    tenant: CurrentTenant,
    db: Db,
    after: After = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many events.")] = 100,
    type: TypeFilter = None,
) -> list[EventOut]:
    """The tenant's events after `after`, oldest first; page on with `after` = the last one's `seq`."""
    return [_out(e) for e in _read(db, tenant.id, after, _checked(type), limit)]


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events until the client leaves."}
    },
)
def stream_events(
    tenant: CurrentTenant,
    db: Db,
    request: Request,
    after: After = 0,
    type: TypeFilter = None,
    last_event_id: Annotated[str | None, Header(description="Resume after this event's `seq`.")] = None,
) -> StreamingResponse:
    """The tenant's events as server-sent events, oldest first, then each as it happens: `id:` its `seq`,
    `event:` its type, `data:` the event as GET /v1/events lists it. Starts after `Last-Event-ID` (what
    EventSource sends when it reconnects), else after `?after=`, else at the feed's beginning. A comment line every
    15 s keeps a quiet connection open."""
    if last_event_id is not None:
        if re.fullmatch(r"[0-9]{1,18}", last_event_id.strip()) is None:  # ASCII digits only, within MAX_SEQ
            raise APIError(422, "Last-Event-ID: not an event id of this stream", param="Last-Event-ID")
        after = int(last_event_id)
    type = _checked(type)
    db.close()  # the stream reads with a session of its own: no connection held idle in a transaction meanwhile
    return StreamingResponse(
        _stream(tenant.id, request, after, type),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(tenant_id: str, request: Request, after: int, type: str | None) -> AsyncIterator[str]:
    """Poll the table. `publish` commits a tenant's events in id order (app/events.py), so whatever a poll sees
    follows everything an earlier poll saw: the cursor never passes an event still to come."""
    db = sessions()()
    last_sent = time.monotonic()
    try:
        while True:
            new = await run_in_threadpool(_poll, db, tenant_id, after, type)
            for event in new:
                yield f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(event.model_dump())}\n\n"
                after = event.seq
            if new:
                last_sent = time.monotonic()
            elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"  # also how a server without disconnect events notices a gone client
                last_sent = time.monotonic()
            if await request.is_disconnected():
                return
            if len(new) < STREAM_BATCH:  # caught up: wait for more
                await asyncio.sleep(POLL_SECONDS)
    finally:
        db.close()  # not awaited: a cancelled stream (the client left) must still give its connection back


def _poll(db: Session, tenant_id: str, after: int, type: str | None) -> list[EventOut]:
    db.rollback()  # end the previous read transaction so this one sees the commits since
    return [_out(e) for e in _read(db, tenant_id, after, type, STREAM_BATCH)]


def _read(db: Session, tenant_id: str, after: int, type: str | None, limit: int) -> Sequence[TenantEvent]:
    query = select(TenantEvent).where(TenantEvent.tenant_id == tenant_id, TenantEvent.id > after)
    query = query.where(TenantEvent.type == type) if type is not None else query.where(TenantEvent.type != TEST)
    return db.scalars(query.order_by(TenantEvent.id).limit(limit)).all()


def _checked(type: str | None) -> str | None:
    if type is not None and type not in FEED_TYPES:
        raise APIError(422, f"type: unknown event type {type!r}; one of {', '.join(FEED_TYPES)}", param="type")
    return type


def _out(event: TenantEvent) -> EventOut:
    return EventOut(seq=event.id, **events.envelope(event))
