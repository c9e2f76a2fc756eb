"""Dependencies shared by the routers: a database session, the calling tenant, the deployment runtime."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.db import sessions
from app.models import Tenant
from app.tenants import authenticate
from functions.deployments.runtime import DeploymentRuntime
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


def deployment_runtime(request: Request) -> DeploymentRuntime:
    runtime = getattr(request.app.state, "deployments", None)
    if runtime is None:
        raise APIError(503, "the deployment runtime is not running", code="runtime_unavailable")
    return runtime


Runtime = Annotated[DeploymentRuntime, Depends(deployment_runtime)]
