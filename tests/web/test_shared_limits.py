"""The shared endpoints' free-tier limits per tenant: tokens per day, tokens per month (read from the ledger) and
requests per second. Over one: 429, Retry-After, and a message naming the limit. Enterprise tenants have no token
limits. The window itself is checked with a made-up clock."""

from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db import session_scope, sessions
from app.models import BillingAccount
from conftest import TINY_MODEL, Platform, make_tenant
from web.errors import APIError
from web.shared_limits import SharedLimiter, _next_month, _seconds_until

BODY = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}


def limits(monkeypatch: pytest.MonkeyPatch, **values: Any) -> None:
    from app.settings import get_settings

    for key, value in values.items():  # the token limits are the free tier's allowance
        group = "FREE" if key.startswith("tokens_") else "SHARED"
        monkeypatch.setenv(f"LORAPLEX_{group}_{key.upper()}", str(value))
    get_settings.cache_clear()


def used_up(client: TestClient, headers: dict[str, str]) -> Any:
    """Ask until refused (each answer adds its tokens to the ledger); the refusal."""
    for _ in range(20):
        r = client.post("/v1/chat/completions", headers=headers, json=BODY)
        if r.status_code != 200:
            return r
    raise AssertionError("never refused")


def test_tokens_per_day_then_per_month(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    limits(monkeypatch, tokens_per_day=40, tokens_per_month=0, requests_per_second=0)
    _, alice = make_tenant("alice")
    r = used_up(client, alice)
    assert r.status_code == 429
    error = r.json()["error"]
    assert error["code"] == "rate_limit_tokens_per_day" and error["type"] == "rate_limit_error"
    assert error["message"].startswith("tokens per day: the free tier's 40 shared-endpoint tokens a day are used up")
    assert 1 <= int(r.headers["Retry-After"]) <= 86_400
    assert client.get("/v1/usage", headers=alice).json()["by_kind"]["inference"]["records"] >= 1

    limits(monkeypatch, tokens_per_day=0, tokens_per_month=40)
    r = client.post("/v1/chat/completions", headers=alice, json=BODY)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_tokens_per_month"
    assert "tokens per month" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 31 * 86_400

    _, bob = make_tenant("bob")  # per tenant: bob has his own allowance
    assert client.post("/v1/chat/completions", headers=bob, json=BODY).status_code == 200


def test_enterprise_tenants_have_no_token_limits(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    limits(monkeypatch, tokens_per_day=1, requests_per_second=0)
    tenant_id, headers = make_tenant("bigco")
    with session_scope() as s:
        s.merge(BillingAccount(tenant_id=tenant_id, plan="enterprise"))
    for _ in range(3):
        assert client.post("/v1/chat/completions", headers=headers, json=BODY).status_code == 200


def test_requests_per_second(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    limits(monkeypatch, requests_per_second=1)
    _, headers = make_tenant("alice")
    assert client.post("/v1/completions", headers=headers, json={"model": "nope", "prompt": "x"}).status_code == 404
    r = client.post("/v1/completions", headers=headers, json={"model": TINY_MODEL, "prompt": "x"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["message"].startswith("requests per second: the shared endpoints take at most 1")


def test_the_window_with_a_made_up_clock(sqlite_platform: Platform) -> None:
    now = [100.0]  # the counts are kept in the database, shared by every API process
    limiter = SharedLimiter(clock=lambda: now[0])
    db = sessions()()  # the request's session, which the check commits
    for _ in range(3):
        limiter._rate(db, "t1", 3)
    with pytest.raises(APIError) as refused:
        limiter._rate(db, "t1", 3)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    limiter._rate(db, "t2", 3)  # another tenant's own window
    now[0] = 101.01  # the first three left the window
    limiter._rate(db, "t1", 3)


def test_month_boundaries() -> None:
    assert _next_month(datetime(2026, 12, 31, 23, 0, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert _seconds_until(datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)) == 1
