"""What one GPU serving container does (the bodies of app/modal_app.py's `Inference`): load the engine on entry,
stream requests from it, report itself, and stop on exit.

A container serves one pool (functions/engine/pool.py `Pool`): a base model (or a full fine-tuning's weights) for
the shared endpoints, or one config of a private deployment. A deployment's container writes its own `replicas`
row (functions/deployments/containers.py: started, ready, heartbeat, stopped, and its time on the ledger) and loads
the deployment's preloaded adapters before it says it is ready. Adapters are read from the Volume: one this
container has not seen yet may have been published after it started, so the Volume is reloaded first.
"""

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from app.settings import get_settings

log = logging.getLogger(__name__)


class ServingContainer:
    """One container's engine and report. `reload_volume` sees what other containers committed (Modal's
    Volume.reload, best effort); `accelerator` is what the container runs on, as priced."""

    def __init__(
        self,
        base_model: str,
        model_dir: str,
        deployment: str,
        config_version: int,
        accelerator: str,
        engine: str,
        reload_volume: Callable[[], None],
    ) -> None:
        self.base_model, self.model_dir, self.deployment = base_model, model_dir, deployment
        self.config_version, self.accelerator, self.kind = config_version, accelerator, engine
        self.reload_volume = reload_volume
        self.engine: Any = None
        self.report: Any = None  # a ContainerReport for a deployment's container
        self.in_flight = 0
        self.seen_adapters: set[str] = set()

    # ---- @modal.enter ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Report the start, load the engine and the preloaded adapters, report readiness (or the failure)."""
        self.reload_volume()
        if self.deployment:
            from functions.deployments.containers import ContainerReport

            settings = get_settings()
            self.report = ContainerReport(
                self.deployment,
                container_id(),
                self.accelerator,
                self.config_version,
                every=settings.engine.engine_health_interval,  # silent 3 of them, the API closes its row
                meter_every=settings.deployments.deployment_metering_seconds,
                in_flight=lambda: self.in_flight,
            ).started()
        try:
            self.engine = _create_engine(self.base_model, Path(self.model_dir) if self.model_dir else None, self.kind)
            if self.deployment:
                self._preload()
        except Exception as exc:
            if self.report is not None:
                self.report.failed(f"{type(exc).__name__}: {exc}")
            raise
        if self.report is not None:
            self.report.ready()

    def _preload(self) -> None:
        """One single-token request per preloaded adapter: the engine loads it into a slot, as for any request."""
        from app.db import session_scope
        from app.models import Deployment
        from functions import repos
        from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams, collect

        with session_scope() as s:
            row = s.get_one(Deployment, self.deployment)
            refs = []
            for name in row.preloaded_adapters or []:
                weights = repos.find(s, row.tenant_id, name)
                if weights is None:
                    raise RuntimeError(f"preloaded adapter {name!r} no longer exists")
                refs.append(AdapterRef(weights.key, weights.path, weights.base_model))
        for ref in refs:
            request = GenerationRequest("Hi", SamplingParams(max_new_tokens=1, temperature=0), ref)
            asyncio.run(collect(self.engine.generate(request)))
            self.seen_adapters.add(ref.key)

    # ---- @modal.method, a generator ---------------------------------------------------------------------

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from functions.engine.pool import serve_stream

        adapter = request.get("adapter")
        if adapter is not None and adapter["key"] not in self.seen_adapters:
            # Published after this container started, perhaps: see the Volume as it is now before reading it.
            self.reload_volume()
            self.seen_adapters.add(adapter["key"])
        self.in_flight += 1
        try:
            async for item in serve_stream(self.engine, request):
                yield item
        finally:
            self.in_flight -= 1

    # ---- @modal.exit ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Report the stop (the row closed, its time billed up to now), then stop the engine."""
        if self.report is not None:
            self.report.stopped()
        if self.engine is not None:
            self.engine.close()


def container_id() -> str:
    """Modal's id of this container (MODAL_TASK_ID); host:pid where there is none."""
    return os.environ.get("MODAL_TASK_ID") or f"{socket.gethostname()}:{os.getpid()}"


def _create_engine(base_model: str, model_dir: Path | None, kind: str) -> Any:
    """The engine of the kind the pool names ("" = the image's configured one, vLLM in the serving image)."""
    from functions.engine import create_engine, engine_config

    settings = get_settings()
    if not kind or kind == settings.engine.kind:
        return create_engine(base_model, model_dir)
    if kind == "vllm":
        from functions.base_models import ensure_local
        from functions.engine.vllm_engine import VLLMEngine

        return VLLMEngine(
            base_model,
            model_dir or ensure_local(base_model),
            max_loras=settings.engine.adapter_cache_size,
            max_lora_rank=settings.engine.max_lora_rank,
        )
    from functions.engine.native import NativeEngine

    return NativeEngine(base_model, model_dir, engine_config(settings))
