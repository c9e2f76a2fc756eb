"""Serving engines behind one protocol, and the per-process registry of loaded engines."""

import threading

from functions.engine.protocol import Engine

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def create_engine(base_model: str, adapter_slots: int = 8) -> Engine:
    from functions.engine.hf import HFEngine

    return HFEngine(base_model, adapter_slots=adapter_slots)


def get_engine(base_model: str, adapter_slots: int = 8) -> Engine:
    """The process's engine for this base model, loaded on first use."""
    with _lock:
        if base_model not in _engines:
            _engines[base_model] = create_engine(base_model, adapter_slots)
        return _engines[base_model]
