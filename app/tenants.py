"""API keys of tenants. A key is shown once, at creation; only its SHA-256 is stored. (A tenant is created with its
billing account: billing/signup.py.)"""

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant

KEY_PREFIX = "lpx_"


def hash_key(raw: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough; no salt or slow KDF is needed.
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(session: Session, tenant: Tenant) -> str:
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, prefix=raw[:10], key_hash=hash_key(raw)))
    return raw


def authenticate(session: Session, raw: str) -> Tenant | None:
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw), ApiKey.revoked_at.is_(None)))
    return key.tenant if key is not None else None
