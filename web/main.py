"""The FastAPI application: REST resources and the OpenAI-compatible API under /v1."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.db import migrate
from web import errors
from web.routers import datasets, finetuning, openai_compat, repos, usage


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    migrate()
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="Loraplex", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    for module in (datasets, finetuning, repos, usage, openai_compat):
        app.include_router(module.router)

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
