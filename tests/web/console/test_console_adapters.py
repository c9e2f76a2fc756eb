"""The adapters pages in a real browser: a version trained through the API on its repo's page with its evaluation,
config, checkpoints and working downloads; a repo created and a PEFT adapter imported from the page, the API's
refusal shown beside the field; a description holding HTML shown as text; another tenant's repo answering 404."""

from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import screenshot, sign_in, train_greeter
from playwright.sync_api import expect

from conftest import TINY_MODEL, make_tenant

HOSTILE = "<img src=x onerror=alert(1)>"
ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di")] + [
    {"prompt": f"Say hi to {n}", "completion": f"Hi {n}!", "split": "evaluation"} for n in ("Ed", "Flo")
]


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from lora_helpers import build_lora

    return build_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


def train_version(console_url: str, api_key: str) -> dict[str, Any]:
    """greet/1 on the tiny model (repo created first with a description holding HTML), trained through the API."""
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        assert http.post("/v1/repos", json={"name": "greet", "description": f"Greets {HOSTILE}"}).status_code == 201
    return train_greeter(console_url, api_key, ROWS)


def test_a_trained_version_shows_its_evaluation_checkpoints_and_downloads(
    page: Any, console_url: str, api_key: str
) -> None:
    job = train_version(console_url, api_key)
    page.goto("/adapters")
    card = page.locator(".repo-card", has_text="greet")
    expect(card.get_by_role("link", name="greet/1")).to_be_visible()
    expect(card).to_contain_text(TINY_MODEL)
    expect(card.locator(".badge")).to_have_text("ready")
    expect(card).to_contain_text(f"Greets {HOSTILE}")  # the description as text
    assert page.locator("main img").count() == 0
    screenshot(page, "adapters")

    card.get_by_role("link", name="greet", exact=True).click()
    page.wait_for_url("**/adapters/greet")
    version = page.locator("#v1")
    expect(version.get_by_role("heading", name="greet/1")).to_be_visible()
    expect(version).to_contain_text(f"job {job['id']}")
    metrics = version.locator("table.metrics tbody tr")
    expect(metrics.first).to_contain_text("Before training")
    assert metrics.count() == 3  # before training, best, last
    checkpoints = version.locator("table.checkpoints tbody tr")
    expect(checkpoints).to_have_count(len(job["checkpoints"]))
    expect(checkpoints.first).to_contain_text("greet/1@1")
    version.get_by_text("Config").click()
    expect(version.locator("table.config")).to_contain_text("learning_rate")
    screenshot(page, "repo")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.locator("main").evaluate("m => m.scrollWidth") <= 390  # wide tables scroll in their own box
    screenshot(page, "repo-narrow")
    page.set_viewport_size({"width": 1280, "height": 900})

    links = [version.get_by_role("link", name="Download greet/1 (.tar.gz)"), version.get_by_label("Download greet/1@1")]
    for link in links:
        answer = page.request.get(link.get_attribute("href"))  # the session's cookie, as a click sends it
        assert (answer.status, answer.headers["content-type"]) == (200, "application/gzip")

    # The dataset the job used is kept: its delete answers 409, said on its page.
    page.goto("/datasets/hi")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete dataset").click()
    expect(page.locator("#delete-error")).to_contain_text("is used by fine-tuning jobs")


def test_a_repo_created_and_an_adapter_imported_from_the_page(
    page: Any, console_url: str, peft_adapter: Path, tmp_path: Path
) -> None:
    page.goto("/adapters")
    page.get_by_label("Name").fill("bad name!")
    page.get_by_role("button", name="Create repo").click()
    expect(page.locator("#repo-name-error")).to_contain_text("name:")
    page.get_by_label("Name").fill("imported")
    page.get_by_label("Description").fill(HOSTILE)
    page.get_by_role("button", name="Create repo").click()
    page.wait_for_url("**/adapters/imported")
    expect(page.locator("#repo-description")).to_have_text(HOSTILE)
    assert page.locator("main img").count() == 0

    page.get_by_label("Base model").select_option(TINY_MODEL)
    page.get_by_role("button", name="Import").click()  # no file
    expect(page.locator("#import-files-error")).to_contain_text("files: send either")
    broken = tmp_path / "adapter_config.json"
    broken.write_text("{not json")
    page.get_by_label("Adapter files").set_input_files([str(broken), str(peft_adapter / "adapter_model.safetensors")])
    page.get_by_role("button", name="Import").click()
    expect(page.locator("#import-files-error")).to_contain_text("adapter_config.json")

    files = [str(peft_adapter / "adapter_config.json"), str(peft_adapter / "adapter_model.safetensors")]
    page.get_by_label("Adapter files").set_input_files(files)
    page.get_by_role("button", name="Import").click()
    version = page.locator("#v1")
    expect(version.get_by_role("heading", name="imported/1")).to_be_visible(timeout=30_000)
    expect(version).to_contain_text("an imported PEFT adapter")
    expect(version).to_contain_text("rank 4")
    answer = page.request.get(version.get_by_role("link", name="Download imported/1 (.tar.gz)").get_attribute("href"))
    assert answer.status == 200

    # Another tenant signed in: the repo's page answers 404, as the API does.
    _, other = make_tenant("someone-else-adapters")
    other_page = page.context.browser.new_context(base_url=console_url).new_page()
    sign_in(other_page, other["Authorization"].split()[1], "/adapters")
    answer = other_page.goto("/adapters/imported")
    assert answer is not None and answer.status == 404
    expect(other_page.get_by_role("heading", name="Repo not found")).to_be_visible()
    assert other_page.request.get("/v1/repos/imported/versions/1/download").status == 404
    other_page.context.close()
