"""The FastAPI application: REST resources and the OpenAI-compatible API under /v1."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from app.db import migrate
from app.settings import get_settings
from web import errors, health
from web.routers import (
    billing,
    datasets,
    deployments,
    finetuning,
    openai_compat,
    prometheus,
    repos,
    stripe_webhook,
    usage,
)
from web.shared_limits import SharedLimiter

MULTIPART_OVERHEAD = 64 * 1024  # bytes of form fields and boundaries allowed beside the file itself


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate, then run the deployment runtime (autoscaler and replica processes) and the supervisor of the shared
    endpoints' engines until shutdown, when every replica and engine started is stopped."""
    from functions.deployments.runtime import DeploymentRuntime
    from functions.engine import close_engines
    from functions.engine.supervisor import EngineSupervisor

    migrate()
    runtime = DeploymentRuntime().start()
    app.state.deployments = runtime
    app.state.engines = EngineSupervisor().start()
    try:
        yield
    finally:
        await run_in_threadpool(app.state.engines.stop)  # first: it would start the engines closed below again
        await run_in_threadpool(runtime.stop)
        await run_in_threadpool(close_engines)  # the shared endpoints' engine processes


def create_app() -> FastAPI:
    app = FastAPI(title="Loraplex", version="0.1.0", lifespan=lifespan)
    app.state.shared_limiter = SharedLimiter()
    errors.install(app)

    @app.middleware("http")
    async def refuse_oversized_uploads(request: Request, call_next):  # type: ignore[no-untyped-def]
        """Refuse a declared-too-large upload before its body is read (the form parser would spool it to disk);
        bodies without a length are still cut at the limit while being copied."""
        limit = get_settings().max_upload_bytes + MULTIPART_OVERHEAD
        declared = request.headers.get("content-length", "")
        if request.method == "POST" and declared.isdigit() and int(declared) > limit:
            return errors.error_response(
                413, f"file: the upload is larger than the {limit} bytes allowed", param="file", code="file_too_large"
            )
        response: Response = await call_next(request)
        return response

    for module in (datasets, finetuning, repos, usage, billing, stripe_webhook, openai_compat, deployments, prometheus):
        app.include_router(module.router)
    app.include_router(health.router)  # 503 when a component is degraded (web/health.py)

    return app
