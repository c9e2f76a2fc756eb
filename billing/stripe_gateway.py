"""A thin layer over the official `stripe` library: the only module that talks to Stripe.

Two `stripe.StripeClient`s share one API key. The core client (customers) uses `api_base`; the billing client
(meter events, credit grants, Checkout, the customer portal) uses `billing_api_base`. In production both are
https://api.stripe.com. In the tests the core API is localstripe and the billing endpoints are a small fake
(tests/billing/fake_stripe_billing.py), because localstripe implements no billing meters, credit grants,
Checkout or portal, and Stripe itself cannot be reached from the test machines.

Units: our ledger counts micro-USD (1 USD = 1_000_000). Stripe counts money in cents (1 USD = 100), so
micro-USD -> cents divides by 10_000. Usage goes to Stripe as meter events whose value is the ledger amount in
micro-USD: a metered price of $0.000001 per unit (unit_amount_decimal "0.0001" cents) on that meter makes the
Stripe invoice equal our ledger, with no rounding until Stripe totals the period.

Errors: what a later retry can fix (no connection, 5xx, 409 lock conflicts, 429 rate limits, and a wrong or
revoked key, which every call hits alike until an operator fixes it) becomes `StripeUnavailable`. A request
Stripe refuses as malformed (`stripe.InvalidRequestError`, 400/404) is our bug for that one call and is raised
as is.
"""

import hashlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Literal, TypeVar

import stripe
from stripe.params.billing import CreditGrantCreateParams, MeterEventCreateParams
from stripe.params.checkout import SessionCreateParams

from app.settings import BillingSettings, get_settings

log = logging.getLogger("loraplex.stripe")
T = TypeVar("T")

MICRO_USD_PER_CENT = 10_000
CURRENCY = "usd"
METER_IDENTIFIER_MAX = 100  # Stripe's limit on a meter event identifier
# Stripe refuses a meter event whose identifier it has seen (within at least 24 hours) with a 400 that says so.
DUPLICATE_METER_EVENT = "already exists with identifier"
GRANT_KEY_METADATA = "loraplex_key"  # our idempotency key, stored on the Stripe credit grant


class StripeUnavailable(Exception):
    """Stripe cannot take the call now (connection, 5xx, 429, bad key): keep the work and retry later."""


def micro_usd_to_cents(amount_micro_usd: int) -> int:
    """Whole cents, rounded DOWN: Stripe is never told of more money than the ledger holds."""
    return amount_micro_usd // MICRO_USD_PER_CENT


def meter_identifier(key: str) -> str:
    """A deterministic meter event identifier within Stripe's 100 characters: the key itself, or its hash."""
    if len(key) <= METER_IDENTIFIER_MAX:
        return key
    return "meter:" + hashlib.sha256(key.encode()).hexdigest()


class StripeGateway:
    """Every Stripe call the platform makes. Stateless apart from the HTTP clients; safe to share."""

    def __init__(
        self,
        api_key: str,
        api_base: str,
        billing_api_base: str,
        meter_event_name: str,
        *,
        timeout_seconds: float = 20.0,
        http_client: stripe.HTTPClient | None = None,
    ) -> None:
        # No retries inside the library: the outbox retries with its own backoff and keeps the order of calls.
        client = http_client or stripe.RequestsClient(timeout=timeout_seconds)
        self.meter_event_name = meter_event_name
        self._core = stripe.StripeClient(
            api_key, base_addresses={"api": api_base.rstrip("/")}, max_network_retries=0, http_client=client
        )
        self._billing = stripe.StripeClient(
            api_key, base_addresses={"api": billing_api_base.rstrip("/")}, max_network_retries=0, http_client=client
        )

    @classmethod
    def from_settings(cls, settings: BillingSettings | None = None) -> "StripeGateway | None":
        """The configured gateway, or None when no Stripe key is set (Stripe sync is off)."""
        settings = settings or get_settings().billing
        if settings.stripe_api_key is None or not settings.stripe_api_key.get_secret_value():
            return None
        return cls(
            settings.stripe_api_key.get_secret_value(),
            settings.stripe_api_base,
            settings.stripe_billing_api_base or settings.stripe_api_base,
            settings.stripe_meter_event_name,
        )

    # ---- customers (core API) ------------------------------------------------------------------------

    def ensure_customer(self, tenant_id: str, name: str) -> str:
        """Create the tenant's Stripe customer and return its cus_ id.

        The caller stores the id (BillingAccount.stripe_customer_id) and calls this only while none is stored.
        The idempotency key makes a repeat within Stripe's 24 hours (say, the id was lost to a failed commit)
        return the same customer instead of a second one.
        """
        customer = _call(
            "create customer",
            lambda: self._core.v1.customers.create(
                params={"name": name, "metadata": {"tenant_id": tenant_id}},
                options={"idempotency_key": f"customer:{tenant_id}"},
            ),
        )
        return str(customer.id)

    # ---- usage and credits (billing API) ----------------------------------------------------------------

    def send_meter_event(self, customer_id: str, identifier: str, value_micro_usd: int, timestamp: int) -> None:
        """Report usage worth `value_micro_usd` at `timestamp` (Unix seconds) to the meter.

        Stripe de-duplicates meter events by `identifier` (at least 24 hours) and refuses a repeat with a 400;
        since our identifier names one ledger row, that refusal proves the event is already recorded: success.
        """
        params: MeterEventCreateParams = {
            "event_name": self.meter_event_name,
            "payload": {"stripe_customer_id": customer_id, "value": str(value_micro_usd)},
            "identifier": meter_identifier(identifier),
            "timestamp": timestamp,
        }
        try:
            _call("send meter event", lambda: self._billing.v1.billing.meter_events.create(params=params))
        except stripe.InvalidRequestError as exc:
            if DUPLICATE_METER_EVENT not in f"{exc.user_message} {exc}":
                raise
            log.info("meter event %s was already recorded by Stripe", params["identifier"])

    def create_credit_grant(
        self,
        customer_id: str,
        idempotency_key: str,
        amount_micro_usd: int,
        category: str,
        expires_at: datetime | None,
        name: str,
        *,
        attempt: int = 0,
    ) -> str:
        """Mirror one of our credit grants in Stripe, so its invoices apply the credit to metered usage.

        The amount goes in whole cents, rounded DOWN (a grant of 12_345 micro-USD becomes 1 cent); the caller
        skips grants under one cent. Returns Stripe's credgr_ id.

        `attempt` counts earlier failed tries of this grant. Stripe replays the saved response of an
        Idempotency-Key for 24 hours, a 500 included, so a retry with the first key could fail all day. A retry
        therefore first looks for the grant by its metadata (the earlier try may have created it before
        failing) and only then creates it under a key of its own.
        """
        cents = micro_usd_to_cents(amount_micro_usd)
        if cents <= 0:
            raise ValueError(f"a credit grant under one cent cannot be sent to Stripe ({amount_micro_usd} micro-USD)")
        if attempt > 0:
            existing = self.find_credit_grant(customer_id, idempotency_key)
            if existing is not None:
                return existing
        params: CreditGrantCreateParams = {
            "customer": customer_id,
            "amount": {"type": "monetary", "monetary": {"currency": CURRENCY, "value": cents}},
            "applicability_config": {"scope": {"price_type": "metered"}},
            "category": category,
            "name": name[:100],
            "metadata": {GRANT_KEY_METADATA: idempotency_key},
        }
        if expires_at is not None:
            params["expires_at"] = int(expires_at.timestamp())
        key = idempotency_key if attempt == 0 else f"{idempotency_key}:retry{attempt}"
        grant = _call(
            "create credit grant",
            lambda: self._billing.v1.billing.credit_grants.create(params=params, options={"idempotency_key": key}),
        )
        return str(grant.id)

    def find_credit_grant(self, customer_id: str, idempotency_key: str) -> str | None:
        """The credgr_ id of the customer's grant made for `idempotency_key`, if Stripe has one."""
        grants = _call(
            "list credit grants",
            lambda: self._billing.v1.billing.credit_grants.list(params={"customer": customer_id, "limit": 100}),
        )
        for grant in _call("list credit grants", lambda: list(grants.auto_paging_iter())):
            if (grant.to_dict().get("metadata") or {}).get(GRANT_KEY_METADATA) == idempotency_key:
                return str(grant.id)
        return None

    # ---- hosted pages (billing API) -------------------------------------------------------------------

    def checkout_session(
        self,
        customer_id: str,
        purpose: Literal["card", "topup"],
        amount_micro_usd: int | None,
        success_url: str,
        cancel_url: str,
        tenant_id: str,
    ) -> str:
        """A Stripe Checkout page: "card" saves a card (mode=setup); "topup" buys credits (mode=payment).

        A top-up must be a whole number of cents (`amount_micro_usd` divisible by 10_000); the webhook for the
        completed session grants amount_total cents x 10_000 micro-USD. Returns the page's URL.
        """
        metadata = {"purpose": purpose, "tenant_id": tenant_id}
        params: SessionCreateParams = {
            "customer": customer_id,
            "client_reference_id": tenant_id,
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": metadata,
        }
        if purpose == "card":
            # Setup mode needs a currency to choose the payment methods it offers.
            params |= {"mode": "setup", "currency": CURRENCY, "setup_intent_data": {"metadata": metadata}}
        elif purpose == "topup":
            if amount_micro_usd is None or amount_micro_usd <= 0 or amount_micro_usd % MICRO_USD_PER_CENT:
                raise ValueError(f"a top-up must be a positive whole number of cents, got {amount_micro_usd} micro-USD")
            params |= {
                "mode": "payment",
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": CURRENCY,
                            "unit_amount": micro_usd_to_cents(amount_micro_usd),
                            "product_data": {"name": "Loraplex credits"},
                        },
                    }
                ],
                "payment_intent_data": {"metadata": metadata},
            }
        else:
            raise ValueError(f"unknown checkout purpose {purpose!r}")
        session = _call("create checkout session", lambda: self._billing.v1.checkout.sessions.create(params=params))
        return str(session.url)

    def portal_session(self, customer_id: str, return_url: str) -> str:
        """A Stripe customer portal page (cards, invoices); returns its URL."""
        session = _call(
            "create portal session",
            lambda: self._billing.v1.billing_portal.sessions.create(
                params={"customer": customer_id, "return_url": return_url}
            ),
        )
        return str(session.url)


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run one Stripe call, turning the errors a later retry can fix into StripeUnavailable."""
    try:
        return fn()
    except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
        raise StripeUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
    except (stripe.AuthenticationError, stripe.PermissionError) as exc:
        log.error("Stripe refused our API key (%s): check LORAPLEX_STRIPE_API_KEY", exc)
        raise StripeUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
