"""A client of an engine process (server.py), started and watched from the API process.

The API keeps the tokenizer itself (prompts are rendered and counted here) and streams deltas from the engine
over local HTTP. An engine process that died, or stays unhealthy, is replaced by the API's engine supervisor
(supervisor.py), or by the next request that finds it dead, whichever comes first.
"""

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx

from app.settings import get_settings
from functions.engine.protocol import (
    Delta,
    Engine,
    EngineUnavailable,
    GenerationRequest,
    RequestFailed,
    delta_from_dict,
    refusal_from_dict,
    request_to_dict,
)
from functions.prompts import encode_text

STOP_GRACE_SECONDS = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine_process(base_model: str, model_dir: Path | None, port: int) -> subprocess.Popen[bytes]:
    """No PR_SET_PDEATHSIG here: it fires when the *thread* that started the child ends, and engines are started
    from short-lived worker threads. The engine process watches this process instead (server.py), by its pid: one
    that dies before the engine got to look is noticed too."""
    command = [sys.executable, "-m", "app.cli", "engine", "--base-model", base_model, "--port", str(port)]
    command += ["--parent-pid", str(os.getpid())]
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    return subprocess.Popen(command)


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineUnavailable(f"the engine process exited with code {process.returncode} while starting")
        try:
            return httpx.get(f"{url}/health", timeout=2).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise EngineUnavailable(f"the engine did not answer within {timeout:.0f} s")


class RemoteEngine(Engine):
    def __init__(self, base_model: str, url: str, context_length: int, model_dir: Path | None = None) -> None:
        from functions.base_models import load_tokenizer

        self.base_model, self.url, self.context_length = base_model, url, context_length
        self.tokenizer = load_tokenizer(base_model) if model_dir is None else _tokenizer(model_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: dict[int, httpx.AsyncClient] = {}  # one per event loop that used it

    @classmethod
    def start(cls, base_model: str, model_dir: Path | None = None) -> "RemoteEngine":
        port = _free_port()
        process = start_engine_process(base_model, model_dir, port)
        url = f"http://127.0.0.1:{port}"
        health = wait_healthy(url, process, get_settings().engine.engine_start_timeout)
        engine = cls(base_model, url, int(health["context_length"]), model_dir)
        engine.process = process
        return engine

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def healthy(self) -> tuple[bool, str]:
        """(healthy, why not), from the process's GET /health: 503 carries the engine's own reason; no answer
        within a poll interval (at least 1 s) is unhealthy too."""
        if self.process is not None and self.process.poll() is not None:
            return False, f"the engine process exited with code {self.process.returncode}"
        timeout = max(1.0, get_settings().engine.engine_health_interval)
        try:
            response = httpx.get(f"{self.url}/health", timeout=timeout)
        except httpx.HTTPError as exc:
            return False, f"GET /health did not answer within {timeout:g} s ({type(exc).__name__})"
        if response.status_code == 200:
            return True, ""
        try:
            reason = response.json().get("reason")
        except ValueError:
            reason = None
        return False, reason or f"GET /health answered {response.status_code}"

    def count_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        client = self._client_for_loop()
        try:
            async with client.stream("POST", "/generate", json=request_to_dict(request)) as response:
                if response.status_code != 200:
                    raise _refusal(response.status_code, await response.aread())
                finished = False
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    data = json.loads(line)
                    if "error" in data:  # the request failed in the engine after it began streaming
                        raise refusal_from_dict(data)
                    delta = delta_from_dict(data)
                    finished = delta.finish_reason is not None
                    yield delta
                if not finished:
                    raise EngineUnavailable("the engine process ended the answer before it was complete")
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"the engine process went away ({type(exc).__name__})") from exc

    def _client_for_loop(self) -> httpx.AsyncClient:
        import asyncio

        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            # idle connections expire here (2 s) well before the engine server drops them (30 s), so a request is
            # never sent on a connection the server is closing
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2)
            client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=5), limits=limits)
            self._clients[loop_id] = client
        return client

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                # an engine stops in a second or two; one that has not after this is stuck (a hung step), and
                # holds nothing that a SIGKILL would lose
                self.process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _refusal(status: int, raw: bytes) -> Exception:
    """What the engine refused or failed with before streaming (its body names the kind); a body not of ours (a
    crash page) is a RequestFailed whose first words are the reason."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "kind" in body:
        return refusal_from_dict(body)
    return RequestFailed(f"the engine answered {status}: {raw[:200]!r}")


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
