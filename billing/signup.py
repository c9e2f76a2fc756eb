"""Sign-up: a new tenant, its billing account (with the developer sign-up credits) and its first API key."""

from sqlalchemy.orm import Session

from app.models import BillingAccount, Tenant
from app.names import NAME
from app.tenants import create_key
from billing.credits import grant_signup_credits


def create_tenant(session: Session, name: str, plan: str = "developer") -> tuple[Tenant, str]:
    """The tenant and its first API key (the raw key; it is not stored). ValueError with the name rule for a bad
    name: a tenant's name is shown beside its resources."""
    NAME.check(name)
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    session.add(BillingAccount(tenant_id=tenant.id, plan=plan))
    if plan == "developer":
        grant_signup_credits(session, tenant.id)
    return tenant, create_key(session, tenant)
