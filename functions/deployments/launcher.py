"""A replica's process: imports torch, transformers and the engine first, then reads one JSON line from stdin and
becomes that engine process (functions/engine/server.py's `serve_engine`).

    {"base_model": "smollm2-135m", "port": 41234, "model_dir": null, "env": {"LORAPLEX_ENGINE": "native", ...}}

Started ahead of need (a spare), it turns a wake from Standby into a weight load: the imports, most of a fresh
process's start, are already done. It prints one line `LAUNCHER_TIMINGS {...}` (seconds spent importing, waiting
for the command, loading the engine) that the runtime reads back for its cold-start figures.

    python -m functions.deployments.launcher
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TIMINGS_PREFIX = "LAUNCHER_TIMINGS "


def main() -> None:
    began = time.monotonic()
    _import_everything()
    imported = time.monotonic()
    line = sys.stdin.readline()
    if not line.strip():  # the runtime went away or stopped its spare
        return
    command = json.loads(line)
    handed = time.monotonic()
    os.environ.update(command.get("env") or {})

    from app.logs import configure_logging
    from app.settings import get_settings

    get_settings.cache_clear()  # settings read from the environment just given
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read by OpenMP when torch loaded: too late for us
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    configure_logging()
    timings: dict[str, Any] = {"imports_s": round(imported - began, 3), "idle_s": round(handed - imported, 3)}
    _time_engine_creation(timings, handed)

    from functions.engine.server import serve_engine

    model_dir = Path(command["model_dir"]) if command.get("model_dir") else None
    serve_engine(command["base_model"], model_dir, "127.0.0.1", int(command["port"]))


def _import_everything() -> None:
    """What an engine process imports before it can load weights; transformers imports much of it lazily, on the
    first tokenizer or model load, so those modules are named here."""
    import fastapi  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import functions.engine.native  # noqa: F401
    import functions.engine.server  # noqa: F401


def _time_engine_creation(timings: dict[str, Any], handed: float) -> None:
    """Wrap the engine factory that serve_engine calls, to print how long the weights took to load."""
    import functions.engine as engines

    create = engines.create_engine

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        engine = create(*args, **kwargs)
        timings["load_s"] = round(time.monotonic() - started, 3)
        timings["handoff_to_loaded_s"] = round(time.monotonic() - handed, 3)
        print(TIMINGS_PREFIX + json.dumps(timings), flush=True)
        return engine

    engines.create_engine = timed


if __name__ == "__main__":
    main()
