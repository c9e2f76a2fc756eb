"""What happened to a tenant's resources: one feed (`GET /v1/events`) and, from it, the tenant's webhooks.

`publish` writes the event in the caller's transaction together with one delivery for each of the tenant's enabled
webhook endpoints that wants its type (an outbox, like the Stripe one): the change and what it owes the tenant's
receivers commit together or not at all. The workers send the deliveries (functions/webhooks.py).

An event's `data` is the resource as the API returns it at that moment. The API's shapes live in web/, above the
domain that publishes most events, so the caller either passes `data` or leaves it to the renderer the entry point
registered for the type's resource (`register_renderer`; web/event_renderers.py, registered by the API app and by
worker_main's `wire()`), the way the queue is handed its handlers.
"""

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.event_tables import TenantEvent, WebhookDelivery, WebhookEndpoint
from app.models import Tenant

# Every event type -> the resource its `data` is (a renderer's key), or None where the publisher passes `data`.
TYPES: dict[str, str | None] = {
    "dataset.ready": "dataset",
    "dataset.invalid": "dataset",
    "finetune.job.started": "finetune.job",
    "finetune.job.succeeded": "finetune.job",
    "finetune.job.failed": "finetune.job",
    "finetune.job.cancelled": "finetune.job",
    "finetune.checkpoint.created": "finetune.checkpoint",
    "adapter.version.published": "adapter.version",
    "deployment.status_changed": "deployment",  # every status of the eight
    "deployment.scaled": "deployment",  # replicas wanted changed, status unchanged
    "deployment.cold_start": "deployment",  # a wake from zero replicas finished
    "billing.credit_low": None,
    "billing.credit_expired": None,
    "billing.payment_failed": None,
    "billing.charge": "usage.record",  # one priced fine-tuning job: its ledger record (subject: the record id)
    "webhook.endpoint_disabled": "webhook.endpoint",  # the platform disabled an endpoint that kept failing
    "webhook.test": None,  # "send a test event": delivered to the one endpoint asked, never on the feed
}

Renderer = Callable[[Session, str], dict[str, Any]]  # (session, resource id) -> the resource as the API returns it
_renderers: dict[str, Renderer] = {}


def register_renderer(resource: str, render: Renderer) -> None:
    _renderers[resource] = render


def publish(
    session: Session, tenant_id: str, type: str, subject_id: str = "", data: dict[str, Any] | None = None
) -> TenantEvent:
    """Record one event of `type` about `subject_id` in the caller's transaction, with its webhook deliveries."""
    resource = TYPES[type]  # KeyError: a type not in the catalogue is a bug of the caller
    if data is None:
        if resource is None or resource not in _renderers:
            raise RuntimeError(f"event {type}: no data given and no renderer registered for {resource!r}")
        session.flush()  # the renderer reads the change this event reports
        data = _renderers[resource](session, subject_id)
    # The feed is read by id (`after`, Last-Event-ID): a tenant's events must commit in id order, or a reader could
    # pass an id whose transaction commits later and never see it. So the tenant's row is locked before the id is
    # taken, until this transaction ends (NO KEY UPDATE: rows that merely reference the tenant are not held up).
    # SQLite needs no lock: it has one writer at a time.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    event = TenantEvent(tenant_id=tenant_id, type=type, subject_id=subject_id, data=data)
    session.add(event)
    session.flush()  # its id, for the deliveries
    for endpoint in session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.enabled.is_(True))
    ):
        if type in endpoint.event_types:
            session.add(WebhookDelivery(tenant_id=tenant_id, endpoint_id=endpoint.id, event_id=event.id))
    return event


def envelope(event: TenantEvent) -> dict[str, Any]:
    """The body a receiver gets and the feed lists: Standard Webhooks' `{type, timestamp, data}`, plus the ids."""
    return {
        "id": event.uid,
        "type": event.type,
        "timestamp": event.created_at.isoformat().replace("+00:00", "Z"),
        "data": event.data,
    }
