"""The Stripe outbox flush against localstripe (customers) and the fake billing server (meter events, grants).

Stripe itself cannot be reached from the test machines; see fake_stripe_billing.py for what the fakes check.
"""

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from app.db import session_scope
from app.models import BillingAccount, StripeOutbox, utcnow
from app.settings import get_settings
from billing import ledger, outbox
from billing.stripe_gateway import StripeGateway
from conftest import make_tenant
from fake_stripe_billing import API_KEY, METER_EVENT_NAME, FakeStripeBilling, localstripe_get

HOUR = timedelta(hours=1)


@pytest.fixture
def gateway(localstripe: str, fake: FakeStripeBilling) -> StripeGateway:
    return StripeGateway(API_KEY, localstripe, fake.url, METER_EVENT_NAME)


def _meter(tenant_id: str, key: str, amount: int, timestamp: int | None = None) -> None:
    """What billing.ledger.record owes Stripe for one priced usage record."""
    with session_scope() as s:
        outbox.enqueue(
            s,
            tenant_id,
            "meter_event",
            f"meter:{key}",
            {"usage_key": key, "value_micro_usd": amount, "timestamp": timestamp or int(utcnow().timestamp())},
        )


def _rows() -> list[StripeOutbox]:
    with session_scope() as s:
        return list(s.scalars(select(StripeOutbox).order_by(StripeOutbox.id)))


def _customer_of(tenant_id: str) -> str | None:
    with session_scope() as s:
        account = s.get(BillingAccount, tenant_id)
        return account.stripe_customer_id if account else None


def _localstripe_customers(localstripe: str, tenant_id: str) -> list[dict[str, Any]]:
    customers = localstripe_get(localstripe, "/v1/customers", limit=100)["data"]
    return [c for c in customers if c["metadata"].get("tenant_id") == tenant_id]


def _posted(fake: FakeStripeBilling) -> list[str]:
    """What the fake accepted, in order: a grant's key or a meter event's identifier."""
    out = []
    for r in fake.requests:
        if r.status != 200:
            continue
        if r.path == "/v1/billing/meter_events":
            out.append(r.form["identifier"])
        elif r.method == "POST" and r.path == "/v1/billing/credit_grants":
            out.append(r.form["metadata[loraplex_key]"])
    return out


def test_each_tenant_gets_one_customer_and_its_meter_events(
    platform, gateway: StripeGateway, fake: FakeStripeBilling, localstripe: str
) -> None:
    a, _ = make_tenant("a")
    b, _ = make_tenant("b")
    with session_scope() as s:  # a tenant from before billing existed has no billing account yet
        s.execute(delete(BillingAccount).where(BillingAccount.tenant_id == b))
    for i in range(3):
        _meter(a, f"inference:a{i}", 100 + i)
        _meter(b, f"inference:b{i}", 200 + i)
    pending = len(_rows())

    result = outbox.flush(gateway)
    assert (result.sent, result.failed) == (pending, 0)
    assert outbox.flush(gateway) == outbox.FlushResult()  # nothing left

    for tenant, values in ((a, ["100", "101", "102"]), (b, ["200", "201", "202"])):
        customer_id = _customer_of(tenant)
        assert [c["id"] for c in _localstripe_customers(localstripe, tenant)] == [customer_id]
        mine = [e for e in fake.meter_events if e["payload"]["stripe_customer_id"] == customer_id]
        assert [e["payload"]["value"] for e in mine] == values  # micro-USD
        assert all(e["event_name"] == METER_EVENT_NAME for e in mine)
    assert [e["identifier"] for e in fake.meter_events] == [f"meter:inference:{t}{i}" for i in range(3) for t in "ab"]
    assert all(r.status == "sent" and r.sent_at is not None for r in _rows())


@pytest.mark.parametrize("how", ["error", "refuse"])
def test_an_outage_keeps_everything_pending_then_each_row_is_sent_once_in_order(
    platform, gateway: StripeGateway, fake: FakeStripeBilling, how: str
) -> None:
    tenant, _ = make_tenant("t")
    for i in range(5):
        _meter(tenant, f"inference:r{i}", 10 + i)
    keys = [r.idempotency_key for r in _rows()]
    t0 = utcnow()

    fake.go_down(how)  # type: ignore[arg-type]
    assert outbox.flush(gateway, now=t0) == outbox.FlushResult(sent=0, failed=1)  # stops at the first failure
    first, *rest = _rows()
    assert first.status == "pending" and first.attempts == 1 and first.last_error
    assert first.next_attempt_at == t0 + timedelta(seconds=2)
    assert all(r.status == "pending" and r.attempts == 0 for r in rest)

    assert outbox.flush(gateway, now=t0 + timedelta(seconds=3)).failed == 1  # due again: 2 s, then 4 s
    first = _rows()[0]
    assert (first.attempts, first.next_attempt_at) == (2, t0 + timedelta(seconds=3 + 4))
    assert _posted(fake) == []  # nothing took effect

    fake.come_back()
    later = t0 + HOUR
    assert outbox.flush(gateway, now=later) == outbox.FlushResult(sent=len(keys))
    assert outbox.flush(gateway, now=later + HOUR) == outbox.FlushResult()
    assert _posted(fake) == keys  # each row once, oldest first
    assert len(fake.meter_events) == 5
    assert all(r.status == "sent" and r.sent_at == later for r in _rows())


def test_an_answer_lost_after_stripe_acted_is_not_a_second_charge(
    platform, gateway: StripeGateway, fake: FakeStripeBilling
) -> None:
    tenant, _ = make_tenant("t")
    outbox.flush(gateway)  # the sign-up credit grant, if any
    for i in range(3):
        _meter(tenant, f"inference:l{i}", 7)
    fake.go_down("lose_response")  # Stripe records the first event, but we see a 500
    assert outbox.flush(gateway).failed == 1
    fake.come_back()
    assert outbox.flush(gateway, now=utcnow() + HOUR).sent == 3  # the first one: "already exists" = delivered
    assert [e["identifier"] for e in fake.meter_events] == [f"meter:inference:l{i}" for i in range(3)]
    assert len(fake.credit_grants) == len([r for r in _rows() if r.kind == "credit_grant"])


def test_a_row_stripe_refuses_does_not_block_the_others(
    platform, gateway: StripeGateway, fake: FakeStripeBilling
) -> None:
    tenant, _ = make_tenant("t")
    _meter(tenant, "inference:ok1", 5)
    forty_days_ago = int((utcnow() - timedelta(days=40)).timestamp())  # Stripe takes 35 days back at most
    _meter(tenant, "inference:too-old", 5, timestamp=forty_days_ago)
    _meter(tenant, "inference:ok2", 5)
    total = len(_rows())
    now = utcnow()

    assert outbox.flush(gateway, now=now) == outbox.FlushResult(sent=total - 1, failed=1)
    bad = next(r for r in _rows() if r.idempotency_key == "meter:inference:too-old")
    assert (bad.status, bad.attempts, bad.next_attempt_at) == ("pending", 1, now + timedelta(seconds=2))
    assert "InvalidRequestError" in (bad.last_error or "") and "35 calendar days" in (bad.last_error or "")
    assert [e["identifier"] for e in fake.meter_events] == ["meter:inference:ok1", "meter:inference:ok2"]
    assert outbox.flush(gateway, now=now + timedelta(seconds=1)) == outbox.FlushResult()  # backing off
    assert outbox.flush(gateway, now=now + timedelta(seconds=2)).failed == 1
    assert _rows()[-2].attempts == 2


def test_backoff_is_capped_at_an_hour(platform, gateway: StripeGateway, fake: FakeStripeBilling) -> None:
    tenant, _ = make_tenant("t")
    _meter(tenant, "inference:x", 5)
    with session_scope() as s:
        s.execute(update(StripeOutbox).values(attempts=20))
    fake.go_down("error")
    now = utcnow()
    outbox.flush(gateway, now=now)
    first = _rows()[0]
    assert (first.attempts, first.next_attempt_at) == (21, now + timedelta(seconds=3600))


def test_rows_with_nothing_to_send_are_skipped(platform, gateway: StripeGateway, fake: FakeStripeBilling) -> None:
    tenant, _ = make_tenant("t")
    outbox.flush(gateway)
    before = (len(fake.meter_events), len(fake.credit_grants))
    _meter(tenant, "inference:free", 0)
    with session_scope() as s:
        yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        payload = {"grant_id": "cg_x", "amount_micro_usd": 5_000_000, "category": "promotional", "reason": "promo"}
        outbox.enqueue(s, tenant, "credit_grant", "credit_grant:expired", payload | {"expires_at": yesterday})
        outbox.enqueue(s, tenant, "credit_grant", "credit_grant:tiny", payload | {"amount_micro_usd": 9_999})
    assert outbox.flush(gateway) == outbox.FlushResult(skipped=3)
    assert (len(fake.meter_events), len(fake.credit_grants)) == before
    assert [r.status for r in _rows()[-3:]] == ["skipped"] * 3


def test_two_flushers_never_send_the_same_row(platform, gateway: StripeGateway, fake: FakeStripeBilling) -> None:
    tenant, _ = make_tenant("t")
    outbox.flush(gateway)
    for i in range(20):
        _meter(tenant, f"inference:c{i}", 1)
    results: list[outbox.FlushResult] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        results.append(outbox.flush(gateway))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.sent for r in results) == 20 and sum(r.failed for r in results) == 0
    posted = Counter(r.form["identifier"] for r in fake.requests if r.path == "/v1/billing/meter_events")
    assert posted == Counter({f"meter:inference:c{i}": 1 for i in range(20)})  # no row was sent twice


def test_ledger_usage_reaches_the_meter_through_the_worker_entry_point(
    platform, localstripe: str, fake: FakeStripeBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, _ = make_tenant("t")
    with session_scope() as s:
        ledger.record(
            s,
            ledger.Usage(
                idempotency_key="inference:req-1",
                tenant_id=tenant,
                kind="inference",
                technique="inference",
                base_model="m",
                amount_micro_usd=129,
                input_tokens=10,
                output_tokens=5,
            ),
        )
    monkeypatch.delenv("LORAPLEX_STRIPE_API_KEY", raising=False)
    get_settings.cache_clear()
    assert outbox.flush_if_configured() is None  # no Stripe key: nothing is sent, rows wait
    monkeypatch.setenv("LORAPLEX_STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("LORAPLEX_STRIPE_API_BASE", localstripe)
    monkeypatch.setenv("LORAPLEX_STRIPE_BILLING_API_BASE", fake.url)
    get_settings.cache_clear()
    result = outbox.flush_if_configured()
    assert result is not None and result.failed == 0
    [event] = fake.meter_events
    assert event["identifier"] == "meter:inference:req-1"
    assert event["payload"] == {"stripe_customer_id": _customer_of(tenant), "value": "129"}
