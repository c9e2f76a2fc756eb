"""How the API (the `web` function) reaches the GPU serving class on Modal: functions/engine/pool.py's `PoolCalls`,
over Modal's lookup of the deployed class.

    Pool (base model, deployment, config, accelerator, engine, concurrency)
      -> Cls.from_name(app, "Inference")                  the deployed serving class
         .with_options(gpu=...)                             a deployment's accelerator picks the GPU
         .with_concurrency(max_inputs, target_inputs)       scale_up_threshold: requests per container aimed at
         (base_model=..., deployment=..., ...)              the parameters: one container pool per value set
      -> .generate.remote_gen.aio(request)                  a generator method: deltas stream back as they come
      -> .update_autoscaler(min_containers, ...)            the pool's bounds, live, without a redeploy

Each distinct Pool is its own autoscaled pool of containers on Modal (parameters and options both partition it).
"""

import threading
from collections.abc import AsyncIterator
from typing import Any

import modal

from functions.engine.pool import Autoscaling, Pool

# A deployment's accelerator (functions/deployments/config.py) -> Modal's GPU type.
GPUS = {"a10g": "A10G", "l40s": "L40S", "a100-80gb": "A100-80GB", "h100": "H100"}


class ModalPools:
    """PoolCalls over the deployed app's serving class (looked up once, lazily: no network until the first call)."""

    def __init__(self, app_name: str, class_name: str, max_inputs: int) -> None:
        """max_inputs: requests one container takes at once (the class's @modal.concurrent); a deployment's
        concurrency target above it raises it for that pool."""
        self.app_name, self.class_name, self.max_inputs = app_name, class_name, max_inputs
        self._cls: Any = None
        self._objects: dict[Pool, Any] = {}
        self._lock = threading.Lock()

    async def stream(self, pool: Pool, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self._object(pool).generate.remote_gen.aio(request):
            yield item

    def autoscale(self, pool: Pool, bounds: Autoscaling) -> None:
        self._object(pool).update_autoscaler(
            min_containers=bounds.min_containers,
            max_containers=bounds.max_containers,
            scaledown_window=bounds.scaledown_window,
        )

    def _object(self, pool: Pool) -> Any:
        """The serving class's instance for the pool (Modal's Obj; cached: it is a handle, not a container)."""
        with self._lock:
            obj = self._objects.get(pool)
            if obj is None:
                obj = self._objects[pool] = variant(self._lookup(), pool, self.max_inputs)(**parameters(pool))
            return obj

    def _lookup(self) -> Any:
        if self._cls is None:
            self._cls = modal.Cls.from_name(self.app_name, self.class_name)
        return self._cls


def variant(cls: Any, pool: Pool, max_inputs: int) -> Any:
    """The class with the pool's options: its GPU, and its concurrency target."""
    if pool.accelerator:
        cls = cls.with_options(gpu=GPUS[pool.accelerator])
    if pool.concurrency:
        cls = cls.with_concurrency(max_inputs=max(max_inputs, pool.concurrency), target_inputs=pool.concurrency)
    return cls


def parameters(pool: Pool) -> dict[str, Any]:
    """The serving class's modal.parameter values (app/modal_app.py `Inference`)."""
    return {
        "base_model": pool.base_model,
        "model_dir": pool.model_dir,
        "deployment": pool.deployment,
        "config_version": pool.config_version,
        "accelerator": pool.accelerator,
        "engine": pool.engine,
    }
