"""Credits: sign-up grants, expiry on an injected clock, usage drawn from the grant that expires first."""

from datetime import UTC, datetime, timedelta

import pytest

from app.db import session_scope
from app.models import BillingAccount, CreditGrant
from billing import credits, ledger
from conftest import make_tenant

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
DAY = timedelta(days=1)


def _grant(gid: str, amount: int, created: datetime, expires: datetime | None) -> CreditGrant:
    return CreditGrant(
        id=gid,
        amount_micro_usd=amount,
        created_at=created,
        expires_at=expires,
        category="x",
        reason="x",
        idempotency_key=gid,
        tenant_id="t",
    )


def test_usage_draws_on_the_soonest_expiring_grant_and_expired_credit_is_forfeited() -> None:
    signup = _grant("signup", 25_000_000, T0, T0 + 30 * DAY)
    topup = _grant("topup", 10_000_000, T0 + DAY, None)  # paid credits never expire
    usage = [(T0 + 2 * DAY, 4_000_000), (T0 + 3 * DAY, 1_000_000)]

    day_5 = credits.settle([signup, topup], usage, T0 + 5 * DAY)
    assert [s.remaining_micro_usd for s in day_5.grants] == [20_000_000, 10_000_000]
    assert (day_5.credit_micro_usd, day_5.pay_as_you_go_micro_usd) == (30_000_000, 0)

    day_31 = credits.settle([signup, topup], usage, T0 + 31 * DAY)  # the sign-up credit expired on day 30
    assert [(s.remaining_micro_usd, s.expired) for s in day_31.grants] == [(0, True), (10_000_000, False)]
    assert day_31.credit_micro_usd == 10_000_000

    late = usage + [(T0 + 40 * DAY, 12_000_000)]  # after expiry only the top-up pays; the rest is pay-as-you-go
    day_41 = credits.settle([signup, topup], late, T0 + 41 * DAY)
    assert (day_41.credit_micro_usd, day_41.pay_as_you_go_micro_usd) == (0, 2_000_000)


def test_usage_before_a_grant_is_not_covered_by_it() -> None:
    later = _grant("later", 5_000_000, T0 + DAY, None)
    settled = credits.settle([later], [(T0, 3_000_000)], T0 + 2 * DAY)
    assert (settled.credit_micro_usd, settled.pay_as_you_go_micro_usd) == (5_000_000, 3_000_000)


def test_signup_grants_25_dollars_for_30_days_once(platform) -> None:  # type: ignore[no-untyped-def]
    tenant_id, _ = make_tenant("dev")
    with session_scope() as s:
        again = credits.grant_signup_credits(s, tenant_id)  # a retried sign-up grants nothing more
        state = credits.balance(s, tenant_id)
        assert [g.grant.id for g in state.grants] == [again.id]
        grant = state.grants[0].grant
        assert grant.amount_micro_usd == 25_000_000
        assert timedelta(days=29, hours=23) < grant.expires_at - grant.created_at <= timedelta(days=30)
        assert credits.balance(s, tenant_id, grant.created_at + timedelta(days=30)).credit_micro_usd == 0


def test_grants_must_be_positive(platform) -> None:  # type: ignore[no-untyped-def]
    tenant_id, _ = make_tenant("dev")
    with pytest.raises(ValueError, match="positive"), session_scope() as s:
        credits.grant_credit(s, tenant_id, 0, category="paid", reason="x", idempotency_key="zero")


def test_paid_work_needs_credit_or_a_card_in_good_standing(platform) -> None:  # type: ignore[no-untyped-def]
    tenant_id, _ = make_tenant("dev")
    with session_scope() as s:
        assert credits.paid_work_refusal(s, tenant_id, 24_000_000) is None
        refusal = credits.paid_work_refusal(s, tenant_id, 26_000_000)
        assert refusal is not None and "$26.00" in refusal and "$25.00" in refusal
        ledger.record(
            s,
            ledger.Usage(
                idempotency_key="big",
                tenant_id=tenant_id,
                kind="finetune",
                technique="sft_lora",
                base_model="m",
                amount_micro_usd=25_000_000,
            ),
        )
    with session_scope() as s:
        assert "no credit left" in (credits.paid_work_refusal(s, tenant_id, 1) or "")
        s.get_one(BillingAccount, tenant_id).payment_method = "visa ending 4242"
    with session_scope() as s:
        assert credits.paid_work_refusal(s, tenant_id, 10**9) is None
        s.get_one(BillingAccount, tenant_id).payment_status = "past_due"
    with session_scope() as s:
        assert "last payment failed" in (credits.paid_work_refusal(s, tenant_id, 1) or "")
        s.get_one(BillingAccount, tenant_id).plan = "enterprise"
    with session_scope() as s:
        assert credits.paid_work_refusal(s, tenant_id, 10**9) is None
