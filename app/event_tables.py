"""The tables of the tenant event feed and its webhooks (app/events.py, functions/webhooks.py), beside app/models.py's
on the same declarative base."""

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models import Base, new_id, utcnow


class TenantEvent(Base):
    """One thing that happened to a tenant's resources (app/events.py): the feed (`GET /v1/events`) lists them in
    `id` order, and each is fanned out to the tenant's webhook endpoints that want its type, in the transaction
    that wrote it. Append-only. `data` is the resource as the API returned it at that moment."""

    __tablename__ = "tenant_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # the feed's event id
    uid: Mapped[str] = mapped_column(String(32), unique=True, default=lambda: new_id("evt"))  # its public id
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(60))  # finetune.job.succeeded, deployment.status_changed, ...
    subject_id: Mapped[str] = mapped_column(String(100), default="")  # the resource's id ("" for billing events)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """A tenant's webhook receiver: where to send which event types, signed with its own secret (Standard Webhooks
    "whsec_..."). A rotated secret keeps signing beside the new one until `previous_secret_expires_at`."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("we"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[Any]] = mapped_column(default=list)  # the types it wants
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(default=True)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    failing_since: Mapped[datetime | None] = mapped_column(default=None)  # the first failure since its last success
    disabled_reason: Mapped[str | None] = mapped_column(Text, default=None)  # set when the platform disabled it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One event owed to one endpoint. `id` is the Standard Webhooks `webhook-id`, the same on every attempt, so a
    receiver can drop a repeat. Written with the event (an outbox); sent and retried by the workers."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("msg"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("tenant_events.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(12), default="pending", index=True)  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)  # None: no attempt planned
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """One try of a delivery: the delivery log an endpoint's owner reads."""

    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)  # None: no answer (timeout, refused, ...)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
