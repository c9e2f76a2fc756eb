"""The Stripe outbox: calls owed to Stripe, stored with the ledger rows they mirror and sent later."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import StripeOutbox


def enqueue(session: Session, tenant_id: str, kind: str, idempotency_key: str, payload: dict[str, Any]) -> None:
    """Owe Stripe one call, in the caller's transaction. The same key twice is one call."""
    if session.scalar(select(StripeOutbox.id).where(StripeOutbox.idempotency_key == idempotency_key)) is None:
        session.add(StripeOutbox(tenant_id=tenant_id, kind=kind, idempotency_key=idempotency_key, payload=payload))
