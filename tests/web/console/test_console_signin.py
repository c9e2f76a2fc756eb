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


def test_revoking_the_key_signs_its_sessions_out(page: Any, console_url: str, api_key: str) -> None:
    """The session holds the key's id and re-reads the key on every request: once revoked (with another key, as the
    last active key cannot be), the next page asks to sign in again and the scripts' API calls are a 401."""
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        other = http.post("/v1/api_keys", json={"name": "other"}).json()
        mine = next(k for k in http.get("/v1/api_keys").json() if k["name"] == "default")
        revoked = http.delete(f"/v1/api_keys/{mine['id']}", headers={"Authorization": f"Bearer {other['key']}"})
        assert revoked.status_code == 200, revoked.text
    assert page.evaluate("fetch('/v1/datasets').then(r => r.status)") == 401
    page.goto("/adapters")
    page.wait_for_url("**/signin?next=/adapters")


def test_a_read_key_looks_and_an_inference_key_is_turned_away(browser: Any, console_url: str, api_key: str) -> None:
    with httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        read = http.post("/v1/api_keys", json={"name": "look", "scope": "read"}).json()["key"]
        inference = http.post("/v1/api_keys", json={"name": "serve", "scope": "inference"}).json()["key"]
    context = browser.new_context(base_url=console_url)
    page = context.new_page()
    page.goto("/signin")
    page.get_by_label("API key").fill(inference)
    page.get_by_role("button", name="Sign in").click()
    assert "may only call the inference routes" in page.get_by_role("alert").inner_text()
    page.get_by_label("API key").fill(read)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/datasets")
    assert "(read key)" in page.locator(".who").inner_text()
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    status = page.evaluate(
        "t => fetch('/v1/repos', {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': t},"
        " body: JSON.stringify({name: 'nope'})}).then(r => r.status)",
        token,
    )
    assert status == 403  # the key's scope holds for the console's calls as for any other
    context.close()
