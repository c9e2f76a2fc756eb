"""The Stripe outbox: calls owed to Stripe, stored with the ledger rows they mirror and sent later.

`enqueue` runs in the caller's transaction, so a ledger row and the Stripe call it owes commit together.
`flush` (the worker's reaper loop calls it through `flush_if_configured`) sends what is due, oldest first:
a tenant's sign-up credit grant reaches Stripe before the meter events that spend it. A Stripe outage
delays rows and never loses them; resending is harmless because every call carries a key Stripe
de-duplicates on (meter event identifier, Idempotency-Key).
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import stripe
from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import BillingAccount, StripeOutbox, Tenant, utcnow
from billing.stripe_gateway import StripeGateway, StripeUnavailable, micro_usd_to_cents

log = logging.getLogger("loraplex.outbox")

MAX_BACKOFF_SECONDS = 3600
# A row being sent is hidden from other flushers (every worker runs one) this long; if its flusher dies
# mid-call, the row becomes due again afterwards.
CLAIM_SECONDS = 300
MAX_ERROR_CHARS = 2000


def enqueue(session: Session, tenant_id: str, kind: str, idempotency_key: str, payload: dict[str, Any]) -> None:
    """Owe Stripe one call, in the caller's transaction. The same key twice is one call."""
    if session.scalar(select(StripeOutbox.id).where(StripeOutbox.idempotency_key == idempotency_key)) is None:
        session.add(StripeOutbox(tenant_id=tenant_id, kind=kind, idempotency_key=idempotency_key, payload=payload))


@dataclass(frozen=True)
class FlushResult:
    sent: int = 0
    failed: int = 0  # tried and refused or unreachable; retried after a backoff
    skipped: int = 0  # nothing to send (zero value, under a cent, already expired): status "skipped"


@dataclass(frozen=True)
class _Row:
    id: int
    tenant_id: str
    kind: str
    idempotency_key: str
    payload: dict[str, Any]
    attempts: int


class _Skip(Exception):
    """This row needs no Stripe call; the message says why."""


# Errors that concern one row only (Stripe refused the request as malformed, or its payload is broken):
# the row backs off and the flush goes on with the others.
_ROW_ERRORS = (stripe.StripeError, ValueError, KeyError, TypeError)


def flush(gateway: StripeGateway, now: datetime | None = None, limit: int = 500) -> FlushResult:
    """Send up to `limit` due rows, oldest first. Stops at the first StripeUnavailable (Stripe is down: the
    rest would fail too, and stopping keeps the order); a row Stripe refuses backs off alone."""
    now = now or utcnow()
    with session_scope() as s:
        due = s.scalars(
            select(StripeOutbox.id)
            .where(StripeOutbox.status == "pending", StripeOutbox.next_attempt_at <= now)
            .order_by(StripeOutbox.id)
            .limit(limit)
        ).all()
    sent = failed = skipped = 0
    customers: dict[str, str] = {}  # tenant id -> cus_ id, for this pass
    for row_id in due:
        row = _claim(row_id, now)
        if row is None:
            continue  # another worker's flush took it
        try:
            _send(gateway, row, customers, now)
        except _Skip as why:
            _finish(row.id, "skipped", now, str(why))
            skipped += 1
        except StripeUnavailable as exc:
            _back_off(row, str(exc), now)
            log.warning("Stripe unavailable; outbox flush stops until row %d is due again: %s", row.id, exc)
            return FlushResult(sent, failed + 1, skipped)
        except _ROW_ERRORS as exc:
            _back_off(row, f"{type(exc).__name__}: {exc}", now)
            log.error("Stripe refused outbox row %d (%s %s): %s", row.id, row.kind, row.idempotency_key, exc)
            failed += 1
        else:
            _finish(row.id, "sent", now, None)
            sent += 1
    return FlushResult(sent, failed, skipped)


_gateways: dict[tuple[str, str, str | None, str], StripeGateway] = {}


def flush_if_configured() -> FlushResult | None:
    """Flush with the configured gateway; None when no Stripe key is set (rows wait, unsent)."""
    from app.settings import get_settings

    settings = get_settings().billing
    if settings.stripe_api_key is None:
        return None
    key = (
        settings.stripe_api_key.get_secret_value(),
        settings.stripe_api_base,
        settings.stripe_billing_api_base,
        settings.stripe_meter_event_name,
    )
    gateway = _gateways.get(key)
    if gateway is None:  # one gateway per configuration: its HTTP connections are reused between passes
        gateway = StripeGateway.from_settings(settings)
        if gateway is None:
            return None
        _gateways[key] = gateway
    return flush(gateway)


def ensure_stripe_customer(gateway: StripeGateway, tenant_id: str) -> str:
    """The tenant's Stripe customer id: the stored one, or a new customer whose id is stored now.

    The Stripe call runs outside any transaction (no database lock is held across the network). If another
    process stored an id first, theirs is kept; Stripe's idempotency key gave both the same customer anyway.
    """
    with session_scope() as s:
        account = s.get(BillingAccount, tenant_id)
        if account is not None and account.stripe_customer_id:
            return account.stripe_customer_id
        name = s.get_one(Tenant, tenant_id).name
    customer_id = gateway.ensure_customer(tenant_id, name)
    for _ in range(2):  # a second try only when a concurrent insert of the billing account won the race
        try:
            with session_scope() as s:
                account = s.get(BillingAccount, tenant_id)
                if account is None:
                    s.add(BillingAccount(tenant_id=tenant_id, stripe_customer_id=customer_id))
                elif account.stripe_customer_id:
                    return account.stripe_customer_id
                else:
                    account.stripe_customer_id = customer_id
            return customer_id
        except IntegrityError:
            continue
    raise RuntimeError(f"could not store the Stripe customer of tenant {tenant_id}")


def _claim(row_id: int, now: datetime) -> _Row | None:
    """Take a due row for this flush: one conditional UPDATE, so two flushers never send it at once."""
    with session_scope() as s:
        claim = (
            update(StripeOutbox)
            .where(StripeOutbox.id == row_id, StripeOutbox.status == "pending", StripeOutbox.next_attempt_at <= now)
            .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
        )
        taken = cast("CursorResult[Any]", s.execute(claim))  # an UPDATE's result has rowcount (see app/queue.py)
        if taken.rowcount != 1:
            return None
        r = s.get_one(StripeOutbox, row_id)
        return _Row(r.id, r.tenant_id, r.kind, r.idempotency_key, dict(r.payload), r.attempts)


def _send(gateway: StripeGateway, row: _Row, customers: dict[str, str], now: datetime) -> None:
    if row.kind == "meter_event":
        value = int(row.payload["value_micro_usd"])
        if value == 0:
            raise _Skip("zero usage: no meter event needed")
        customer_id = _customer(gateway, row.tenant_id, customers)
        gateway.send_meter_event(customer_id, row.idempotency_key, value, int(row.payload["timestamp"]))
    elif row.kind == "credit_grant":
        amount = int(row.payload["amount_micro_usd"])
        if micro_usd_to_cents(amount) <= 0:
            raise _Skip(f"{amount} micro-USD is under one cent, the smallest grant Stripe takes")
        expires_at = datetime.fromisoformat(row.payload["expires_at"]) if row.payload.get("expires_at") else None
        if expires_at is not None and expires_at <= now:
            # Stripe refuses an expiry in the past; the credit can no longer be spent anyway.
            log.warning("credit grant %s expired before it reached Stripe; not sent", row.idempotency_key)
            raise _Skip(f"expired at {expires_at.isoformat()} before it could be sent")
        customer_id = _customer(gateway, row.tenant_id, customers)
        gateway.create_credit_grant(
            customer_id,
            row.idempotency_key,
            amount,
            str(row.payload["category"]),
            expires_at,
            str(row.payload.get("reason") or "credits"),
            attempt=row.attempts,
        )
    else:
        raise ValueError(f"unknown outbox kind {row.kind!r}")


def _customer(gateway: StripeGateway, tenant_id: str, customers: dict[str, str]) -> str:
    if tenant_id not in customers:
        customers[tenant_id] = ensure_stripe_customer(gateway, tenant_id)
    return customers[tenant_id]


def _finish(row_id: int, status: str, now: datetime, note: str | None) -> None:
    with session_scope() as s:
        s.execute(
            update(StripeOutbox)
            .where(StripeOutbox.id == row_id)
            .values(status=status, sent_at=now if status == "sent" else None, last_error=note)
        )


def _back_off(row: _Row, error: str, now: datetime) -> None:
    """attempts + 1, next try after 2**attempts seconds (2 s, 4 s, ... at most an hour); the row stays pending."""
    attempts = row.attempts + 1
    with session_scope() as s:
        s.execute(
            update(StripeOutbox)
            .where(StripeOutbox.id == row.id)
            .values(
                attempts=attempts,
                next_attempt_at=now + timedelta(seconds=min(2**attempts, MAX_BACKOFF_SECONDS)),
                last_error=error[:MAX_ERROR_CHARS],
            )
        )
