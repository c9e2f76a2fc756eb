"""Dependencies shared by the routers: a database session and the calling tenant."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.db import sessions
from app.models import Tenant
from app.tenants import authenticate
from web.errors import APIError


def get_db() -> Iterator[Session]:
    """A session per request; handlers commit what they mean to keep, the rest is rolled back."""
    session = sessions()()
    try:
        yield session
    finally:
        session.close()


Db = Annotated[Session, Depends(get_db)]


def current_tenant(db: Db, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="missing_api_key")
    tenant = authenticate(db, key.strip())
    if tenant is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
