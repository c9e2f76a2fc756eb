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
