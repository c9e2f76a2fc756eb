"""What the console's browser tests do often: sign in, save a screenshot (.artifacts/console/, kept out of git),
train a version through the API to look at."""

import json
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import TINY_MODEL

SCREENSHOTS = Path(__file__).resolve().parents[3] / ".artifacts" / "console"


def sign_in(page: Any, api_key: str, next_path: str = "/datasets") -> None:
    page.goto(f"/signin?next={next_path}")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{next_path}")


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def train_greeter(console_url: str, api_key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """greet/1 on the tiny model, trained through the API on `rows` (dataset "hi", 1 epoch: checkpoint greet/1@1
    too); the completed job."""
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as http:
        data = "\n".join(json.dumps(r) for r in rows).encode()
        r = http.post("/v1/datasets", files={"file": ("hi.jsonl", data)}, data={"base_model": TINY_MODEL})
        assert r.status_code == 201 and r.json()["status"] == "ready", r.text
        config = {"base_model": TINY_MODEL, "dataset": "hi", "repo": "greet", "epochs": 1, "learning_rate": 0.05}
        r = http.post("/v1/finetuning/jobs", json=config | {"rank": 8, "effective_batch_size": 2})
        assert r.status_code == 201, r.text
        job = r.json()
        deadline = time.monotonic() + 120
        while job["status"] in ("queued", "training") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = http.get(f"/v1/finetuning/jobs/{job['id']}").json()
        assert job["status"] == "completed", job
        return job
