"""Sending webhooks: the workers' `flush`, a manual re-send, a test event, and the delivery log an endpoint's owner
reads. Endpoints themselves are functions/webhook_endpoints.py; the POST and its SSRF guard functions/webhook_http.py.

app/events.py's `publish` wrote a pending delivery per endpoint in the transaction of the change it reports (an
outbox). Every worker's reaper pass calls `flush`, which
  1. lists the due deliveries of enabled endpoints, oldest first;
  2. claims each with one conditional UPDATE that moves its `next_attempt_at` CLAIM_SECONDS ahead, so no other
     flusher sees it due while it is sent (and if this one dies, it is due again after the claim);
  3. sends them in lanes, one per endpoint, side by side on a small thread pool: a slow receiver holds up only its
     own lane, each attempt for at most the timeout. Each is signed with the endpoint's secrets (standardwebhooks),
     the delivery's id its `webhook-id` on every attempt;
  4. records each attempt: delivered; or failed, with the next try on the Standard Webhooks schedule
     (RETRY_DELAYS) or, after the last, status `failed`. A failure starts the endpoint's `failing_since` and a
     success clears it; an endpoint failing for `webhook_disable_after_days` is disabled and the tenant told
     (`webhook.endpoint_disabled`).
"""

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from app import events
from app.db import session_scope
from app.errors import NotFound
from app.event_tables import TenantEvent, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.models import utcnow
from app.settings import get_settings
from functions import webhook_endpoints, webhook_http
from functions.webhook_http import Answer

log = logging.getLogger("loraplex.webhooks")

SECOND, MINUTE, HOUR = timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1)
# Standard Webhooks' schedule: the first attempt at once, then these waits after the 1st..7th failed attempt
# (about 28 hours in all); the 8th failure is the last.
RETRY_DELAYS = (5 * SECOND, 5 * MINUTE, 30 * MINUTE, 2 * HOUR, 5 * HOUR, 10 * HOUR, 10 * HOUR)
CLAIM_SECONDS = 300  # far beyond a send (timeout <= 60 s): a claim outlives its attempt
SENDERS = 16  # endpoints sent to at once by one flush pass (threads)
MAX_ERROR_CHARS = 8000  # an attempt's error: 4 KB of a receiver's answer and what says where it failed
USER_AGENT = "Loraplex-Webhooks/1"


@dataclass(frozen=True)
class FlushResult:
    delivered: int = 0
    failed: int = 0  # attempts that failed (retried later, or the delivery's last)
    unfinished: int = 0  # lanes still sending when the pass ended (their attempts are recorded when they end)
    left: int = 0  # due, not started in this pass's window: the next pass takes them


@dataclass(frozen=True)
class _Job:
    """A claimed delivery: what one attempt needs, read in the claim's transaction."""

    delivery_id: str  # the `webhook-id`
    tenant_id: str
    endpoint_id: str
    url: str
    secrets: list[str]  # the endpoint's signing secrets now (two during a rotation's overlap)
    body: str  # the event's envelope, JSON


@dataclass(frozen=True)
class LoggedDelivery:
    """One line of an endpoint's delivery log."""

    delivery: WebhookDelivery
    event: TenantEvent
    attempts: list[WebhookAttempt]  # oldest first


def flush(now: datetime | None = None, limit: int = 500) -> FlushResult:
    """Send up to `limit` due deliveries. `now` is the schedule's clock (tests move it); the signature's timestamp
    and the timeout are the real clock's.

    Each endpoint is one lane: its deliveries go one after another, the lanes side by side (SENDERS threads), so a
    slow receiver holds up only its own. Sends start during the first half of the timeout and each may take all of
    it: a pass returns within 1.5x the timeout (and a second for the writes), whatever the receivers do."""
    now = now or utcnow()
    timeout = get_settings().webhooks.webhook_timeout_seconds
    lanes = _due_by_endpoint(now, limit)
    if not lanes:
        return FlushResult()
    start_by = time.monotonic() + timeout / 2
    pool = ThreadPoolExecutor(min(SENDERS, len(lanes)), thread_name_prefix="webhooks")
    try:
        sends = [pool.submit(_send_lane, delivery_ids, now, timeout, start_by) for delivery_ids in lanes.values()]
    finally:
        pool.shutdown(wait=False)  # a lane stuck past the wait below (a hung DNS lookup) ends on its own
    done, running = wait(sends, timeout=max(0.0, start_by + timeout + 1 - time.monotonic()))
    results = [send.result() for send in done]
    return FlushResult(
        delivered=sum(r.delivered for r in results),
        failed=sum(r.failed for r in results),
        unfinished=len(running),
        left=sum(r.left for r in results),
    )


def schedule_resend(session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> str:
    """Make the tenant's delivery due now, whatever its status (the caller commits, then `send_now`). Its attempts
    go on counting: a failed one gets one more try, a pending one keeps its schedule if this try fails."""
    delivery = _find_delivery(session, tenant_id, endpoint_id, delivery_id)
    delivery.status, delivery.next_attempt_at = "pending", utcnow()
    session.flush()
    return delivery.id


def schedule_test(session: Session, tenant_id: str, endpoint_id: str) -> str:
    """A `webhook.test` event and its delivery to this one endpoint only, due now (the caller commits, then
    `send_now`). The event is not fanned out and the feed leaves test events out."""
    endpoint = webhook_endpoints.find(session, tenant_id, endpoint_id)
    data = {"endpoint_id": endpoint.id, "message": "A test event from Loraplex: this endpoint receives webhooks."}
    event = TenantEvent(tenant_id=tenant_id, type="webhook.test", subject_id=endpoint.id, data=data)
    session.add(event)
    session.flush()
    delivery = WebhookDelivery(tenant_id=tenant_id, endpoint_id=endpoint.id, event_id=event.id)
    session.add(delivery)
    session.flush()
    return delivery.id


def send_now(delivery_id: str) -> None:
    """One attempt of a due delivery from this thread, as flush would make it; nothing if a flusher has it."""
    now = utcnow()
    job = _claim(delivery_id, now)
    if job is not None:
        _attempt(job, now, get_settings().webhooks.webhook_timeout_seconds)


def delivery_log(
    session: Session, tenant_id: str, endpoint_id: str, limit: int = 50, status: str | None = None
) -> list[LoggedDelivery]:
    """The endpoint's deliveries, newest first, each with its attempts."""
    endpoint = webhook_endpoints.find(session, tenant_id, endpoint_id)
    query = select(WebhookDelivery, TenantEvent).join(TenantEvent, TenantEvent.id == WebhookDelivery.event_id)
    query = query.where(WebhookDelivery.endpoint_id == endpoint.id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    rows = session.execute(query.order_by(WebhookDelivery.created_at.desc(), TenantEvent.id.desc()).limit(limit))
    found = [(delivery, event) for delivery, event in rows]
    attempts: dict[str, list[WebhookAttempt]] = {delivery.id: [] for delivery, _ in found}
    for attempt in session.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(attempts)).order_by(WebhookAttempt.id)
    ):
        attempts[attempt.delivery_id].append(attempt)
    return [LoggedDelivery(delivery, event, attempts[delivery.id]) for delivery, event in found]


def logged(session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> LoggedDelivery:
    """One delivery of the log, read now."""
    delivery = _find_delivery(session, tenant_id, endpoint_id, delivery_id)
    session.refresh(delivery)  # written by send_now's own session
    attempts = session.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id).order_by(WebhookAttempt.id)
    )
    return LoggedDelivery(delivery, session.get_one(TenantEvent, delivery.event_id), list(attempts))


# ---- sending -------------------------------------------------------------------------------------------------


def _due_by_endpoint(now: datetime, limit: int) -> dict[str, list[str]]:
    """Endpoint id -> its due deliveries' ids, oldest first; the endpoint with the oldest first."""
    with session_scope() as s:
        query = (
            select(WebhookDelivery.id, WebhookDelivery.endpoint_id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
                WebhookEndpoint.enabled.is_(True),  # a disabled endpoint's deliveries wait until it is enabled
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
            .limit(limit)
        )
        lanes: dict[str, list[str]] = {}
        for delivery_id, endpoint_id in s.execute(query):
            lanes.setdefault(endpoint_id, []).append(delivery_id)
        return lanes


def _send_lane(delivery_ids: list[str], now: datetime, timeout: float, start_by: float) -> FlushResult:
    """One endpoint's due deliveries, one after another, while the pass's start window is open."""
    delivered = failed = 0
    for n, delivery_id in enumerate(delivery_ids):
        if time.monotonic() >= start_by:
            return FlushResult(delivered, failed, left=len(delivery_ids) - n)
        job = _claim(delivery_id, now)
        if job is None:  # another flusher took it
            continue
        if _attempt(job, now, timeout):
            delivered += 1
        else:
            failed += 1
    return FlushResult(delivered, failed)


def _claim(delivery_id: str, now: datetime) -> _Job | None:
    """Take a due delivery for one attempt: one conditional UPDATE, so two flushers never send it at once."""
    with session_scope() as s:
        claim = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
        )
        taken = cast("CursorResult[Any]", s.execute(claim))  # an UPDATE's result has rowcount (see app/queue.py)
        if taken.rowcount != 1:
            return None
        delivery = s.get_one(WebhookDelivery, delivery_id)
        endpoint = s.get_one(WebhookEndpoint, delivery.endpoint_id)
        body = json.dumps(events.envelope(s.get_one(TenantEvent, delivery.event_id)), separators=(",", ":"))
        secrets = webhook_endpoints.signing_secrets(endpoint, now)
        return _Job(delivery.id, delivery.tenant_id, endpoint.id, endpoint.url, secrets, body)


def _attempt(job: _Job, now: datetime, timeout: float) -> bool:
    """Send one claimed delivery and record the attempt; whether it was delivered. An error here (the database
    went away) leaves the claim to expire, and the delivery is tried again then."""
    try:
        answer = webhook_http.post(job.url, job.body.encode(), _signed_headers(job), timeout)
        _record(job, answer, now)
    except Exception:  # noqa: BLE001 - one delivery's trouble must not stop its lane
        log.exception("webhook delivery %s: the attempt could not be made or recorded", job.delivery_id)
        return False
    return answer.error is None


def _signed_headers(job: _Job) -> dict[str, str]:
    """Standard Webhooks' headers; `webhook-signature` holds one signature per secret, space-separated."""
    sent_at = utcnow()  # the real clock, also under an injected `now`: receivers check it against theirs
    signatures = [Webhook(secret).sign(job.delivery_id, sent_at, job.body) for secret in job.secrets]
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": job.delivery_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


def _record(job: _Job, answer: Answer, now: datetime) -> None:
    """The attempt, the delivery's next step, and the endpoint's failing state, in one transaction."""
    with session_scope() as s:
        delivery = s.get(WebhookDelivery, job.delivery_id)
        if delivery is None:
            return  # deleted with its endpoint while it was being sent
        s.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                at=now,
                status_code=answer.status_code,
                latency_ms=answer.latency_ms,
                error=None if answer.error is None else answer.error[:MAX_ERROR_CHARS],
            )
        )
        delivery.attempts += 1
        delivery.last_status_code = answer.status_code
        delivery.last_error = None if answer.error is None else answer.error[:MAX_ERROR_CHARS]
        endpoint = s.get_one(WebhookEndpoint, job.endpoint_id)
        if answer.error is None:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = "delivered", now, None
            endpoint.failing_since = None
            return
        if delivery.attempts <= len(RETRY_DELAYS):
            delivery.next_attempt_at = now + RETRY_DELAYS[delivery.attempts - 1]
        else:
            delivery.status, delivery.next_attempt_at = "failed", None
        if endpoint.failing_since is None:
            endpoint.failing_since = now
        _disable_if_failing_too_long(s, endpoint, answer.error, now)


def _disable_if_failing_too_long(s: Session, endpoint: WebhookEndpoint, error: str, now: datetime) -> None:
    days = get_settings().webhooks.webhook_disable_after_days
    since = endpoint.failing_since
    if not endpoint.enabled or since is None or now - since < timedelta(days=days):
        return
    s.flush()  # the attempt above, before the conditional UPDATE reads the row
    disable = (
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id, WebhookEndpoint.enabled.is_(True))
        .values(
            enabled=False,
            disabled_reason=f"disabled by Loraplex: every delivery failed for {days:g} days since "
            f"{since.isoformat()} (the last: {error[:200]}); enable it again to resume",
        )
    )
    taken = cast("CursorResult[Any]", s.execute(disable))
    if taken.rowcount != 1:
        return  # another worker disabled it (and told the tenant) first
    s.refresh(endpoint)
    data = webhook_endpoints.shown(endpoint, now)
    events.publish(s, endpoint.tenant_id, "webhook.endpoint_disabled", endpoint.id, data)
    log.warning("webhook endpoint %s disabled: failing since %s", endpoint.id, since.isoformat())


def _find_delivery(session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    endpoint = webhook_endpoints.find(session, tenant_id, endpoint_id)
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.endpoint_id != endpoint.id:
        raise NotFound(
            f"The delivery '{delivery_id}' of webhook endpoint '{endpoint_id}' does not exist",
            field="delivery_id",
            code="delivery_not_found",
        )
    return delivery
