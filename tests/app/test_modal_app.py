"""The Modal app's declaration, read from the Modal objects themselves, offline.

Importing app.modal_app only declares Modal objects, so everything here runs without an account or network.
Facts are read through `Function.info()` (modal.types.FunctionInfo), which for a locally defined, not yet
deployed function is filled in at decoration time and makes no request.
"""

import importlib
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

modal = pytest.importorskip("modal")

from modal.exception import DeprecationError  # noqa: E402

import app.modal_app as modal_app  # noqa: E402

EXPECTED_FUNCTIONS = {"handle_event", "train", "web", "reap"}
EXPECTED_CLASSES = {"Inference"}


def _registry(app: "modal.App") -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The app's functions, classes and web endpoints as registered at definition time.

    modal 1.6 marks App.registered_* deprecated (removal planned for 1.7) without a public replacement;
    they are still the only way to list what an App declares, so silence just that warning here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationError)
        return (
            dict(app.registered_functions),
            dict(app.registered_classes),
            list(app.registered_web_endpoints),
        )


def _functions() -> dict[str, Any]:
    return _registry(modal_app.app)[0]


def _class_service_function(cls_name: str) -> Any:
    # Modal serves all methods of a class from one "service function", registered as "<Class>.*"; the
    # class's resources (GPU, timeout, volumes) live on it.
    return _functions()[f"{cls_name}.*"]


@pytest.mark.parametrize("package", ["loraplex", "app", "functions", "billing", "web"])
def test_project_packages_can_be_added_to_the_image(package: str) -> None:
    # add_local_python_source resolves packages only at deploy time; resolve them now, the same way.
    from modal._utils.package_utils import get_module_mount_info

    assert package in modal_app.PROJECT_PACKAGES
    assert get_module_mount_info(package)


def test_app_name() -> None:
    assert modal_app.APP_NAME == "loraplex"
    assert modal_app.app.name == "loraplex"


def test_registered_functions_and_classes_are_exactly_the_expected_set() -> None:
    functions, classes, web_endpoints = _registry(modal_app.app)
    plain_functions = {name for name in functions if not name.endswith(".*")}
    assert plain_functions == EXPECTED_FUNCTIONS
    assert set(classes) == EXPECTED_CLASSES
    assert set(functions) - plain_functions == {"Inference.*"}
    assert web_endpoints == ["web"]


def test_spawn_targets_match_registered_names() -> None:
    # spawn_event looks functions up by these strings after deployment; a rename would break it silently.
    assert {modal_app.HANDLE_EVENT_FUNCTION, modal_app.TRAIN_FUNCTION} <= set(_functions())


def test_train_runs_on_the_training_gpu_for_up_to_a_day() -> None:
    info = modal_app.train.info()
    assert info.gpus == [(modal_app.TRAIN_GPU, 1)]
    assert info.timeout == 24 * 60 * 60 == 24 * modal_app.HOURS
    assert info.max_retries is not None and info.max_retries >= 1


def test_train_gpu_defaults_to_a10g_and_is_overridable() -> None:
    assert modal_app.DEFAULT_TRAIN_GPU == "A10G"
    assert modal_app._train_gpu({}) == "A10G"
    assert modal_app._train_gpu({"LORAPLEX_TRAIN_GPU": ""}) == "A10G"
    assert modal_app._train_gpu({"LORAPLEX_TRAIN_GPU": "H100"}) == "H100"


@pytest.fixture
def reload_modal_app() -> Iterator[None]:
    """Re-import app.modal_app under a changed environment, and restore it afterwards."""
    yield
    importlib.reload(modal_app)


def test_train_gpu_override_reaches_the_deployed_function(
    monkeypatch: pytest.MonkeyPatch, reload_modal_app: None
) -> None:
    monkeypatch.setenv("LORAPLEX_TRAIN_GPU", "H100")
    importlib.reload(modal_app)
    assert modal_app.train.info().gpus == [("H100", 1)]
    monkeypatch.delenv("LORAPLEX_TRAIN_GPU")
    importlib.reload(modal_app)
    assert modal_app.train.info().gpus == [("A10G", 1)]


def test_handle_event_is_cpu_only_with_a_15_minute_timeout() -> None:
    info = modal_app.handle_event.info()
    assert info.gpus == []
    assert info.timeout == 15 * 60
    assert info.max_retries is not None and info.max_retries >= 1


def test_inference_class_serves_on_the_serving_gpu() -> None:
    info = _class_service_function("Inference").info()
    assert modal_app.SERVE_GPU == "L40S"
    assert info.gpus == [("L40S", 1)]
    assert info.method_names == ["generate"]


def test_every_function_mounts_the_volume_at_vol_and_gets_the_db_secret() -> None:
    functions = _functions()
    assert functions  # guard against vacuous success
    for name, function in functions.items():
        info = function.info()
        assert any("loraplex-db" in secret for secret in info.secrets), name
        if name == "reap":  # touches only the database
            assert info.volumes == {}
            continue
        assert set(info.volumes) == {"/vol"}, name
        assert info.volumes["/vol"].name == "loraplex-volume", name
        assert not info.volumes["/vol"].read_only, name


def test_web_is_a_concurrent_asgi_app_without_gpu() -> None:
    info = modal_app.web.info()
    assert info.gpus == []
    # web_info is set only for web endpoints; its method is set only for @modal.fastapi_endpoint, so None
    # here means an app-style endpoint (asgi/wsgi/web_server).
    assert info.web_info is not None
    assert info.web_info.method is None
    assert info.concurrency_info is not None and (info.concurrency_info.max_inputs or 0) > 1
    # Telling ASGI apart from WSGI/web_server needs the webhook config, which modal keeps on the
    # underlying (unwrapped) function object only.
    from modal._utils.async_utils import synchronizer
    from modal_proto import api_pb2

    webhook_config = synchronizer._translate_in(modal_app.web)._webhook_config
    assert webhook_config.type == api_pb2.WEBHOOK_TYPE_ASGI_APP


class _RecordingFunction:
    """Stand-in for a deployed modal.Function handle: records what would have been sent."""

    def __init__(self, app_name: str, name: str, calls: list[tuple[str, str, str]]) -> None:
        self.app_name = app_name
        self.name = name
        self.calls = calls

    def spawn(self, *args: Any, **kwargs: Any) -> None:
        assert not kwargs
        (event_id,) = args
        self.calls.append((self.app_name, self.name, event_id))


class _RecordingVolume:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def reload(self) -> None:
        self.calls.append("reload")

    def commit(self) -> None:
        self.calls.append("commit")


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    # Modal's cloud cannot be reached from here (no account, no network), so Function.from_name is faked
    # with a recorder; what matters is which deployed function spawn_event picks and what it passes.
    calls: list[tuple[str, str, str]] = []

    def from_name(app_name: str, name: str, **_: Any) -> _RecordingFunction:
        return _RecordingFunction(app_name, name, calls)

    monkeypatch.setattr(modal.Function, "from_name", from_name)
    return calls


@pytest.fixture
def fake_volume(monkeypatch: pytest.MonkeyPatch) -> _RecordingVolume:
    # Volume.reload/commit only work inside a Modal container that mounts the volume.
    volume = _RecordingVolume()
    monkeypatch.setattr(modal_app, "volume", volume)
    return volume


def test_spawn_event_sends_finetunes_to_the_gpu_train_function(
    spawned: list[tuple[str, str, str]], fake_volume: _RecordingVolume, sqlite_platform: Any
) -> None:
    # No such event in the database: the declared GPU (a job's own GPU: tests/app/test_modal_training.py)
    modal_app.spawn_event("evt-1", "finetune.requested")
    assert spawned == [("loraplex", "train", "evt-1")]


def test_spawn_event_sends_other_events_to_handle_event(
    spawned: list[tuple[str, str, str]], fake_volume: _RecordingVolume
) -> None:
    modal_app.spawn_event("evt-2", "dataset.uploaded")
    modal_app.spawn_event("evt-3", "anything.else")
    assert spawned == [("loraplex", "handle_event", "evt-2"), ("loraplex", "handle_event", "evt-3")]


def test_spawn_event_commits_the_volume_only_inside_a_container(
    spawned: list[tuple[str, str, str]], fake_volume: _RecordingVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    modal_app.spawn_event("evt-4", "dataset.uploaded")
    assert fake_volume.calls == []  # locally there is no mounted volume to commit

    monkeypatch.setattr(modal, "is_local", lambda: False)
    modal_app.spawn_event("evt-5", "dataset.uploaded")
    assert fake_volume.calls == ["commit"]  # the upload must be visible to the spawned container
    assert [call[2] for call in spawned] == ["evt-4", "evt-5"]


@pytest.fixture
def fake_queue(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    # app.queue is the real handler dispatcher (database, training); replace it so only the Modal wiring
    # around it is exercised.
    processed: list[str] = []

    def process_event(event_id: str) -> None:
        if event_id == "boom":
            raise RuntimeError("handler crashed")
        processed.append(event_id)

    fake = types.ModuleType("app.queue")
    fake.process_event = process_event  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app.queue", fake)
    return processed


# .local() warns that the volume is not mounted here; that is the point of faking it.
LOCAL_RUN_WARNING = "ignore:The .* function is executing locally:UserWarning"


@pytest.mark.filterwarnings(LOCAL_RUN_WARNING)
@pytest.mark.parametrize("function_name", ["handle_event", "train"])
def test_event_functions_reload_process_then_commit(
    function_name: str, fake_queue: list[str], fake_volume: _RecordingVolume
) -> None:
    function = getattr(modal_app, function_name)
    function.local("evt-6")  # runs the body in this process, as the container would
    assert fake_queue == ["evt-6"]
    assert fake_volume.calls == ["reload", "commit"]


@pytest.mark.filterwarnings(LOCAL_RUN_WARNING)
def test_event_functions_commit_even_when_the_handler_raises(
    fake_queue: list[str], fake_volume: _RecordingVolume
) -> None:
    with pytest.raises(RuntimeError, match="handler crashed"):
        modal_app.handle_event.local("boom")
    assert fake_volume.calls == ["reload", "commit"]


def test_the_image_installs_exactly_the_project_dependencies() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert (*project["dependencies"], *project["optional-dependencies"]["server"]) == modal_app.PYTHON_PACKAGES
    assert "stripe>=12" in modal_app.PYTHON_PACKAGES  # the web app imports it for the webhook


@pytest.mark.filterwarnings(LOCAL_RUN_WARNING)
def test_a_checkpoint_saved_while_training_is_committed_at_once(
    fake_volume: _RecordingVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import volume as platform_volume

    seen: list[list[str]] = []

    def process_event(event_id: str) -> None:
        platform_volume.durable_write_done()  # what functions/checkpoints.save does after writing a checkpoint
        seen.append(list(fake_volume.calls))

    fake = types.ModuleType("app.queue")
    fake.process_event = process_event  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app.queue", fake)
    modal_app.train.local("evt-7")
    assert seen == [["reload", "commit"]]  # committed before the handler went on
    assert fake_volume.calls == ["reload", "commit", "commit"]
    platform_volume.durable_write_done()  # outside a handler nothing is committed
    assert fake_volume.calls == ["reload", "commit", "commit"]
