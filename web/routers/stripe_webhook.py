"""POST /v1/stripe/webhook: Stripe reports payments, cards and invoices. No API key: Stripe signs each delivery.

Stripe delivers an event at least once and retries until it gets a 2xx, so the handler is idempotent: the
event id is stored in `stripe_webhook_events` in the same transaction as the event's effects, and a replay is
acknowledged without effects. A top-up is additionally keyed by its Checkout session (`topup:<cs_...>`).
Amounts from Stripe are cents; the ledger counts micro-USD (1 cent = 10_000 micro-USD).
"""

import json
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any

import stripe
from fastapi import APIRouter, Depends, Header, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import BillingAccount, StripeWebhookEvent, Tenant
from app.settings import get_settings
from billing import alerts, credits
from billing.stripe_gateway import CURRENCY, MICRO_USD_PER_CENT
from functions.deployments import suspension
from web.deps import Db
from web.errors import APIError

log = logging.getLogger("loraplex.stripe_webhook")
router = APIRouter(prefix="/v1/stripe", tags=["billing"])

TOLERANCE_SECONDS = 300  # a signature older than this is refused: a captured delivery cannot be replayed later
CARD_ON_FILE = "card on file"  # until payment_method.attached names the card


async def _raw_body(request: Request) -> bytes:
    """The exact bytes Stripe signed: the signature covers them, not a re-serialised JSON."""
    return await request.body()


@router.post("/webhook")
def stripe_webhook(
    db: Db,
    payload: Annotated[bytes, Depends(_raw_body)],
    stripe_signature: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    secret = get_settings().billing.stripe_webhook_secret
    if secret is None or not secret.get_secret_value():
        raise APIError(
            503,
            "Stripe webhooks are not configured on this installation: set LORAPLEX_STRIPE_WEBHOOK_SECRET to the "
            "endpoint's signing secret (whsec_...)",
            code="webhooks_not_configured",
        )
    try:
        # verify_header rather than construct_event: the latter also builds a stripe.Event, which fails with a
        # TypeError or AttributeError (a 500) on a signed body that is not a JSON object; _event checks the shape.
        stripe.WebhookSignature.verify_header(
            payload, stripe_signature, secret.get_secret_value(), tolerance=TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError as exc:
        raise _bad_signature(exc.user_message or str(exc)) from None
    except ValueError:  # not UTF-8: nothing Stripe sends
        raise _not_an_event("not JSON text (UTF-8)") from None
    # Stripe's check refuses only timestamps older than the tolerance; one dated ahead would stay replayable for
    # as long as it is ahead, so the future bound is ours.
    signed_at = _signed_at(stripe_signature or "")
    if signed_at > time.time() + TOLERANCE_SECONDS:
        raise _bad_signature(f"timestamp {signed_at} is more than {TOLERANCE_SECONDS} s in the future")
    return _handle(db, _event(payload))


def _signed_at(header: str) -> int:
    """The header's timestamp, read the way verify_header read it (the first `t=` item) once it accepted it."""
    return int(next(parts[1] for parts in (item.split("=", 2) for item in header.split(",")) if parts[0] == "t"))


def _bad_signature(reason: str) -> APIError:
    return APIError(400, f"invalid Stripe signature: {reason}", param="Stripe-Signature", code="invalid_signature")


def _not_an_event(problem: str) -> APIError:
    return APIError(400, f"the body is not a Stripe event: {problem}", code="invalid_payload")


JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _event(payload: bytes) -> dict[str, Any]:
    """The signed body as an event object with what the handlers read: string `id` and `type`, object
    `data.object`. Anything else is a 400 naming what is missing, never a 500 inside a handler."""
    try:
        event = json.loads(payload)
    except ValueError:
        raise _not_an_event("not JSON") from None
    if not isinstance(event, dict):
        raise _not_an_event(f"a JSON {JSON_KINDS[type(event)]}, not an event object")
    for key in ("id", "type"):
        if not isinstance(event.get(key), str) or not event[key]:
            raise _not_an_event(f"no string {key!r}")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise _not_an_event("no object 'data.object'")
    return event


def _handle(db: Session, event: dict[str, Any]) -> dict[str, Any]:
    event_id, event_type = event["id"], event["type"]
    handler = HANDLERS.get(event_type)
    if handler is None:
        return {"received": True, "ignored": f"event type {event_type} is not used"}
    if db.get(StripeWebhookEvent, event_id) is not None:
        return {"received": True, "duplicate": True}
    data = event["data"]
    obj: dict[str, Any] = data["object"]
    account = _account(db, _customer_of(event_type, obj, data), obj.get("metadata") or {})
    if account is None:
        log.warning("Stripe event %s (%s) names no customer of ours; ignored", event_id, event_type)
        return {"received": True, "ignored": "unknown customer"}
    try:
        # The id first: a concurrent delivery of the same event blocks here, then fails, and applies nothing.
        db.add(StripeWebhookEvent(id=event_id, type=event_type))
        db.flush()
        # The account before anything the handler publishes (the order the credit check takes them in), and so
        # the review below reads a ledger no check is acting on at the same moment.
        credits.lock_account(db, account.tenant_id)
        outcome = handler(db, account, obj)
        # Credit or a card came or went: announce a fall, hold or release the tenant's deployments (the runtime
        # reads the rows within a few seconds).
        suspension.review(db, account.tenant_id)
        db.commit()
    except IntegrityError:
        db.rollback()
        return {"received": True, "duplicate": True}
    log.info("Stripe event %s (%s) for tenant %s: %s", event_id, event_type, account.tenant_id, outcome)
    return {"received": True}


def _customer_of(event_type: str, obj: dict[str, Any], data: dict[str, Any]) -> str | None:
    customer = obj.get("customer")
    if customer is None and event_type == "payment_method.detached":
        # A detached payment method no longer has a customer; Stripe names the old one here.
        customer = (data.get("previous_attributes") or {}).get("customer")
    if isinstance(customer, dict):  # an expanded customer object
        customer = customer.get("id")
    return customer if isinstance(customer, str) else None


def _account(db: Session, customer_id: str | None, metadata: dict[str, Any]) -> BillingAccount | None:
    """The billing account of the Stripe customer, or of metadata.tenant_id (set on our Checkout sessions)."""
    if customer_id:
        account = db.scalar(select(BillingAccount).where(BillingAccount.stripe_customer_id == customer_id))
        if account is not None:
            return account
    tenant_id = metadata.get("tenant_id")
    if not isinstance(tenant_id, str) or db.get(Tenant, tenant_id) is None:
        return None
    account = db.get(BillingAccount, tenant_id)
    if account is None:  # a tenant from before billing existed
        account = BillingAccount(tenant_id=tenant_id)
        db.add(account)
    return account


# ---- effects: each runs inside the transaction that records the event id -------------------------------


def _checkout_completed(db: Session, account: BillingAccount, session: dict[str, Any]) -> str:
    metadata = session.get("metadata") or {}
    if session.get("mode") == "setup":
        # The card's brand and last digits come with payment_method.attached; until then say a card exists.
        if account.payment_method is None:
            account.payment_method = CARD_ON_FILE
        return "card saved"
    if session.get("mode") != "payment" or metadata.get("purpose") != "topup":
        return "not a top-up; nothing to do"
    if session.get("payment_status") != "paid":
        # Delayed payment methods complete the session unpaid; checkout.session.async_payment_succeeded follows.
        return f"top-up not paid yet ({session.get('payment_status')})"
    currency, cents = session.get("currency"), session.get("amount_total")
    if currency != CURRENCY or not isinstance(cents, int) or cents <= 0:
        log.error("top-up session %s has amount %r %r; not granted", session.get("id"), cents, currency)
        return "top-up amount unusable; not granted"
    credits.grant_credit(
        db,
        account.tenant_id,
        cents * MICRO_USD_PER_CENT,
        category="paid",
        reason="top-up",
        idempotency_key=f"topup:{session['id']}",
    )
    return f"granted {cents} cents"


def _card_attached(db: Session, account: BillingAccount, payment_method: dict[str, Any]) -> str:
    account.payment_method = _describe(payment_method)
    return f"payment method {account.payment_method}"


def _card_detached(db: Session, account: BillingAccount, payment_method: dict[str, Any]) -> str:
    # Only forget the card we show: detaching an older, unused card leaves the current one on file.
    if account.payment_method in (_describe(payment_method), CARD_ON_FILE):
        account.payment_method = None
    return f"payment method now {account.payment_method}"


def _payment_failed(db: Session, account: BillingAccount, invoice: dict[str, Any]) -> str:
    account.payment_status = "past_due"
    alerts.payment_failed(db, account.tenant_id)
    return "past_due"


def _paid(db: Session, account: BillingAccount, invoice: dict[str, Any]) -> str:
    account.payment_status = "ok"
    return "ok"


def _describe(payment_method: dict[str, Any]) -> str:
    """ "visa ending 4242"; other methods by type ("sepa_debit ending 3000")."""
    kind = str(payment_method.get("type") or "card")
    details = payment_method.get(kind) or {}
    brand = details.get("brand") or kind
    last4 = details.get("last4")
    return f"{brand} ending {last4}" if last4 else str(brand)


HANDLERS: dict[str, Callable[[Session, BillingAccount, dict[str, Any]], str]] = {
    "checkout.session.completed": _checkout_completed,
    "checkout.session.async_payment_succeeded": _checkout_completed,
    "payment_method.attached": _card_attached,
    "payment_method.detached": _card_detached,
    "invoice.payment_failed": _payment_failed,
    "invoice.paid": _paid,
    "invoice.payment_succeeded": _paid,
}
