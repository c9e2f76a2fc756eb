"""Credit runs out (SQLite and PostgreSQL): a developer tenant with no credit left and no card in good standing has
its deployments held in Standby (replicas stopped, the reason in the transitions, `suspended_reason` set), wakes
and new deployments refused with 402 and the way out, the shared endpoint still free; a top-up through a signed
Stripe webhook brings them back as configured. The billing events on the tenant's feed: billing.credit_low once per
move, billing.charge after a priced job, billing.payment_failed, billing.credit_expired (an injected clock).

Credit is spent by writing the ledger directly (as replica time or a job would) and noticed by the runtime's
periodic check, or by calling that check with a clock of the test's."""

import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.models import BillingAccount, utcnow
from app.settings import get_settings
from billing import credits
from conftest import TINY_MODEL, InProcessWorker, Platform, make_tenant, process_alive
from credit_helpers import SECRET, credit, events, refused_402, spend, stripe_event, stripe_headers, topup
from deployment_helpers import FAST_ENV, Served, deployment, ready_replicas, serve_app, wait_for, wait_status

CHECK_SECONDS = 0.2  # the runtime's credit check, quick for tests
HELLO = [{"role": "user", "content": "Say hi"}]
LOW = 5_000_000  # LORAPLEX_CREDIT_LOW_MICRO_USD's default: $5


# ---- helpers ------------------------------------------------------------------------------------------------


def reasons(http: httpx.Client | TestClient, name: str, **headers: str) -> list[tuple[str | None, str, str]]:
    transitions = http.get(f"/v1/deployments/{name}/transitions", headers=headers).json()
    return [(t["from_status"], t["to_status"], t["reason"]) for t in transitions]


# ---- a deployment with replicas runs out, and comes back ------------------------------------------------------


@pytest.fixture
def served(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    env = FAST_ENV | {"LORAPLEX_CREDIT_CHECK_SECONDS": str(CHECK_SECONDS), "LORAPLEX_STRIPE_WEBHOOK_SECRET": SECRET}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    with serve_app() as s:
        yield s


def test_a_deployment_out_of_credit_waits_in_standby_until_a_top_up(served: Served) -> None:
    tenant_id, headers = make_tenant("acme")
    http = httpx.Client(base_url=served.url, headers=headers, timeout=120)
    r = http.post("/v1/deployments", json={"name": "prod", "base_model": TINY_MODEL, "min_replicas": 1})
    assert r.status_code == 201, r.text
    deployment_id = r.json()["id"]
    assert ready_replicas(wait_status(http, "prod", "Ready")) == 1
    pids = served.runtime.replica_pids(deployment_id)
    assert len(pids) == 1

    # Credit falls below the threshold: told once; the deployment keeps running on what is left.
    spend(tenant_id, credit(tenant_id) - 2_000_000)
    wait_for(lambda: events(tenant_id, "billing.credit_low"), 30, "no billing.credit_low")
    [low] = events(tenant_id, "billing.credit_low")
    balance = http.get("/v1/billing/balance").json()
    assert set(low.data) == set(balance) and low.data["payment_status"] == "ok"
    assert 1_900_000 < low.data["credit"]["micro_usd"] < 2_000_000 + 1  # replica time draws on it too
    assert deployment(http, "prod")["status"] == "Ready" and deployment(http, "prod")["suspended_reason"] is None

    # None left and no card: told again (reached zero), and the deployment goes to Standby, replicas stopped.
    spend(tenant_id, 2_000_000)
    held = wait_status(http, "prod", "Standby", timeout=30)
    assert held["suspended_reason"].startswith("no credit left and no payment method in good standing")
    assert held["status_reason"] == held["suspended_reason"]
    assert ("Ready", "Standby", held["suspended_reason"]) in reasons(http, "prod")
    wait_for(lambda: not deployment(http, "prod")["live"]["replicas"], 30, "the replica was not stopped")
    wait_for(lambda: not any(process_alive(p) for p in pids), 30, "the replica process still runs")
    assert deployment(http, "prod")["replicas"] == 0
    lows = events(tenant_id, "billing.credit_low")
    assert len(lows) == 2 and lows[1].data["credit"]["micro_usd"] == 0
    assert lows[1].data["can_start_paid_work"] is False

    # A request that would wake it, and a new deployment, are refused with the way out; nothing starts.
    chat = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 4}
    assert "held in Standby" in refused_402(http.post("/v1/deployments/prod/chat/completions", json=chat))
    refused_402(http.post("/v1/deployments", json={"name": "other", "base_model": TINY_MODEL}))
    assert [d["name"] for d in http.get("/v1/deployments").json()] == ["prod"]
    # The shared endpoint, free up to its allowance, still answers.
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["cost_micro_usd"] == 0
    time.sleep(5 * CHECK_SECONDS)  # more checks: no move, nothing more to tell, nothing started
    assert len(events(tenant_id, "billing.credit_low")) == 2
    assert deployment(http, "prod")["status"] == "Standby" and not deployment(http, "prod")["live"]["replicas"]
    assert [t[:2] for t in reasons(http, "prod")].count(("Ready", "Standby")) == 1

    # A top-up through Stripe's signed webhook: back as configured (min_replicas 1), the credit state reset.
    payload = topup(tenant_id, cents=2000)
    r = http.post("/v1/stripe/webhook", content=payload, headers=stripe_headers(payload))
    assert r.status_code == 200 and r.json() == {"received": True}, r.text
    back = wait_status(http, "prod", "Ready")
    assert ready_replicas(back) == 1 and back["suspended_reason"] is None
    path = reasons(http, "prod")
    resumed = path.index(("Standby", "Initializing", "credit or a card returned: back as configured"))
    assert path[resumed + 1][:2] == ("Initializing", "Ready")
    with session_scope() as s:
        assert s.get_one(BillingAccount, tenant_id).credit_state == "ok"  # $20: above the $5 threshold
    assert len(events(tenant_id, "billing.credit_low")) == 2
    assert http.post("/v1/deployments/prod/chat/completions", json=chat).status_code == 200
    http.close()


# ---- an idle deployment, and the events of a job, a failed payment and an expiry --------------------------------


def test_an_idle_deployment_is_held_and_released_and_each_fall_is_told_once(
    client: TestClient, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from functions.deployments import suspension

    monkeypatch.setenv("LORAPLEX_STRIPE_WEBHOOK_SECRET", SECRET)
    get_settings.cache_clear()
    tenant_id, headers = make_tenant("idle")
    assert client.post("/v1/deployments", headers=headers, json={"name": "prod", "base_model": TINY_MODEL}).is_success
    wait_for(lambda: deployment_status(client, headers) == "Standby", 30, "never Standby")

    # Straight to zero (ok -> exhausted): one billing.credit_low; the idle deployment's hold is recorded at once.
    spend(tenant_id, credit(tenant_id))
    chat = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 4}
    refused_402(client.post("/v1/deployments/prod/chat/completions", headers=headers, json=chat))  # held or not yet
    suspension.check()  # the check with the test's clock (the runtime's own may have held it first)
    assert suspension.check() is False  # held: nothing more to change
    why = client.get("/v1/deployments/prod", headers=headers).json()["suspended_reason"]
    assert why.startswith("no credit left and no payment method in good standing")
    wait_for(lambda: ("Standby", "Standby", why) in reasons(client, "prod", **headers), 30, "the hold not recorded")
    assert [e.data["credit"]["micro_usd"] for e in events(tenant_id, "billing.credit_low")] == [0]

    # A card added (Checkout in setup mode): released; credit is still zero, so nothing more is told.
    payload = stripe_event("checkout.session.completed", {"mode": "setup", "metadata": {"tenant_id": tenant_id}})
    assert client.post("/v1/stripe/webhook", content=payload, headers=stripe_headers(payload)).status_code == 200
    assert client.get("/v1/deployments/prod", headers=headers).json()["suspended_reason"] is None
    resumed = ("Standby", "Standby", "credit or a card returned: back as configured: scales up on the next request")
    wait_for(lambda: resumed in reasons(client, "prod", **headers), 30, "the release not recorded")
    assert len(events(tenant_id, "billing.credit_low")) == 1

    # Top-ups move the state back up quietly; the next fall is told again.
    with session_scope() as s:
        credits.grant_credit(s, tenant_id, 10_000_000, category="paid", reason="top-up", idempotency_key="t:1")
        suspension.review(s, tenant_id)
        assert s.get_one(BillingAccount, tenant_id).credit_state == "ok"
    spend(tenant_id, 7_000_000)  # $3 left: below $5
    suspension.check()
    suspension.check()
    assert [e.data["credit"]["micro_usd"] for e in events(tenant_id, "billing.credit_low")] == [0, 3_000_000]


def deployment_status(client: TestClient, headers: dict[str, str]) -> str:
    return str(client.get("/v1/deployments/prod", headers=headers).json()["status"])


def test_a_priced_job_a_failed_payment_and_an_expiry_are_on_the_feed(
    client: TestClient, worker: InProcessWorker, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing import views
    from functions.deployments import suspension

    monkeypatch.setenv("LORAPLEX_STRIPE_WEBHOOK_SECRET", SECRET)
    get_settings.cache_clear()
    tenant_id, headers = make_tenant("feed")

    # billing.charge: the job's ledger record as GET /v1/usage lists it.
    job = finished_job(client, headers)
    [charge] = events(tenant_id, "billing.charge")
    [record] = [r for r in client.get("/v1/usage", headers=headers).json()["records"] if r["reference"] == job["id"]]
    assert charge.data["reference"] == job["id"] and charge.data == record
    assert charge.data["cost"] == job["charge"] and job["charge"]["micro_usd"] > 0

    # billing.payment_failed: the balance as the billing API returns it, now past due.
    customer_id = f"cus_test_{secrets.token_hex(6)}"
    with session_scope() as s:
        account = s.get_one(BillingAccount, tenant_id)
        account.stripe_customer_id, account.payment_method = customer_id, "visa ending 4242"
    invoice = {"id": f"in_{secrets.token_hex(6)}", "object": "invoice", "customer": customer_id}
    payload = stripe_event("invoice.payment_failed", invoice)
    assert client.post("/v1/stripe/webhook", content=payload, headers=stripe_headers(payload)).status_code == 200
    [failed] = events(tenant_id, "billing.payment_failed")
    assert failed.data == client.get("/v1/billing/balance", headers=headers).json()
    assert failed.data["payment_status"] == "past_due"

    # billing.credit_expired: noticed by the periodic check once its clock passes the expiry, once.
    now = utcnow()
    with session_scope() as s:
        grant = credits.grant_credit(
            s,
            tenant_id,
            1_500_000,
            category="promotional",
            reason="promotion",
            idempotency_key=f"promo:{tenant_id}",
            expires_at=now + timedelta(hours=1),
        )
        grant_id = grant.id
    suspension.check(now + timedelta(minutes=59))
    assert events(tenant_id, "billing.credit_expired") == []
    suspension.check(now + timedelta(hours=2))
    suspension.check(now + timedelta(hours=3))
    [expired] = events(tenant_id, "billing.credit_expired")
    [listed] = [c for c in client.get("/v1/billing/credits", headers=headers).json() if c["id"] == grant_id]
    assert expired.subject_id == grant_id
    assert expired.data == listed | {
        "remaining": views.money(0),
        "expired": True,
        "forfeited": views.money(1_500_000),
    }
    suspension.check(now + timedelta(days=8))  # past the lookback: not told again either
    assert len(events(tenant_id, "billing.credit_expired")) == 1


def finished_job(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    """A small fine-tuning job of the tiny model, run to its end by the in-process worker (the `worker` fixture)."""
    rows = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di")]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    r = client.post(
        "/v1/datasets", headers=headers, files={"file": ("hi.jsonl", data)}, data={"base_model": TINY_MODEL}
    )
    assert r.status_code == 201, r.text
    config = {
        "base_model": TINY_MODEL,
        "dataset": "hi",
        "repo": "hi",
        "epochs": 1,
        "rank": 4,
        "effective_batch_size": 2,
    }
    r = client.post("/v1/finetuning/jobs", headers=headers, json=config)
    assert r.status_code == 201, r.text
    job: dict[str, Any] = wait_for(
        lambda: (
            (j := client.get(f"/v1/finetuning/jobs/{r.json()['id']}", headers=headers).json())["status"]
            not in ("queued", "training")
            and j
        ),
        120,
        "the job did not finish",
    )
    assert job["status"] == "completed", job
    return job


def test_a_top_up_landing_while_the_credit_check_looks_is_not_taken_for_a_fall(
    client: TestClient, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the ledger, then moves the credit state and the holds: a top-up committing in between would
    have its reset state taken for a fresh fall (a third billing.credit_low) and the deployment held again. The
    check's ledger read is paused here until the top-up commits (or 3 s): the account lock makes the top-up wait."""
    from functions.deployments import suspension

    tenant_id, headers = make_tenant("race")
    assert client.post("/v1/deployments", headers=headers, json={"name": "prod", "base_model": TINY_MODEL}).is_success
    spend(tenant_id, credit(tenant_id))
    suspension.check()
    assert len(events(tenant_id, "billing.credit_low")) == 1
    assert client.get("/v1/deployments/prod", headers=headers).json()["suspended_reason"]

    real_balance = credits.balance
    read, committed = threading.Event(), threading.Event()

    def balance_then_pause(session: Any, tenant: str, now: Any = None) -> credits.Balance:
        found = real_balance(session, tenant, now)
        if threading.current_thread().name == "check":
            read.set()
            committed.wait(3)
        return found

    def top_up() -> None:
        with session_scope() as s:
            credits.grant_credit(s, tenant_id, 20_000_000, category="paid", reason="top-up", idempotency_key="race:1")
            suspension.review(s, tenant_id)
        committed.set()

    monkeypatch.setattr(credits, "balance", balance_then_pause)
    checker = threading.Thread(target=suspension.check, name="check")
    checker.start()
    assert read.wait(30)
    payer = threading.Thread(target=top_up)
    payer.start()
    checker.join(60)
    payer.join(60)
    assert not checker.is_alive() and not payer.is_alive()
    with session_scope() as s:
        assert s.get_one(BillingAccount, tenant_id).credit_state == "ok"
    assert len(events(tenant_id, "billing.credit_low")) == 1
    assert client.get("/v1/deployments/prod", headers=headers).json()["suspended_reason"] is None
