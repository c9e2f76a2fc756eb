"""The serving path under load, over real HTTP: `loraplex serve` with its engine process, 200 concurrent
streaming clients. Every request completes or gets a 429 with Retry-After; nothing else."""

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY_MODEL, Platform, Processes, make_tenant

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
from load_serving import run_load  # noqa: E402


@pytest.fixture
def processes(sqlite_platform: Platform) -> Iterator[Processes]:
    # a small engine: 16 requests decode at once and 32 wait, so 200 clients overflow it
    procs = Processes(sqlite_platform, {"LORAPLEX_MAX_BATCH_SIZE": "16", "LORAPLEX_MAX_QUEUED_REQUESTS": "32"})
    yield procs
    procs.stop()


@pytest.mark.slow
def test_200_streaming_clients_complete_or_get_429_with_retry_after(processes: Processes) -> None:
    url = processes.server(workers=0)
    _, headers = make_tenant("load")
    result = asyncio.run(run_load(url, headers, TINY_MODEL, clients=200, seconds=15))
    assert result["failed"] == 0, result["failures"]
    assert result["completed"] >= 20  # (on 2 cores shared by the clients, the API and the engine)
    assert result["refused_429"] > 0  # the queue did fill up, and overflow was refused cleanly
