"""The SDK's REST calls (loraplex/api.py) and the CLI's client commands (app/cli_client.py) against a real
`loraplex serve` process (API and a worker, the tiny model), and the SDK's retries against a tiny scripted HTTP
server counting the attempts."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from served import served_platform

from conftest import TINY_MODEL, free_port, make_tenant
from loraplex import Loraplex, LoraplexError

ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")] + [
    {"prompt": "Say hi to Gus", "completion": "Hi Gus!", "split": "evaluation"}
]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[str]:
    """`loraplex serve --workers 1`, once on SQLite and once on PostgreSQL, shared by this module's tests (each with
    its own tenant)."""
    with served_platform(tmp_path_factory.mktemp("served"), request.param, tiny_model_dir) as url:
        yield url


@pytest.fixture
def served(server_url: str, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(url, API key of a new tenant named after the test)."""
    return server_url, make_tenant(request.node.originalname)[1]["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    path = tmp_path / "greetings.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return path


def train_steps(events: list[tuple[str, dict[str, Any]]]) -> list[int]:
    return [d["step"] for e, d in events if e == "metric" and d.get("kind", "train") == "train"]


# --- against the served platform ----------------------------------------------------------------------


def test_sdk_uploads_trains_streams_and_reads_usage(served: tuple[str, str], dataset_file: Path) -> None:
    url, key = served
    lp = Loraplex(f"{url}/v1", key)  # the openai SDK's base_url works as well as the bare address
    ds = lp.upload_dataset(dataset_file, base_model=TINY_MODEL)
    assert (ds["name"], ds["status"], ds["stats"]["train_rows"]) == ("greetings", "ready", 6)
    assert [d["name"] for d in lp.list_datasets()] == ["greetings"]

    # Errors carry the API's error shape; 4xx are final (no retries: each answers at once).
    with pytest.raises(LoraplexError) as bad:
        lp.create_job(base_model=TINY_MODEL, dataset="greetings", repo="greet", rank=0)
    assert (bad.value.status, bad.value.param, bad.value.code) == (422, "rank", "invalid_value")
    assert bad.value.type == "invalid_request_error" and bad.value.message.startswith("rank: ")
    with pytest.raises(LoraplexError) as missing:
        lp.get_job("ft_0000000000000000")
    assert (missing.value.status, missing.value.param, missing.value.code) == (404, "job_id", "job_not_found")
    with pytest.raises(LoraplexError) as unauthorized:
        Loraplex(url, "lpx_wrong").usage()
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "invalid_api_key")

    job = lp.create_job(base_model=TINY_MODEL, dataset="greetings", repo="greet", epochs=1, effective_batch_size=2)
    assert job["status"] == "queued" and job["estimate"]["tokens"] > 0
    events = list(lp.stream_events(job["id"]))  # ends by itself once the job ended
    statuses = [d["status"] for e, d in events if e == "status"]
    assert statuses[-1] == "completed" and "training" in statuses and events[-1][0] == "status"
    final = events[-1][1]
    assert final["total_steps"] == 3 and train_steps(events) == [1, 2, 3]
    assert lp.get_job(job["id"]) == final
    assert [m["step"] for m in lp.metrics(job["id"], after_step=1) if m.get("kind", "train") == "train"] == [2, 3]
    assert [j["id"] for j in lp.list_jobs()] == [job["id"]]
    assert lp.cancel_job(job["id"]) == final  # a finished job stays as it is

    usage = lp.usage()
    assert usage["by_kind"]["finetune"]["records"] == 1
    assert usage["by_kind"]["finetune"]["cost"] == final["charge"]
    balance = lp.balance()
    assert balance["plan"] == "developer"
    assert balance["credit"]["micro_usd"] == 25_000_000 - final["charge"]["micro_usd"]


def test_cli_uploads_starts_and_watches_jobs(served: tuple[str, str], dataset_file: Path) -> None:
    url, key = served
    env = os.environ | {"LORAPLEX_API_URL": url, "LORAPLEX_API_KEY": key, "COLUMNS": "160"}

    def cli(*args: str, api_key: str = key) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env=env | {"LORAPLEX_API_KEY": api_key},
            capture_output=True,
            text=True,
            timeout=120,
        )

    upload = cli("datasets", "upload", str(dataset_file), "--base-model", TINY_MODEL)
    assert upload.returncode == 0, upload.stderr
    assert "dataset greetings ready: 7 rows (6 train, 1 evaluation)" in upload.stdout

    options = ("--dataset", "greetings", "--repo", "greet", "--base-model", TINY_MODEL,
               "--epochs", "1", "--effective-batch-size", "2", "--rank", "4", "--set", "seed=7")  # fmt: skip
    quote = cli("finetune", "quote", *options)  # the price first: nothing starts
    assert quote.returncode == 0, quote.stderr
    assert "learning_rate = " in quote.stdout and "(auto)" in quote.stdout and "your credit covers it" in quote.stdout
    assert Loraplex(url, key).list_jobs() == []
    start = cli("finetune", "start", *options)
    assert start.returncode == 0, start.stderr
    quoted = re.search(r"estimate (\$[0-9.]+) for", quote.stdout).group(1)  # type: ignore[union-attr]
    assert f"estimate {quoted}" in start.stdout  # the job's estimate is the quote's
    job_id = re.search(r"job (ft_[0-9a-f]+) queued", start.stdout).group(1)  # type: ignore[union-attr]

    watch = cli("jobs", "watch", job_id)  # the job trains while this watches
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert f"Job {job_id} completed" in watch.stdout and "adapter greet/1, 3 steps" in watch.stdout
    job = Loraplex(url, key).get_job(job_id)
    assert job["status"] == "completed" and job["config"]["seed"] == 7 and job["config"]["rank"] == 4

    listing = cli("jobs", "list")
    assert listing.returncode == 0 and job_id in listing.stdout and "completed" in listing.stdout

    # A cancelled job: exit code 1 and the reason.
    lp = Loraplex(url, key)
    cancelled = lp.create_job(base_model=TINY_MODEL, dataset="greetings", repo="greet", epochs=1)
    assert lp.cancel_job(cancelled["id"])["status"] == "cancelled"
    watch = cli("jobs", "watch", cancelled["id"])
    assert watch.returncode == 1 and f"Job {cancelled['id']} cancelled" in watch.stdout, watch.stdout

    # API errors are one line on stderr, not a traceback.
    bad = cli("jobs", "watch", job_id, api_key="lpx_wrong")
    assert bad.returncode == 1 and "invalid API key" in bad.stderr and "Traceback" not in bad.stderr
    refused = cli("finetune", "start", "--dataset", "greetings", "--repo", "greet", "--base-model", TINY_MODEL,
                  "--rank", "0")  # fmt: skip
    assert refused.returncode == 1 and "rank: " in refused.stderr and "Traceback" not in refused.stderr


def test_cli_and_sdk_manage_api_keys(served: tuple[str, str]) -> None:
    url, key = served
    env = os.environ | {"LORAPLEX_API_URL": url, "COLUMNS": "200"}

    def cli(*args: str, api_key: str = key) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", *args],
            env=env | {"LORAPLEX_API_KEY": api_key},
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = cli("create", "dashboard", "--scope", "read", "--expires-in-days", "7")
    assert created.returncode == 0, created.stderr
    shown = r"API key (key_[0-9a-f]+) \(dashboard, scope read, expires 20.+\)\nsecret \(shown once\): (lpx_\S+)"
    match = re.search(shown, created.stdout)
    assert match, created.stdout
    key_id, secret = match.groups()

    listing = cli("list")
    assert listing.returncode == 0, listing.stderr
    assert key_id in listing.stdout and "dashboard" in listing.stdout and "read" in listing.stdout
    assert secret not in listing.stdout and secret[:10] in listing.stdout  # the prefix, never the secret
    read_only = cli("list", api_key=secret)  # a read key may not manage keys: one line naming its scope
    assert read_only.returncode == 1 and "scope is 'read'" in read_only.stderr and "Traceback" not in read_only.stderr

    revoked = cli("revoke", key_id)
    assert revoked.returncode == 0 and f"API key {key_id} (dashboard) revoked" in revoked.stdout, revoked.stderr
    with pytest.raises(LoraplexError) as refused:
        Loraplex(url, secret).list_datasets()
    assert (refused.value.status, refused.value.code) == (401, "revoked_api_key")

    # The SDK: a key of its own revokes the first; the last active key stays.
    lp = Loraplex(url, key)
    spare = lp.create_api_key("spare", scope="all")
    (first,) = [k for k in lp.list_api_keys() if k["status"] == "active" and k["id"] != spare["id"]]
    assert Loraplex(url, spare["key"]).revoke_api_key(first["id"])["status"] == "revoked"
    last = cli("revoke", spare["id"], api_key=spare["key"])
    assert last.returncode == 1 and "last active API key" in last.stderr, last.stderr


def test_the_sdk_imports_without_torch() -> None:
    code = (
        "import sys, loraplex, app.cli_client, app.watch\n"
        "assert not {'torch', 'sqlalchemy', 'fastapi', 'typer'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- retries, against a scripted server ---------------------------------------------------------------


Reply = tuple[int, dict[str, str], bytes] | Callable[[BaseHTTPRequestHandler], None]


class Scripted:
    """An HTTP server answering each request with the next reply of its script (the last one repeats), and
    recording when each request came and its headers."""

    def __init__(self, *script: Reply) -> None:
        self.script, self.requests = list(script), list[tuple[float, str, dict[str, str]]]()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                scripted.requests.append((time.monotonic(), self.path, dict(self.headers)))
                reply = scripted.script.pop(0) if len(scripted.script) > 1 else scripted.script[0]
                if callable(reply):
                    reply(self)
                    return
                status, headers, body = reply
                self.send_response(status)
                for name, value in ({"Content-Type": "application/json"} | headers).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.requests]
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(*script: Reply) -> Scripted:
        servers.append(Scripted(*script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Reply:
    body = {"error": {"message": message, "type": "x", "param": param, "code": code}}
    return status, {}, json.dumps(body).encode()


OK: Reply = (200, {}, b'{"id": "ft_1", "status": "queued"}')


def test_5xx_is_retried_with_growing_backoff(scripted: Callable[..., Scripted]) -> None:
    server = scripted(error(503, "busy"), error(503, "busy"), OK)
    assert Loraplex(server.url, "k", max_retries=3, backoff_seconds=0.2).get_job("ft_1")["status"] == "queued"
    assert len(server.requests) == 3
    first, second = server.gaps()
    assert first >= 0.2 and second >= 0.4 and second > 1.5 * first, server.gaps()  # 0.2 s, then 0.4 s

    # Retries run out: the last answer is the error raised, after max_retries + 1 attempts.
    server = scripted(error(500, "broken", code="internal"))
    with pytest.raises(LoraplexError) as exc:
        Loraplex(server.url, "k", max_retries=2, backoff_seconds=0.01).create_job(repo="x")
    assert (exc.value.status, exc.value.message, exc.value.code) == (500, "broken", "internal")
    assert len(server.requests) == 3
    assert all(path == "/v1/finetuning/jobs" for _, path, _ in server.requests)

    # max_retries=0: one attempt only.
    server = scripted(error(502, "bad gateway"), OK)
    with pytest.raises(LoraplexError):
        Loraplex(server.url, "k", max_retries=0).get_job("ft_1")
    assert len(server.requests) == 1


def test_4xx_is_not_retried(scripted: Callable[..., Scripted]) -> None:
    server = scripted(error(422, "rank: must be at least 1", "rank", "invalid_value"), OK)
    with pytest.raises(LoraplexError) as exc:
        Loraplex(server.url, "k", backoff_seconds=0.01).create_job(rank=0)
    assert (exc.value.status, exc.value.param, exc.value.code) == (422, "rank", "invalid_value")
    assert exc.value.message == "rank: must be at least 1" and len(server.requests) == 1
    # Not our error shape (a proxy's page): still a LoraplexError, with the text.
    server = scripted((404, {"Content-Type": "text/html"}, b"<h1>no such page</h1>"))
    with pytest.raises(LoraplexError) as exc:
        Loraplex(server.url, "k").balance()
    assert exc.value.status == 404 and "no such page" in exc.value.message and exc.value.param is None


def test_429_waits_as_long_as_retry_after_says(scripted: Callable[..., Scripted]) -> None:
    server = scripted((429, {"Retry-After": "1"}, b'{"error": {"message": "slow down"}}'), OK)
    assert Loraplex(server.url, "k", backoff_seconds=0.01).get_job("ft_1")["id"] == "ft_1"
    assert len(server.requests) == 2 and server.gaps()[0] >= 1.0  # Retry-After, not the 0.01 s backoff


def test_connection_errors_are_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(LoraplexError) as exc:
        Loraplex(url, "k", max_retries=2, backoff_seconds=0.1).usage()
    assert exc.value.status == 0 and "ConnectError" in exc.value.message
    assert time.monotonic() - started >= 0.3  # waited 0.1 s, then 0.2 s, between the three attempts


def test_env_defaults_and_stream_resume(scripted: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch) -> None:
    """The event stream, cut before the job ended, is resumed with Last-Event-ID where it stopped."""

    def sse(body: str) -> Callable[[BaseHTTPRequestHandler], None]:
        def reply(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.end_headers()
            handler.wfile.write(body.encode())  # then the connection closes: HTTP/1.0, no length

        return reply

    server = scripted(
        sse(
            'event: status\ndata: {"status": "training", "attempts": 1}\n\nid: 41\nevent: metric\ndata: {"step": 1}\n\n'
        ),
        sse(
            ': keep-alive\n\nid: 42\nevent: metric\ndata: {"step": 2}\n\nevent: status\ndata: {"status": "failed"}\n\n'
        ),
    )
    monkeypatch.setenv("LORAPLEX_API_URL", server.url)
    monkeypatch.setenv("LORAPLEX_API_KEY", "lpx_from_env")
    events = list(Loraplex(backoff_seconds=0.01).stream_events("ft_1"))
    assert events == [
        ("status", {"status": "training", "attempts": 1}),
        ("metric", {"step": 1}),
        ("metric", {"step": 2}),
        ("status", {"status": "failed"}),
    ]
    (_, first_path, first), (_, _, second) = server.requests
    assert first_path == "/v1/finetuning/jobs/ft_1/events?after_step=-1"
    assert first["Authorization"] == second["Authorization"] == "Bearer lpx_from_env"
    assert "Last-Event-ID" not in first and second["Last-Event-ID"] == "41"


def test_generation_errors_in_lorax_shape(scripted: Callable[..., Scripted]) -> None:
    """The LoRAX routes answer errors as {"error": "message", "error_type", "param", "code"}, before a stream and
    as its last event: both raise LoraplexError with the param and code."""
    tokens = "".join(
        f'data:{{"token": {{"id": {i}, "text": "t{i}", "logprob": -0.5, "special": false}}}}\n\n' for i in (1, 2)
    )
    broken = 'data:{"error": "the engine ended the answer", "error_type": "generation", "code": "engine_unavailable"}'

    def stream(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write((tokens + broken + "\n\n").encode())

    refused = {"error": "parameters.top_k: too big", "error_type": "validation", "param": "parameters.top_k"}
    models = (200, {}, json.dumps({"data": [{"id": "tiny"}]}).encode())  # /v1/models: "tiny" is a base model
    server = scripted(models, (422, {}, json.dumps(refused).encode()), stream)
    client = Loraplex(server.url, "k", backoff_seconds=0.01).deployments.client("tiny")
    with pytest.raises(LoraplexError) as exc:
        client.generate("Hi", top_k=10**6)
    assert (exc.value.status, exc.value.param, exc.value.message) == (422, "parameters.top_k", refused["error"])
    received = []
    with pytest.raises(LoraplexError) as cut:
        for item in client.generate_stream("Hi"):
            received.append(item.token.text)
    assert received == ["t1", "t2"] and (cut.value.status, cut.value.code) == (500, "engine_unavailable")
    paths = [path for _, path, _ in server.requests]
    assert paths == ["/v1/models", "/v1/models/tiny/generate", "/v1/models/tiny/generate_stream"]
