from app.db import session_scope
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
