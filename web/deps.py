"""Dependencies shared by the routers: a database session, the calling tenant, the deployment runtime."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.db import sessions
from app.models import ApiKey, Tenant
from app.tenants import KeyRefused, authenticate
from functions.deployments.runtime import DeploymentRuntime
from web import console_session, key_scopes
from web.errors import APIError


def get_db() -> Iterator[Session]:
    """A session per request; handlers commit what they mean to keep, the rest is rolled back."""
    session = sessions()()
    try:
        yield session
    finally:
        session.close()


Db = Annotated[Session, Depends(get_db)]


def current_key(request: Request, db: Db, authorization: Annotated[str | None, Header()] = None) -> ApiKey:
    """The request's API key, read from the database each time (a revocation holds at once in every process), and
    allowed by its scope to call this route (web/key_scopes.py). Without an Authorization header, the key the web
    console's session signed in with (its scripts call these same routes; web/console_session.py)."""
    key = _bearer_key(db, authorization) if authorization is not None else _console_key(db, request)
    route = getattr(request.scope.get("route"), "path", request.url.path)  # the template: /v1/deployments/{name}/...
    refusal = key_scopes.refusal(key.scope, request.method, route)
    if refusal is not None:
        raise APIError(403, refusal, code="scope_not_allowed")
    key.tenant  # noqa: B018 - loaded here, on this worker thread, so current_tenant does no I/O (below)
    return key


def _bearer_key(db: Session, authorization: str) -> ApiKey:
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise APIError(401, MISSING_KEY, code="missing_api_key")
    try:
        return authenticate(db, raw.strip())
    except KeyRefused as refused:
        raise APIError(401, refused.message, code=refused.code) from None


def _console_key(db: Session, request: Request) -> ApiKey:
    try:
        key = console_session.signed_in_key(db, request)
    except console_session.SessionRefused as refused:
        raise APIError(403, str(refused), code="csrf_refused") from None
    if key is None:
        raise APIError(401, MISSING_KEY, code="missing_api_key")
    return key


MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
CurrentKey = Annotated[ApiKey, Depends(current_key)]


async def current_tenant(key: CurrentKey) -> Tenant:
    """The key's tenant, already loaded. Async on purpose: a sync dependency is a second hop through the
    threadpool, and a request holding its database connection while it waits for a free thread starves the pool
    under load (200 clients: connections timed out in every request's authentication)."""
    return key.tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]


def deployment_runtime(request: Request) -> DeploymentRuntime:
    runtime = getattr(request.app.state, "deployments", None)
    if runtime is None:
        raise APIError(503, "the deployment runtime is not running", code="runtime_unavailable")
    return runtime


Runtime = Annotated[DeploymentRuntime, Depends(deployment_runtime)]
