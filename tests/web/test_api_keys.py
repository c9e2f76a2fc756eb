"""API keys (/v1/api_keys, app/tenants.py, web/key_scopes.py): named keys with a scope and an optional expiry, the
secret shown once and never listed; scopes refused with 403 naming the scope; expired and revoked keys refused with
401 and their own codes; a revocation holds at once in a second, real API process; the last active key stays."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.db import session_scope
from app.models import ApiKey
from conftest import TINY_MODEL, Platform, Processes, make_tenant
from web.key_scopes import INFERENCE_ROUTES

CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def create(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = client.post("/v1/api_keys", headers=headers, json={"name": "ci"} | body)
    assert r.status_code == 201, r.text
    return r.json()


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return str(err["message"])


def set_key(key_id: str, **values: Any) -> None:
    with session_scope() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(**values))


def stored(key_id: str) -> ApiKey:
    with session_scope() as s:
        return s.get_one(ApiKey, key_id)


def key_rows() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(ApiKey)) or 0


def test_create_list_and_revoke(client: TestClient, alice: dict[str, str]) -> None:
    created = create(client, alice, name="ci pipeline")
    secret = created["key"]
    assert secret.startswith("lpx_") and created["prefix"] == secret[:10]
    assert (created["name"], created["scope"], created["status"], created["expires_at"]) == (
        "ci pipeline", "all", "active", None,
    )  # fmt: skip
    assert client.get("/v1/datasets", headers=bearer(secret)).status_code == 200

    listing = client.get("/v1/api_keys", headers=alice)
    assert listing.status_code == 200, listing.text
    keys = listing.json()
    assert [k["name"] for k in keys] == ["default", "ci pipeline"]
    assert set(keys[1]) == {"id", "prefix", "name", "scope", "status", "created_at", "last_used_at", "expires_at",
                            "revoked_at"}  # fmt: skip
    assert secret not in listing.text and stored(created["id"]).key_hash not in listing.text
    assert alice["Authorization"].removeprefix("Bearer ") not in listing.text

    revoked = client.delete(f"/v1/api_keys/{created['id']}", headers=alice)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] is not None
    assert "revoked" in error(client.get("/v1/datasets", headers=bearer(secret)), 401, "revoked_api_key")
    again = client.delete(f"/v1/api_keys/{created['id']}", headers=alice)  # idempotent: it stays as it was
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]

    # The tenant's last active key cannot be revoked: the tenant would be locked out.
    default_id = keys[0]["id"]
    message = error(client.delete(f"/v1/api_keys/{default_id}", headers=alice), 409, "last_active_key")
    assert "last active API key" in message and client.get("/v1/datasets", headers=alice).status_code == 200
    assert stored(default_id).revoked_at is None
    # With another key, it can: the new key revokes the old one.
    spare = create(client, alice, name="spare")
    assert client.delete(f"/v1/api_keys/{default_id}", headers=bearer(spare["key"])).status_code == 200
    error(client.get("/v1/datasets", headers=alice), 401, "revoked_api_key")


def test_an_inference_key_can_only_infer(client: TestClient, alice: dict[str, str]) -> None:
    key = bearer(create(client, alice, name="serving", scope="inference")["key"])
    r = client.post("/v1/chat/completions", headers=key, json=CHAT)
    assert r.status_code == 200, r.text
    assert client.get("/v1/models", headers=key).status_code == 200
    # A private deployment's inference route is allowed too: what answers is the deployment's own 404.
    error(client.post("/v1/deployments/nope/chat/completions", headers=key, json=CHAT), 404, "deployment_not_found")

    for method, path in [("POST", "/v1/datasets"), ("GET", "/v1/finetuning/jobs"), ("GET", "/v1/deployments/nope")]:
        message = error(client.request(method, path, headers=key), 403, "scope_not_allowed")
        assert "scope is 'inference'" in message and "inference only" in message, message
    message = error(client.get("/v1/api_keys", headers=key), 403, "scope_not_allowed")
    assert "managing API keys needs scope 'all'" in message


def test_a_read_key_can_only_get(client: TestClient, alice: dict[str, str]) -> None:
    key = bearer(create(client, alice, name="dashboard", scope="read")["key"])
    for path in ("/v1/datasets", "/v1/finetuning/jobs", "/v1/usage", "/v1/models", "/v1/billing/balance"):
        assert client.get(path, headers=key).status_code == 200, path
    r = client.post("/v1/datasets", headers=key, files={"file": ("a.jsonl", b"{}")}, data={"base_model": TINY_MODEL})
    message = error(r, 403, "scope_not_allowed")
    assert message == (
        "this API key's scope is 'read', which allows reading only (GET); POST /v1/datasets needs scope 'all'"
    )
    message = error(client.post("/v1/chat/completions", headers=key, json=CHAT), 403, "scope_not_allowed")
    assert "needs scope 'all' or 'inference'" in message
    error(client.get("/v1/api_keys", headers=key), 403, "scope_not_allowed")
    error(client.post("/v1/api_keys", headers=key, json={"name": "wider"}), 403, "scope_not_allowed")


def test_every_inference_route_of_the_app_is_listed(client: TestClient) -> None:
    """A new completions route that web/key_scopes.py does not list would refuse inference keys."""
    paths: dict[str, dict[str, Any]] = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    routes = {(method.upper(), path) for path, methods in paths.items() for method in methods}
    inference = {(m, p) for m, p in routes if p.endswith("completions") or p == "/v1/models"}
    assert len(inference) == 5 and inference <= INFERENCE_ROUTES


def test_an_expired_key_is_refused(client: TestClient, alice: dict[str, str]) -> None:
    created = create(client, alice, name="temp", expires_in_days=30)
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(days=30) - timedelta(minutes=1) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert client.get("/v1/datasets", headers=bearer(created["key"])).status_code == 200

    set_key(created["id"], expires_at=datetime.now(UTC) - timedelta(seconds=1))
    message = error(client.get("/v1/datasets", headers=bearer(created["key"])), 401, "expired_api_key")
    assert message.startswith("this API key (") and "expired at" in message
    listed = client.get("/v1/api_keys", headers=alice).json()
    assert [k["status"] for k in listed] == ["active", "expired"]
    # An expired key is no way in: the default key is still the last active one.
    error(client.delete(f"/v1/api_keys/{listed[0]['id']}", headers=alice), 409, "last_active_key")


def test_last_used_at_is_written_at_most_once_a_minute(client: TestClient, alice: dict[str, str]) -> None:
    created = create(client, alice)
    assert created["last_used_at"] is None
    client.get("/v1/datasets", headers=bearer(created["key"]))
    first = stored(created["id"]).last_used_at
    assert first is not None and datetime.now(UTC) - first < timedelta(seconds=30)
    client.get("/v1/datasets", headers=bearer(created["key"]))
    assert stored(created["id"]).last_used_at == first  # within the minute: no write

    set_key(created["id"], last_used_at=first - timedelta(minutes=2))
    client.get("/v1/datasets", headers=bearer(created["key"]))
    assert stored(created["id"]).last_used_at > first  # type: ignore[operator]
    listed = {k["id"]: k for k in client.get("/v1/api_keys", headers=alice).json()}
    assert listed[created["id"]]["last_used_at"] is not None


def test_another_tenants_key_is_not_found(client: TestClient, alice: dict[str, str], bob: dict[str, str]) -> None:
    alices = create(client, alice)
    message = error(client.delete(f"/v1/api_keys/{alices['id']}", headers=bob), 404, "api_key_not_found")
    assert message == f"The API key '{alices['id']}' does not exist"
    error(client.delete("/v1/api_keys/key_0000000000000000", headers=bob), 404, "api_key_not_found")
    assert alices["id"] not in client.get("/v1/api_keys", headers=bob).text
    assert stored(alices["id"]).revoked_at is None
    assert client.get("/v1/datasets", headers=bearer(alices["key"])).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "scope": "admin"}, "scope"),
        ({"name": "x", "colour": "blue"}, "colour"),
        ({"name": "  "}, "name"),
        ({}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "x", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "x", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),  # no time zone
        ({"name": "x", "expires_in_days": 0}, "expires_in_days"),
        ({"name": "x", "expires_in_days": "30"}, "expires_in_days"),
        ({"name": "x", "expires_in_days": 3, "expires_at": "2999-01-01T00:00:00Z"}, "expires_in_days"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(
    client: TestClient, alice: dict[str, str], body: dict[str, Any], param: str
) -> None:
    before = key_rows()
    r = client.post("/v1/api_keys", headers=alice, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err
    assert key_rows() == before


def test_a_revocation_holds_at_once_in_another_api_process(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    """This process (the TestClient's app) and a real `loraplex serve` on the same database: a key revoked on one
    is refused by the other on its very next request, after both had just accepted it."""
    first, second = create(client, alice, name="first"), create(client, alice, name="second")
    processes = Processes(platform, {})
    try:
        other = processes.server(workers=0)
        for key in (first, second):
            assert httpx.get(f"{other}/v1/datasets", headers=bearer(key["key"])).status_code == 200
            assert client.get("/v1/datasets", headers=bearer(key["key"])).status_code == 200

        assert client.delete(f"/v1/api_keys/{first['id']}", headers=alice).status_code == 200  # here...
        error(httpx.get(f"{other}/v1/datasets", headers=bearer(first["key"])), 401, "revoked_api_key")  # ...there

        r = httpx.delete(f"{other}/v1/api_keys/{second['id']}", headers=alice)  # there...
        assert r.status_code == 200, r.text
        error(client.get("/v1/datasets", headers=bearer(second["key"])), 401, "revoked_api_key")  # ...here
    finally:
        processes.stop()


def test_the_first_key_of_a_tenant(platform: Platform) -> None:
    tenant_id, _ = make_tenant("carol")
    with session_scope() as s:
        (key,) = s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)).all()
        assert (key.name, key.scope, key.expires_at, key.revoked_at) == ("default", "all", None, None)
