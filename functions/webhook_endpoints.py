"""A tenant's webhook endpoints: register, list, change, delete, rotate the signing secret, and the endpoint as the
API shows it. Sending is functions/webhooks.py; where an endpoint may point is functions/webhook_http.py.

Each endpoint signs with its own Standard Webhooks secret, `whsec_` + base64 of SECRET_BYTES random bytes, shown
once: when it is created and when it is rotated. After a rotation the previous secret keeps signing beside the new
one until `previous_secret_expires_at` (a delivery then carries both signatures), so a receiver can switch over.
"""

import base64
import secrets
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import events
from app.errors import Conflict, NotFound
from app.event_tables import WebhookEndpoint
from app.models import utcnow
from functions.webhook_http import MAX_URL_CHARS, check_url

SECRET_BYTES = 32  # the spec asks for 24 to 64
MAX_ENDPOINTS = 20  # per tenant
HOUR = 3600  # seconds
MAX_OVERLAP_SECONDS = 7 * 24 * HOUR
# What an endpoint may subscribe to: every event type but the test event, which goes only to the endpoint asked.
SUBSCRIBABLE = tuple(type_ for type_ in events.TYPES if type_ != "webhook.test")
NO_UNKNOWN_FIELDS = ConfigDict(extra="forbid")  # a field we do not implement is refused, naming it


def _known_type(value: str) -> str:
    if value not in SUBSCRIBABLE:
        raise ValueError(f"unknown event type {value!r}; one of {', '.join(SUBSCRIBABLE)}")
    return value


EventTypes = Annotated[
    list[Annotated[str, AfterValidator(_known_type)]],
    Field(min_length=1, max_length=len(SUBSCRIBABLE) * 2, description="The event types it receives."),
    AfterValidator(lambda types: list(dict.fromkeys(types))),  # each once, in the order given
]


class EndpointConfig(BaseModel):
    """POST /v1/webhooks."""

    model_config = NO_UNKNOWN_FIELDS

    url: str = Field(max_length=MAX_URL_CHARS, description="http(s) URL on a public address; redirects not followed.")
    event_types: EventTypes
    description: str = Field(default="", max_length=500)
    enabled: bool = Field(default=True, description="false: deliveries wait, unsent, until it is enabled again.")


class EndpointUpdate(BaseModel):
    """PATCH /v1/webhooks/{id}: the fields given replace the endpoint's. Enabling it clears `disabled_reason`."""

    model_config = NO_UNKNOWN_FIELDS

    url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    event_types: EventTypes | None = None
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None


class SecretRotation(BaseModel):
    """POST /v1/webhooks/{id}/rotate_secret."""

    model_config = NO_UNKNOWN_FIELDS

    overlap_seconds: int = Field(
        default=24 * HOUR,
        ge=0,
        le=MAX_OVERLAP_SECONDS,
        description="How long the previous secret keeps signing beside the new one; 0: it stops at once.",
    )


def create(session: Session, tenant_id: str, config: EndpointConfig) -> tuple[WebhookEndpoint, str]:
    """(the new endpoint, its secret: the only time it is shown)."""
    check_url(config.url)
    count = session.scalar(select(func.count(WebhookEndpoint.id)).where(WebhookEndpoint.tenant_id == tenant_id)) or 0
    if count >= MAX_ENDPOINTS:
        raise Conflict(f"at most {MAX_ENDPOINTS} webhook endpoints; delete one first", code="too_many_endpoints")
    secret = new_secret()
    endpoint = WebhookEndpoint(
        tenant_id=tenant_id,
        url=config.url,
        event_types=config.event_types,
        description=config.description,
        enabled=config.enabled,
        secret=secret,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def listed(session: Session, tenant_id: str) -> list[WebhookEndpoint]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def find(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    """The tenant's endpoint (another tenant's reads as missing)."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise NotFound(f"The webhook endpoint '{endpoint_id}' does not exist", field="id", code="webhook_not_found")
    return endpoint


def update(session: Session, tenant_id: str, endpoint_id: str, change: EndpointUpdate) -> WebhookEndpoint:
    endpoint = find(session, tenant_id, endpoint_id)
    if change.url is not None:
        check_url(change.url)
        endpoint.url = change.url
    if change.event_types is not None:
        endpoint.event_types = change.event_types
    if change.description is not None:
        endpoint.description = change.description
    if change.enabled is not None:
        if change.enabled and not endpoint.enabled:  # a fresh start: the failures before it was disabled are past
            endpoint.disabled_reason, endpoint.failing_since = None, None
        endpoint.enabled = change.enabled
    session.flush()
    return endpoint


def delete(session: Session, tenant_id: str, endpoint_id: str) -> None:
    """The endpoint, its deliveries and their attempts (the database cascades)."""
    session.delete(find(session, tenant_id, endpoint_id))
    session.flush()


def rotate(
    session: Session, tenant_id: str, endpoint_id: str, overlap_seconds: int, now: datetime | None = None
) -> tuple[WebhookEndpoint, str]:
    """(the endpoint, its new secret). The secret it had signs beside the new one for `overlap_seconds`."""
    now = now or utcnow()
    endpoint = find(session, tenant_id, endpoint_id)
    secret = new_secret()
    if overlap_seconds > 0:
        endpoint.previous_secret = endpoint.secret
        endpoint.previous_secret_expires_at = now + timedelta(seconds=overlap_seconds)
    else:
        endpoint.previous_secret, endpoint.previous_secret_expires_at = None, None
    endpoint.secret = secret
    session.flush()
    return endpoint, secret


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets a delivery sent at `now` is signed with: the current one, and the previous one in its overlap."""
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and now < expires:
        return [endpoint.secret, endpoint.previous_secret]
    return [endpoint.secret]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def shown(endpoint: WebhookEndpoint, now: datetime | None = None) -> dict[str, Any]:
    """The endpoint as the API shows it (and as the `webhook.endpoint_disabled` event carries it): never a secret."""
    now = now or utcnow()
    rotating = len(signing_secrets(endpoint, now)) > 1
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "event_types": list(endpoint.event_types),
        "description": endpoint.description,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,  # set when the platform disabled it
        "failing_since": _iso(endpoint.failing_since),  # the first failed delivery since the last success
        "previous_secret_expires_at": _iso(endpoint.previous_secret_expires_at) if rotating else None,
        "created_at": _iso(endpoint.created_at),
        "updated_at": _iso(endpoint.updated_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
