"""The engine process: one base model's engine behind a small HTTP API on localhost.

    POST /generate   a GenerationRequest (protocol.request_to_dict) -> NDJSON, one Delta per line, the last with
                     its finish_reason; a request that fails once streaming ends with one line
                     {"error", "kind", ...} instead (protocol.refusal_to_dict: the refusal by kind). Before
                     streaming, a request refused or failed is a 400 with that body
    GET  /health     200 {"status": "ok", ...load figures} once the model is loaded and while it makes progress;
                     503 {"status": "unhealthy", "reason", ...} when it does not (the API then replaces it)

The engine loop runs on the main thread (torch's OpenMP workers run fastest there) and the HTTP server on a
second thread; tokens cross between them through the engine's thread-safe hand-off.
"""

import json
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.errors import Refusal
from functions.engine.protocol import (
    ClientGone,
    Engine,
    RequestFailed,
    refusal_to_dict,
    request_from_dict,
    unless_gone,
)


def create_engine_app(engine: Engine) -> FastAPI:
    api = FastAPI(title="Loraplex engine", docs_url=None, redoc_url=None)

    @api.get("/health")
    def health() -> JSONResponse:
        ok, reason = engine.healthy()
        body = {"status": "ok" if ok else "unhealthy", "context_length": engine.context_length, **engine.stats()}
        return JSONResponse(body if ok else body | {"reason": reason}, status_code=200 if ok else 503)

    @api.post("/generate", response_model=None)
    async def generate(http: Request) -> Any:
        request = request_from_dict(await http.json())
        stream = engine.generate(request)
        try:
            first = await unless_gone(anext(stream), http.is_disconnected)  # a queued request whose caller left
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Refusal as exc:  # the client rebuilds it by kind; the API gives it its status
            return JSONResponse(refusal_to_dict(exc), status_code=400)

        async def lines() -> Any:
            try:
                yield json.dumps(asdict(first)) + "\n"
                async for delta in stream:
                    yield json.dumps(asdict(delta)) + "\n"
            except Exception as exc:  # noqa: BLE001 - the stream ends with the reason, never as if complete
                failed = exc if isinstance(exc, Refusal) else RequestFailed(f"{type(exc).__name__}: {exc}")
                yield json.dumps(refusal_to_dict(failed)) + "\n"
            finally:
                await stream.aclose()  # the API went away: free the request's slot at once

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return api


def serve_engine(base_model: str, model_dir: Path | None, host: str, port: int, parent: int | None = None) -> None:
    """Load the engine, serve HTTP on a thread, run the engine loop here until SIGTERM/SIGINT, or until the process
    `parent` (default: the parent process) is gone.

    The parent watch starts before the model loads: an engine whose parent dies while it loads would otherwise
    serve nobody, forever. While it loads there is nothing to save, so SIGTERM keeps its default action, which ends
    the process at once even inside a long native call (a Python handler would wait for that call to return); it
    is set explicitly because an ignored signal stays ignored across exec, whatever the spawner left it at.
    """
    import uvicorn

    from functions.engine import create_engine

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = parent or os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    engine: Engine = create_engine(base_model, model_dir, background=False)
    config = uvicorn.Config(create_engine_app(engine), host=host, port=port, log_level="warning", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    # uvicorn installs its signal handlers only when it runs on the main thread: here signals are ours, below
    http = threading.Thread(target=server.run, name="engine-http", daemon=True)

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True
        engine.close()

    signal.signal(signal.SIGTERM, stop)  # serving from here: requests in flight end before the process does
    signal.signal(signal.SIGINT, stop)
    http.start()
    engine.run()  # the native engine's loop, until close(); an engine with its own loop (vLLM) returns at once
    while not server.should_exit:
        time.sleep(0.5)
    http.join(timeout=10)


def _exit_with_parent(parent: int) -> None:
    """End this process once `parent` is gone (this one is then reparented, so its parent pid changes): a SIGTERM to
    itself ends a loading engine at once and stops a serving one gracefully (serve_engine); one still there after
    a grace period (its stop stuck behind a hung step) exits without more ado."""
    import logging

    grace = 15.0
    while os.getppid() == parent:
        time.sleep(0.5)
    logging.getLogger("loraplex.engine").warning("the process that started this engine (pid %d) is gone", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)
