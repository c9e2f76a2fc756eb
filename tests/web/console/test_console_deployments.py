"""The deployments pages in a real browser against a real server (FAST_ENV: figures per second): create a deployment
of the tiny model through the form (errors shown beside the field the API names), watch it reach Ready on its page
with its status history, see the health charts fill as requests arrive through the API, update, stop and delete it
from the page; text that looks like HTML stays text; another tenant's deployment is a 404 page."""

import time
from pathlib import Path
from typing import Any

import httpx
from browser_helpers import screenshot
from playwright.sync_api import expect

from conftest import TINY_MODEL, make_tenant
from deployment_helpers import import_lora
from functions.deployments.config import DeploymentConfig, DeploymentUpdate
from lora_helpers import build_lora

HOSTILE = '<img src=x onerror=alert(1)><script>alert("x")</script>'
ANSWER_SECONDS = 120_000  # ms: a replica of the tiny model starts in seconds, on a busy machine in more


def test_create_watch_ready_charts_fill_update_stop_and_delete(
    page: Any, console_url: str, api_key: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as http:
        adapter = import_lora(http, "greeter", build_lora(tiny_model_dir, tmp_path / "lora"))
    page.goto("/deployments")
    for field, info in DeploymentConfig.model_fields.items():  # the form is the API's config, field for field
        control = page.get_by_label(field, exact=True)
        expect(control).to_have_count(1)
        if info.description:
            expect(page.locator(f"#create-{field}-help")).to_contain_text(info.description)
    expect(page.get_by_label("cooldown_time", exact=True)).to_have_value("3600.0")

    # Refusals of the API are shown beside the field they name, as text.
    page.get_by_label("name", exact=True).fill(HOSTILE)
    page.get_by_label("base_model", exact=True).select_option(TINY_MODEL)
    page.get_by_label("description", exact=True).fill(HOSTILE)
    page.get_by_role("button", name="Create deployment").click()
    expect(page.locator("#create-name-error")).to_contain_text("lowercase letters, digits and dashes")
    page.get_by_label("name", exact=True).fill("web")
    page.get_by_label("min_replicas", exact=True).fill("3")
    page.get_by_label("max_replicas", exact=True).fill("2")
    page.get_by_role("button", name="Create deployment").click()
    expect(page.locator("#create-min_replicas-error")).to_contain_text("more than max_replicas")
    expect(page.locator("#create-name-error")).to_be_empty()

    page.get_by_label("min_replicas", exact=True).fill("1")  # one replica kept up: it starts at once
    page.get_by_role("button", name="Create deployment").click()
    page.wait_for_url("**/deployments/web")
    expect(page.locator("#status")).to_have_text("Ready", timeout=ANSWER_SECONDS)
    history = page.locator("#transition-rows")
    for status in ("Pending", "Initializing", "Ready"):
        expect(history).to_contain_text(status)
    expect(page.locator("#description")).to_have_text(HOSTILE)  # shown as text, never run
    assert page.locator("#description *").count() == 0
    expect(page.locator("#replicas")).to_have_text("1")

    # Requests through the API fill the charts (and the table beside them) on the next refresh.
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as http:
        for model in (TINY_MODEL, TINY_MODEL, adapter):
            body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
            r = http.post("/v1/deployments/web/chat/completions", json=body)
            assert r.status_code == 200, r.text
    base = page.locator("#adapter-rows tr", has_text="base")
    expect(base.locator("td").first).to_have_text("2", timeout=30_000)  # requests
    assert int(base.locator("td").nth(2).inner_text()) > 0  # generated tokens
    expect(page.locator("#adapter-rows tr", has_text=adapter).locator("td").first).to_have_text("1")
    expect(page.locator("#chart-requests .u-legend")).to_contain_text(adapter)  # a line per adapter, and the total
    for chart in ("requests", "tokens", "inference", "queue", "replicas", "utilization"):
        expect(page.locator(f"#chart-{chart} canvas").first).to_be_visible()
        assert int(page.locator(f"#chart-{chart}").get_attribute("data-points") or 0) > 0, chart
    for chart in ("requests", "tokens", "inference", "replicas"):  # (a 4-token answer may fall between samples
        assert int(page.locator(f"#chart-{chart}").get_attribute("data-nonzero") or 0) > 0, chart  # of busy)
    screenshot(page, "deployment")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen but the tables
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "deployment-narrow")
    page.set_viewport_size({"width": 1280, "height": 900})

    # The update form sends what changed (PATCH); a refusal is shown beside its field.
    for field in DeploymentUpdate.model_fields.keys() - {"base_model"}:
        expect(page.get_by_label(field, exact=True)).to_have_count(1)
    page.get_by_label("max_replicas", exact=True).fill("0")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator("#update-max_replicas-error")).to_contain_text("greater than or equal to 1")
    page.get_by_label("max_replicas", exact=True).fill("3")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator("#update-status")).to_contain_text("Saved (max_replicas)")
    expect(page.locator("#range")).to_have_text("1 / 3")

    expect(page.get_by_role("button", name="Standby")).to_be_disabled()  # only a Stopped or Errored one goes back
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#status")).to_have_text("Stopped", timeout=60_000)
    expect(history).to_contain_text("Stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    expect(page.locator("#replica-rows")).to_contain_text("No replica up.")
    page.get_by_role("button", name="Standby").click()  # min_replicas 1: it starts again
    expect(page.locator("#status")).not_to_have_text("Stopped", timeout=30_000)
    expect(history).to_contain_text("moved to Standby by the tenant")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#status")).to_have_text("Stopped", timeout=60_000)

    page.goto("/deployments")
    row = page.locator("tbody tr", has_text="web")
    expect(row).to_contain_text("Stopped")
    expect(row).to_contain_text(HOSTILE)
    assert row.locator("img, script").count() == 0
    screenshot(page, "deployments")

    page.get_by_role("link", name="web").click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url("**/deployments")
    expect(page.locator("tbody")).to_contain_text("No deployment yet.")


def test_another_tenants_deployment_is_a_404_page(page: Any, console_url: str) -> None:
    _, theirs = make_tenant("someone-else")
    with httpx.Client(base_url=console_url, headers=theirs, timeout=60) as http:
        r = http.post("/v1/deployments", json={"name": "theirs", "base_model": TINY_MODEL})
        assert r.status_code == 201, r.text
        response = page.goto("/deployments/theirs")
        assert response is not None and response.status == 404
        expect(page.get_by_role("alert")).to_have_text("The deployment 'theirs' does not exist.")
        page.goto("/deployments")
        expect(page.locator("tbody")).not_to_contain_text("theirs")
        assert page.evaluate("fetch('/v1/deployments/theirs/metrics').then(r => r.status)") == 404
        mine = {c["name"]: c["value"] for c in page.context.cookies()}
        with httpx.Client(base_url=console_url, cookies=mine) as browser_like:
            for path in ("/deployments", "/deployments/theirs"):
                started = time.perf_counter()
                browser_like.get(path)
                print(f"{path}: {1000 * (time.perf_counter() - started):.1f} ms")  # server time, on localhost
        assert http.delete("/v1/deployments/theirs", params={"wait": 0}).status_code in (200, 202)
