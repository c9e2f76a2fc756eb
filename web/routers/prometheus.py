"""GET /metrics: Prometheus text exposition of the deployments' health figures (labels: deployment, tenant, adapter,
accelerator). Open unless LORAPLEX_METRICS_TOKEN is set, then it asks for `Authorization: Bearer <token>`."""

import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.settings import get_settings
from web.errors import APIError

router = APIRouter(tags=["ops"])


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
    token = get_settings().metrics_token
    if token is not None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise APIError(401, "metrics: send 'Authorization: Bearer <LORAPLEX_METRICS_TOKEN>'", code="invalid_token")
    runtime = getattr(request.app.state, "deployments", None)
    body = generate_latest(runtime.registry) if runtime is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
