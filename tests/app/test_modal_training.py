"""Training on Modal (SQLite and PostgreSQL): each job is spawned on its GPU (the one it names, else the first of its
size tier's that holds it), and a preempted job resumes from its last committed checkpoint.

Driven through the Modal app's own code: `spawn_event`, `train`'s body (`_run_event`, which installs the volume's
commit as app/volume.py's `committing_with` hook, so a checkpoint is committed as soon as it is saved) and `reap`.
Modal's cloud cannot be reached from here (no account, no network), so two pieces are stand-ins, in this file:
- `CloudVolume` for modal.Volume: the container's mount is the platform's volume directory and the cloud's copy a
  directory beside it. commit() copies the mount to the cloud, reload() and a container's start copy the cloud to the
  mount, and once a container is killed nothing it does reaches the cloud (Modal runs nothing after preempting it).
  It records what each commit carried, and from which container.
- `ModalFunctions` for modal.Function.from_name(...)[.with_options(gpu=...)].spawn(...): it records each spawn, and
  `run` does what Modal would with it: a fresh container (the volume as last committed) running the function's real
  body with `.local()`.
Everything else is real: the API, the database, the queue's claims and leases, the trainer on the tiny model.
"""

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app import queue
from app.settings import get_settings
from app.worker_main import wire
from conftest import Platform
from finetune_helpers import metrics, ready_dataset, start_job, tensors, train, version_dir

modal = pytest.importorskip("modal")
import app.modal_app as modal_app  # noqa: E402

NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")
ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in NAMES] + [
    {"prompt": "Say hi to Ivy", "completion": "Hi Ivy!", "split": "evaluation"}
]
# 8 rows, 2 per step: 4 steps an epoch, 8 in all; checkpoints at steps 3 and 6, and at the last step.
CONFIG = {"dataset": "greetings", "epochs": 2, "effective_batch_size": 2, "learning_rate": 1e-2, "rank": 4}
LEASE_SECONDS = 3  # heartbeats every second keep it; a killed container's runs out 3 s after its last beat
# `.local()` warns that the function is not running in a Modal container; here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")


class ContainerKilled(BaseException):
    """Modal preempting the container: a BaseException, so no `except Exception` of ours records a failure or
    schedules a retry, as none would run in a container that is gone."""


@dataclass(frozen=True)
class Commit:
    container: int  # 0: the web container's commit of the upload; then one number per container started
    lost: bool  # made after the container was killed: it never reached the cloud
    checkpoints: tuple[str, ...]  # of the 'resumed' job's version: "1", "1/resume", ...
    published: bool  # the version's own weights are there


class CloudVolume:
    """Stand-in for modal.Volume: see the module's docstring."""

    def __init__(self, mount: Path, cloud: Path) -> None:
        self.mount, self.cloud = mount, cloud
        self.container, self.killed = 0, False
        self.commits: list[Commit] = []

    def commit(self) -> None:
        if not self.killed:
            _copy_tree(self.mount, self.cloud)
        self.commits.append(Commit(self.container, self.killed, *_job_files(self.mount)))

    def reload(self) -> None:
        _copy_tree(self.cloud, self.mount)

    def start_container(self) -> None:
        """A new container mounts the volume as last committed; what the last one did not commit is gone."""
        self.container, self.killed = self.container + 1, False
        self.reload()

    def kill(self) -> None:
        self.killed = True


def _copy_tree(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)  # base-model weights stay links to the session's copy


def _job_files(root: Path) -> tuple[tuple[str, ...], bool]:
    versions = list((root / "adapters").glob("*/resumed/1"))
    if not versions:
        return (), False
    checkpoints = versions[0] / "checkpoints"
    found = [p.relative_to(checkpoints) for p in [*checkpoints.glob("*"), *checkpoints.glob("*/resume")] if p.is_dir()]
    names = tuple(sorted(str(p) for p in found if not p.parts[0].startswith(".")))  # not a write still in flight
    return names, (versions[0] / "adapter_model.safetensors").exists()


@dataclass(frozen=True)
class Call:
    function: str  # "train" or "handle_event"
    gpu: str | None  # with_options(gpu=...); None: the function's declared GPU
    event_id: str


class ModalFunctions:
    """Stand-in for deployed modal.Function handles: see the module's docstring."""

    def __init__(self, volume: CloudVolume) -> None:
        self.volume = volume
        self.calls: list[Call] = []

    def from_name(self, app_name: str, name: str, **_: Any) -> "_Handle":
        assert app_name == modal_app.APP_NAME
        return _Handle(self, name, None)

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls

    def run(self, call: Call) -> None:
        self.volume.start_container()
        getattr(modal_app, call.function).local(call.event_id)

    def reap(self) -> list[Call]:
        """One run of the scheduled `reap` function, in a fresh container (nothing wired yet); what it spawned."""
        queue._spawner = None
        modal_app.reap.local()
        return self.take()


@dataclass(frozen=True)
class _Handle:
    owner: ModalFunctions
    name: str
    gpu: str | None

    def with_options(self, *, gpu: str) -> "_Handle":
        return _Handle(self.owner, self.name, gpu)

    def spawn(self, event_id: str) -> None:
        self.owner.calls.append(Call(self.name, self.gpu, event_id))


@pytest.fixture
def on_modal(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModalFunctions]:
    """The stand-ins installed; call `switch(on_modal)` once what the test prepares locally is done."""
    volume = CloudVolume(platform.data_dir / "volume", platform.data_dir / "cloud-volume")
    functions = ModalFunctions(volume)
    monkeypatch.setattr(modal_app, "volume", volume)
    monkeypatch.setattr(modal.Function, "from_name", functions.from_name)
    monkeypatch.setattr(queue, "_spawner", None)  # restored after the test: other tests run on the local runtime
    monkeypatch.setenv("LORAPLEX_LEASE_SECONDS", str(LEASE_SECONDS))
    get_settings.cache_clear()
    yield functions
    get_settings.cache_clear()


def switch(functions: ModalFunctions, monkeypatch: pytest.MonkeyPatch) -> None:
    """From here the platform runs as on Modal: the API spawns events through spawn_event, and the volume holds what
    the web container committed (its uploads)."""
    monkeypatch.setenv("LORAPLEX_RUNTIME", "modal")
    get_settings.cache_clear()
    wire(modal_app.spawn_event)  # as the `web` function does
    functions.volume.commit()


def test_each_job_is_spawned_on_its_gpu(
    client: TestClient, alice: dict[str, str], on_modal: ModalFunctions, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready_dataset(client, alice, ROWS, "greetings")
    switch(on_modal, monkeypatch)
    tiered = start_job(client, alice, repo="tiered", **CONFIG)
    named = start_job(client, alice, repo="named", accelerator="a100-80gb", **CONFIG)
    modal_app.spawn_event("ev-gone", "finetune.requested")  # no such event: the declared GPU
    modal_app.spawn_event("ev-upload", "dataset.uploaded")
    calls = on_modal.take()
    assert [(c.function, c.gpu) for c in calls] == [
        ("train", "A10G"),  # the tiny model is in the up-to-16B tier, whose first GPU holds it
        ("train", "A100-80GB"),
        ("train", None),
        ("handle_event", None),
    ]
    jobs = {job["id"]: job for job in client.get("/v1/finetuning/jobs", headers=alice).json()}
    assert set(jobs) == {tiered["id"], named["id"]} and jobs[named["id"]]["config"]["accelerator"] == "a100-80gb"


def test_the_gpu_is_a_modal_option_of_the_train_function() -> None:
    """with_options(gpu=...) on the declared function itself (offline: Modal checks the options as it binds them)."""
    from modal._utils.async_utils import synchronizer

    for gpu in ("A10G", "L40S", "A100-80GB", "H100"):
        variant = synchronizer._translate_in(modal_app.train.with_options(gpu=gpu))
        assert variant._options.resources.gpu_config.gpu_type == gpu
        assert variant._options.resources.gpu_config.count == 1


def test_a_preempted_job_resumes_from_its_last_committed_checkpoint(
    client: TestClient, alice: dict[str, str], platform: Platform, on_modal: ModalFunctions, monkeypatch: Any
) -> None:
    """Attempt 1 is preempted at step 5, after checkpoint 1 (step 3) was committed. Modal's own retry comes while the
    dead container's lease still holds, and leaves the event; once the lease runs out the reaper re-spawns it, on the
    same GPU, and the new container resumes from checkpoint 1 and ends where an uninterrupted run ends."""
    import functions.train_progress

    ready_dataset(client, alice, ROWS, "greetings")
    config = CONFIG | {"checkpoint_every": 3, "enable_early_stopping": False}
    uninterrupted = train(client, alice, repo="whole", **config)  # on the local runtime, for the figures
    switch(on_modal, monkeypatch)

    log_step = functions.train_progress.Progress.log

    def preempted_at_step_5(self: functions.train_progress.Progress, step: int, logs: dict) -> None:
        if self.attempt == 1 and step == 5:
            on_modal.volume.kill()
            raise ContainerKilled
        log_step(self, step, logs)

    monkeypatch.setattr(functions.train_progress.Progress, "log", preempted_at_step_5)
    job_id = start_job(client, alice, repo="resumed", **config)["id"]
    [first] = on_modal.take()
    assert (first.function, first.gpu) == ("train", "A10G")
    with pytest.raises(ContainerKilled):
        on_modal.run(first)
    # Checkpoint 1 (step 3) reached the cloud as it was saved, resume state and all; the commit the dying
    # container's `finally` attempted did not.
    assert [c for c in on_modal.volume.commits if c.container == 1] == [
        Commit(1, False, ("1", "1/resume"), False),
        Commit(1, True, ("1", "1/resume"), False),
    ]

    on_modal.run(first)  # Modal's retry of the preempted call (modal.Retries), at once
    job = client.get(f"/v1/finetuning/jobs/{job_id}", headers=alice).json()
    assert (job["status"], job["attempts"]) == ("training", 1)  # the lease held: the retry claimed nothing

    deadline = time.monotonic() + 4 * LEASE_SECONDS
    while not (respawned := on_modal.reap()):  # Modal's schedule runs it every minute
        assert time.monotonic() < deadline, "the reaper never re-sent the event"
        time.sleep(0.25)
    assert [(c.function, c.gpu, c.event_id) for c in respawned] == [("train", "A10G", first.event_id)]
    on_modal.run(respawned[0])

    job = client.get(f"/v1/finetuning/jobs/{job_id}", headers=alice).json()
    assert (job["status"], job["attempts"]) == ("completed", 2), job
    assert job["summary"]["resumed_from"] == {"checkpoint": "resumed/1@1", "step": 3, "attempt": 2}
    assert job["checkpoints"] == ["resumed/1@1", "resumed/1@2", "resumed/1@3"]
    final = on_modal.volume.commits[-1]
    assert (final.container, final.lost, final.checkpoints, final.published) == (3, False, ("1", "2", "3"), True)

    rows = metrics(client, alice, job_id)
    assert [m["step"] for m in rows] == list(range(1, 9))
    expected = [m["loss"] for m in metrics(client, alice, uninterrupted["id"])]
    assert [m["loss"] for m in rows] == pytest.approx(expected, rel=1e-4)
    ours = tensors(version_dir(platform, "resumed", 1) / "adapter_model.safetensors")
    theirs = tensors(version_dir(platform, "whole", 1) / "adapter_model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
