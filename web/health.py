"""GET /health: each component's state, for operators, probes and load balancers.

    200 {"status": "ok", "components": {...}}        every component works
    503 {"status": "degraded", "components": {...}}  one does not; the components say which and why

The status code carries the verdict because that is what load balancers and probes read. Components: the
database (a query), the workers `serve` runs (app/supervisor.py: expected, alive, restarts), the shared endpoints'
engines (functions/engine/supervisor.py: each one's state, from its own /health, and restarts) and the deployment
runtime (its `role`: "holder" in the one API process that runs the replicas, "follower" in the others). It is
public, so it names no tenant, deployment or adapter.
"""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["ops"])


@router.get("/health")
def health(request: Request) -> JSONResponse:
    state = request.app.state
    workers = getattr(state, "workers", None)  # set by `loraplex serve`; an app built otherwise runs none
    engines = getattr(state, "engines", None)  # set by the lifespan
    runtime = getattr(state, "deployments", None)
    components: dict[str, dict[str, Any]] = {
        "database": _database(),
        "workers": workers.status() if workers is not None else {"status": "ok", "expected": 0, "alive": 0},
        "engines": engines.status() if engines is not None else {"status": "ok", "engines": []},
        "deployments": runtime.health() if runtime is not None else {"status": "ok", "ready_replicas": 0},
    }
    ok = all(c["status"] == "ok" for c in components.values())
    return JSONResponse({"status": "ok" if ok else "degraded", "components": components}, 200 if ok else 503)


def _database() -> dict[str, Any]:
    from app.db import session_scope

    try:
        with session_scope() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure is the answer; its text may hold the server's address
        return {"status": "degraded", "error": f"unreachable ({type(exc).__name__})"}
    return {"status": "ok"}
