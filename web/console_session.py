"""The web console's session: which API key signed in, and the token that proves a form or script is the console's.

The cookie holds `{"key": <api key id or null>, "csrf": <random token>}`, signed and timestamped with itsdangerous
(never the key's secret, never readable by scripts: HttpOnly, SameSite=Strict, Secure over https). Every request
re-reads the key by its id, so a revoked or expired key signs its sessions out at once, in every process.

Cross-site request forgery is refused three ways: the cookie is SameSite=Strict (a cross-site request carries
none), an unsafe request with a cookie must carry the session's token (a form field or the `X-CSRF-Token` header,
which a cross-site page cannot set without CORS, which this server never grants), and its `Origin`, when sent, must
name this server's host (the host alone: behind a proxy that ends TLS the scheme the app sees is not the browser's).
"""

import hmac
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from app import tenants
from app.models import ApiKey
from app.settings import get_settings

COOKIE = "loraplex_session"
MAX_AGE_SECONDS = 12 * 3600  # a session lasts a working day; signing in again renews it
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class SessionRefused(Exception):
    """An unsafe request that did not prove it comes from the console (token or origin): a 403."""


@dataclass(frozen=True)
class ConsoleSession:
    key_id: str | None  # the signed-in API key; None before sign-in
    csrf: str
    new: bool = False  # not read from a cookie: set it on the response

    @staticmethod
    def fresh(key_id: str | None = None) -> "ConsoleSession":
        return ConsoleSession(key_id=key_id, csrf=secrets.token_urlsafe(32), new=True)


def read(request: Request) -> ConsoleSession | None:
    """The request's session, or None without a cookie or with one that is forged, altered or too old."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        data = _serializer().loads(raw, max_age=MAX_AGE_SECONDS)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
        return None
    key_id = data.get("key")
    return ConsoleSession(key_id=key_id if isinstance(key_id, str) else None, csrf=data["csrf"])


def current(request: Request) -> ConsoleSession:
    """The request's session, or a new anonymous one (the sign-in form's token needs one)."""
    return read(request) or ConsoleSession.fresh()


def save(response: Response, request: Request, session: ConsoleSession) -> None:
    response.set_cookie(
        COOKIE,
        _serializer().dumps({"key": session.key_id, "csrf": session.csrf}),
        max_age=MAX_AGE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=_https(request),
        path="/",
    )


def clear(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/")


def check_forgery(request: Request, session: ConsoleSession, token: str | None) -> None:
    """Refuse an unsafe request whose token is not the session's, or whose Origin is another site's."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise SessionRefused(f"origin {origin!r} is not this console's")
    if token is None or not hmac.compare_digest(token, session.csrf):
        raise SessionRefused("the form's security token is missing or stale: reload the page and try again")


def signed_in_key(db: Session, request: Request) -> ApiKey | None:
    """The API key of the request's console session, if it is still active; checks the token of an unsafe request
    (the header: only the console's own scripts call the API with a cookie). Raises SessionRefused for a forgery."""
    session = read(request)
    if session is None or session.key_id is None:
        return None
    key = tenants.active_key(db, session.key_id)
    if key is not None:
        check_forgery(request, session, request.headers.get(CSRF_HEADER))
    return key


def _https(request: Request) -> bool:
    """Whether the browser reached us over https: directly, or through a proxy that ended TLS (Modal's web
    endpoints) and says so."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(signing_secret(), salt="loraplex.console.session")


def signing_secret() -> str:
    """LORAPLEX_CONSOLE_SECRET, or on the local runtime a secret made once under data_dir (0600), which every
    process of this machine shares. Modal's containers share no disk that would do, so there it must be set."""
    settings = get_settings()
    if settings.console_secret is not None:
        return settings.console_secret.get_secret_value()
    if settings.runtime == "modal":
        raise RuntimeError("LORAPLEX_CONSOLE_SECRET is not set: the console cannot sign sessions on Modal without it")
    return _secret_file(settings.data_dir / "console_secret")


@lru_cache  # read once per process: every console request and every cookie-signed API call signs or checks
def _secret_file(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # the first process's secret wins; a racing one reads it below
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
