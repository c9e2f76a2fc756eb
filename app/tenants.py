"""Tenants and their API keys. A key is shown once, at creation; only its SHA-256 is stored."""

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, BillingAccount, Tenant
from app.names import NAME

KEY_PREFIX = "lpx_"


def hash_key(raw: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough; no salt or slow KDF is needed.
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(session: Session, tenant: Tenant) -> str:
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, prefix=raw[:10], key_hash=hash_key(raw)))
    return raw


def create_tenant(session: Session, name: str, plan: str = "developer") -> tuple[Tenant, str]:
    """A new tenant, its billing account with the developer sign-up credits, and its first API key (the raw
    key; it is not stored)."""
    from billing.credits import grant_signup_credits

    NAME.check(name)  # ValueError with the rule: a tenant's name is shown beside its resources
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    session.add(BillingAccount(tenant_id=tenant.id, plan=plan))
    if plan == "developer":
        grant_signup_credits(session, tenant.id)
    return tenant, create_key(session, tenant)


def authenticate(session: Session, raw: str) -> Tenant | None:
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw), ApiKey.revoked_at.is_(None)))
    return key.tenant if key is not None else None
