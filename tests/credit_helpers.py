"""Spending a tenant's credit and paying through Stripe's signed webhook, for the tests of credit running out
(tests/web/test_credit_exhaustion.py on the local runtime, tests/app/test_modal_deployments.py on Modal's)."""

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from sqlalchemy import select

from app.db import session_scope
from app.event_tables import TenantEvent
from billing import credits, ledger
from conftest import TINY_MODEL

SECRET = "whsec_test_" + secrets.token_hex(16)  # LORAPLEX_STRIPE_WEBHOOK_SECRET of the tests that use these


def credit(tenant_id: str) -> int:
    with session_scope() as s:
        return credits.balance(s, tenant_id).credit_micro_usd


def spend(tenant_id: str, micro_usd: int, **fields: Any) -> None:
    """A priced usage record written straight to the ledger (a fine-tuning of the tiny model, unless `fields` of
    ledger.Usage say otherwise): credit falls with no event of its own."""
    with session_scope() as s:
        ledger.record(
            s,
            ledger.Usage(
                idempotency_key=f"test:{secrets.token_hex(6)}",
                tenant_id=tenant_id,
                kind="finetune",
                technique="sft_lora",
                base_model=TINY_MODEL,
                amount_micro_usd=micro_usd,
                **fields,
            ),
        )


def events(tenant_id: str, type: str) -> list[TenantEvent]:
    with session_scope() as s:
        rows = s.scalars(
            select(TenantEvent)
            .where(TenantEvent.tenant_id == tenant_id, TenantEvent.type == type)
            .order_by(TenantEvent.id)
        ).all()
        s.expunge_all()
        return list(rows)


def stripe_event(event_type: str, obj: dict[str, Any]) -> bytes:
    body = {"id": f"evt_{secrets.token_hex(8)}", "object": "event", "type": event_type, "data": {"object": obj}}
    return json.dumps(body).encode()


def stripe_headers(payload: bytes) -> dict[str, str]:
    """Signed the way Stripe documents: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    t = int(time.time())
    signature = hmac.new(SECRET.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "Stripe-Signature": f"t={t},v1={signature}"}


def topup(tenant_id: str, cents: int) -> bytes:
    """A paid Checkout top-up session, completed."""
    session = {
        "id": f"cs_test_{secrets.token_hex(8)}",
        "object": "checkout.session",
        "mode": "payment",
        "amount_total": cents,
        "currency": "usd",
        "payment_status": "paid",
        "metadata": {"purpose": "topup", "tenant_id": tenant_id},
    }
    return stripe_event("checkout.session.completed", session)


def refused_402(r: Any) -> str:
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("payment_required", "payment_required"), error
    assert "POST /v1/billing/checkout" in error["message"] and "topup" in error["message"], error  # the way out
    return str(error["message"])
