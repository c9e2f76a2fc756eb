"""The `loraplex` server commands: serve the platform, run workers and engines, create tenants, run the demo. They
need the server extra (typer among it); app/cli.py, the entry point, sends them here. The client commands (datasets,
finetune, jobs, deployments, keys) are in app/cli_client.py, listed here for `--help` and run there."""

import os
import signal
from pathlib import Path

import typer

from app import cli_client
from app.logs import configure_logging

app = typer.Typer(
    help="Loraplex: fine-tune open LLMs and serve many adapters from one base model.", no_args_is_help=True
)
tenant_app = typer.Typer(help="Tenants and API keys.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
# Client commands: argparse in app/cli_client.py (so they run without the server extra); these entries list them in
# `loraplex --help` and pass everything after the command's name on. app/cli.py sends them there before typer.
PASS_ON = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _client_command(name: str, about: str) -> None:
    def run(ctx: typer.Context) -> None:
        raise typer.Exit(cli_client.main([name, *ctx.args]))

    app.command(name, help=f"{about}, {cli_client.ENV}.", context_settings=PASS_ON)(run)


for _name, _about in (
    ("datasets", "Datasets"),
    ("finetune", "Fine-tuning"),
    ("jobs", "Fine-tuning jobs"),
    ("deployments", "Private deployments"),
    ("keys", "API keys"),
):
    _client_command(_name, _about)


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
    """Run the API server (and, by default, a worker process, restarted when it dies) until interrupted."""
    import uvicorn

    from app.db import migrate
    from app.supervisor import WorkerSupervisor
    from web.main import create_app

    configure_logging()
    migrate()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    supervisor = WorkerSupervisor(workers).start()
    try:
        api = create_app()
        api.state.workers = supervisor  # GET /health reports them
        # Idle connections are kept 75 s: longer than clients keep theirs (httpx and the OpenAI SDK: 5 s), so a
        # client never sends a request on a connection the server is just closing.
        uvicorn.run(api, host=host, port=port, log_level="warning", timeout_keep_alive=75)
    finally:
        supervisor.stop()


@app.command()
def engine(
    base_model: str = typer.Option(..., help="Catalog name of the base model."),
    port: int = typer.Option(..., help="Port on 127.0.0.1."),
    model_dir: Path | None = typer.Option(None, help="Weights directory (a full fine-tuned model version)."),
    parent_pid: int = typer.Option(0, help="The process that started this one: exit once it is gone (0: the parent)."),
) -> None:
    """Run one base model's serving engine (started by the API; see functions/engine/server.py)."""
    # Read before the imports below, which take seconds: a parent that dies meanwhile is still noticed.
    parent = parent_pid or os.getppid()
    configure_logging()
    from functions.engine.server import serve_engine

    serve_engine(base_model, model_dir, "127.0.0.1", port, parent)


@app.command()
def worker(threads: int = typer.Option(0, help="Handler threads (0: LORAPLEX_WORKER_THREADS).")) -> None:
    """Run a worker: validates datasets and trains adapters from the event queue."""
    from app.db import migrate
    from app.queue import run_worker
    from app.worker_main import wire

    configure_logging()
    migrate()
    wire()
    run_worker(threads or None)


@tenant_app.command("create")
def tenant_create(
    name: str,
    plan: str = typer.Option("developer", help="developer (sign-up credits, pay as you go) or enterprise."),
) -> None:
    """Create a tenant and print its first API key (shown once)."""
    from app.db import migrate, session_scope
    from app.names import NAME
    from billing.signup import create_tenant

    if plan not in ("developer", "enterprise"):
        raise typer.BadParameter("developer or enterprise", param_hint="--plan")
    if not NAME.matches(name):
        raise typer.BadParameter(NAME.rule, param_hint="NAME")
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


@app.command("modal-check")
def modal_check(
    stripe: bool = typer.Option(True, "--stripe/--without-stripe", help="Check the Stripe keys (billing sync)."),
) -> None:
    """Check a Modal set-up: the loraplex-db secret, the database (this shell's DATABASE_URL), the volume; exit 1 and
    say what is missing if anything is (app/cli_modal.py)."""
    from app.cli_modal import check, live_lookups, report

    raise typer.Exit(report(check(live_lookups(), stripe=stripe)))


@app.command()
def prepare(base_model: str = "smollm2-135m") -> None:
    """Put a base model's weights on the volume (the bundled model is converted from GGUF once)."""
    from functions.base_models import ensure_local

    typer.echo(f"{base_model}: {ensure_local(base_model)}")


@app.command()
def demo(
    port: int = typer.Option(8765, help="Port for the demo's API server."),
    dataset: Path = typer.Option(Path(__file__).parent / "samples" / "support_triage.jsonl", help="JSONL or CSV."),
    epochs: int | None = typer.Option(None, help="Fine-tuning epochs; derived from the dataset if unset ('auto')."),
) -> None:
    """The main job: start the platform, fine-tune SmolLM2-135M on a sample dataset, compare answers and costs."""
    from app.demo import run_demo

    os.environ.setdefault("LORAPLEX_LOG_LEVEL", "WARNING")
    configure_logging()
    raise typer.Exit(run_demo(port=port, dataset=dataset, epochs=epochs))
