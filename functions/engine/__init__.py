"""Serving engines behind one protocol (protocol.py), and the per-process registry of started engines.

With `engine_process` (the default) each base model's engine runs in its own process (server.py) and the API
talks to it over local HTTP (remote.py); otherwise the engine runs on a thread of the calling process.
"""

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from app.settings import Settings, get_settings
from functions.engine.protocol import Engine

if TYPE_CHECKING:
    from functions.engine.native import EngineConfig

_engines: dict[str, Engine] = {}
_started: dict[str, tuple[str, Path | None]] = {}  # key -> (base model, model dir): how to start it again
_lock = threading.Lock()


def engine_config(settings: Settings) -> "EngineConfig":
    from functions.engine.native import EngineConfig

    return EngineConfig(
        dtype=settings.engine.engine_dtype,
        adapter_slots=settings.engine.adapter_cache_size,
        max_lora_rank=settings.engine.max_lora_rank,
        kv_cache_bytes=settings.engine.kv_cache_mb * 1024 * 1024,
        max_batch=settings.engine.max_batch_size,
        max_waiting=settings.engine.max_queued_requests,
        prefill_chunk=settings.engine.prefill_chunk_tokens,
        stall_seconds=settings.engine.engine_stall_seconds,
    )


def create_engine(base_model: str, model_dir: Path | None = None, background: bool = True) -> Engine:
    """An engine in this process, of the configured kind."""
    settings = get_settings()
    if settings.engine.kind == "vllm":
        from functions.base_models import ensure_local
        from functions.engine.vllm_engine import VLLMEngine

        return VLLMEngine(
            base_model,
            model_dir or ensure_local(base_model),
            max_loras=settings.engine.adapter_cache_size,
            max_lora_rank=settings.engine.max_lora_rank,
        )
    from functions.engine.native import NativeEngine

    return NativeEngine(base_model, model_dir, engine_config(settings), background=background)


def engine_key(base_model: str, model_dir: Path | None = None) -> str:
    return str(model_dir or base_model)


def get_engine(base_model: str, model_dir: Path | None = None) -> Engine:
    """The engine for this base model (or full-model version directory), started on first use."""
    key = engine_key(base_model, model_dir)
    with _lock:
        engine = _engines.get(key)
        if engine is None or not engine.alive():  # a dead engine process is replaced
            if get_settings().engine.engine_process:
                from functions.engine.remote import RemoteEngine

                engine = RemoteEngine.start(base_model, model_dir)
            else:
                engine = create_engine(base_model, model_dir)
            _engines[key] = engine
            _started[key] = (base_model, model_dir)
        return engine


def started_engines() -> dict[str, tuple[str, Path | None]]:
    """Every engine started so far (and not closed), by key: what the supervisor (supervisor.py) watches."""
    with _lock:
        return dict(_started)


def current_engine(key: str) -> Engine | None:
    with _lock:
        return _engines.get(key)


def replace_engine(key: str, stale: Engine | None) -> Engine:
    """Stop `stale` (when given) and start its successor; when a request replaced it meanwhile, that one stays."""
    with _lock:
        if stale is not None and _engines.get(key) is stale:
            del _engines[key]
    if stale is not None:
        stale.close()
    return get_engine(*_started[key])


def close_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.close()
        _engines.clear()
        _started.clear()
