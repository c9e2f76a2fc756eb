"""The console session's signing secret and cookie, without a browser (tests/web/console/ drives one)."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import Request

from app.settings import get_settings
from web import console_session


def _request(cookie: str | None = None) -> Request:
    headers = [(b"cookie", f"{console_session.COOKIE}={cookie}".encode())] if cookie else []
    return Request({"type": "http", "method": "GET", "headers": headers, "scheme": "http", "path": "/"})


@pytest.fixture
def settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LORAPLEX_CONSOLE_SECRET", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_the_local_runtime_makes_one_private_secret_and_keeps_it(settings_env: Path) -> None:
    first = console_session.signing_secret()
    assert len(first) >= 48 and console_session.signing_secret() == first
    mode = stat.S_IMODE(os.stat(settings_env / "console_secret").st_mode)
    assert mode == 0o600  # readable by the server's user only
    assert [p.name for p in settings_env.iterdir()] == ["console_secret"]  # no temporary file left behind


def test_modal_without_a_secret_refuses_to_sign(settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_RUNTIME", "modal")
    get_settings.cache_clear()
    with pytest.raises(RuntimeError, match="LORAPLEX_CONSOLE_SECRET"):
        console_session.signing_secret()
    monkeypatch.setenv("LORAPLEX_CONSOLE_SECRET", "s" * 40)
    get_settings.cache_clear()
    assert console_session.signing_secret() == "s" * 40


def test_a_cookie_signed_with_another_secret_or_altered_is_no_session(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = console_session._serializer().dumps({"key": "ak_1", "csrf": "t"})
    assert console_session.read(_request(saved)) == console_session.ConsoleSession(key_id="ak_1", csrf="t")
    assert console_session.read(_request(saved[:-2] + "xy")) is None
    monkeypatch.setenv("LORAPLEX_CONSOLE_SECRET", "another-secret-" * 3)
    get_settings.cache_clear()
    assert console_session.read(_request(saved)) is None
    assert console_session.read(_request(None)) is None


def _post(origin: str | None, host: str = "console.example", proto: str | None = None) -> Request:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if proto is not None:
        headers.append((b"x-forwarded-proto", proto.encode()))
    return Request({"type": "http", "method": "POST", "headers": headers, "scheme": "http", "path": "/signout"})


def test_a_post_must_carry_the_token_and_come_from_this_host() -> None:
    """Behind a proxy that ends TLS the app sees http while the browser's Origin says https: the host decides."""
    session = console_session.ConsoleSession(key_id="ak_1", csrf="token")
    console_session.check_forgery(_post("https://console.example"), session, "token")
    console_session.check_forgery(_post(None), session, "token")  # no Origin sent (older browsers): the token holds
    for origin in ("https://evil.example", "null", "https://console.example.evil.example"):
        with pytest.raises(console_session.SessionRefused, match="is not this console's"):
            console_session.check_forgery(_post(origin), session, "token")
    for token in (None, "", "other"):
        with pytest.raises(console_session.SessionRefused, match="security token"):
            console_session.check_forgery(_post("https://console.example"), session, token)


def test_the_cookie_is_secure_behind_a_proxy_that_ended_tls(settings_env: Path) -> None:
    from fastapi import Response

    for proto, secure in (("https", True), (None, False)):
        response = Response()
        console_session.save(response, _post(None, proto=proto), console_session.ConsoleSession.fresh("ak_1"))
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and ("Secure" in cookie) is secure
