"""Serving engines behind one protocol (protocol.py), and the registry of the engines this process uses.

With `engine_process` (the default) each base model's engine runs in its own process (server.py) and the API
talks to it over local HTTP (remote.py): one per model for the machine, whichever API process started it, found
through the database (registry.py); otherwise the engine runs on a thread of the calling process.
"""

import contextlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from app.settings import Settings, get_settings
from functions.engine.protocol import Engine, EngineUnavailable

if TYPE_CHECKING:
    from functions.engine.native import EngineConfig

_engines: dict[str, Engine] = {}
_started: dict[str, tuple[str, Path | None]] = {}  # key -> (base model, model dir): how to start it again
_borrowed: dict[str, float] = {}  # key -> when its row was last read: engines another API process runs
_lock = threading.Lock()
BORROW_CHECK_SECONDS = 2.0  # how often the address of an engine another process runs is read again


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
        if engine is None or not engine.alive() or _moved(key, engine):  # a dead engine process is replaced
            if get_settings().engine.engine_process:
                engine = _machine_engine(key, base_model, model_dir)
            else:
                engine = create_engine(base_model, model_dir)
            _engines[key] = engine
            _started[key] = (base_model, model_dir)
        return engine


def _machine_engine(key: str, base_model: str, model_dir: Path | None) -> Engine:
    """The machine's engine process of the model: the one another API process runs (registry.py), else one this
    process starts and publishes."""
    from functions.engine import registry
    from functions.engine.remote import RemoteEngine

    for _ in range(2):  # the other process's engine may be replaced meanwhile: look twice
        found = registry.address(key)
        if found is not None:
            _borrowed[key] = time.monotonic()
            return RemoteEngine(base_model, found[0], found[1], model_dir)
        if registry.reserve(key, base_model):
            break
    else:
        raise EngineUnavailable(f"the engine of {base_model} that another API process runs does not answer")
    _borrowed.pop(key, None)
    try:
        engine = RemoteEngine.start(base_model, model_dir)
    except BaseException:
        registry.withdraw([key])  # the next process to need it tries again at once
        raise
    assert engine.process is not None
    registry.publish(key, engine.url, engine.process.pid, engine.context_length)
    return engine


def _moved(key: str, engine: Engine) -> bool:
    """Whether the engine another process runs for us is gone from its row (replaced, or its owner stopped)."""
    checked = _borrowed.get(key)
    if checked is None or time.monotonic() - checked < BORROW_CHECK_SECONDS:
        return False
    from functions.engine import registry

    _borrowed[key] = time.monotonic()
    return registry.current_url(key) != getattr(engine, "url", None)


def owned_engines() -> list[str]:
    """The keys of the engine processes this process started (its supervisor renews their rows)."""
    with _lock:
        return [key for key in _engines if key not in _borrowed]


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
    """Stop the engines this process started (and withdraw their rows); forget those it borrowed."""
    with _lock:
        owned = [key for key in _engines if key not in _borrowed]
        for engine in _engines.values():
            engine.close()
        _engines.clear()
        _started.clear()
        _borrowed.clear()
    if owned and get_settings().engine.engine_process:
        from functions.engine import registry

        with contextlib.suppress(Exception):  # the database may be gone already (tests drop it): the rows go silent
            registry.withdraw(owned)
