"""The `loraplex` client commands: datasets, fine-tuning, jobs and deployments of a running server, over HTTP
with the SDK (app/client.py). They import neither torch nor the database; app/cli.py mounts them."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

datasets_app = typer.Typer(help="Datasets, over the API (LORAPLEX_API_URL, LORAPLEX_API_KEY).", no_args_is_help=True)
finetune_app = typer.Typer(help="Fine-tuning, over the API (LORAPLEX_API_URL, LORAPLEX_API_KEY).", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Fine-tuning jobs, over the API (LORAPLEX_API_URL, LORAPLEX_API_KEY).", no_args_is_help=True
)
deployments_app = typer.Typer(
    help="Private deployments, over the API (LORAPLEX_API_URL, LORAPLEX_API_KEY).", no_args_is_help=True
)


# ---- client commands (over HTTP, with the SDK) -------------------------------------------------------------


@contextmanager
def _api() -> Iterator[Any]:
    """An SDK client from the environment; an API error becomes one line on stderr and exit code 1, not a
    traceback."""
    from rich.console import Console
    from rich.markup import escape

    from app.client import Loraplex, LoraplexError

    try:
        with Loraplex() as client:
            yield client
    except LoraplexError as exc:
        err = Console(stderr=True)
        err.print(f"[bold red]error[/]: {escape(str(exc))}")
        for row in exc.body.get("errors", [])[:20]:  # a refused dataset lists its bad rows
            where = f"line {row.get('line')}" + (f", {row['field']}" if row.get("field") else "")
            err.print(f"  {escape(where)}: {escape(str(row.get('message')))}")
        if exc.status == 401:
            err.print("Set LORAPLEX_API_KEY to a key from `loraplex tenant create`.")
        elif exc.status == 0:
            err.print("Is the server running? Set LORAPLEX_API_URL to its address (default http://127.0.0.1:8000).")
        raise typer.Exit(1) from None


@datasets_app.command("upload")
def datasets_upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="JSONL or CSV file."),
    name: str | None = typer.Option(None, help="Dataset name (default: the file name without extension)."),
    base_model: str = typer.Option("smollm2-135m", help="Whose tokenizer counts the tokens."),
) -> None:
    """Upload a dataset and wait until a worker validated it and counted its tokens."""
    with _api() as client:
        ds = client.upload_dataset(file, name=name, base_model=base_model)
    if ds["status"] != "ready":
        typer.echo(f"dataset {ds['name']}: still {ds['status']}; see it with GET /v1/datasets/{ds['name']}")
        return
    stats = ds["stats"]
    typer.echo(
        f"dataset {ds['name']} ready: {stats.get('rows')} rows ({stats.get('train_rows')} train, "
        f"{stats.get('evaluation_rows')} evaluation), {stats.get('total_tokens')} tokens "
        f"with the {base_model} tokenizer"
    )


@finetune_app.command("start")
def finetune_start(
    dataset: str = typer.Option(..., help="Name of a ready dataset."),
    repo: str = typer.Option(..., help="Adapter repository; the result is its next version, repo/N."),
    base_model: str = typer.Option("smollm2-135m", help="Model to fine-tune."),
    epochs: int | None = typer.Option(None, help="Passes over the training split (server default 3)."),
    learning_rate: float | None = typer.Option(None, help="Peak learning rate (server default 2e-4)."),
    rank: int | None = typer.Option(None, help="LoRA rank (server default 16)."),
    lora_alpha: int | None = typer.Option(None, help="LoRA alpha (server default 2 x rank)."),
    lora_dropout: float | None = typer.Option(None, help="LoRA dropout (server default 0.05)."),
    target_modules: str | None = typer.Option(None, help="Comma-separated, e.g. q_proj,k_proj,v_proj,o_proj."),
    max_seq_length: int | None = typer.Option(None, help="Truncate examples to this many tokens."),
    effective_batch_size: int | None = typer.Option(None, help="Examples per optimizer step."),
    seed: int | None = typer.Option(None, help="Seed for a reproducible run."),
    chat_template: bool | None = typer.Option(None, "--chat-template/--no-chat-template", help="Apply it to rows."),
    set_: list[str] = typer.Option([], "--set", help="Any other config field, KEY=VALUE (VALUE read as JSON)."),
    watch: bool = typer.Option(False, "--watch", help="Follow the job with a progress bar until it ends."),
) -> None:
    """Start a fine-tuning job; options left out take the server's defaults."""
    import json

    options = {
        "epochs": epochs,
        "learning_rate": learning_rate,
        "rank": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": [m.strip() for m in target_modules.split(",") if m.strip()] if target_modules else None,
        "max_seq_length": max_seq_length,
        "effective_batch_size": effective_batch_size,
        "seed": seed,
        "apply_chat_template": chat_template,
    }
    config: dict[str, Any] = {"base_model": base_model, "dataset": dataset, "repo": repo}
    config |= {key: value for key, value in options.items() if value is not None}
    for item in set_:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            config[key.strip()] = json.loads(raw)
        except ValueError:
            config[key.strip()] = raw  # a bare word: a string
    with _api() as client:
        job = client.create_job(**config)
        typer.echo(
            f"job {job['id']} {job['status']}: {job['estimate']['tokens']} tokens to process, "
            f"estimate {job['estimate']['cost']['usd']}"
        )
        if watch:
            _watch(client, job["id"])


@jobs_app.command("watch")
def jobs_watch(job_id: str = typer.Argument(..., help="The job's id (ft_...).")) -> None:
    """Follow a job live (step, loss, tokens/s, elapsed, ETA). Exit code 0 once it completed, 1 if it failed
    or was cancelled."""
    with _api() as client:
        _watch(client, job_id)


def _watch(client: Any, job_id: str) -> None:
    from app.watch import watch_job

    if not watch_job(client, job_id).completed:
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list() -> None:
    """Your fine-tuning jobs, oldest first."""
    from rich.console import Console
    from rich.table import Table

    with _api() as client:
        jobs = client.list_jobs()
    table = Table("id", "status", "base model", "dataset", "adapter", "steps", "estimate", "charge", "created")
    for job in jobs:
        table.add_row(
            job["id"],
            job["status"],
            job["base_model"],
            job["dataset"],
            job["adapter"] or f"{job['repo']}/-",
            str(job["total_steps"] or "-"),
            job["estimate"]["cost"]["usd"],
            job["charge"]["usd"] if job["charge"] else "-",
            job["created_at"][:19].replace("T", " "),
        )
    Console().print(table)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="The job's id (ft_...).")) -> None:
    """Cancel a job: a queued job never starts, a training one stops at its next step."""
    with _api() as client:
        job = client.cancel_job(job_id)
    typer.echo(f"job {job['id']} {job['status']}")


def _print_deployment(d: dict[str, Any]) -> None:
    live = d.get("live") or {}
    replicas = ", ".join(f"{r['id']} {r['state']} ({r['in_flight']} in flight)" for r in live.get("replicas", []))
    typer.echo(
        f"deployment {d['name']}: {d['status']} ({d['status_reason']}); {d['base_model']} on {d['accelerator']}, "
        f"{d['min_replicas']}..{d['max_replicas']} replicas, scale_up_threshold {d['scale_up_threshold']}, "
        f"cooldown {d['cooldown_time']:g} s, {d['price_per_replica_hour']['usd']}/replica-hour"
    )
    typer.echo(f"  replicas: {replicas or 'none'}; endpoint: {d['endpoint']}")


def _scaling_options(
    min_replicas: int | None, max_replicas: int | None, threshold: int | None, cooldown: float | None
) -> dict[str, Any]:
    options = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "scale_up_threshold": threshold,
        "cooldown_time": cooldown,
    }
    return {k: v for k, v in options.items() if v is not None}


@deployments_app.command("create")
def deployments_create(
    name: str = typer.Argument(..., help="Lowercase letters, digits and dashes."),
    base_model: str = typer.Option("smollm2-135m", help="Base model to serve."),
    accelerator: str = typer.Option("cpu", help="cpu here; a10g, l40s, a100-80gb, h100 on Modal."),
    engine: str = typer.Option("native", help="native or vllm."),
    min_replicas: int | None = typer.Option(None, help="Replicas kept up when idle (0: Standby when idle)."),
    max_replicas: int | None = typer.Option(None, help="Most replicas."),
    scale_up_threshold: int | None = typer.Option(None, help="Concurrent requests per replica before another."),
    cooldown_time: float | None = typer.Option(None, help="Seconds of lower load before scaling down."),
    preload: list[str] = typer.Option([], help="Adapter to load on every replica (repeat for more)."),
) -> None:
    """Create a private deployment that autoscales between min and max replicas."""
    config = _scaling_options(min_replicas, max_replicas, scale_up_threshold, cooldown_time)
    config |= {"accelerator": accelerator, "engine": engine, "preloaded_adapters": preload}
    with _api() as client:
        _print_deployment(client.create_deployment(name, base_model, **config))


@deployments_app.command("list")
def deployments_list() -> None:
    """Your deployments with their status and replicas."""
    with _api() as client:
        for d in client.list_deployments():
            _print_deployment(d)


@deployments_app.command("get")
def deployments_get(name: str) -> None:
    """One deployment, with its status transitions."""
    with _api() as client:
        d = client.get_deployment(name)
        transitions = client.deployment_transitions(name)
    _print_deployment(d)
    for t in transitions:
        typer.echo(f"  {t['at'][:19].replace('T', ' ')}  {t['from_status'] or '-'} -> {t['to_status']}: {t['reason']}")


@deployments_app.command("update")
def deployments_update(
    name: str,
    min_replicas: int | None = typer.Option(None),
    max_replicas: int | None = typer.Option(None),
    scale_up_threshold: int | None = typer.Option(None),
    cooldown_time: float | None = typer.Option(None),
    engine: str | None = typer.Option(None),
    preload: list[str] | None = typer.Option(None, help="Replaces the preloaded adapters (rolls the replicas)."),
) -> None:
    """Change the config; a change of engine or preloaded adapters rolls the replicas without dropping requests."""
    changes = _scaling_options(min_replicas, max_replicas, scale_up_threshold, cooldown_time)
    if engine is not None:
        changes["engine"] = engine
    if preload:
        changes["preloaded_adapters"] = preload
    with _api() as client:
        _print_deployment(client.update_deployment(name, **changes))


@deployments_app.command("stop")
def deployments_stop(name: str) -> None:
    """Drain every replica and refuse requests until moved to Standby."""
    with _api() as client:
        _print_deployment(client.stop_deployment(name))


@deployments_app.command("standby")
def deployments_standby(name: str) -> None:
    """Move a Stopped or Errored deployment to Standby: it scales up on the next request."""
    with _api() as client:
        _print_deployment(client.standby_deployment(name))


@deployments_app.command("delete")
def deployments_delete(name: str, wait: float = typer.Option(60.0, help="Seconds to wait for the drain.")) -> None:
    """Delete a deployment once its requests in flight have finished."""
    with _api() as client:
        _print_deployment(client.delete_deployment(name, wait=wait))
