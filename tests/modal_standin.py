"""An in-process stand-in for Modal's cloud, as the API reaches the GPU serving class (app/modal_pools.py).

Why: Modal's cloud cannot be reached from here (no account, no network), and the point of the tests is the code that
runs on both sides of it. So only what Modal itself does is stood in for:
    stand-in  the lookup (`modal.Cls.from_name`), `with_options` / `with_concurrency` variants, instantiation with
              parameters, generator calls (`.generate.remote_gen.aio`), `update_autoscaler` (recorded for the tests
              to assert, and its `min_containers` started), Modal's scheduling of inputs onto containers (one more
              container when every one holds `target` inputs, up to `max_containers`), scale-down, a container's
              death (`kill`: its inputs fail, its heartbeat stops, its @modal.exit never runs), and the Volume.
    real      the serving class's own Python class (app.modal_app.Inference's user class), found and bound the way
              Modal's container entrypoint binds it; its @modal.enter, generator method and @modal.exit bodies
              (app/modal_serving.py); the engine they load (the tiny model); the replica rows and ledger records they
              write; and everything the API does around them (routing, streaming, autoscaler mapping, metering).
A container's @modal.enter runs on a worker thread, as a container starts apart from the caller.
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import modal
from modal._partial_function import _find_callables_for_obj, _PartialFunctionFlags
from modal.cls import _get_class_constructor_signature
from modal.exception import InternalFailure

Key = tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]  # (options, parameters), sorted


class RecordingVolume:
    """Stand-in for the Volume (reload/commit only work inside a Modal container that mounts it)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reload(self) -> None:
        self.calls.append("reload")

    def commit(self) -> None:
        self.calls.append("commit")


@dataclass(eq=False)
class Container:
    key: Key
    instance: Any  # the real serving class's instance, entered
    in_flight: int = 0
    served: int = 0
    killed: bool = False
    exited: bool = False

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.key[1])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.key[0])


@dataclass
class StandInModal:
    serving_cls: Any  # app.modal_app.Inference (a modal.Cls)
    default_target: int  # the class's @modal.concurrent target_inputs
    lookups: list[tuple[str, str]] = field(default_factory=list)
    autoscaler_calls: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)  # every container started, in order
    bounds: dict[Key, dict[str, Any]] = field(default_factory=dict)  # each pool's autoscaler settings, merged
    starting: dict[Key, int] = field(default_factory=dict)  # containers starting to reach min_containers
    failed_starts: list[tuple[Key, Exception]] = field(default_factory=list)  # @modal.enter raised

    def __post_init__(self) -> None:
        self.user_cls = self.serving_cls._get_user_cls()
        self.lock = threading.Lock()

    # ---- what the API calls -------------------------------------------------------------------------------

    def from_name(self, app_name: str, name: str, **_: Any) -> "_Cls":
        self.lookups.append((app_name, name))
        assert name == self.user_cls.__name__, name
        return _Cls(self, {})

    # ---- Modal's side ---------------------------------------------------------------------------------------

    def up(self, key: Key | None = None) -> list[Container]:
        return [c for c in self.containers if not c.exited and not c.killed and (key is None or c.key == key)]

    async def stream(self, key: Key, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One input on a container of the pool, its items as the container yields them; the input fails once its
        container is killed (its process gone, nothing more comes from it)."""
        container = await self._place(key)
        generate = _find_callables_for_obj(container.instance, _PartialFunctionFlags.CALLABLE_INTERFACE)["generate"]
        container.in_flight += 1
        container.served += 1
        stream = generate(request)
        try:
            while True:
                task = asyncio.ensure_future(anext(stream))
                while not task.done():
                    await asyncio.wait({task}, timeout=0.05)
                    if container.killed:
                        task.cancel()
                        raise InternalFailure("the container running this input died")
                try:
                    item = task.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            container.in_flight -= 1
            if not container.killed:
                await stream.aclose()

    async def _place(self, key: Key) -> Container:
        """A container of the pool with room (fewest inputs first), else a new one while max_containers allows."""
        options = dict(key[0])
        target = options.get("target_inputs") or self.default_target
        up = sorted(self.up(key), key=lambda c: c.in_flight)
        if up and (up[0].in_flight < target or len(up) >= self._max(key)):
            return up[0]
        return await asyncio.to_thread(self.start, key)

    def _max(self, key: Key) -> int:
        return int(self.bounds.get(key, {}).get("max_containers") or 1_000)

    def start(self, key: Key) -> Container:
        """A container starts: the real class instantiated with the pool's parameters, its @modal.enter run."""
        instance = self.user_cls.__new__(self.user_cls)
        bound = _get_class_constructor_signature(self.user_cls).bind(**dict(key[1]))
        bound.apply_defaults()
        instance.__dict__.update(bound.arguments)
        for enter in _find_callables_for_obj(instance, _PartialFunctionFlags.ENTER_POST_SNAPSHOT).values():
            enter()
        container = Container(key, instance)
        with self.lock:
            self.containers.append(container)
        return container

    def autoscale(self, key: Key, settings: dict[str, Any]) -> None:
        """Record the call; containers below min_containers start (each on its own thread, as Modal starts them
        apart from the caller)."""
        self.autoscaler_calls.append((dict(key[0]), dict(key[1]), settings))
        merged = self.bounds.setdefault(key, {})
        merged.update({k: v for k, v in settings.items() if v is not None})
        self._top_up(key)

    def _top_up(self, key: Key) -> None:
        with self.lock:
            missing = int(self.bounds.get(key, {}).get("min_containers") or 0) - len(self.up(key))
            missing -= self.starting.get(key, 0)
            self.starting[key] = self.starting.get(key, 0) + max(0, missing)
        for _ in range(missing):
            threading.Thread(target=self._start_kept, args=(key,), daemon=True).start()

    def _start_kept(self, key: Key) -> None:
        try:
            self.start(key)
        except Exception as exc:  # noqa: BLE001 - a container whose @modal.enter raised: Modal logs it, goes on
            self.failed_starts.append((key, exc))
        finally:
            with self.lock:
                self.starting[key] -= 1

    def scale_down(self, key: Key | None = None) -> int:
        """Modal's scale-down of idle containers above the pool's min_containers: their @modal.exit runs."""
        stopped = 0
        for pool in {c.key for c in self.up(key)}:
            floor = int(self.bounds.get(pool, {}).get("min_containers") or 0)
            idle = [c for c in self.up(pool) if c.in_flight == 0]
            for c in idle[: max(0, len(self.up(pool)) - floor)]:
                self.exit(c)
                stopped += 1
        return stopped

    def exit(self, container: Container) -> None:
        for stop in _find_callables_for_obj(container.instance, _PartialFunctionFlags.EXIT).values():
            stop()
        container.exited = True

    def kill(self, container: Container) -> None:
        """The container dies (SIGKILL, preemption): its inputs fail, it writes nothing more, @modal.exit never
        runs. Its heartbeat thread and engine are stopped, as the process holding them is gone. Below the pool's
        min_containers, Modal starts a replacement (here on a thread, as a container starts apart)."""
        container.killed = True
        serving = container.instance.container
        if getattr(serving, "report", None) is not None:
            serving.report.halt()
        serving.engine.close()
        self._top_up(container.key)

    def close(self) -> None:
        """Every container still up exits (the app stopped)."""
        for c in self.up():
            self.exit(c)


class _Cls:
    """Stand-in for a looked-up modal.Cls: option variants, and instances with parameters."""

    def __init__(self, modal_: StandInModal, options: dict[str, Any]) -> None:
        self.modal, self.options = modal_, options

    def with_options(self, **options: Any) -> "_Cls":
        return _Cls(self.modal, self.options | options)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> "_Cls":
        return _Cls(self.modal, self.options | {"max_inputs": max_inputs, "target_inputs": target_inputs})

    def __call__(self, **parameters: Any) -> "_Obj":
        key = (tuple(sorted(self.options.items())), tuple(sorted(parameters.items())))
        return _Obj(self.modal, key)


class _Obj:
    def __init__(self, modal_: StandInModal, key: Key) -> None:
        self.modal, self.key = modal_, key
        self.generate = _Method(modal_, key)

    def update_autoscaler(
        self,
        *,
        min_containers: int | None = None,
        max_containers: int | None = None,
        scaledown_window: int | None = None,
        buffer_containers: int | None = None,
    ) -> None:
        settings = {
            "min_containers": min_containers,
            "max_containers": max_containers,
            "scaledown_window": scaledown_window,
            "buffer_containers": buffer_containers,
        }
        self.modal.autoscale(self.key, settings)


class _Method:
    def __init__(self, modal_: StandInModal, key: Key) -> None:
        self.remote_gen = _RemoteGen(modal_, key)


class _RemoteGen:
    def __init__(self, modal_: StandInModal, key: Key) -> None:
        self.modal, self.key = modal_, key

    def aio(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.modal.stream(self.key, request)


def install(monkeypatch: Any) -> StandInModal:
    """Modal's lookup replaced by the stand-in; the Volume by a recorder. The serving class is the real one."""
    import app.modal_app as modal_app
    from app import queue

    standin = StandInModal(modal_app.Inference, modal_app.SERVE_TARGET_INPUTS)
    monkeypatch.setattr(modal.Cls, "from_name", standin.from_name)
    monkeypatch.setattr(modal_app, "volume", RecordingVolume())
    monkeypatch.setattr(queue, "_spawner", queue._spawner)  # `web` wires Modal's spawn: undone after the test
    return standin


# ---- the API the tests drive: the app `web` builds, over real HTTP ----------------------------------------------


@contextmanager
def serve(api: Any) -> Iterator[str]:
    """`api` (modal_app.web's app) under uvicorn on a free port, lifespan included, until the block ends; its URL.
    Real HTTP, so a stream reaches the client as it is produced (a test can act mid-stream)."""
    import httpx
    import uvicorn

    from conftest import free_port, wait_for

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "the API did not start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
