"""GET /metrics: Prometheus text exposition of the deployments' health figures (labels: deployment, tenant, adapter,
accelerator). Those labels name every tenant's resources, and the endpoint sits on the API port tenants reach, so it
is private by default: it asks for `Authorization: Bearer <LORAPLEX_METRICS_TOKEN>` (a tenant's API key does not
open it), is closed while no token is set, and is open only when the operator says so (LORAPLEX_METRICS_PUBLIC)."""

import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.settings import get_settings
from web.errors import APIError

router = APIRouter(tags=["ops"])


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
    settings = get_settings()
    # An empty LORAPLEX_METRICS_TOKEN= counts as unset: compared as a token it would let anyone in.
    token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else ""
    if token:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise APIError(401, "metrics: send 'Authorization: Bearer <LORAPLEX_METRICS_TOKEN>'", code="invalid_token")
    elif not settings.metrics_public:
        raise APIError(
            403,
            "metrics: private; set LORAPLEX_METRICS_TOKEN and scrape with 'Authorization: Bearer <token>' "
            "(or LORAPLEX_METRICS_PUBLIC=true where tenants cannot reach this port)",
            code="metrics_private",
        )
    runtime = getattr(request.app.state, "deployments", None)
    body = generate_latest(runtime.registry) if runtime is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
