"""The FastAPI application: REST resources and the OpenAI-compatible API under /v1, and the web console at /."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.db import migrate
from app.settings import get_settings
from functions.engine.pool import PoolCalls, SharedPools
from web import errors, event_renderers, health
from web.bodies import RequestBodies
from web.console import mount as console
from web.routers import (
    api_keys,
    billing,
    datasets,
    deployment_inference,
    deployments,
    events,
    finetuning,
    lorax,
    openai_compat,
    openai_files,
    openai_finetuning,
    prometheus,
    repos,
    stripe_webhook,
    usage,
    webhooks,
)
from web.shared_limits import SharedLimiter


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate, then run the deployment runtime (autoscaler and replica processes) and the supervisor of the shared
    endpoints' engines until shutdown, when every replica and engine started is stopped."""
    from functions.deployments.runtime import DeploymentRuntime
    from functions.engine import close_engines
    from functions.engine.supervisor import EngineSupervisor

    migrate()
    runtime = _pool_runtime(app) or DeploymentRuntime().start()
    app.state.deployments = runtime
    app.state.engines = EngineSupervisor().start()
    try:
        yield
    finally:
        await run_in_threadpool(app.state.engines.stop)  # first: it would start the engines closed below again
        await run_in_threadpool(runtime.stop)
        await run_in_threadpool(close_engines)  # the shared endpoints' engine processes


def _pool_runtime(app: FastAPI) -> Any:
    """Under LORAPLEX_RUNTIME=modal, private deployments are container pools (functions/deployments/modal_runtime.py)
    over the pools the entry point injected (app/modal_app.py's `web`); None on the local runtime."""
    if app.state.pools is None:
        if get_settings().runtime == "modal":
            raise RuntimeError("LORAPLEX_RUNTIME=modal, but no serving pools are wired in (modal_app.py's web does)")
        return None
    from functions.deployments.modal_runtime import PoolRuntime

    return PoolRuntime(app.state.pools).start()


def create_app(pools: PoolCalls | None = None) -> FastAPI:
    """`pools`: where inference runs when the API loads no model (Modal's GPU serving class); None: engines here."""
    app = FastAPI(title="Loraplex", version="0.1.0", lifespan=lifespan)
    app.state.pools = pools
    app.state.shared_pools = SharedPools(pools) if pools is not None else None  # the shared endpoints' engines
    app.state.shared_limiter = SharedLimiter()
    errors.install(app)
    event_renderers.register()  # what this process publishes (deployment transitions, cancels) in the API's shapes

    app.add_middleware(RequestBodies)  # body limits and sound JSON, before any route reads a body

    platform = (datasets, finetuning, repos, usage, billing, stripe_webhook, deployments, events, api_keys, webhooks)
    openai = (openai_compat, openai_files, openai_finetuning)  # OpenAI's API: inference, files and fine-tuning
    for module in (*platform, *openai, deployment_inference, lorax, prometheus):
        app.include_router(module.router)
    app.include_router(health.router)  # 503 when a component is degraded (web/health.py)
    console.install(app)  # pages, static files and security headers (web/console/)

    return app
