"""GET /health in-process: every component is reported, and a component that is down turns the answer into a 503
(the killed worker and engine under a real `loraplex serve`: tests/e2e/test_supervision_e2e.py)."""

from fastapi.testclient import TestClient


def test_health_reports_each_component_and_answers_503_while_one_is_down(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert {name: c["status"] for name, c in body["components"].items()} == {
        "database": "ok",
        "workers": "ok",
        "engines": "ok",
        "deployments": "ok",
    }
    assert body["components"]["workers"]["expected"] == 0  # an app built without `serve` runs no workers

    client.app.state.deployments.stop()  # type: ignore[attr-defined]  # the loop that keeps replicas up is gone
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "degraded" and r.json()["components"]["deployments"]["status"] == "degraded"
