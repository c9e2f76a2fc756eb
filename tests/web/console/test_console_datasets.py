"""The datasets pages in a real browser: an upload (file input and drag and drop) with its progress and status, the
validation report with each bad row's line and field, text that looks like HTML shown as text, token statistics,
the preview of the first rows, delete, and another tenant's dataset answering 404."""

import json
from pathlib import Path
from typing import Any

import httpx
from browser_helpers import screenshot
from playwright.sync_api import expect

from conftest import TINY_MODEL, make_tenant

HOSTILE = "<img src=x onerror=alert(1)>"
GOOD = [
    {"prompt": "Say hi to Ann", "completion": "Hi Ann!"},
    {"prompt": f"Quote {HOSTILE}", "completion": HOSTILE},
    {"prompt": "Is the sky blue?", "completion": "yes"},
]
# Lines 1-3 are good; line 4 is not JSON, line 5 lacks its completion's text, line 6 has a bad split.
BAD_LINES = [
    "{not json",
    json.dumps({"prompt": "Count to two", "completion": 2}),
    json.dumps({"prompt": "Hello", "completion": "Hi", "split": "test"}),
]
CLASSIFICATION = [
    {"prompt": text, "completion": label}
    for text, label in [
        ("I love it", "positive"),
        ("Great food", "positive"),
        ("Terrible service", "negative"),
        ("It broke", "negative"),
    ]
]


def jsonl(rows: list[dict[str, Any]], extra: tuple[str, ...] | list[str] = ()) -> str:
    return "\n".join([json.dumps(r) for r in rows] + list(extra)) + "\n"


def test_an_upload_with_bad_rows_shows_each_line_and_field_as_text(page: Any, tmp_path: Path) -> None:
    path = tmp_path / "greetings.jsonl"
    path.write_text(jsonl(GOOD, BAD_LINES))
    page.get_by_label("Base model").select_option(TINY_MODEL)
    page.get_by_label("File").set_input_files(str(path))
    page.get_by_role("button", name="Upload").click()
    status = page.get_by_role("status")
    expect(status).to_contain_text("greetings: invalid, 3 bad rows", timeout=30_000)
    assert page.locator("#upload-progress").evaluate("p => p.value") == 1
    row = page.locator("#dataset-rows tr", has_text="greetings")
    expect(row.locator(".badge")).to_have_text("invalid")
    screenshot(page, "datasets")

    status.get_by_role("link", name="greetings").click()
    page.wait_for_url("**/datasets/greetings")
    report = page.locator("#validation-report tbody tr")
    expect(report).to_have_count(3)
    lines = [report.nth(i).locator("td").all_inner_texts() for i in range(3)]
    assert [(line, field) for line, field, _ in lines] == [("4", "—"), ("5", "completion"), ("6", "split")], lines
    assert lines[0][2].startswith("invalid JSON")
    preview = page.locator("#preview tbody tr")
    expect(preview).to_have_count(3)
    assert preview.nth(1).locator("pre").inner_text() == f"prompt: Quote {HOSTILE}\ncompletion: {HOSTILE}"
    assert page.locator("main img").count() == 0  # shown as text, never as an element
    screenshot(page, "dataset-invalid")


def test_a_dropped_file_is_validated_with_its_token_statistics_and_labels(page: Any, tmp_path: Path) -> None:
    page.get_by_label("Name").fill("reviews")
    page.get_by_label("Base model").select_option(TINY_MODEL)
    text = jsonl(CLASSIFICATION)
    # A drop as a user's: a DataTransfer holding the file, dispatched on the drop zone.
    transfer = page.evaluate_handle(
        """text => { const t = new DataTransfer(); t.items.add(new File([text], "reviews.jsonl")); return t; }""",
        text,
    )
    page.dispatch_event("#dropzone", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    expect(page.get_by_role("status")).to_contain_text("reviews: ready", timeout=30_000)
    page.get_by_role("link", name="reviews").first.click()
    page.wait_for_url("**/datasets/reviews")
    expect(page.locator("#dataset-facts")).to_contain_text("prompt_completion")
    tokens = page.locator("#token-stats")
    expect(tokens).to_contain_text("Total tokens")
    expect(tokens).to_contain_text("Completion (learned) tokens")
    expect(page.locator("#labels tbody tr")).to_have_count(2)
    expect(page.locator("#labels")).to_contain_text("negative")
    expect(page.locator("#truncation tbody tr").first).to_contain_text("0 of 4")
    expect(page.locator("#preview tbody tr")).to_have_count(4)
    screenshot(page, "dataset")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.locator("main").evaluate("m => m.scrollWidth") <= 390  # wide tables scroll in their own box
    screenshot(page, "dataset-narrow")


def test_delete_asks_first_and_another_tenants_dataset_is_not_found(page: Any, console_url: str, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for name in ("mine", "kept"):
        r = httpx.post(
            f"{console_url}/v1/datasets",
            headers=headers,
            files={"file": (f"{name}.jsonl", jsonl(CLASSIFICATION).encode())},
            data={"base_model": TINY_MODEL, "wait": "true"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
    _, other = make_tenant("someone-else-datasets")
    assert httpx.get(f"{console_url}/v1/datasets/mine", headers=other).status_code == 404
    rows = httpx.get(f"{console_url}/v1/datasets/mine/rows", params={"limit": 2}, headers=headers).json()
    assert rows == [
        {"line": 1, "split": "train", "prompt": "I love it", "completion": "positive"},
        {"line": 2, "split": "train", "prompt": "Great food", "completion": "positive"},
    ]
    assert httpx.get(f"{console_url}/v1/datasets/mine/rows", headers=other).status_code == 404

    page.goto("/datasets/mine")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.get_by_role("button", name="Delete dataset").click()
    expect(page).to_have_url(f"{console_url}/datasets/mine")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete dataset").click()
    page.wait_for_url("**/datasets")
    expect(page.locator("#dataset-rows")).not_to_contain_text("mine")
    assert httpx.get(f"{console_url}/v1/datasets/mine", headers=headers).status_code == 404

    # Another tenant signed in: the dataset's page answers 404, as the API does.
    response = page.request.get("/datasets/kept")
    assert response.status == 200
    other_page = page.context.browser.new_context(base_url=console_url).new_page()
    from browser_helpers import sign_in

    sign_in(other_page, other["Authorization"].split()[1])
    answer = other_page.goto("/datasets/kept")
    assert answer is not None and answer.status == 404
    expect(other_page.get_by_role("heading", name="Dataset not found")).to_be_visible()
    other_page.context.close()
