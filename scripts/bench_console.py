"""Web console benchmark: how long the server takes to answer each page, and how much JavaScript and CSS each page
makes the browser load, on the embedded default with the bundled SmolLM2-135M.

    .venv/bin/python scripts/bench_console.py [--requests 30]

It starts `loraplex serve --workers 1` on a fresh data directory (scripts/bench_deployments.py's Server), creates a
tenant, uploads the demo's dataset, fine-tunes one adapter with the defaults (as the demo does), creates a deployment
left in Standby, and signs in to the console as that tenant. The README's two screenshots come from this run: the
job's page, and the playground asking the base model and the adapter a held-out ticket side by side
(scripts/results/console_job.png, console_playground.png). Then, per page:
- server time: `--requests` GETs of the page's HTML over loopback with the session cookie (httpx, one connection),
  timed to the last byte: the median and the 90th percentile. Loopback adds well under a millisecond, so this is
  the server's time, an upper bound.
- weight: the page opened in headless Chromium (Debian's, driven by Playwright); the bytes of every script and
  stylesheet it loaded (uncompressed, as served), and of the HTML itself.

Writes scripts/results/console_benchmark.json and .md.
"""

import argparse
import json
import platform
import re
import statistics
import sys
import time
from typing import Any

import httpx
from bench_deployments import MODEL, RESULTS, ROOT, Server, _bundled_weights

SAMPLE = ROOT / "app" / "samples" / "support_triage.jsonl"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="GETs per page for its server time")
    args = parser.parse_args()

    with Server(_bundled_weights(), prewarm=False, workers=1) as server:
        pages = set_up(server)
        cookies = sign_in(server.url, server.key)
        rows = [
            {"page": label, "path": path, **server_time(server.url, path, cookies, args.requests)}
            for label, path in pages
        ]
        weights = page_weights(server.url, server.key, [path for _, path in pages])
        screenshots(server.url, server.key, pages)
    for row in rows:
        row.update(weights[row["path"]])
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
        "requests_per_page": args.requests,
        "pages": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "console_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "console_benchmark.md").write_text(markdown(report))
    print(markdown(report))


def set_up(server: Server) -> list[tuple[str, str]]:
    """A dataset, a trained adapter and a deployment in Standby, so that no page is empty: (label, path) per page."""
    assert server.http is not None
    with SAMPLE.open("rb") as f:
        r = server.http.post("/v1/datasets", files={"file": (SAMPLE.name, f)}, data={"base_model": MODEL})
    r.raise_for_status()
    dataset = r.json()["name"]
    config = {"base_model": MODEL, "dataset": dataset, "repo": "triage"}
    job = server.http.post("/v1/finetuning/jobs", json=config).json()
    while job["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(2)
        job = server.http.get(f"/v1/finetuning/jobs/{job['id']}").json()
    print(f"job {job['id']}: {job['status']}", file=sys.stderr)
    deployment = {"name": "triage", "base_model": MODEL, "min_replicas": 0, "max_replicas": 1}
    server.http.post("/v1/deployments", json=deployment).raise_for_status()
    return [
        ("Sign in", "/signin"),
        ("Datasets", "/datasets"),
        ("A dataset", f"/datasets/{dataset}"),
        ("Fine-tuning jobs", "/jobs"),
        ("New job", "/jobs/new"),
        ("A job", f"/jobs/{job['id']}"),
        ("Adapters", "/adapters"),
        ("A repo", "/adapters/triage"),
        ("Playground", "/playground"),
        ("Deployments", "/deployments"),
        ("A deployment", "/deployments/triage"),
        ("Billing", "/billing"),
    ]


def sign_in(url: str, key: str) -> dict[str, str]:
    """The session cookie of a sign-in through the form, as a browser does it."""
    with httpx.Client(base_url=url) as client:
        form = client.get("/signin")
        token = re.search(r'name="csrf-token" content="([^"]+)"', form.text)
        assert token is not None
        r = client.post("/signin", data={"api_key": key, "csrf_token": token.group(1), "next": "/datasets"})
        assert r.status_code == 303, r.text
        return dict(client.cookies)


def server_time(url: str, path: str, cookies: dict[str, str], requests: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, cookies=cookies) as client:
        client.get(path).raise_for_status()  # warm: templates compiled, connection open
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            r = client.get(path)
            times.append((time.perf_counter() - start) * 1000)
            assert r.status_code == 200, (path, r.status_code)
    times.sort()
    return {"median_ms": round(statistics.median(times), 1), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 1)}


def page_weights(url: str, key: str, paths: list[str]) -> dict[str, dict[str, int]]:
    from playwright.sync_api import sync_playwright

    weights = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=url).new_page()
        page.goto("/signin")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/datasets")
        for path in paths:
            loaded: list[Any] = []

            def record(response: Any, loaded: list[Any] = loaded) -> None:
                loaded.append(response)

            page.on("response", record)
            page.goto(path, wait_until="load")
            page.wait_for_timeout(500)  # the modules a page's script imports
            page.remove_listener("response", record)
            assets = [r for r in loaded if r.request.resource_type in ("script", "stylesheet")]
            documents = [r for r in loaded if r.request.resource_type == "document"]
            weights[path] = {
                "js_css_bytes": sum(len(r.body()) for r in assets),
                "html_bytes": sum(len(r.body()) for r in documents),
                "files": len(assets),
            }
        browser.close()
    return weights


def screenshots(url: str, key: str, pages: list[tuple[str, str]]) -> None:
    """The job's page (its curves and evaluation) and the playground comparing the base model with the adapter on
    the sample's first held-out ticket, as the README shows them."""
    from playwright.sync_api import expect, sync_playwright

    held_out = next(r for r in map(json.loads, SAMPLE.read_text().splitlines()) if r.get("split") == "evaluation")
    job_path = dict(pages)["A job"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=url, viewport={"width": 1280, "height": 1000}).new_page()
        page.goto("/signin")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/datasets")
        page.goto(job_path)
        expect(page.locator("#status")).to_have_text("completed")
        expect(page.locator("#points")).not_to_have_attribute("data-train-points", "0")
        page.wait_for_timeout(500)  # the last redraw
        page.screenshot(path=str(RESULTS / "console_job.png"))
        page.goto(f"/playground?model={MODEL}&compare=triage/1")
        page.get_by_label("Temperature").fill("0")
        page.get_by_label("Max tokens").fill("48")
        page.get_by_label("Message").fill(held_out["prompt"])
        page.get_by_role("button", name="Send").click()
        for key_ in ("a", "b"):
            total = page.locator(f'[data-pane="{key_}"] [data-stat="total"]')
            expect(total).to_have_text(re.compile(r"\d+\.\d\d s"), timeout=120_000)  # a latency once measured
        page.screenshot(path=str(RESULTS / "console_playground.png"))
        browser.close()


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Web console: server time and page weight",
        "",
        f"{report['date']}, {report['machine']}, the embedded default (SQLite) with the bundled SmolLM2-135M; "
        f"`.venv/bin/python scripts/bench_console.py`. Server time: {report['requests_per_page']} GETs of the page's "
        "HTML over loopback with the session cookie, to the last byte. Weight: the scripts and stylesheets "
        "headless Chromium loaded for the page (uncompressed), and the HTML.",
        "",
        "| page | path | server time, median (ms) | p90 (ms) | JS + CSS (KB) | files | HTML (KB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["pages"]:
        lines.append(
            f"| {p['page']} | `{p['path']}` | {p['median_ms']} | {p['p90_ms']} | {p['js_css_bytes'] / 1024:.1f} "
            f"| {p['files']} | {p['html_bytes'] / 1024:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
