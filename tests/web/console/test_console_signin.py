"""Signing in and out of the console, and what guards it: the session cookie, cross-site forms, security headers,
other tenants' pages, and text that looks like HTML."""

from typing import Any

import httpx
import pytest
from browser_helpers import screenshot

from web.console.security import POLICY


def test_sign_in_keeps_a_signed_http_only_cookie_and_sign_out_ends_it(page: Any, console_url: str) -> None:
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["loraplex_session"]
    assert (session["httpOnly"], session["sameSite"]) == (True, "Strict")
    assert "lpx_" not in session["value"]  # the key itself is never in the cookie
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it
    assert page.evaluate("JSON.stringify(localStorage)") == "{}"
    assert page.get_by_role("navigation", name="Console").is_visible()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/signin")
    page.goto("/datasets")
    page.wait_for_url("**/signin?next=/datasets")


def test_a_wrong_key_says_so_without_saying_whose(browser: Any, console_url: str) -> None:
    context = browser.new_context(base_url=console_url)
    page = context.new_page()
    page.goto("/signin")
    for key in ("lpx_not-a-key", "nonsense"):
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        assert page.get_by_role("alert").inner_text().startswith("That API key was not accepted")
    screenshot(page, "signin-refused")
    context.close()


def test_a_session_cookie_calls_the_api_and_a_forged_post_is_refused(page: Any, console_url: str) -> None:
    """The console's scripts call the API with the cookie; a POST without the session's token, or from another
    origin, is refused (403) even with the cookie, and a cross-site form post to sign-out does nothing."""
    assert page.evaluate("fetch('/v1/datasets').then(r => r.status)") == 200
    cookie = {c["name"]: c["value"] for c in page.context.cookies()}
    with httpx.Client(base_url=console_url, cookies=cookie) as client:
        forged = client.post("/v1/repos", json={"name": "forged"})
        assert (forged.status_code, forged.json()["error"]["code"]) == (403, "csrf_refused")
        token = page.locator('meta[name="csrf-token"]').get_attribute("content")
        other_site = client.post(
            "/v1/repos", json={"name": "x"}, headers={"X-CSRF-Token": token, "Origin": "https://evil.example"}
        )
        assert other_site.status_code == 403
        assert client.post("/signout", data={"csrf_token": "guess"}).status_code == 403
        assert client.post("/v1/repos", json={"name": "mine"}, headers={"X-CSRF-Token": token}).status_code == 201


def test_pages_carry_the_security_headers(console_url: str) -> None:
    for path in ("/signin", "/static/console.js", "/health"):
        headers = httpx.get(f"{console_url}{path}").headers
        assert headers["content-security-policy"] == POLICY
        assert "unsafe-inline" not in POLICY and "script-src 'self'" in POLICY
        assert (headers["x-content-type-options"], headers["x-frame-options"]) == ("nosniff", "DENY")


@pytest.mark.parametrize("target", ["https://evil.example/x", "//evil.example/x"])
def test_sign_in_never_redirects_off_the_site(browser: Any, console_url: str, api_key: str, target: str) -> None:
    context = browser.new_context(base_url=console_url)
    page = context.new_page()
    page.goto(f"/signin?next={target}")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{console_url}/datasets")
    context.close()
