"""`pip install loraplex` installs the SDK and the CLI's client commands without the server: the wheel is built from
this tree, installed WITHOUT extras into a fresh virtual environment (httpx and pydantic come with it, from the
package index), and that environment's python and `loraplex` command drive a real `loraplex serve` process through
the Predibase-style flow (tests/app/sdk_flow.py). Prints the wheel's size and the install's time."""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from served import served_platform

from conftest import TINY_MODEL, make_tenant

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "loraplex",
    "app",
    "functions",
    "billing",
    "web",
)  # what the wheel is built of
SERVER_ONLY = ("torch", "transformers", "fastapi", "sqlalchemy", "typer", "peft", "uvicorn", "rich")
ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")] + [
    {"prompt": "Say hi to Gus", "completion": "Hi Gus!", "split": "evaluation"}
]


@dataclass
class SdkVenv:
    root: Path
    wheel_bytes: int
    install_seconds: float
    installed: dict[str, str]  # distribution name (lowercase) -> version

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        # A clean environment: nothing of the test process's (its PYTHONPATH, its LORAPLEX_ settings) leaks in.
        base = {"PATH": f"{self.root / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
        return subprocess.run(
            [str(a) for a in args], env=base | (env or {}), capture_output=True, text=True, timeout=240, cwd=self.root
        )


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> SdkVenv:
    """The wheel, built from a copy of the sources (the build writes build/ and *.egg-info beside them) with this
    environment's setuptools, installed without extras into a new virtual environment."""
    work = tmp_path_factory.mktemp("sdk-wheel")
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work / "dist"), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (work / "dist").glob("loraplex-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    started = time.monotonic()
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    seconds = time.monotonic() - started
    listing = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format", "json"], check=True, capture_output=True, text=True, timeout=120
    )
    installed = {d["name"].lower(): d["version"] for d in json.loads(listing.stdout)}
    return SdkVenv(venv, wheel.stat().st_size, seconds, installed)


# SQLite only: what this test proves is the install (the same flow runs on both databases in-process in
# test_sdk_predibase.py), and each server costs it about 100 s.
@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[str]:
    with served_platform(tmp_path_factory.mktemp("served"), "sqlite", tiny_model_dir) as url:
        yield url


def test_the_wheel_installs_without_the_server(sdk_venv: SdkVenv, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(
            f"\nSDK wheel: {sdk_venv.wheel_bytes / 1024:.0f} KiB ({sdk_venv.wheel_bytes} bytes); pip install without "
            f"extras into a fresh venv: {sdk_venv.install_seconds:.1f} s, {len(sdk_venv.installed)} distributions: "
            + ", ".join(f"{name} {version}" for name, version in sorted(sdk_venv.installed.items()))
        )
    assert {"loraplex", "httpx", "pydantic"} <= sdk_venv.installed.keys()
    assert not set(SERVER_ONLY) & sdk_venv.installed.keys(), sdk_venv.installed

    # The client commands answer; a server command says, in one line, what to install.
    assert sdk_venv.run("loraplex", "--help").returncode == 0
    serve = sdk_venv.run("loraplex", "serve", "--port", "8000")
    assert serve.returncode == 1 and "Traceback" not in serve.stderr, serve.stderr
    assert serve.stderr.strip().count("\n") == 0 and "pip install 'loraplex[server]'" in serve.stderr, serve.stderr
    options = sdk_venv.run("loraplex", "finetune", "start", "--help")
    assert options.returncode == 0 and "--prompt-template" in options.stdout and "--rank" in options.stdout


def test_the_wheel_drives_a_running_server(
    sdk_venv: SdkVenv, server_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    key = make_tenant(request.node.originalname)[1]["Authorization"].removeprefix("Bearer ")
    dataset = tmp_path / "greetings.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in ROWS))
    flow = sdk_venv.run(sdk_venv.python, ROOT / "tests" / "app" / "sdk_flow.py", server_url, key, TINY_MODEL, dataset,
                        tmp_path)  # fmt: skip
    assert flow.returncode == 0, flow.stdout + flow.stderr
    seen = json.loads(flow.stdout.strip().splitlines()[-1])
    print(f"SDK flow from the wheel's venv, seconds per step: {seen['seconds']}")
    assert seen["adapter"] == "greet/1" and seen["tokens"] >= 1
    assert not set(SERVER_ONLY) & set(seen["modules"])
    assert "completed: adapter greet/1, 3 steps" in flow.stdout  # adapters.create's progress

    env = {"LORAPLEX_API_URL": server_url, "LORAPLEX_API_KEY": key, "COLUMNS": "160"}
    listing = sdk_venv.run("loraplex", "datasets", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "greetings" in listing.stdout and "ready" in listing.stdout, listing.stdout
    jobs = sdk_venv.run("loraplex", "jobs", "list", env=env)
    assert jobs.returncode == 0 and "completed" in jobs.stdout and "cancelled" in jobs.stdout, jobs.stdout + jobs.stderr
