"""The Stripe gateway against localstripe (customers) and the fake billing server (everything localstripe lacks).

Stripe itself cannot be reached from the test machines; see fake_stripe_billing.py for what the fakes check.
"""

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from app.settings import BillingSettings
from billing.stripe_gateway import StripeGateway, StripeUnavailable, meter_identifier
from fake_stripe_billing import API_KEY, METER_EVENT_NAME, FakeStripeBilling, localstripe_get


class RecordingClient(stripe.RequestsClient):
    """The library's own HTTP client, remembering the headers of each request (to see Idempotency-Key)."""

    def __init__(self) -> None:
        super().__init__(timeout=10)
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    def request(self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None) -> Any:
        self.calls.append((method, url, dict(headers or {})))
        return super().request(method, url, headers, post_data)


@pytest.fixture
def http() -> RecordingClient:
    return RecordingClient()


@pytest.fixture
def gateway(localstripe: str, fake: FakeStripeBilling, http: RecordingClient) -> StripeGateway:
    return StripeGateway(API_KEY, localstripe, fake.url, METER_EVENT_NAME, http_client=http)


def test_from_settings_needs_a_key() -> None:
    assert StripeGateway.from_settings(BillingSettings(stripe_api_key=None)) is None
    gateway = StripeGateway.from_settings(BillingSettings(stripe_api_key="sk_test_1", stripe_meter_event_name="m"))
    assert gateway is not None and gateway.meter_event_name == "m"


def test_customer_is_created_in_localstripe_with_tenant_metadata_and_idempotency_key(
    gateway: StripeGateway, localstripe: str, http: RecordingClient
) -> None:
    customer_id = gateway.ensure_customer("tn_gw1", "acme")
    assert customer_id.startswith("cus_")
    customer = localstripe_get(localstripe, f"/v1/customers/{customer_id}")
    assert (customer["name"], customer["metadata"]) == ("acme", {"tenant_id": "tn_gw1"})
    method, url, headers = http.calls[-1]
    assert (method, url) == ("post", f"{localstripe}/v1/customers")
    assert headers["Idempotency-Key"] == "customer:tn_gw1"
    assert headers["Authorization"] == f"Bearer {API_KEY}"


def test_meter_event_carries_customer_value_identifier_and_timestamp(
    gateway: StripeGateway, fake: FakeStripeBilling
) -> None:
    now = int(datetime.now(UTC).timestamp())
    gateway.send_meter_event("cus_1", "meter:inference:req-1", 129, now)
    assert fake.meter_events == [
        {
            "object": "billing.meter_event",
            "created": fake.meter_events[0]["created"],
            "event_name": METER_EVENT_NAME,
            "identifier": "meter:inference:req-1",
            "livemode": False,
            "payload": {"stripe_customer_id": "cus_1", "value": "129"},  # micro-USD
            "timestamp": now,
        }
    ]
    # Stripe refuses an identifier it has seen; that proves delivery, so the gateway treats it as success.
    gateway.send_meter_event("cus_1", "meter:inference:req-1", 129, now)
    assert len(fake.meter_events) == 1
    assert [r.status for r in fake.requests] == [200, 400]


def test_long_keys_become_a_stable_identifier_within_stripes_limit() -> None:
    key = "meter:" + "x" * 150
    assert len(meter_identifier(key)) <= 100
    assert meter_identifier(key) == meter_identifier(key) != meter_identifier(key + "y")
    assert meter_identifier("meter:short") == "meter:short"


def test_credit_grant_in_cents_rounded_down_with_expiry(
    gateway: StripeGateway, fake: FakeStripeBilling, http: RecordingClient
) -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    grant_id = gateway.create_credit_grant(
        "cus_1", "credit_grant:cg_1", 25_009_999, "promotional", expires, "developer sign-up"
    )
    grant = fake.credit_grants[0]
    assert grant["id"] == grant_id
    assert grant["amount"] == {"type": "monetary", "monetary": {"currency": "usd", "value": 2500}}  # $25.00
    assert grant["expires_at"] == int(expires.timestamp())
    assert (grant["category"], grant["name"], grant["customer"]) == ("promotional", "developer sign-up", "cus_1")
    assert grant["applicability_config"] == {"scope": {"price_type": "metered"}}
    assert grant["metadata"] == {"loraplex_key": "credit_grant:cg_1"}
    assert fake.requests[-1].idempotency_key == "credit_grant:cg_1"
    gateway.create_credit_grant("cus_1", "credit_grant:cg_2", 12_345, "paid", None, "top-up")
    assert fake.credit_grants[1]["amount"]["monetary"]["value"] == 1  # 1.2345 cents -> 1 cent
    assert fake.credit_grants[1]["expires_at"] is None
    with pytest.raises(ValueError, match="under one cent"):
        gateway.create_credit_grant("cus_1", "credit_grant:cg_3", 9_999, "paid", None, "top-up")


def test_credit_grant_retry_after_a_lost_answer_finds_the_grant_instead_of_making_a_second(
    gateway: StripeGateway, fake: FakeStripeBilling
) -> None:
    fake.go_down("lose_response")  # Stripe made the grant, but we saw a 500
    with pytest.raises(StripeUnavailable):
        gateway.create_credit_grant("cus_1", "credit_grant:cg_9", 5_000_000, "paid", None, "top-up")
    fake.come_back()
    grant_id = gateway.create_credit_grant("cus_1", "credit_grant:cg_9", 5_000_000, "paid", None, "top-up", attempt=1)
    assert [g["id"] for g in fake.credit_grants] == [grant_id]
    # A retry that finds nothing creates the grant under a key of its own (Stripe would replay a saved 500).
    gateway.create_credit_grant("cus_1", "credit_grant:cg_10", 5_000_000, "paid", None, "top-up", attempt=2)
    assert fake.requests[-1].idempotency_key == "credit_grant:cg_10:retry2"
    assert len(fake.credit_grants) == 2


def test_checkout_for_a_card_and_for_a_top_up(gateway: StripeGateway, fake: FakeStripeBilling) -> None:
    url = gateway.checkout_session("cus_1", "card", None, "https://app/ok", "https://app/no", "tn_1")
    card = fake.checkout_sessions[0]
    assert url == card["url"] and url.startswith("https://checkout.stripe.com/")
    assert (card["mode"], card["currency"], card["customer"]) == ("setup", "usd", "cus_1")
    assert card["metadata"] == {"purpose": "card", "tenant_id": "tn_1"}
    assert (card["success_url"], card["cancel_url"]) == ("https://app/ok", "https://app/no")

    url = gateway.checkout_session("cus_1", "topup", 25_500_000, "https://app/ok", "https://app/no", "tn_1")
    topup = fake.checkout_sessions[1]
    assert url == topup["url"]
    assert (topup["mode"], topup["amount_total"], topup["currency"]) == ("payment", 2550, "usd")  # cents
    assert topup["metadata"] == {"purpose": "topup", "tenant_id": "tn_1"}
    form = fake.requests[-1].form
    assert form["line_items[0][price_data][unit_amount]"] == "2550"
    assert form["line_items[0][quantity]"] == "1"
    for bad in (None, 0, 25_500_001):
        with pytest.raises(ValueError, match="whole number of cents"):
            gateway.checkout_session("cus_1", "topup", bad, "https://app/ok", "https://app/no", "tn_1")


def test_portal_returns_its_url(gateway: StripeGateway, fake: FakeStripeBilling) -> None:
    url = gateway.portal_session("cus_1", "https://app/billing")
    assert url == fake.portal_sessions[0]["url"] and url.startswith("https://billing.stripe.com/")
    assert fake.portal_sessions[0]["return_url"] == "https://app/billing"


@pytest.mark.parametrize("how", ["error", "refuse"])
def test_an_outage_is_stripe_unavailable(gateway: StripeGateway, fake: FakeStripeBilling, how: str) -> None:
    fake.go_down(how)  # type: ignore[arg-type]
    with pytest.raises(StripeUnavailable):
        gateway.send_meter_event("cus_1", "meter:x", 1, int(datetime.now(UTC).timestamp()))
    with pytest.raises(StripeUnavailable):
        gateway.portal_session("cus_1", "https://app/billing")


def test_a_wrong_key_is_unavailable_and_a_bad_request_is_ours(localstripe: str, fake: FakeStripeBilling) -> None:
    wrong = StripeGateway("sk_test_wrong", localstripe, fake.url, METER_EVENT_NAME)
    with pytest.raises(StripeUnavailable, match="AuthenticationError"):
        wrong.portal_session("cus_1", "https://app/billing")
    gateway = StripeGateway(API_KEY, localstripe, fake.url, METER_EVENT_NAME)
    forty_days_ago = int((datetime.now(UTC) - timedelta(days=40)).timestamp())
    with pytest.raises(stripe.InvalidRequestError, match="35 calendar days"):
        gateway.send_meter_event("cus_1", "meter:old", 5, forty_days_ago)
