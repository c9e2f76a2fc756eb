"""Shared by the deployment tests: the app served by uvicorn on a free port (real HTTP, in a thread of the test
process, so the test can reach its runtime), a LoRA of the tiny model imported through the API, and waits."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from conftest import TINY_MODEL, free_port, wait_for

# Quick loops for tests: the autoscaler looks every 0.1 s, figures per 1 s, replica time metered every second.
FAST_ENV = {
    "LORAPLEX_DEPLOYMENT_TICK_SECONDS": "0.1",
    "LORAPLEX_DEPLOYMENT_METRICS_INTERVAL": "1",
    "LORAPLEX_DEPLOYMENT_METERING_SECONDS": "1",
    "LORAPLEX_DEPLOYMENT_WAKE_TIMEOUT": "90",
    "LORAPLEX_ENGINE_START_TIMEOUT": "90",
    "LORAPLEX_SHARED_REQUESTS_PER_SECOND": "0",
}


class Served:
    def __init__(self, app: Any, url: str) -> None:
        self.app, self.url = app, url

    @property
    def runtime(self) -> Any:
        return self.app.state.deployments


@contextmanager
def serve_app() -> Iterator[Served]:
    """create_app() under uvicorn (lifespan included: the deployment runtime runs) until the block ends."""
    from web.main import create_app

    app = create_app()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(url), 30, "the server did not start")
    try:
        yield Served(app, url)
    finally:
        server.should_exit = True
        thread.join(timeout=90)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def import_lora(http: httpx.Client, repo: str, lora: Path, base_model: str = TINY_MODEL) -> str:
    files = [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = http.post(f"/v1/repos/{repo}/versions", files=files, data={"base_model": base_model})
    assert r.status_code == 201, r.text
    return str(r.json()["name"])


def deployment(http: httpx.Client, name: str) -> dict[str, Any]:
    r = http.get(f"/v1/deployments/{name}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_status(http: httpx.Client, name: str, status: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(
        lambda: (d := deployment(http, name))["status"] == status and d,
        timeout,
        f"deployment {name} never became {status} (now {deployment(http, name)['status']})",
    )


def ready_replicas(d: dict[str, Any]) -> int:
    return sum(1 for r in d["live"]["replicas"] if r["state"] == "ready")
