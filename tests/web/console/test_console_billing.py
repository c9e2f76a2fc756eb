"""The billing portal in a real browser: the balance and sign-up credits, a chat completion's charge appearing in
the month's usage (by category and by model), the Stripe buttons saying the API's error where Stripe is not
configured, the low-credit and failed-payment banners, statements, and text that looks like HTML."""

import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import screenshot, sign_in
from playwright.sync_api import expect

from app.db import session_scope
from app.models import BillingAccount
from app.tenants import authenticate
from billing import alerts, credits
from conftest import TINY_MODEL, make_tenant
from credit_helpers import spend
from fake_stripe_billing import API_KEY, FakeStripeBilling, localstripe_server

HTML = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def console_url(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[str]:
    """The console's server (as tests/conftest.py's), with no free tier: every shared-endpoint token is charged,
    so a chat completion shows as a charge. No Stripe key: Checkout and the portal answer 503."""
    from served import served_platform

    from deployment_helpers import FAST_ENV

    env = FAST_ENV | {"LORAPLEX_FREE_TOKENS_PER_DAY": "0", "LORAPLEX_FREE_TOKENS_PER_MONTH": "0"}
    with served_platform(tmp_path_factory.mktemp("console-billing"), "sqlite", tiny_model_dir, env) as url:
        yield url


@pytest.fixture
def stripe_console(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[str, FakeStripeBilling]]:
    """A second server, whose Stripe is localstripe (customers) and the billing fake (Checkout and portal
    sessions): (its URL, the fake). For one test: while it runs, this process's settings name its platform."""
    from served import served_platform

    from deployment_helpers import FAST_ENV

    fake = FakeStripeBilling().start()
    try:
        with localstripe_server() as localstripe:
            env = FAST_ENV | {
                "LORAPLEX_STRIPE_API_KEY": API_KEY,
                "LORAPLEX_STRIPE_API_BASE": localstripe,
                "LORAPLEX_STRIPE_BILLING_API_BASE": fake.url,
            }
            with served_platform(tmp_path / "stripe", "sqlite", tiny_model_dir, env) as url:
                yield url, fake
    finally:
        fake.stop()


def tenant_of(api_key: str) -> str:
    with session_scope() as s:
        return authenticate(s, api_key).tenant_id


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def usage_row(page: Any, table: str, label: str) -> list[str]:
    row = page.locator(f"#usage-{table} tbody tr").filter(has=page.get_by_role("rowheader", name=label, exact=True))
    return [cell.strip() for cell in row.locator("th, td").all_inner_texts()]


def test_balance_credits_and_a_chat_completion_charged_in_this_months_usage(
    page: Any, console_url: str, api_key: str
) -> None:
    page.goto("/billing")
    expect(page.get_by_role("heading", name="Billing", level=1)).to_be_visible()
    assert page.locator("#credit").inner_text() == "$25.00"
    credits_table = page.get_by_role("table", name="Credits")
    expect(credits_table.get_by_role("cell", name="developer sign-up")).to_be_visible()
    expires = credits_table.locator("tbody tr").first.locator("td").nth(4).inner_text()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", expires), expires
    assert usage_row(page, "category", "inference")[1:] == ["0", "0", "—", "$0.000000"]
    expect(page.locator("#usage-model")).to_contain_text(f"No usage in {this_month()}")
    expect(page.locator("figure.bars figcaption").first).to_have_text("No usage")
    expect(page.get_by_text("No statement yet")).to_be_visible()

    # One chat completion to the tiny model, through the API with the key, as a user's program would.
    headers = {"Authorization": f"Bearer {api_key}"}
    chat = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    r = httpx.post(f"{console_url}/v1/chat/completions", headers=headers, json=chat, timeout=120)
    assert r.status_code == 200, r.text
    tokens, cost = r.json()["usage"]["total_tokens"], r.json()["usage"]["cost_micro_usd"]
    assert cost > 0  # no free tier on this server
    api_usage = httpx.get(f"{console_url}/v1/billing/usage", headers=headers).json()

    page.reload()
    inference = usage_row(page, "category", "inference")
    assert inference[:3] == ["inference", "1", f"{tokens:,}"]
    assert inference[4] == api_usage["by_category"]["inference"]["cost"]["usd"] == f"${cost / 1e6:.6f}"
    assert usage_row(page, "category", "finetune")[1:] == ["0", "0", "—", "$0.000000"]
    model = usage_row(page, "model", TINY_MODEL)
    assert model[:4] == [TINY_MODEL, "—", "1", f"{tokens:,}"] and model[5] == inference[4]
    assert page.locator("#usage-total").inner_text() == api_usage["total"]["usd"]
    # The bars: inference is the longest (the only charge), finetune has none.
    widths = (
        page.locator("#usage-category")
        .locator("xpath=../..")
        .locator(".bar")
        .evaluate_all("bars => bars.map(b => b.style.width)")
    )
    assert sorted(widths) == ["0%", "0%", "100%"]
    assert (
        page.locator("#credit").inner_text()
        == httpx.get(f"{console_url}/v1/billing/balance", headers=headers).json()["credit"]["usd"]
    )

    # This month's statement is listed, and opens with the line of the charge.
    page.get_by_role("link", name=f"Statement {this_month()}").click()
    page.wait_for_url(f"**/billing/statements/{this_month()}")
    line = page.locator("#statement-lines tbody tr").first.locator("td").all_inner_texts()
    assert line[:3] == ["inference", "inference", TINY_MODEL] and line[8] == f"${cost / 1e6:.6f}"
    assert f"Credits applied\n−${cost / 1e6:.6f}\n" in page.locator("#statement-totals").inner_text()
    page.get_by_role("link", name="← Billing").click()
    page.wait_for_url("**/billing")
    screenshot(page, "billing")
    page.set_viewport_size({"width": 390, "height": 844})
    # Nothing of the page is wider than the screen: the tables scroll inside their own frames.
    wide = "[...document.querySelectorAll('main *')].filter(e => !e.closest('.table-wrap'))"
    assert page.evaluate(f"{wide}.filter(e => e.getBoundingClientRect().right > 390).length") == 0
    screenshot(page, "billing-narrow")


def test_the_stripe_buttons_say_the_apis_error_beside_them(page: Any) -> None:
    page.goto("/billing")
    topup = page.locator("#topup")
    amount = page.get_by_label("Top-up amount (USD)")

    amount.fill("3")  # refused by the API's own check, named on its field
    page.get_by_role("button", name="Top up").click()
    expect(topup.get_by_role("alert")).to_have_text("amount_usd: between $5 and $10,000")
    expect(amount).to_have_attribute("aria-invalid", "true")

    amount.fill("25.50")
    page.get_by_role("button", name="Top up").click()
    expect(topup.get_by_role("alert")).to_have_text("payments are not configured on this installation (no Stripe key)")
    expect(amount).not_to_have_attribute("aria-invalid", "true")
    assert page.url.endswith("/billing")

    for form, button in (("#add-card", "Add a card"), ("#portal", "Manage billing")):
        page.get_by_role("button", name=button).focus()
        page.keyboard.press("Enter")  # reachable and usable by keyboard
        expect(page.locator(form).get_by_role("alert")).to_contain_text("payments are not configured")
        expect(page.get_by_role("button", name=button)).to_be_enabled()


def test_the_banner_when_credit_is_low_and_when_a_payment_failed(page: Any, api_key: str) -> None:
    tenant_id = tenant_of(api_key)
    page.goto("/billing")
    expect(page.locator("p.banner")).to_have_count(0)

    spend(tenant_id, 21_000_000)  # $25 of sign-up credit - $21: below the $5 threshold
    with session_scope() as s:  # what the credit check (and every charge) does: the state moves, the tenant is told
        assert alerts.credit_moved(s, tenant_id, credits.balance(s, tenant_id).credit_micro_usd) == "low"
    page.reload()
    expect(page.get_by_role("alert")).to_have_text(
        "Your credit is running low: top up in Billing to keep paid work running."
    )
    assert page.locator("#credit").inner_text() == "$4.00"
    page.goto("/datasets")  # on every page
    expect(page.locator("p.banner")).to_contain_text("Your credit is running low")

    with session_scope() as s:  # as the Stripe webhook leaves it after invoice.payment_failed
        account = s.get(BillingAccount, tenant_id)
        assert account is not None
        account.payment_method, account.payment_status = "visa ending 4242", "past_due"
    page.goto("/billing")
    banner = page.locator("p.banner")
    expect(banner).to_have_text(
        "Your last payment failed: update your card in Billing to keep deployments and jobs running."
    )
    expect(page.locator("dd").filter(has_text="last payment failed")).to_be_visible()
    expect(page.get_by_text("visa ending 4242")).to_be_visible()
    banner.get_by_role("link").click()
    page.wait_for_url("**/billing")


def test_past_months_statements_and_html_in_usage_shown_as_text(page: Any, api_key: str) -> None:
    """A past month is chosen with the selector; an adapter name and a month holding HTML show as text (the page
    fixture fails the test on any script that ran, or that the policy blocked)."""
    tenant_id = tenant_of(api_key)
    spend(
        tenant_id, 1_500_000, adapter=f"{HTML}/1", input_tokens=1200, created_at=datetime(2026, 3, 14, 12, tzinfo=UTC)
    )
    page.goto("/billing")
    page.get_by_label("Month", exact=True).select_option("2026-03")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**/billing?month=2026-03")
    expect(page.get_by_role("heading", name="Usage in 2026-03")).to_be_visible()
    assert usage_row(page, "model", f"{HTML}/1") == [f"{HTML}/1", TINY_MODEL, "1", "1,200", "—", "$1.50"]
    assert usage_row(page, "category", "finetune")[4] == "$1.50"
    assert page.locator("img").count() == 0
    page.get_by_role("link", name="statement for 2026-03").click()
    page.wait_for_url("**/billing/statements/2026-03")
    expect(page.locator("#statement-lines")).to_contain_text(f"{HTML}/1")
    assert page.locator("#statement-totals").inner_text().startswith("Subtotal\n$1.50\n")
    assert page.locator("img").count() == 0

    page.goto("/billing")
    months = page.get_by_role("list", name="Monthly statements").get_by_role("link").all_inner_texts()
    assert months == ["Statement 2026-03"]

    page.goto(f"/billing?month={HTML}")  # a month typed by hand is said back as text, beside the selector
    expect(page.get_by_role("alert")).to_have_text(f"month: {HTML!r} is not YYYY-MM")
    assert page.locator("img").count() == 0


def test_a_statement_is_the_tenants_own_and_a_bad_month_is_404(
    browser: Any, page: Any, console_url: str, api_key: str
) -> None:
    """Statements are named by month, the same URL for everyone: another tenant's usage never shows in it."""
    headers = {"Authorization": f"Bearer {api_key}"}
    spend(tenant_of(api_key), 2_000_000)
    assert httpx.get(f"{console_url}/v1/billing/statements", headers=headers).json()["months"] == [this_month()]
    # A second tenant, signed in in its own browser context, sees none of the first one's usage.
    second_key = make_tenant(f"second-{secrets.token_hex(3)}")[1]["Authorization"].split()[1]
    context = browser.new_context(base_url=console_url)
    second = context.new_page()
    sign_in(second, second_key, "/billing")
    response = second.goto(f"/billing/statements/{this_month()}")
    assert response.status == 200
    expect(second.locator("#statement-lines")).to_contain_text(f"No usage in {this_month()}")
    second.goto("/billing")
    expect(second.get_by_text("No statement yet")).to_be_visible()
    context.close()

    response = page.goto("/billing/statements/last-month")
    assert response.status == 404
    expect(page.get_by_role("heading", name="No such statement")).to_be_visible()


def test_billing_needs_a_session(browser: Any, console_url: str) -> None:
    context = browser.new_context(base_url=console_url)
    page = context.new_page()
    page.goto("/billing/statements/2026-01")
    page.wait_for_url("**/signin?next=/billing/statements/2026-01")
    context.close()


def test_top_up_add_a_card_and_manage_billing_go_to_stripe(
    browser: Any, stripe_console: tuple[str, FakeStripeBilling]
) -> None:
    """With Stripe configured, each button opens the page Stripe returned (stood in for here: the browser reaches
    no outside host), with what the user asked for in the Checkout session."""
    url, fake = stripe_console
    key = make_tenant(f"stripe-{secrets.token_hex(3)}")[1]["Authorization"].split()[1]
    context = browser.new_context(base_url=url)
    stripe_pages: list[str] = []

    def stripe(route: Any) -> None:
        stripe_pages.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<title>Stripe</title><p>Stripe stand-in</p>")

    context.route(re.compile(r"https://(checkout|billing)\.stripe\.com/.*"), stripe)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    sign_in(page, key, "/billing")
    for act, expected in (
        (lambda: page.get_by_role("button", name="Add a card").click(), "https://checkout.stripe.com/c/pay/cs_test_"),
        (lambda: page.get_by_role("button", name="Top up").click(), "https://checkout.stripe.com/c/pay/cs_test_"),
        (lambda: page.get_by_role("button", name="Manage billing").click(), "https://billing.stripe.com/p/session/"),
    ):
        page.goto("/billing")
        if len(stripe_pages) == 1:
            page.get_by_label("Top-up amount (USD)").fill("42.50")
        act()
        page.wait_for_url(f"{expected}**")
        expect(page.get_by_text("Stripe stand-in")).to_be_visible()
    assert [s["mode"] for s in fake.checkout_sessions] == ["setup", "payment"]
    topup = fake.checkout_sessions[1]
    assert topup["amount_total"] == 4250 and topup["success_url"].endswith("/billing?checkout=done")
    assert len(fake.portal_sessions) == 1 and len(stripe_pages) == 3
    page.goto("/billing?checkout=done")  # back from Checkout
    expect(page.get_by_role("status")).to_contain_text("Back from Stripe Checkout")
    context.close()
    assert not problems, problems
