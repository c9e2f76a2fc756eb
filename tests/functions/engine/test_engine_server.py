"""The engine process (server.py's serve_engine) while it loads its model, before it serves: it exits when the
process that started it dies, and SIGTERM ends it at once, even when its spawner left SIGTERM ignored. Real
`loraplex engine` processes of the tiny model."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from conftest import TINY_MODEL, Platform, free_port, process_alive, wait_for


def test_an_engine_exits_when_its_parent_dies_while_it_loads(sqlite_platform: Platform) -> None:
    """The API starts engines with remote.start_engine_process; here a short-lived process does, and is killed at
    once, long before the model is loaded. Before, the engine loaded, found itself already reparented and so
    watched the wrong parent: it served nobody, for ever."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from functions.engine.remote import start_engine_process
                print(start_engine_process({TINY_MODEL!r}, None, {free_port()}).pid, flush=True)
                time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    engine = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        # the engine's watch starts with its serve_engine, a few seconds of imports after its start on 2 cores
        wait_for(lambda: not process_alive(engine), 20, "the engine outlived its parent")
    finally:
        if process_alive(engine):
            os.kill(engine, signal.SIGKILL)


def test_sigterm_while_loading_ends_the_engine_at_once(sqlite_platform: Platform) -> None:
    """A spawner that ignores SIGTERM passes that on across exec; the engine sets it back to its default action
    when it starts loading, so SIGTERM then ends it at once (killed by the signal: no graceful stop, nothing to
    save yet). Before, the SIGTERM was lost and the engine loaded and served on."""
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "engine", "--base-model", TINY_MODEL, "--port", str(port)],
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )
    try:

        def sigterm_ignored() -> bool:
            status = Path(f"/proc/{engine.pid}/status").read_text().splitlines()
            mask = next(line for line in status if line.startswith("SigIgn:"))
            return bool(int(mask.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

        wait_for(lambda: not sigterm_ignored(), 60, "SIGTERM stayed ignored")  # serve_engine began
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            raise AssertionError("the engine serves already: this is not loading")
        except httpx.TransportError:
            pass
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=5) == -signal.SIGTERM
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
