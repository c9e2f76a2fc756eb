"""The `loraplex` command: serve the platform, run workers, create tenants, run the demo."""

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import typer

app = typer.Typer(
    help="Loraplex: fine-tune open LLMs and serve many adapters from one base model.", no_args_is_help=True
)
tenant_app = typer.Typer(help="Tenants and API keys.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")


def _logging() -> None:
    level = os.environ.get("LORAPLEX_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # library chatter (progress bars, deprecation notes) drowns our own log lines
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("huey").setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's own progress bar
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def start_workers(count: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], preexec_fn=_die_with_parent) for _ in range(count)
    ]


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # uvicorn re-raises the SIGTERM it caught once it has shut down; exiting here (not dying of the signal)
    # lets `serve` stop its workers on the way out.
    raise SystemExit(0)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(1, help="Worker processes to start beside the API (0: run them yourself)."),
) -> None:
    """Run the API server (and, by default, a worker process) until interrupted."""
    import uvicorn

    from app.db import migrate
    from web.main import create_app

    _logging()
    migrate()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    children = start_workers(workers)
    try:
        uvicorn.run(create_app(), host=host, port=port, log_level="warning")
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(timeout=30)


@app.command()
def worker(threads: int = typer.Option(0, help="Handler threads (0: LORAPLEX_WORKER_THREADS).")) -> None:
    """Run a worker: validates datasets and trains adapters from the event queue."""
    from app.db import migrate
    from app.queue import run_worker

    _logging()
    migrate()
    run_worker(threads or None)


@tenant_app.command("create")
def tenant_create(
    name: str,
    plan: str = typer.Option("developer", help="developer (sign-up credits, pay as you go) or enterprise."),
) -> None:
    """Create a tenant and print its first API key (shown once)."""
    from app.db import migrate, session_scope
    from app.tenants import create_tenant

    if plan not in ("developer", "enterprise"):
        raise typer.BadParameter("developer or enterprise", param_hint="--plan")
    migrate()
    with session_scope() as s:
        tenant, key = create_tenant(s, name, plan=plan)
        tenant_id = tenant.id
    typer.echo(f"tenant {name} ({tenant_id}, {plan})\nAPI key (shown once): {key}")


@tenant_app.command("prices")
def tenant_prices(name: str, prices_json: Path = typer.Argument(..., help="Overrides, see billing/prices.py.")) -> None:
    """Give an enterprise tenant its own prices, discount and volume tiers (checked before saving)."""
    import json

    from sqlalchemy import select

    from app.db import migrate, session_scope
    from app.models import BillingAccount, Tenant
    from billing.prices import DEFAULT

    try:
        overrides = json.loads(prices_json.read_text())
        DEFAULT.with_overrides(overrides)
    except (ValueError, TypeError, AttributeError) as exc:  # bad JSON or a PriceError naming the field
        raise typer.BadParameter(str(exc), param_hint="PRICES_JSON") from None
    migrate()
    with session_scope() as s:
        tenant = s.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise typer.BadParameter(f"no tenant named {name!r}", param_hint="NAME")
        account = s.get(BillingAccount, tenant.id) or BillingAccount(tenant_id=tenant.id)
        account.plan, account.prices = "enterprise", overrides
        s.add(account)
    typer.echo(f"tenant {name}: enterprise prices saved")


@app.command()
def prepare(base_model: str = "smollm2-135m") -> None:
    """Put a base model's weights on the volume (the bundled model is converted from GGUF once)."""
    from functions.base_models import ensure_local

    typer.echo(f"{base_model}: {ensure_local(base_model)}")


@app.command()
def demo(
    port: int = typer.Option(8765, help="Port for the demo's API server."),
    dataset: Path = typer.Option(Path(__file__).parent / "samples" / "support_triage.jsonl", help="JSONL or CSV."),
    epochs: int = typer.Option(3, help="Fine-tuning epochs."),
) -> None:
    """The main job: start the platform, fine-tune SmolLM2-135M on a sample dataset, compare answers and costs."""
    from app.demo import run_demo

    os.environ.setdefault("LORAPLEX_LOG_LEVEL", "WARNING")
    _logging()
    raise typer.Exit(run_demo(port=port, dataset=dataset, epochs=epochs))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
