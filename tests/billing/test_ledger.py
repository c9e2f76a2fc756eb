import dataclasses

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import StripeOutbox
from billing import ledger
from conftest import make_tenant


def _usage(tenant_id: str, key: str, amount: int, kind: str = "inference") -> ledger.Usage:
    return ledger.Usage(
        idempotency_key=key,
        tenant_id=tenant_id,
        kind=kind,
        technique=kind,
        base_model="m",
        amount_micro_usd=amount,
        input_tokens=10,
        output_tokens=5,
    )


def test_same_event_three_times_charges_once(platform) -> None:
    tenant_id, _ = make_tenant("t")
    for _ in range(3):
        with session_scope() as s:
            ledger.record(s, _usage(tenant_id, "inference:req-1", 129))
    with session_scope() as s:
        totals = ledger.totals(s, tenant_id)
    assert (totals.records, totals.amount_micro_usd, totals.input_tokens) == (1, 129, 10)


def test_totals_by_kind_and_tenant(platform) -> None:
    a, _ = make_tenant("a")
    b, _ = make_tenant("b")
    with session_scope() as s:
        ledger.record(s, _usage(a, "k1", 100))
        ledger.record(s, _usage(a, "k2", 6_665, kind="finetune"))
        ledger.record(s, _usage(b, "k3", 7))
    with session_scope() as s:
        assert ledger.totals(s, a).amount_micro_usd == 6_765
        assert ledger.totals(s, a, kind="finetune").amount_micro_usd == 6_665
        assert ledger.totals(s, b).records == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_tokens": -5}, "input_tokens"),
        ({"amount_micro_usd": -1}, "amount_micro_usd"),
        ({"compute_ms": 10**15}, "compute_ms"),
        ({"input_tokens": 10**13}, "not plausible"),
        ({"kind": "mining"}, "kind"),
        ({"idempotency_key": ""}, "idempotency_key"),
    ],
)
def test_bad_usage_is_refused_and_the_ledger_is_unchanged(platform, change: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    tenant_id, _ = make_tenant("t")
    bad = dataclasses.replace(_usage(tenant_id, "k-bad", 10), **change)
    with pytest.raises(ledger.LedgerError, match=message), session_scope() as s:
        ledger.record(s, bad)
    with session_scope() as s:
        assert ledger.totals(s, tenant_id).records == 0
        assert s.scalar(select(func.count(StripeOutbox.id)).where(StripeOutbox.kind == "meter_event")) == 0


def test_priced_usage_owes_stripe_one_meter_event(platform) -> None:  # type: ignore[no-untyped-def]
    tenant_id, _ = make_tenant("t")
    for _ in range(3):
        with session_scope() as s:
            ledger.record(s, _usage(tenant_id, "inference:req-9", 129))
    with session_scope() as s:
        ledger.record(s, _usage(tenant_id, "inference:free", 0))  # free usage owes Stripe nothing
    with session_scope() as s:
        rows = s.scalars(select(StripeOutbox).where(StripeOutbox.kind == "meter_event")).all()
        assert [(r.idempotency_key, r.payload["value_micro_usd"]) for r in rows] == [("meter:inference:req-9", 129)]


def test_inference_is_free_up_to_the_daily_allowance(platform, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.settings import get_settings

    monkeypatch.setenv("LORAPLEX_FREE_TOKENS_PER_DAY", "1000")
    get_settings.cache_clear()
    tenant_id, _ = make_tenant("t")
    params = 8 * 10**9
    with session_scope() as s:
        assert ledger.inference_charge(s, tenant_id, params, 600) == 0
        ledger.record(s, dataclasses.replace(_usage(tenant_id, "r1", 0), input_tokens=500, output_tokens=100))
    with session_scope() as s:
        # 400 tokens left free today: 1,000 more tokens price 600 of them ($0.20 per 1M -> 120 micro-USD)
        assert ledger.inference_charge(s, tenant_id, params, 1000) == 120
