"""Shared fixtures: an isolated platform (data dir + database) per test, SQLite and PostgreSQL, a tiny random
Llama with the SmolLM2 tokenizer for fast training and generation, tenants, and an in-process worker."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

PG_ADMIN_URL = os.environ.get("LORAPLEX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TINY_MODEL = "tiny-llama"


def _clear_caches() -> None:
    from app import db, queue, settings
    from functions import base_models, engine

    engine.close_engines()
    for fn in (
        settings.get_settings,
        db.get_engine,
        db.sessions,
        queue.get_huey,
        queue._huey_task,
        base_models.load_tokenizer,
    ):
        fn.cache_clear()


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure means: skip the PostgreSQL runs
        return False


@pytest.fixture(scope="session", autouse=True)
def wired_queue() -> None:
    """The queue's handlers, as `loraplex worker` wires them (the in-process worker below runs them)."""
    from app.worker_main import wire

    wire()


@pytest.fixture(scope="session")
def shared_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One volume for the session: base-model weights are built once and shared by every test."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(shared_volume: Path) -> Path:
    """The real SmolLM2 tokenizer, read from the bundled GGUF once."""
    import importlib.util

    from transformers import AutoTokenizer

    from functions.base_models import GGUF_FILE, GGUF_PACKAGE

    target = shared_volume / "smollm2-tokenizer"
    if not (target / "tokenizer.json").exists():
        src = Path(importlib.util.find_spec(GGUF_PACKAGE).origin).parent  # type: ignore[union-attr,arg-type]
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(shared_volume: Path, smollm_tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with the SmolLM2 tokenizer: trains and generates in milliseconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = shared_volume / "base_models" / TINY_MODEL
    if not (target / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        params = sum(p.numel() for p in model.parameters())
        (target / "loraplex_model.json").write_text(json.dumps({"params": params, "context_length": 2048}))
    return target


@dataclass
class Platform:
    data_dir: Path
    database_url: str
    backend: str

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (server, workers) that must see this same platform."""
        return {
            "LORAPLEX_DATA_DIR": str(self.data_dir),
            "DATABASE_URL": self.database_url,
            "LORAPLEX_QUEUE_URL": f"sqlite:///{self.data_dir / 'queue.db'}",
        }


@pytest.fixture(scope="session")
def bundled_model(tiny_model_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct, converted from the bundled GGUF once for the session."""
    from functions.base_models import _convert_bundled_gguf

    target = tiny_model_dir.parent / "smollm2-135m"
    if not (target / "config.json").exists():
        _convert_bundled_gguf(target)
    return target


def _make_platform(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> Iterator[Platform]:
    data_dir = tmp_path / "data"
    (data_dir / "volume" / "base_models").mkdir(parents=True)
    (data_dir / "volume" / "base_models" / TINY_MODEL).symlink_to(tiny_model_dir)
    # The bundled model, when a test converted it already, is shared the same way.
    bundled = tiny_model_dir.parent / "smollm2-135m"
    if bundled.exists():
        (data_dir / "volume" / "base_models" / "smollm2-135m").symlink_to(bundled)
    drop = None
    if backend == "postgres":
        if not postgres_available():
            if os.environ.get("LORAPLEX_REQUIRE_POSTGRES"):
                pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL} (LORAPLEX_REQUIRE_POSTGRES is set)")
            pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
        import psycopg

        name = f"loraplex_test_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        drop = name
    else:
        url = f"sqlite:///{data_dir / 'loraplex.db'}"
    platform = Platform(data_dir, url, backend)
    for key, value in platform.env().items():
        monkeypatch.setenv(key, value)
    # In-process tests run the engine on a thread of the test process; subprocess tests (e2e) keep the default,
    # an engine process per base model.
    monkeypatch.setenv("LORAPLEX_ENGINE_PROCESS", "false")
    monkeypatch.setenv("LORAPLEX_KV_CACHE_MB", "64")
    _clear_caches()
    from app.db import migrate

    migrate()
    yield platform
    from app.db import get_engine

    get_engine().dispose()
    _clear_caches()
    if drop:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {drop} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def platform(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> Iterator[Platform]:
    """A fresh platform, once on SQLite and once on PostgreSQL."""
    yield from _make_platform(tmp_path, request.param, monkeypatch, tiny_model_dir)


@pytest.fixture
def sqlite_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> Iterator[Platform]:
    yield from _make_platform(tmp_path, "sqlite", monkeypatch, tiny_model_dir)


@pytest.fixture
def client(platform: Platform) -> Iterator["TestClient"]:  # type: ignore[name-defined]  # noqa: F821
    from fastapi.testclient import TestClient

    from web.main import create_app

    with TestClient(create_app()) as c:
        yield c


def openai_sdk(client: Any, headers: dict[str, str]) -> Any:
    """The official `openai` client over a TestClient (`client`), with the tenant's key from `headers`."""
    import openai

    key = headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def make_tenant(name: str) -> tuple[str, dict[str, str]]:
    """(tenant id, auth headers) for a new tenant."""
    from app.db import session_scope
    from billing.signup import create_tenant

    with session_scope() as s:
        tenant, key = create_tenant(s, name)
        return tenant.id, {"Authorization": f"Bearer {key}"}


@pytest.fixture
def alice(platform: Platform) -> dict[str, str]:
    return make_tenant("alice")[1]


@pytest.fixture
def bob(platform: Platform) -> dict[str, str]:
    return make_tenant("bob")[1]


class InProcessWorker:
    """Delivers pending events to the real handlers from a thread, as a Huey worker would (the Huey consumer
    itself runs in the subprocess tests). `drain()` processes everything due right now."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def drain(self) -> int:
        from app.db import session_scope
        from app.models import Event
        from app.queue import now, process_event

        with session_scope() as s:
            due = s.scalars(select(Event.id).where(Event.status == "pending", Event.run_after <= now())).all()
        for event_id in due:
            process_event(event_id)
        return len(due)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.drain():
                time.sleep(0.05)

    def __enter__(self) -> "InProcessWorker":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture
def worker(platform: Platform) -> Iterator[InProcessWorker]:
    with InProcessWorker() as w:
        yield w


@pytest.fixture(scope="module")
def localstripe() -> Iterator[str]:
    """localstripe, a stateful fake of Stripe's core API (customers, subscriptions, invoices, webhooks)."""
    from fake_stripe_billing import localstripe_server

    with localstripe_server() as url:
        yield url


@pytest.fixture
def fake() -> Iterator["FakeStripeBilling"]:  # type: ignore[name-defined]  # noqa: F821
    """Our fake of the Stripe endpoints localstripe lacks (meter events, credit grants, Checkout, portal)."""
    from fake_stripe_billing import FakeStripeBilling

    fake = FakeStripeBilling().start()
    yield fake
    fake.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether the process runs: a zombie is dead, just not yet reaped; one that vanishes while /proc is read
    (ESRCH, ProcessLookupError) is gone too."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition: Callable[[], Any], timeout: float, message: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{message} (after {timeout:.0f} s)")


class Processes:
    """`loraplex` processes (server, workers) on one platform, stopped together."""

    def __init__(self, platform: Platform, extra_env: dict[str, str]) -> None:
        # (the in-process tests' LORAPLEX_ENGINE_PROCESS=false is in os.environ: real servers get the default back)
        base = {"LORAPLEX_LOG_LEVEL": "WARNING", "LORAPLEX_ENGINE_PROCESS": "true"}
        self.env = os.environ | platform.env() | base | extra_env
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=self.env)
        self.children.append(child)
        return child

    def server(self, workers: int) -> str:
        port = free_port()
        child = self.start("serve", "--port", str(port), "--workers", str(workers))
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            assert child.poll() is None, "server exited"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not start")

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed certificate for localhost, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


# The web console's browser tests (tests/web/console/): headless Chromium (Debian's `chromium`, never Playwright's own
# download) driven by Playwright against a real `loraplex serve` on the tiny model. Without Chromium they skip with a
# message; in CI (CI set) they fail, as .ci/run installs it. Each test signs a new tenant in.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes say: without the background-networking flags Chromium keeps dialling Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")  # not longer: Playwright's sync API keeps its event loop running on this thread while
def browser() -> Iterator[Any]:  # it is started, and a later test's asyncio.run() would refuse to start its own
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is missing at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip(f"the console's browser tests need Debian's chromium ({CHROMIUM}): apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def console_url(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[str]:
    """A real server (SQLite, one worker, the tiny model) for a module of console tests."""
    from served import served_platform

    from deployment_helpers import FAST_ENV

    with served_platform(tmp_path_factory.mktemp("console"), "sqlite", tiny_model_dir, FAST_ENV) as url:
        yield url


@pytest.fixture
def api_key(console_url: str, request: pytest.FixtureRequest) -> str:
    """A new tenant's key (the tenant named after the test, made unique: parametrized tests share the name)."""
    name = f"{request.node.originalname.removeprefix('test_')[:40]}-{secrets.token_hex(3)}"
    return make_tenant(name)[1]["Authorization"].split()[1]


@pytest.fixture
def page(browser: Any, console_url: str, api_key: str) -> Iterator[Any]:
    """A fresh browser context signed in as the test's tenant, on the datasets page. Fails the test on any console
    error of the page's scripts (an exception, or a script or style the content security policy blocked)."""
    context = browser.new_context(base_url=console_url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    from browser_helpers import sign_in

    sign_in(page, api_key)
    yield page
    context.close()
    assert not [p for p in problems if "Failed to load resource" not in p], problems


def sandbox_unavailable() -> str | None:
    """Why this machine cannot build the reward sandbox (functions/sandbox.py: not Linux, namespaces forbidden), or
    None. With LORAPLEX_REQUIRE_SANDBOX=1 (CI) a sandbox that cannot be built is a failure: it raises."""
    from functions.sandbox import SandboxUnavailable, check_available

    try:
        check_available()
    except SandboxUnavailable as e:
        if os.environ.get("LORAPLEX_REQUIRE_SANDBOX") == "1":
            raise
        return str(e)
    return None


def require_sandbox() -> None:
    """Skip the test, saying why, where the sandbox cannot be built (fail in CI: sandbox_unavailable)."""
    reason = sandbox_unavailable()
    if reason is not None:
        pytest.skip(f"sandbox unavailable: {reason}")
