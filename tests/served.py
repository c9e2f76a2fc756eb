"""A real `loraplex serve --workers 1` process (API and a worker) on a platform of its own with the tiny model, for
the tests that drive it over HTTP as users do: the SDK and the CLI (test_client.py, test_sdk_*.py)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import Processes, _make_platform


@contextmanager
def served_platform(
    data_dir: Path, backend: str, tiny_model_dir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The server's URL while it runs; `backend` is "sqlite" or "postgres" (skipped when PostgreSQL is not
    reachable), `env` settings added to the processes'. Starting a server and warming its worker up costs several
    seconds: share one per module."""
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        contextmanager(_make_platform)(data_dir, backend, monkeypatch, tiny_model_dir) as platform,
    ):
        processes = Processes(platform, env or {})
        try:
            yield processes.server(workers=1)
        finally:
            processes.stop()
