"""The deployments API without replicas (SQLite and PostgreSQL): create, list, get, update, stop, standby, delete,
every bad config refused with its field named, other tenants' deployments and adapters invisible, Prometheus text.
(Replicas, scaling and inference on them: tests/functions/deployments/test_deployment_replicas.py.)"""

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import TINY_MODEL, Platform
from lora_helpers import build_lora

BASE = {"name": "prod", "base_model": TINY_MODEL}


def lora_files(tiny_model_dir: Path, tmp_path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    lora = build_lora(tiny_model_dir, tmp_path / "lora")
    return [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]


def import_adapter(client: TestClient, headers: dict[str, str], repo: str, files: Any, base: str = TINY_MODEL) -> str:
    r = client.post(f"/v1/repos/{repo}/versions", headers=headers, files=files, data={"base_model": base})
    assert r.status_code == 201, r.text
    return str(r.json()["name"])


def refused(r: Any, status: int, param: str | None, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error


def wait_status(client: TestClient, headers: dict[str, str], name: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = client.get(f"/v1/deployments/{name}", headers=headers).json()
        if body["status"] == status:
            return dict(body)
        time.sleep(0.05)
    raise AssertionError(f"{name} never became {status}: {body}")


def test_create_list_get_update_and_delete(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/deployments", headers=alice, json=BASE)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "Pending" and created["endpoint"] == "/v1/deployments/prod"
    assert (created["accelerator"], created["engine"], created["min_replicas"], created["max_replicas"]) == (
        "cpu",
        "native",
        0,
        1,
    )
    assert created["scale_up_threshold"] == 1 and created["cooldown_time"] == 3600
    assert created["price_per_replica_hour"] == {"micro_usd": 100_000, "usd": "$0.10"}
    standby = wait_status(client, alice, "prod", "Standby")  # min_replicas 0: nothing starts until a request
    assert standby["replicas"] == 0 and standby["live"]["replicas"] == []
    assert [(t["from_status"], t["to_status"]) for t in standby["transitions"]] == [
        (None, "Pending"),
        ("Pending", "Standby"),
    ]
    assert [d["name"] for d in client.get("/v1/deployments", headers=alice).json()] == ["prod"]

    r = client.patch("/v1/deployments/prod", headers=alice, json={"max_replicas": 3, "cooldown_time": 30})
    assert r.status_code == 200, r.text
    assert (r.json()["max_replicas"], r.json()["cooldown_time"], r.json()["config_version"]) == (3, 30, 1)

    r = client.delete("/v1/deployments/prod", headers=alice, params={"wait": 30})
    assert r.status_code == 200 and r.json()["status"] == "Deleted"
    assert client.get("/v1/deployments/prod", headers=alice).status_code == 404
    assert client.get("/v1/deployments", headers=alice).json() == []
    assert client.post("/v1/deployments", headers=alice, json=BASE).status_code == 201  # the name is free again
    listed = client.get("/v1/deployments", headers=alice, params={"include_deleted": True}).json()
    assert [d["status"] for d in listed] == ["Deleted", "Pending"] or [d["status"] for d in listed] == [
        "Deleted",
        "Standby",
    ]


@pytest.mark.parametrize(
    ("changes", "status", "param", "words"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, 422, "min_replicas", "more than max_replicas"),
        ({"cooldown_time": -1}, 422, "cooldown_time", "greater than or equal to 0"),
        ({"min_replicas": -1}, 422, "min_replicas", "greater than or equal to 0"),
        ({"max_replicas": 0}, 422, "max_replicas", "greater than or equal to 1"),
        ({"max_replicas": 99}, 422, "max_replicas", "at most 8"),
        ({"scale_up_threshold": 0}, 422, "scale_up_threshold", "greater than or equal to 1"),
        ({"accelerator": "tpu-v5"}, 422, "accelerator", "unknown accelerator 'tpu-v5'"),
        ({"accelerator": "a10g"}, 422, "accelerator", "run on the Modal runtime"),
        ({"accelerator": "h100"}, 422, "accelerator", "enterprise terms"),
        ({"base_model": "gpt-17"}, 422, "base_model", "unknown base model 'gpt-17'"),
        ({"engine": "tgi"}, 422, "engine", "unknown engine 'tgi'"),
        ({"name": "Prod Deployment"}, 422, "name", "lowercase letters"),
        ({"preloaded_adapters": ["nope/1"]}, 404, "preloaded_adapters", "'nope/1' does not exist"),
    ],
)
def test_bad_configs_are_refused_with_the_field_named(
    client: TestClient, alice: dict[str, str], changes: dict[str, Any], status: int, param: str, words: str
) -> None:
    refused(client.post("/v1/deployments", headers=alice, json=BASE | changes), status, param, words)
    assert client.get("/v1/deployments", headers=alice).json() == []


def test_updates_are_checked_and_replica_changes_bump_the_version(
    client: TestClient, alice: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = import_adapter(client, alice, "greeter", lora_files(tiny_model_dir, tmp_path))
    assert client.post("/v1/deployments", headers=alice, json=BASE | {"max_replicas": 2}).status_code == 201
    assert client.post("/v1/deployments", headers=alice, json=BASE).status_code == 409  # the name is taken
    refused(client.patch("/v1/deployments/prod", headers=alice, json={"min_replicas": 3}), 422, "min_replicas", "more")
    refused(client.patch("/v1/deployments/prod", headers=alice, json={"max_replicas": 0}), 422, "max_replicas", "")
    refused(
        client.patch("/v1/deployments/prod", headers=alice, json={"base_model": "smollm2-135m"}),
        422,
        "base_model",
        "keeps",
    )
    refused(client.patch("/v1/deployments/prod", headers=alice, json={"cooldown_time": -5}), 422, "cooldown_time", "")
    r = client.patch("/v1/deployments/prod", headers=alice, json={"preloaded_adapters": ["greeter"]})
    assert r.status_code == 200 and r.json()["preloaded_adapters"] == [adapter] and r.json()["config_version"] == 2
    r = client.patch("/v1/deployments/prod", headers=alice, json={"min_replicas": 0, "scale_up_threshold": 4})
    assert r.json()["config_version"] == 2  # scaling knobs apply without new replicas


def test_other_tenants_and_other_base_models_are_refused(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    tiny_model_dir: Path,
    tmp_path: Path,
    platform: Platform,
) -> None:
    files = lora_files(tiny_model_dir, tmp_path)
    import_adapter(client, bob, "bobs", files)
    twin = platform.data_dir / "volume" / "base_models" / "tiny-twin"  # the same weights as another base model
    twin.symlink_to(tiny_model_dir)
    import_adapter(client, alice, "twins", files, base="tiny-twin")
    refused(
        client.post("/v1/deployments", headers=alice, json=BASE | {"preloaded_adapters": ["bobs/1"]}),
        404,
        "preloaded_adapters",
        "'bobs/1' does not exist",
    )
    refused(
        client.post("/v1/deployments", headers=alice, json=BASE | {"preloaded_adapters": ["twins"]}),
        422,
        "preloaded_adapters",
        "is an adapter of 'tiny-twin', not of 'tiny-llama'",
    )
    assert client.post("/v1/deployments", headers=bob, json=BASE).status_code == 201
    for method, path in [
        ("GET", "/v1/deployments/prod"),
        ("PATCH", "/v1/deployments/prod"),
        ("DELETE", "/v1/deployments/prod"),
        ("POST", "/v1/deployments/prod/stop"),
        ("GET", "/v1/deployments/prod/metrics"),
    ]:
        refused(client.request(method, path, headers=alice, json={}), 404, "name", "does not exist")
    chat = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    refused(client.post("/v1/deployments/prod/chat/completions", headers=alice, json=chat), 404, "name", "")
    # bob's deployment serves tiny-llama: an adapter of another base model, or another model, is refused up front
    import_adapter(client, bob, "bobtwins", files, base="tiny-twin")
    for model, words in [("bobtwins/1", "is an adapter of 'tiny-twin'"), ("smollm2-135m", "is another model")]:
        r = client.post("/v1/deployments/prod/chat/completions", headers=bob, json=chat | {"model": model})
        refused(r, 422, "model", words)
    assert client.get("/v1/deployments", headers=alice).json() == []
    assert client.get("/v1/deployments", headers=bob.copy()).status_code == 200
    assert client.get("/v1/deployments").status_code == 401


def test_preloading_an_adapter_above_the_served_rank_is_refused(
    client: TestClient, alice: dict[str, str], tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank no engine serves (training may make one; the operator may lower the limit after an import) is
    refused when the deployment is created or updated, not found out by every replica failing to start."""
    from app.settings import get_settings

    adapter = import_adapter(client, alice, "greeter", lora_files(tiny_model_dir, tmp_path))  # rank 4
    assert client.post("/v1/deployments", headers=alice, json=BASE | {"name": "plain"}).status_code == 201
    monkeypatch.setattr(get_settings().engine, "max_lora_rank", 2)
    for r in (
        client.post("/v1/deployments", headers=alice, json=BASE | {"preloaded_adapters": ["greeter"]}),
        client.patch("/v1/deployments/plain", headers=alice, json={"preloaded_adapters": [adapter]}),
    ):
        refused(r, 422, "preloaded_adapters", "has rank 4; the engines serve ranks up to 2")
    assert [d["name"] for d in client.get("/v1/deployments", headers=alice).json()] == ["plain"]
    assert client.get("/v1/deployments/plain", headers=alice).json()["preloaded_adapters"] == []


def test_a_stopped_deployment_refuses_requests_until_moved_to_standby(
    client: TestClient, alice: dict[str, str]
) -> None:
    client.post("/v1/deployments", headers=alice, json=BASE)
    wait_status(client, alice, "prod", "Standby")
    assert client.post("/v1/deployments/prod/stop", headers=alice).status_code == 200
    stopped = wait_status(client, alice, "prod", "Stopped")
    assert stopped["transitions"][-1]["from_status"] == "Standby"
    body = {"model": TINY_MODEL, "prompt": "hi", "max_tokens": 2}
    r = client.post("/v1/deployments/prod/completions", headers=alice, json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "deployment_stopped"
    assert "until it is moved to Standby" in r.json()["error"]["message"]
    r = client.post("/v1/deployments/prod/standby", headers=alice)
    assert r.json()["status"] == "Standby" and r.json()["transitions"][-1]["reason"] == "moved to Standby by the tenant"


def test_prometheus_endpoint_and_its_token(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics names tenants, deployments and adapters: private unless the operator opens it on purpose."""
    from app.settings import get_settings

    client.post("/v1/deployments", headers=alice, json=BASE)
    wait_status(client, alice, "prod", "Standby")

    def scrape(token: str | None = None, headers: dict[str, str] | None = None) -> Any:
        return client.get("/metrics", headers=headers or ({"Authorization": f"Bearer {token}"} if token else {}))

    # By default (no token, not opened): closed to everyone, a tenant's own API key included; an empty token is none.
    monkeypatch.setenv("LORAPLEX_METRICS_TOKEN", "")
    get_settings.cache_clear()
    for r in (scrape(), scrape(headers=alice), scrape("anything"), scrape(headers={"Authorization": "Bearer "})):
        assert r.status_code == 403 and r.json()["error"]["code"] == "metrics_private", r.text
        assert "LORAPLEX_METRICS_TOKEN" in r.json()["error"]["message"] and "prod" not in r.text

    monkeypatch.setenv("LORAPLEX_METRICS_TOKEN", "s3cret")
    get_settings.cache_clear()
    for r in (scrape(), scrape(headers=alice), scrape("wrong")):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token", r.text
        assert r.json()["error"]["type"] == "authentication_error" and "prod" not in r.text
    r = scrape("s3cret")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'loraplex_deployment_status{accelerator="cpu",deployment="prod"' in r.text
    [line] = [x for x in r.text.splitlines() if x.startswith("loraplex_deployment_status{")]
    assert 'status="Standby"' in line and line.endswith(" 1.0")

    # Opened on purpose (a port the operator firewalls): no token asked; a token set still has to be sent.
    monkeypatch.setenv("LORAPLEX_METRICS_PUBLIC", "true")
    get_settings.cache_clear()
    assert scrape().status_code == 401 and scrape("s3cret").status_code == 200
    monkeypatch.delenv("LORAPLEX_METRICS_TOKEN")
    get_settings.cache_clear()
    assert scrape().status_code == 200 and 'deployment="prod"' in scrape().text
