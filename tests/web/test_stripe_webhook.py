"""POST /v1/stripe/webhook: signed events change billing state once; bad or stale signatures change nothing.

Most events are signed here the way Stripe documents (header `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`);
one test has localstripe itself sign and deliver an event to the app served by uvicorn.
"""

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db import session_scope
from app.models import BillingAccount, CreditGrant, StripeOutbox, StripeWebhookEvent
from app.settings import get_settings
from billing import credits
from conftest import free_port, make_tenant
from fake_stripe_billing import API_KEY, localstripe_server, wait_until_up

SECRET = "whsec_test_" + secrets.token_hex(16)


@pytest.fixture
def webhook_secret(platform, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LORAPLEX_STRIPE_WEBHOOK_SECRET", SECRET)
    get_settings.cache_clear()
    return SECRET


@pytest.fixture
def customer(platform) -> tuple[str, str]:
    """(tenant id, Stripe customer id) of a tenant whose billing account knows its customer."""
    tenant_id, _ = make_tenant("acme")
    customer_id = f"cus_test_{secrets.token_hex(6)}"
    with session_scope() as s:
        s.get_one(BillingAccount, tenant_id).stripe_customer_id = customer_id
    return tenant_id, customer_id


def sign(payload: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={signature}"


def event(event_type: str, obj: dict[str, Any], **data: Any) -> bytes:
    body = {
        "id": f"evt_{secrets.token_hex(8)}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "api_version": "2025-01-27.acacia",
        "livemode": False,
        "data": {"object": obj, **data},
    }
    return json.dumps(body).encode()


def deliver(client: TestClient, payload: bytes, signature: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", "Stripe-Signature": signature or sign(payload)}
    return client.post("/v1/stripe/webhook", content=payload, headers=headers)


def topup_session(customer_id: str, tenant_id: str, cents: int = 2500, paid: bool = True) -> dict[str, Any]:
    return {
        "id": f"cs_test_{secrets.token_hex(8)}",
        "object": "checkout.session",
        "mode": "payment",
        "customer": customer_id,
        "amount_total": cents,
        "currency": "usd",
        "payment_status": "paid" if paid else "unpaid",
        "metadata": {"purpose": "topup", "tenant_id": tenant_id},
    }


def account(tenant_id: str) -> BillingAccount:
    with session_scope() as s:
        return s.get_one(BillingAccount, tenant_id)


def counts() -> tuple[int, int, int]:
    with session_scope() as s:
        return (
            s.scalar(select(func.count()).select_from(StripeWebhookEvent)) or 0,
            s.scalar(select(func.count()).select_from(CreditGrant)) or 0,
            s.scalar(select(func.count()).select_from(StripeOutbox)) or 0,
        )


def test_a_top_up_delivered_three_times_is_granted_once(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    tenant_id, customer_id = customer
    with session_scope() as s:
        before = credits.balance(s, tenant_id).credit_micro_usd
    session = topup_session(customer_id, tenant_id, cents=2550)
    payload = event("checkout.session.completed", session)
    answers = [deliver(client, payload) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json() == {"received": True}
    assert answers[1].json() == answers[2].json() == {"received": True, "duplicate": True}
    with session_scope() as s:
        [grant] = s.scalars(select(CreditGrant).where(CreditGrant.idempotency_key == f"topup:{session['id']}"))
        assert (grant.amount_micro_usd, grant.category, grant.reason) == (25_500_000, "paid", "top-up")  # 2550 cents
        assert credits.balance(s, tenant_id).credit_micro_usd == before + 25_500_000
        # Stripe is owed the matching credit grant, once.
        owed = s.scalars(select(StripeOutbox).where(StripeOutbox.idempotency_key == f"credit_grant:{grant.id}"))
        assert len(list(owed)) == 1
    # The same session in a new event (Stripe's retry with another event id) still grants nothing more.
    assert deliver(client, event("checkout.session.completed", session)).status_code == 200
    with session_scope() as s:
        assert credits.balance(s, tenant_id).credit_micro_usd == before + 25_500_000


def test_bad_or_stale_signatures_are_refused_and_change_nothing(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    tenant_id, customer_id = customer
    payload = event("checkout.session.completed", topup_session(customer_id, tenant_id))
    before = counts()
    forged = payload.replace(b"2500", b"9999")
    cases = {
        "wrong secret": (payload, sign(payload, secret="whsec_wrong")),
        "tampered body": (forged, sign(payload)),
        "stale": (payload, sign(payload, timestamp=int(time.time()) - 301)),  # older than the 300 s tolerance
        "from the future": (payload, sign(payload, timestamp=int(time.time()) + 600)),  # dated 10 minutes ahead
        "garbage header": (payload, "nonsense"),
    }
    for name, (body, signature) in cases.items():
        r = deliver(client, body, signature)
        assert r.status_code == 400, name
        error = r.json()["error"]
        assert (error["code"], error["type"]) == ("invalid_signature", "invalid_request_error"), name
    r = client.post("/v1/stripe/webhook", content=payload, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_signature")  # no header at all
    assert counts() == before
    # The genuine one still works afterwards, from a sender whose clock runs a little ahead of ours too.
    assert deliver(client, payload, sign(payload, timestamp=int(time.time()) + 250)).json() == {"received": True}


def test_signed_bodies_that_are_not_events_are_refused_by_name(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    """Signed (so past the signature check) but not an event object: a 400 saying what is wrong, never a 500."""
    before = counts()
    no_object = json.loads(event("invoice.paid", {}))
    no_object["data"] = {"object": "in_1"}
    cases = {
        b"[]": "a JSON array",
        b'"evt_1"': "a JSON string",
        b"42": "a JSON number",
        b"null": "a JSON null",
        json.dumps({"id": "evt_1", "data": {"object": {}}}).encode(): "'type'",
        json.dumps({"type": "invoice.paid", "data": {"object": {}}}).encode(): "'id'",
        json.dumps({"id": "evt_1", "type": "invoice.paid"}).encode(): "'data.object'",
        json.dumps(no_object).encode(): "'data.object'",
    }
    for body, problem in cases.items():
        r = deliver(client, body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert (error["code"], error["type"]) == ("invalid_payload", "invalid_request_error"), body
        assert error["message"].startswith("the body is not a Stripe event") and problem in error["message"], body
    for body in (b"{not json", b"\xff\xfe"):  # refused as malformed JSON (by the body check in front, or here)
        r = deliver(client, body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
    assert counts() == before


def test_without_a_secret_webhooks_are_refused_with_503(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_STRIPE_WEBHOOK_SECRET", raising=False)
    get_settings.cache_clear()
    payload = event("invoice.paid", {"customer": "cus_x"})
    r = deliver(client, payload)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "webhooks_not_configured"
    assert "LORAPLEX_STRIPE_WEBHOOK_SECRET" in r.json()["error"]["message"]


def test_card_events_set_and_clear_the_payment_method(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    tenant_id, customer_id = customer
    setup = {"id": "cs_test_setup", "object": "checkout.session", "mode": "setup", "customer": customer_id}
    assert deliver(client, event("checkout.session.completed", setup)).status_code == 200
    assert account(tenant_id).payment_method == "card on file"
    card = {"id": "pm_1", "object": "payment_method", "type": "card", "card": {"brand": "visa", "last4": "4242"}}
    assert deliver(client, event("payment_method.attached", card | {"customer": customer_id})).status_code == 200
    assert account(tenant_id).payment_method == "visa ending 4242"
    other = card | {"id": "pm_0", "card": {"brand": "mastercard", "last4": "4444"}}
    detached = {"previous_attributes": {"customer": customer_id}}  # Stripe names the old customer here
    deliver(client, event("payment_method.detached", other | {"customer": None}, **detached))
    assert account(tenant_id).payment_method == "visa ending 4242"  # an old card went; the current one stays
    deliver(client, event("payment_method.detached", card | {"customer": None}, **detached))
    assert account(tenant_id).payment_method is None


def test_invoice_events_set_the_payment_status(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    tenant_id, customer_id = customer
    invoice = {"id": "in_1", "object": "invoice", "customer": customer_id}
    deliver(client, event("invoice.payment_failed", invoice))
    assert account(tenant_id).payment_status == "past_due"
    deliver(client, event("invoice.paid", invoice))
    assert account(tenant_id).payment_status == "ok"
    deliver(client, event("invoice.payment_failed", invoice))
    deliver(client, event("invoice.payment_succeeded", invoice))
    assert account(tenant_id).payment_status == "ok"


def test_an_unpaid_top_up_waits_for_its_async_payment(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    tenant_id, customer_id = customer
    session = topup_session(customer_id, tenant_id, paid=False)
    deliver(client, event("checkout.session.completed", session))
    with session_scope() as s:
        assert s.scalar(select(CreditGrant).where(CreditGrant.idempotency_key == f"topup:{session['id']}")) is None
    deliver(client, event("checkout.session.async_payment_succeeded", session | {"payment_status": "paid"}))
    with session_scope() as s:
        grant = s.scalar(select(CreditGrant).where(CreditGrant.idempotency_key == f"topup:{session['id']}"))
        assert grant is not None and grant.amount_micro_usd == 25_000_000


def test_unknown_customers_and_unused_event_types_are_acknowledged_and_ignored(
    client: TestClient, webhook_secret: str, customer: tuple[str, str]
) -> None:
    tenant_id, _ = customer
    before = counts()
    r = deliver(client, event("invoice.payment_failed", {"id": "in_2", "customer": "cus_unknown"}))
    assert r.status_code == 200 and r.json() == {"received": True, "ignored": "unknown customer"}
    r = deliver(client, event("customer.created", {"id": "cus_new"}))
    assert r.status_code == 200 and r.json()["ignored"].startswith("event type customer.created")
    assert counts() == before
    assert account(tenant_id).payment_status == "ok"


@pytest.fixture
def served_app(platform, webhook_secret: str) -> Iterator[str]:
    """The app served by uvicorn on a free port (in a thread), for localstripe to call."""
    from web.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_localstripe_signs_and_delivers_an_event_to_the_running_app(served_app: str) -> None:
    from billing.outbox import ensure_stripe_customer
    from billing.stripe_gateway import StripeGateway

    tenant_id, _ = make_tenant("acme")
    with localstripe_server() as ls, httpx.Client(base_url=ls, auth=(API_KEY, ""), timeout=10) as stripe_api:
        hook = {"url": f"{served_app}/v1/stripe/webhook", "secret": SECRET, "events": ["invoice.payment_succeeded"]}
        stripe_api.post("/_config/webhooks/loraplex", json=hook).raise_for_status()
        customer_id = ensure_stripe_customer(StripeGateway(API_KEY, ls, ls, "loraplex_usage"), tenant_id)
        with session_scope() as s:
            s.get_one(BillingAccount, tenant_id).payment_status = "past_due"  # an earlier payment failed
        # A paid invoice in localstripe (it only invoices subscriptions): a plan, a card, a subscription.
        stripe_api.post(
            "/v1/plans",
            data={"id": "base", "amount": 500, "currency": "usd", "interval": "month", "product[name]": "Loraplex"},
        ).raise_for_status()
        card = stripe_api.post("/v1/payment_methods/pm_card_visa/attach", data={"customer": customer_id}).json()
        stripe_api.post(
            f"/v1/customers/{customer_id}", data={"invoice_settings[default_payment_method]": card["id"]}
        ).raise_for_status()
        sub = stripe_api.post("/v1/subscriptions", data={"customer": customer_id, "items[0][plan]": "base"}).json()
        assert sub["status"] == "active"
        deadline = time.monotonic() + 15  # localstripe sends its webhooks a second after the event
        while account(tenant_id).payment_status != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert account(tenant_id).payment_status == "ok"
    with session_scope() as s:
        [seen] = s.scalars(select(StripeWebhookEvent))
        assert seen.type == "invoice.payment_succeeded" and seen.id.startswith("evt_")
