"""Which LoRA adapters the native engine holds in its pool's slots, which it is reading, and which are in use.

The pool (lora_pool.LoraPool) keeps adapters' matrices in a fixed number of slots; this manager decides what goes
in them, as vLLM's LRU cache of adapters does (add, pin, evict the least recently used). An adapter a request
names is at any moment one of:

    resident   in a slot; the least recently used slot that no running request pins is the one evicted
    loading    being read on the loader thread (its config was checked; safetensors, weight keys, finite values)
    loaded     read, and waiting for a free slot: the engine thread installs it between two steps
    failed     its read failed: that EngineError answers every request that waits on it, then is forgotten
    absent     none of these: the next request that names it starts its read

A running request pins its adapter's slot (pin, unpin), so an adapter in use is never evicted under it.

Threads: callers' threads check configs and start reads early (prefetch), so a read overlaps the engine's steps;
the loader thread records what it read and wakes the engine (`notify`); the engine thread asks for slots,
installs, pins and unpins. The lock guards what is loading and loaded; the pool itself is the engine thread's.
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from functions.engine.heads import read_head
from functions.engine.lora_pool import AdapterWeights, LoraPool, load_adapter, read_adapter
from functions.engine.protocol import AdapterRef, EngineError


class AdapterManager:
    def __init__(
        self,
        pool: LoraPool,
        base_model: str,
        layer_count: int,
        notify: Callable[[], None],
        head_shape: tuple[int, int],
    ) -> None:
        """notify: wakes the engine loop (a read has ended: requests waiting on it may start or be answered).
        head_shape: (hidden size, vocabulary) of the base model, which a classification head must fit (heads.py)."""
        self.pool = pool
        self.base_model = base_model
        self.layer_count = layer_count
        self.head_shape = head_shape
        self.loads = 0  # adapters installed into a slot since the engine started
        self._notify = notify
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        self._configs: dict[str, dict] = {}  # adapter key -> its checked config, read once
        self._loading: set[str] = set()
        self._loaded: dict[str, AdapterWeights | EngineError] = {}  # read (or failed), not yet in a slot

    def check(self, adapter: AdapterRef) -> dict:
        """The adapter's config, checked against this engine before anything is queued. Raises EngineError."""
        config = self._configs.get(adapter.key)
        if config is None:
            config = read_adapter(adapter.path, self.base_model, adapter.base_model, self.pool.max_rank)
            self._configs[adapter.key] = config
        return config

    def prefetch(self, adapter: AdapterRef, config: dict) -> None:
        """Start reading an adapter that is not resident now, not when the engine loop gets to its request."""
        if adapter.key not in self.pool.resident:
            self._start(adapter, config)

    def slot_for(self, adapter: AdapterRef, config: dict) -> int | EngineError | None:
        """(engine thread) The adapter's slot, installing it when it has been read and a slot is free; the
        EngineError its read failed with; or None while it is loading or every slot is pinned (its read starts
        here if none has)."""
        slot = self.pool.slot_of(adapter.key)
        if slot is not None:
            return slot
        with self._lock:
            ready = self._loaded.get(adapter.key)
        if isinstance(ready, EngineError):
            return ready
        if ready is None:
            self._start(adapter, config)
            return None
        slot = self.pool.free_slot()
        if slot is None:
            return None  # every slot holds an adapter in use: wait for one to finish
        self.pool.install(adapter.key, slot, ready)
        with self._lock:
            del self._loaded[adapter.key]
        self.loads += 1
        return slot

    def forget_failure(self, key: str) -> None:
        """Every request waiting on a failed read has been answered: the next request of the adapter reads it anew."""
        with self._lock:
            self._loaded.pop(key, None)

    def pin(self, slot: int) -> None:
        """A running request uses the slot's adapter: it is not evicted until every such request has unpinned it."""
        self.pool.pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self.pool.pins[slot] -= 1

    def close(self) -> None:
        self._loader.shutdown(wait=False)

    def _start(self, adapter: AdapterRef, config: dict) -> None:
        """Read the adapter on the loader thread, unless it is read or being read."""
        with self._lock:
            if adapter.key in self._loading or adapter.key in self._loaded:
                return
            self._loading.add(adapter.key)
        self._loader.submit(self._load, adapter.key, adapter.path, config)

    def _load(self, key: str, path: Path, config: dict) -> None:
        try:
            adapter = load_adapter(path, config, self.layer_count)
            adapter.head = read_head(path, *self.head_shape)  # None for an adapter without one
            weights: AdapterWeights | EngineError = adapter
        except EngineError as exc:
            weights = exc
        except Exception as exc:  # noqa: BLE001 - unreadable files are the request's error
            weights = EngineError(f"the adapter could not be read: {exc}", "model")
        with self._lock:
            self._loaded[key] = weights
            self._loading.discard(key)
        self._notify()
