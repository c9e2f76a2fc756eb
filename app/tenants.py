"""API keys of tenants: issue, authenticate, revoke. A key is shown once, at creation; only its SHA-256 is stored.
(A tenant is created with its billing account and first key: billing/signup.py.)

A key has a name, a scope (what it may call: web/key_scopes.py) and an optional expiry. Authentication reads the
database on every request, so a revocation holds at once in every API process; it writes `last_used_at` at most
once a minute per key, with a conditional UPDATE, so a busy key costs no write per request.
"""

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.errors import Conflict, NotFound
from app.models import ApiKey, Tenant

KEY_PREFIX = "lpx_"
PREFIX_SHOWN = 10  # characters of the key kept in clear: "lpx_" and 6 random ones, shown in listings

Scope = Literal["all", "inference", "read"]
SCOPES: tuple[str, ...] = get_args(Scope)
LAST_USED_EVERY = timedelta(minutes=1)  # `last_used_at` is this precise, at most one write per key per period


class KeyRefused(Exception):
    """The key given cannot authenticate. `code`: invalid_api_key | revoked_api_key | expired_api_key. The
    messages speak only of the key given (whoever holds it owns it), never of other keys or tenants."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def hash_key(raw: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough; no salt or slow KDF is needed.
    return hashlib.sha256(raw.encode()).hexdigest()


def issue_key(
    session: Session, tenant: Tenant, *, name: str, scope: Scope = "all", expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """A new key (added to the session, flushed for its id) and its secret, which is not stored anywhere."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant.id,
        prefix=raw[:PREFIX_SHOWN],
        key_hash=hash_key(raw),
        name=name,
        scope=scope,
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, raw


def create_key(session: Session, tenant: Tenant) -> str:
    """A tenant's first key (sign-up, the demo): every scope, no expiry."""
    return issue_key(session, tenant, name="default")[1]


def authenticate(session: Session, raw: str, now: datetime | None = None) -> ApiKey:
    """The active key whose secret is `raw` (its tenant is `key.tenant`), or KeyRefused. Commits the session when
    `last_used_at` is due: call it first thing on a request's session."""
    now = now or datetime.now(UTC)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw)))
    if key is None:
        raise KeyRefused("invalid_api_key", "invalid API key")
    _check_active(key, now)
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_EVERY:
        _touch(session, key, now)
    return key


def active_key(session: Session, key_id: str) -> ApiKey | None:
    """The key with this id while it is active (neither revoked nor expired): a console session's, which holds the
    key's id, never its secret."""
    key = session.get(ApiKey, key_id)
    try:
        return None if key is None else _check_active(key, datetime.now(UTC))
    except KeyRefused:
        return None


def _check_active(key: ApiKey, now: datetime) -> ApiKey:
    if key.revoked_at is not None:
        raise KeyRefused("revoked_api_key", f"this API key ({key.prefix}...) was revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise KeyRefused(
            "expired_api_key",
            f"this API key ({key.prefix}...) expired at {key.expires_at.isoformat()}; use another key to create a new "
            "one (POST /v1/api_keys)",
        )
    return key


def _touch(session: Session, key: ApiKey, now: datetime) -> None:
    """Set `last_used_at` unless another request (of any process) did within the period: the condition makes the
    concurrent requests of a minute write once."""
    due = or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_EVERY)
    session.execute(update(ApiKey).where(ApiKey.id == key.id, due).values(last_used_at=now))
    session.commit()
    session.refresh(key)


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """Every key of the tenant, revoked and expired ones included, oldest first."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)))


def revoke_key(session: Session, tenant_id: str, key_id: str, now: datetime | None = None) -> ApiKey:
    """Revoke one of the tenant's keys (idempotent: a revoked key stays as it was). Refused (Conflict) when no other
    active key would remain, so a tenant cannot lock itself out; another tenant's key is NotFound. The caller
    commits."""
    now = now or datetime.now(UTC)
    # Locks the tenant's keys on PostgreSQL, so two revocations of its last two keys cannot both pass the check
    # below; SQLite serializes writers, and the conditional UPDATE reads inside the write.
    keys = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).with_for_update()).all()
    key = next((k for k in keys if k.id == key_id), None)
    if key is None:
        raise NotFound(f"The API key '{key_id}' does not exist", field="key_id", code="api_key_not_found")
    if key.revoked_at is not None:
        return key
    other = aliased(ApiKey)
    another_active = exists().where(
        other.tenant_id == tenant_id,
        other.id != key_id,
        other.revoked_at.is_(None),
        or_(other.expires_at.is_(None), other.expires_at > now),
    )
    revoked = session.execute(
        update(ApiKey)
        .where(and_(ApiKey.id == key_id, ApiKey.revoked_at.is_(None), another_active))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    if revoked.rowcount == 0:  # type: ignore[attr-defined]  # a CursorResult's
        session.refresh(key)
        if key.revoked_at is not None:  # a concurrent request revoked this same key
            return key
        raise Conflict(
            f"key_id: '{key_id}' is your last active API key; create another (POST /v1/api_keys) before revoking it, "
            "or no key could use the API any more",
            field="key_id",
            code="last_active_key",
        )
    session.refresh(key)
    return key
