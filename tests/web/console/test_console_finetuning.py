"""The fine-tuning pages in a real browser: the new-job form generated from the config's schema with its price
quote, a job started from it whose curves grow as it trains over server-sent events, the jobs list, a 402 and a 422
shown where the user acted, cancel, HTML in a job's text shown as text, and another tenant's job answering 404."""

import json
import time
from typing import Any

import httpx
from browser_helpers import screenshot
from playwright.sync_api import expect

from app.db import session_scope
from app.models import FinetuneJob
from app.tenants import authenticate
from conftest import TINY_MODEL, make_tenant
from credit_helpers import credit, spend
from finetune_helpers import SENTIMENT
from functions.evaluate import OTHER
from functions.finetune_config import FinetuneConfig

NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ida", "Jo", "Kit", "Lu", "Max", "Ned", "Oz", "Pia")
ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in NAMES]
# What of the page's own content (the header is base.html's) reaches past a 390 px screen; a table scrolls in
# its .table-wrap.
WIDE = """() => [...document.querySelectorAll('main *')]
  .filter(e => !e.parentElement.closest('.table-wrap') && e.getBoundingClientRect().right > 391)
  .map(e => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`).slice(0, 12)"""
HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script>"


def ready_dataset(url: str, key: str, name: str = "greetings", rows: list[dict[str, Any]] = ROWS) -> None:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(
        f"{url}/v1/datasets",
        headers=headers,
        files={"file": (f"{name}.jsonl", data)},
        data={"base_model": TINY_MODEL, "wait": "false"},
        timeout=30,
    )
    assert r.status_code in (201, 202), r.text
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{url}/v1/datasets/{name}", headers=headers).json()["status"]) == "validating":
        assert time.monotonic() < deadline, "the dataset is still validating"
        time.sleep(0.2)
    assert status == "ready", status


def tenant_of(key: str) -> str:
    with session_scope() as s:
        return authenticate(s, key).tenant_id


def fits_narrow_screen(page: Any) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate(WIDE) == []
    page.set_viewport_size({"width": 1280, "height": 900})


def test_start_a_job_from_the_form_and_watch_its_curves_grow(page: Any, console_url: str, api_key: str) -> None:
    ready_dataset(console_url, api_key)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.goto("/jobs")
    expect(page.get_by_text("No job yet")).to_be_visible()
    page.get_by_role("link", name="New fine-tuning job").click()
    page.wait_for_url("**/jobs/new")

    # Every field of the schema, with its help text and default.
    schema = FinetuneConfig.model_json_schema()
    for name, prop in schema["properties"].items():
        expect(page.locator(f"#help-{name}")).to_contain_text(prop["description"][:60])
        expect(page.locator(f"label[for='f-{name}']")).to_contain_text(name)
    expect(page.locator("#help-rank")).to_contain_text("Default: 16.")
    expect(page.locator("#help-epochs")).to_contain_text("Default: auto.")
    expect(page.locator("#f-dataset")).to_have_value("greetings")
    expect(page.locator("#f-base_model")).to_have_value(TINY_MODEL)  # the dataset's base model
    expect(page.locator("#f-adapter")).to_have_value("lora")
    expect(page.locator("#f-use_rslora")).not_to_be_checked()

    page.locator("#f-repo").fill("greet")
    expect(page.locator("#quote-price")).to_contain_text("estimated")
    page.locator("#f-epochs-mode").select_option("number")
    page.get_by_label("epochs", exact=True).fill("3")
    page.locator("#f-effective_batch_size-mode").select_option("number")
    page.get_by_label("effective_batch_size", exact=True).fill("2")
    page.locator("#f-description").fill(HOSTILE)
    expect(page.locator("#quote-body")).not_to_contain_text("epochs")  # no longer "auto"
    expect(page.locator("#quote-body")).to_contain_text("learning_rate")  # still "auto": the value it takes
    expect(page.locator("#quote-body")).to_contain_text("Your credit covers it.")
    screenshot(page, "job_new")
    fits_narrow_screen(page)

    with page.expect_request(lambda r: r.url.endswith("/v1/finetuning/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Start fine-tuning job").click()
    # Only what was set or changed from its default.
    assert sent.value.post_data_json == {
        "base_model": TINY_MODEL,
        "dataset": "greetings",
        "repo": "greet",
        "epochs": 3,
        "effective_batch_size": 2,
        "description": HOSTILE,
    }
    page.wait_for_url("**/jobs/ft_*")

    # The curve grows while the job trains (read from the table beside the charts), then the job completes.
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 240
    while (status := page.locator("#status").inner_text()) != "completed":
        assert status in ("queued", "training"), page.locator("#job-error").inner_text()
        assert time.monotonic() < deadline, f"still {status}: {seen[-3:]}"
        seen.append((status, page.locator("#metrics-table tbody tr[data-kind=train]").count()))
        time.sleep(0.1)
    expect(page.locator("#points")).to_contain_text("training steps")
    total = page.locator("#metrics-table tbody tr[data-kind=train]").count()
    growing = sorted({n for s, n in seen if s == "training" and 0 < n < total})
    assert growing, f"no partial curve seen while training: {seen}"
    assert total >= 18  # 3 epochs of the rows not held out, 2 a step
    expect(page.locator("#points")).to_have_attribute("data-train-points", str(total))  # redrawn at most every 150 ms
    assert page.locator("#chart-loss .uplot").count() == 1 and page.locator("#chart-eval .uplot").count() == 1
    expect(page.locator("#eval-table")).to_contain_text("step 0 (baseline)")
    expect(page.locator("#eval-table")).to_contain_text("token accuracy")
    expect(page.locator("#charge")).to_contain_text("$")
    expect(page.locator("#version")).to_have_text("greet/1")
    expect(page.locator("#checkpoints li")).to_have_count(3)  # one per epoch
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    expect(page.locator("#config")).to_contain_text(HOSTILE)  # shown as text, never run
    assert page.locator("#config img").count() == 0 and dialogs == []
    screenshot(page, "job")
    fits_narrow_screen(page)

    page.get_by_role("link", name="← Fine-tuning jobs").click()
    row = page.locator("tbody tr").first
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text("greet/1")
    screenshot(page, "jobs")


def test_no_credit_is_explained_and_a_bad_field_is_named(page: Any, console_url: str, api_key: str) -> None:
    ready_dataset(console_url, api_key)
    tenant_id = tenant_of(api_key)
    spend(tenant_id, credit(tenant_id))
    page.goto("/jobs/new")
    page.locator("#f-repo").fill("greet")
    payment = page.locator("#payment")
    expect(payment).to_be_visible()
    expect(payment).to_contain_text("no credit left")
    expect(page.locator("#quote-body")).to_contain_text("does not cover")
    expect(payment.get_by_role("link", name="Top up or add a card in Billing")).to_have_attribute("href", "/billing")
    page.get_by_role("button", name="Start fine-tuning job").click()
    expect(payment).to_contain_text("no credit left")
    screenshot(page, "job_new-402")

    page.locator("#group-lora summary").click()
    page.get_by_label("rank", exact=True).fill("0")
    expect(page.locator("#err-rank")).to_contain_text("rank: ")
    expect(page.get_by_label("rank", exact=True)).to_have_attribute("aria-invalid", "true")
    assert httpx.get(f"{console_url}/v1/finetuning/jobs", headers={"Authorization": f"Bearer {api_key}"}).json() == []


def test_cancel_a_running_job_a_failed_jobs_error_and_another_tenants_job(
    page: Any, console_url: str, api_key: str
) -> None:
    ready_dataset(console_url, api_key)
    mine = {"Authorization": f"Bearer {api_key}"}
    config = {"base_model": TINY_MODEL, "dataset": "greetings", "repo": "long", "train_steps": 5000}
    job = httpx.post(f"{console_url}/v1/finetuning/jobs", headers=mine, json=config).json()
    page.goto(f"/jobs/{job['id']}")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()

    # A failed job's error is shown as text: a job row as a worker leaves a failure (no event: no worker takes it).
    with session_scope() as db:
        cancelled = db.get_one(FinetuneJob, job["id"])
        failed = FinetuneJob(
            tenant_id=cancelled.tenant_id,
            dataset_id=cancelled.dataset_id,
            repo_id=cancelled.repo_id,
            base_model=cancelled.base_model,
            config=cancelled.config,
            status="failed",
            error=f"training failed: {HOSTILE}",
        )
        db.add(failed)
        db.flush()
        failed_id = failed.id
    page.goto(f"/jobs/{failed_id}")
    expect(page.locator("#status")).to_have_text("failed")
    expect(page.locator("#job-error")).to_have_text(f"training failed: {HOSTILE}")
    assert page.locator("#job-error img, #job-error script").count() == 0

    _, theirs = make_tenant("someone-else")
    ready_dataset(console_url, theirs["Authorization"].split()[1], "theirs")
    other = httpx.post(f"{console_url}/v1/finetuning/jobs", headers=theirs, json=config | {"dataset": "theirs"}).json()
    httpx.post(f"{console_url}/v1/finetuning/jobs/{other['id']}/cancel", headers=theirs)
    for job_id in (other["id"], "ft_0000000000000000"):
        response = page.goto(f"/jobs/{job_id}")
        assert response is not None and response.status == 404
        expect(page.get_by_role("heading", name="Job not found")).to_be_visible()


def test_a_finished_classification_job_shows_its_confusion_matrix(page: Any, console_url: str, api_key: str) -> None:
    """Opened after the job ended: every row arrives at once over the events, then the final status."""
    ready_dataset(console_url, api_key, "sentiment", SENTIMENT)
    headers = {"Authorization": f"Bearer {api_key}"}
    config = {"base_model": TINY_MODEL, "dataset": "sentiment", "repo": "sentiment", "epochs": 2}
    job = httpx.post(f"{console_url}/v1/finetuning/jobs", headers=headers, json=config).json()
    deadline = time.monotonic() + 180
    while (shown := httpx.get(f"{console_url}/v1/finetuning/jobs/{job['id']}", headers=headers).json())["status"] in (
        "queued",
        "training",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert shown["status"] == "completed", shown
    page.goto(f"/jobs/{job['id']}")
    matrix = page.locator("#confusion-table")
    expect(matrix).to_be_visible()
    labels = shown["summary"]["labels"] + ["neutral"]  # the evaluation split's class training lacks comes last
    assert matrix.locator("thead th").all_inner_texts() == [*labels, OTHER]
    assert matrix.locator("tbody th").all_inner_texts() == labels
    expect(page.locator("#eval-table")).to_contain_text("label accuracy")
    total = sum(
        m["kind"] == "train"
        for m in httpx.get(f"{console_url}/v1/finetuning/jobs/{job['id']}/metrics", headers=headers).json()
    )
    expect(page.locator("#points")).to_have_attribute("data-train-points", str(total))
    screenshot(page, "job-classification")


def test_a_preference_tuning_job_draws_its_rewards(page: Any, console_url: str, api_key: str) -> None:
    """A DPO job's page: the reward margin chart (training and evaluation), the share of pairs whose chosen answer
    wins beside the losses, and the same values in the table; nothing of SFT's metrics it does not publish."""
    pairs = [{"prompt": f"Say hi to {n}", "chosen": f"Hi {n}!", "rejected": "No."} for n in NAMES[:12]]
    ready_dataset(console_url, api_key, "prefs", pairs)
    headers = {"Authorization": f"Bearer {api_key}"}
    config = {"base_model": TINY_MODEL, "dataset": "prefs", "repo": "polite", "method": "dpo", "train_steps": 4,
              "effective_batch_size": 2, "eval_steps": 2}  # fmt: skip
    job = httpx.post(f"{console_url}/v1/finetuning/jobs", headers=headers, json=config).json()
    deadline = time.monotonic() + 180
    while (shown := httpx.get(f"{console_url}/v1/finetuning/jobs/{job['id']}", headers=headers).json())["status"] in (
        "queued",
        "training",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert shown["status"] == "completed", shown
    page.goto(f"/jobs/{job['id']}")
    expect(page.locator("#points")).to_have_attribute("data-train-points", "4")
    expect(page.locator("#chart-rewards")).to_be_visible()
    assert page.locator("#chart-rewards .uplot").count() == 1 and page.locator("#chart-eval .uplot").count() == 1
    expect(page.locator("#chart-rewards")).to_contain_text("training margin")
    expect(page.locator("#chart-eval")).to_contain_text("chosen over rejected")
    table = page.locator("#eval-table")
    for label in ("evaluation loss", "chosen over rejected", "reward margin", "chosen reward", "rejected reward"):
        expect(table).to_contain_text(label)
    for label in ("perplexity", "token accuracy", "sequence accuracy", "CER"):
        expect(table).not_to_contain_text(label)  # a DPO evaluation publishes none of them
    baseline = page.locator("#eval-table tbody tr", has_text="reward margin").locator("td").first
    expect(baseline).to_have_text("0.0000")  # step 0: the adapter is zero, the policy is its reference
    first_step = page.locator("#metrics-table tbody tr[data-kind=train]").first.locator("td")
    assert first_step.nth(8).inner_text() != "—" and first_step.nth(9).inner_text() != "—"  # margin, accuracy
    screenshot(page, "job-dpo")
    fits_narrow_screen(page)


def test_a_reinforcement_fine_tuning_job_draws_its_rewards(page: Any, console_url: str, api_key: str) -> None:
    """A GRPO job's page: the reward chart (training and evaluation totals, each reward function's mean), the KL
    chart, the mean reward beside the baseline, and the latest evaluation's sample completions with their rewards."""
    ready_dataset(
        console_url, api_key, "prompts", [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in NAMES[:12]]
    )
    headers = {"Authorization": f"Bearer {api_key}"}
    graders = [{"type": "text_similarity", "name": "close", "column": "completion"}]
    config = {"base_model": TINY_MODEL, "dataset": "prompts", "repo": "greeter", "method": "grpo", "train_steps": 2,
              "effective_batch_size": 2, "eval_steps": 1, "num_generations": 2, "max_completion_length": 6,
              "reward_functions": graders}  # fmt: skip
    job = httpx.post(
        f"{console_url}/v1/finetuning/jobs", headers=headers, json=config, timeout=60
    ).json()  # counts prompt tokens
    deadline = time.monotonic() + 180
    while (shown := httpx.get(f"{console_url}/v1/finetuning/jobs/{job['id']}", headers=headers).json())["status"] in (
        "queued",
        "training",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert shown["status"] == "completed", shown
    page.goto(f"/jobs/{job['id']}")
    expect(page.locator("#points")).to_have_attribute("data-train-points", "2")
    expect(page.locator("#chart-rewards")).to_be_visible()
    expect(page.locator("#chart-rewards")).to_contain_text("training reward")
    expect(page.locator("#chart-rewards")).to_contain_text("close")
    expect(page.locator("#chart-kl")).to_be_visible()
    expect(page.locator("#eval-table")).to_contain_text("mean reward")
    samples = page.locator("#samples-table")
    expect(samples).to_contain_text("Say hi to")
    assert samples.locator("tbody tr").count() == 1  # one held-out prompt (12 rows, a tenth held out)
    screenshot(page, "job-grpo")
    fits_narrow_screen(page)
