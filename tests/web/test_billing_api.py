"""/v1/billing through the real app: sign-up credits, the 402 gate, usage by category, statements, and the
refusals that leave the ledger unchanged."""

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from test_finetuning_api import create_job, ready_dataset_without_worker, wait_for_job

from app.db import session_scope
from app.models import BillingAccount, FinetuneJob, UsageRecord
from conftest import InProcessWorker, make_tenant
from fake_stripe_billing import API_KEY, FakeStripeBilling


def _this_month() -> str:
    now = datetime.now(UTC)
    return f"{now.year:04d}-{now.month:02d}"


def test_a_new_developer_has_25_dollars_for_30_days(client: TestClient, alice: dict[str, str]) -> None:
    balance = client.get("/v1/billing/balance", headers=alice).json()
    assert balance["plan"] == "developer"
    assert balance["credit"] == {"micro_usd": 25_000_000, "usd": "$25.00"}
    assert balance["can_start_paid_work"] is True
    assert balance["payment_method"] is None
    [grant] = client.get("/v1/billing/credits", headers=alice).json()
    assert (grant["category"], grant["remaining"]["micro_usd"], grant["expired"]) == ("promotional", 25_000_000, False)
    days = (datetime.fromisoformat(grant["expires_at"]) - datetime.now(UTC)).total_seconds() / 86400
    assert 29.9 < days <= 30


def test_no_credit_and_no_card_is_refused_with_402(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import get_settings

    monkeypatch.setenv("LORAPLEX_SIGNUP_CREDIT_MICRO_USD", "0")
    get_settings.cache_clear()
    tenant_id, headers = make_tenant("broke")
    ready_dataset_without_worker(client, headers)
    r = client.post(
        "/v1/finetuning/jobs",
        headers=headers,
        json={"base_model": "tiny-llama", "dataset": "greetings", "repo": "greet"},
    )
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["type"] == "payment_required" and "no credit left" in error["message"]
    assert "POST /v1/billing/checkout" in error["message"]
    with session_scope() as s:
        assert s.scalar(select(func.count(FinetuneJob.id))) == 0  # nothing was created
        s.get_one(BillingAccount, tenant_id).payment_method = "visa ending 4242"  # a card arrives (webhook)
    assert client.get("/v1/billing/balance", headers=headers).json()["can_start_paid_work"] is True
    create_job(client, headers)


def test_usage_by_category_and_the_monthly_statement(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset_without_worker(client, alice)
    job = create_job(client, alice, epochs=1, effective_batch_size=2)
    with InProcessWorker():
        job = wait_for_job(client, alice, job["id"])
    assert job["status"] == "completed", job
    chat = {"model": "greet/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert client.post("/v1/chat/completions", headers=alice, json=chat).status_code == 200

    month = client.get("/v1/billing/usage", headers=alice).json()
    assert month["month"] == _this_month()
    finetune, inference = month["by_category"]["finetune"], month["by_category"]["inference"]
    assert (finetune["records"], finetune["cost"]["micro_usd"]) == (1, job["charge"]["micro_usd"])
    assert inference["records"] == 1 and inference["cost"]["micro_usd"] == 0  # inside the free daily allowance
    assert month["by_category"]["deployment"]["records"] == 0

    assert client.get("/v1/billing/statements", headers=alice).json() == {"months": [_this_month()]}
    statement = client.get(f"/v1/billing/statements/{_this_month()}", headers=alice).json()
    kinds = sorted((line["kind"], line["adapter"]) for line in statement["lines"])
    assert kinds == [("finetune", "greet/1"), ("inference", "greet/1")]
    assert statement["subtotal_micro_usd"] == job["charge"]["micro_usd"]
    assert statement["credits_applied_micro_usd"] == statement["subtotal_micro_usd"]  # the sign-up credit paid
    assert statement["amount_due_micro_usd"] == 0
    balance = client.get("/v1/billing/balance", headers=alice).json()
    assert balance["credit"]["micro_usd"] == 25_000_000 - job["charge"]["micro_usd"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"purpose": "topup", "amount_usd": "abc"}, "amount_usd"),
        ({"purpose": "topup", "amount_usd": "-5"}, "amount_usd"),
        ({"purpose": "topup", "amount_usd": "10.555"}, "amount_usd"),
        ({"purpose": "topup", "amount_usd": "1e9"}, "amount_usd"),
        ({"purpose": "topup", "amount_usd": "NaN"}, "amount_usd"),
        ({"purpose": "topup"}, "amount_usd"),
        ({"purpose": "gift"}, "purpose"),
    ],
)
def test_malformed_top_ups_are_refused(client: TestClient, alice: dict[str, str], body: dict, param: str) -> None:
    r = client.post("/v1/billing/checkout", headers=alice, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param
    with session_scope() as s:
        assert s.scalar(select(func.count(UsageRecord.id))) == 0


def test_checkout_without_stripe_configured_says_so(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/billing/checkout", headers=alice, json={"purpose": "card"})
    assert r.status_code == 503
    assert "not configured" in r.json()["error"]["message"]


def test_a_bad_month_is_refused(client: TestClient, alice: dict[str, str]) -> None:
    r = client.get("/v1/billing/statements/2026-13", headers=alice)
    assert r.status_code == 422 and r.json()["error"]["param"] == "month"


def test_checkout_and_portal_links_through_stripe(
    client: TestClient,
    alice: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    localstripe: str,
    fake: "FakeStripeBilling",
) -> None:
    """The customer is created in localstripe; Checkout and portal sessions go to the billing fake (localstripe
    has neither), which checks the request shapes Stripe requires."""
    from app.settings import get_settings

    for key, value in {
        "LORAPLEX_STRIPE_API_KEY": API_KEY,
        "LORAPLEX_STRIPE_API_BASE": localstripe,
        "LORAPLEX_STRIPE_BILLING_API_BASE": fake.url,
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    card = client.post("/v1/billing/checkout", headers=alice, json={"purpose": "card"})
    topup = client.post("/v1/billing/checkout", headers=alice, json={"purpose": "topup", "amount_usd": "25.50"})
    portal = client.post("/v1/billing/portal", headers=alice)
    assert (card.status_code, topup.status_code, portal.status_code) == (200, 200, 200), topup.text
    assert all(r.json()["url"].startswith("http") for r in (card, topup, portal))
    assert [s["mode"] for s in fake.checkout_sessions] == ["setup", "payment"]
    assert "2550" in str(fake.checkout_sessions[1])  # $25.50 in cents
    customers = {s["customer"] for s in fake.checkout_sessions} | {s["customer"] for s in fake.portal_sessions}
    assert len(customers) == 1 and next(iter(customers)).startswith("cus_")  # one customer per tenant
