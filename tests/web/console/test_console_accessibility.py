"""Every console page checked by axe-core (Deque's accessibility engine, run in the page by axe-playwright-python)
against WCAG 2 A and AA: labelled controls, names of buttons and links, landmarks, headings, contrast. A page with
data on it (a dataset, a trained version, a job, a deployment), at 1280 px and at 390 px."""

from typing import Any

import httpx
import pytest
from browser_helpers import train_greeter

from conftest import TINY_MODEL

ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")]
WCAG = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_passes_axe(browser: Any, console_url: str, api_key: str, width: int) -> None:
    from axe_playwright_python.sync_playwright import Axe

    job = train_greeter(console_url, api_key, ROWS)
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        deployment = {"name": "greeter", "base_model": TINY_MODEL, "min_replicas": 0, "max_replicas": 1}
        assert http.post("/v1/deployments", json=deployment).status_code == 201
    pages = ["/datasets", "/datasets/hi", "/jobs", "/jobs/new", f"/jobs/{job['id']}", "/adapters", "/adapters/greet",
             "/playground", "/deployments", "/deployments/greeter", "/billing"]  # fmt: skip
    context = browser.new_context(base_url=console_url, viewport={"width": width, "height": 900})
    page = context.new_page()
    axe = Axe()
    found = {"/signin": _violations(axe, page, "/signin")}
    from browser_helpers import sign_in

    sign_in(page, api_key)
    for path in pages:
        found[path] = _violations(axe, page, path)
    context.close()
    assert {path: v for path, v in found.items() if v} == {}


def _violations(axe: Any, page: Any, path: str) -> list[str]:
    page.goto(path)
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)  # the page's script has drawn what it draws at once
    results = axe.run(page, options=WCAG)
    return [
        f"{v['id']} ({v['impact']}): {v['help']} — {[n['target'] for n in v['nodes']][:5]}"
        for v in results.response["violations"]
    ]
