"""What /v1/webhooks answers: an endpoint (never its secret, except the once it is made or rotated) and its
delivery log. An endpoint is read from functions/webhook_endpoints.py's `shown`, the same dict the
`webhook.endpoint_disabled` event carries; a delivery from functions/webhooks.py's LoggedDelivery. Times are ISO 8601.
"""

from typing import Any

from pydantic import BaseModel

from app.events import envelope
from functions.webhooks import LoggedDelivery
from web.deployment_schemas import IsoTime
from web.schemas import FROM_ROWS


class WebhookEndpointOut(BaseModel):
    id: str
    url: str
    event_types: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None  # why the platform disabled it (it kept failing); null otherwise
    failing_since: str | None  # the first failed delivery since the last success
    previous_secret_expires_at: str | None  # during a rotation's overlap: when the previous secret stops signing
    created_at: str
    updated_at: str


class WebhookEndpointWithSecret(WebhookEndpointOut):
    """The answer to a creation or a rotation: the only times the secret is shown."""

    secret: str  # whsec_...: verify deliveries with it (Standard Webhooks)


class AttemptOut(BaseModel):
    model_config = FROM_ROWS

    at: IsoTime
    status_code: int | None  # null: no answer (timed out, refused, unreachable, a forbidden address)
    latency_ms: int
    error: str | None  # null: a 2xx


class DeliveryOut(BaseModel):
    id: str  # the `webhook-id`, the same on every attempt
    event: dict[str, Any]  # the body sent: {id, type, timestamp, data}
    status: str  # pending | delivered | failed
    attempt_count: int
    next_attempt_at: str | None  # when pending: the next try
    last_status_code: int | None
    last_error: str | None
    created_at: str
    delivered_at: str | None
    attempts: list[AttemptOut]  # oldest first

    @classmethod
    def of(cls, logged: LoggedDelivery) -> "DeliveryOut":
        delivery = logged.delivery
        pending = delivery.status == "pending"
        return cls(
            id=delivery.id,
            event=envelope(logged.event),
            status=delivery.status,
            attempt_count=delivery.attempts,
            next_attempt_at=_iso(delivery.next_attempt_at) if pending else None,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            created_at=delivery.created_at.isoformat(),
            delivered_at=_iso(delivery.delivered_at),
            attempts=[AttemptOut.model_validate(attempt) for attempt in logged.attempts],
        )


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
