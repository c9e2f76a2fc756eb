"""The Engine protocol over a remote pool of serving containers (on Modal: the GPU serving class), for an API process
that loads no model itself.

A `Pool` names one autoscaled pool: the shared endpoints have one per base model (or full fine-tuning), a private
deployment one per config. What reaches a pool is injected by the entry point as `PoolCalls` (app/modal_pools.py
on Modal): `stream` runs one request in the pool and yields its deltas as dicts, `autoscale` sets the pool's
autoscaler bounds. The domain never imports the platform that runs the pool.

Over the wire a request is `request_to_dict` (protocol.py), each delta `asdict(Delta)`, and a refusal or failure
inside the container one last item `{"error": refusal_to_dict(...)}` (`serve_stream` writes them in the container,
`PoolEngine` reads them in the API), so every refusal keeps its kind, field and code across the hop.
"""

import threading
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from app.errors import Refusal
from functions.engine.protocol import (
    Delta,
    Engine,
    EngineUnavailable,
    GenerationRequest,
    RequestFailed,
    delta_from_dict,
    refusal_from_dict,
    refusal_to_dict,
    request_from_dict,
    request_to_dict,
)
from functions.prompts import encode_text


@dataclass(frozen=True)
class Pool:
    """Which container pool serves a request. Every field is part of the pool's identity: requests naming the same
    values share containers, a change of any value is another pool (its own autoscaler)."""

    base_model: str
    model_dir: str = ""  # a full fine-tuning's weights on the volume; "" = the base model's own
    deployment: str = ""  # a private deployment's id; "" = the shared endpoints
    config_version: int = 0  # the deployment's config these containers serve (they report it)
    accelerator: str = ""  # a deployment's accelerator (a10g, l40s, ...); "" = the serving class's default GPU
    engine: str = ""  # native | vllm; "" = the serving image's default (vLLM)
    concurrency: int = 0  # requests per container the autoscaler aims at (scale_up_threshold); 0 = the default


@dataclass(frozen=True)
class Autoscaling:
    """A pool's autoscaler bounds (what Modal's `update_autoscaler` takes)."""

    min_containers: int  # kept up even when idle
    max_containers: int  # at least 1 (Modal refuses 0)
    scaledown_window: int  # seconds an idle container above the minimum stays up


class PoolCalls(Protocol):
    """What the entry point gives the domain to reach container pools."""

    def stream(self, pool: Pool, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one request (request_to_dict) in the pool; its deltas as dicts, as `serve_stream` yields them."""
        ...

    def autoscale(self, pool: Pool, bounds: Autoscaling) -> None:
        """Set the pool's autoscaler bounds now, without a redeploy."""
        ...


# ---- the container's side ---------------------------------------------------------------------------------


async def serve_stream(engine: Engine, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """One request on the container's engine, as the dicts `PoolEngine` reads: deltas, then nothing (complete) or
    one {"error": ...} item. Closing it early (the caller left) closes the engine's stream, freeing its slot."""
    stream = engine.generate(request_from_dict(request))
    try:
        async for delta in stream:
            yield asdict(delta)
    except Exception as exc:  # noqa: BLE001 - the stream ends with the reason, never as if complete
        failed = exc if isinstance(exc, Refusal) else RequestFailed(f"{type(exc).__name__}: {exc}")
        yield {"error": refusal_to_dict(failed)}
    finally:
        await stream.aclose()


# ---- the API's side ---------------------------------------------------------------------------------------


class PoolEngine(Engine):
    """An engine whose requests run in a container pool. `tokenizer` is the base model's, read here (not its
    weights): callers render chat prompts with it before `generate`."""

    def __init__(self, calls: PoolCalls, pool: Pool, tokenizer: Any, context_length: int) -> None:
        self.calls, self.pool = calls, pool
        self.base_model, self.tokenizer, self.context_length = pool.base_model, tokenizer, context_length

    def count_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))

    def stats(self) -> dict:
        return {"base_model": self.base_model, "engine": "pool", "pool": asdict(self.pool)}

    def healthy(self) -> tuple[bool, str]:
        """Always: the containers' health is their platform's to watch (it replaces one that dies)."""
        return True, ""

    def close(self) -> None:
        """Nothing to stop: the pool scales itself."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        stream = self.calls.stream(self.pool, request_to_dict(request))
        finished = False
        try:
            async for item in stream:
                if "error" in item:  # refused or failed inside the container: the same refusal here
                    raise refusal_from_dict(item["error"])
                delta = delta_from_dict(item)
                finished = delta.finish_reason is not None
                yield delta
        except Refusal:
            raise
        except Exception as exc:  # noqa: BLE001 - the container or the call went away: say so, as a refusal
            raise EngineUnavailable(f"the serving container went away ({type(exc).__name__}: {exc})") from exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:  # the caller left: the call into the pool is cancelled with it
                await aclose()
        if not finished:
            raise EngineUnavailable("the serving container ended the answer before it was complete")


class SharedPools:
    """The shared endpoints' engines when the pools serve them: one PoolEngine per base model (or full fine-tuning),
    each with its tokenizer read once."""

    def __init__(self, calls: PoolCalls) -> None:
        self.calls = calls
        self._engines: dict[tuple[str, str], PoolEngine] = {}
        self._lock = threading.Lock()

    def engine(self, base_model: str, model_dir: Path | None = None) -> PoolEngine:
        """Loads a tokenizer on first use (call it off the event loop); never a model."""
        from functions.base_models import load_tokenizer
        from functions.catalog import get_model

        key = (base_model, str(model_dir or ""))
        with self._lock:
            engine = self._engines.get(key)
        if engine is None:
            tokenizer = load_tokenizer(base_model) if model_dir is None else _tokenizer(model_dir)
            pool = Pool(base_model, model_dir=key[1])
            engine = PoolEngine(self.calls, pool, tokenizer, get_model(base_model).context_length)
            with self._lock:
                engine = self._engines.setdefault(key, engine)
        return engine


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
