"""The `loraplex` client commands: datasets, fine-tuning, jobs, deployments and API keys of a running server, over
HTTP with the SDK (app/client.py). They import neither torch nor the database; app/cli.py mounts them."""

import inspect
import typing
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
keys_app = typer.Typer(help="API keys, over the API (LORAPLEX_API_URL, LORAPLEX_API_KEY).", no_args_is_help=True)
# Older spellings of an option, still accepted: FinetuneConfig's field name -> extra flag declarations.
CLI_ALIASES = {"apply_chat_template": ("--chat-template/--no-chat-template",)}


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


def finetune_start(dataset: str, repo: str, base_model: str, set_: list[str], watch: bool, **fields: Any) -> None:
    """Start a fine-tuning job; options left out take the server's defaults."""
    import json

    config: dict[str, Any] = {"base_model": base_model, "dataset": dataset, "repo": repo}
    config |= {key: value for key, value in fields.items() if value is not None}
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


def _finetune_options() -> list[inspect.Parameter]:
    """`finetune start`'s options: one per field of the API's FinetuneConfig (so the CLI, the API and its schema
    cannot drift), typed from the field, with its description as help. An option left out is not sent, so the
    server applies its default; the server alone checks ranges (its error names the field)."""
    from functions.finetune_config import FinetuneConfig

    def option(name: str, kind: Any, info: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=info)

    options = [
        option("dataset", str, typer.Option(..., help="Name of a ready dataset.")),
        option("repo", str, typer.Option(..., help="Adapter repository; the result is its next version, repo/N.")),
        option("base_model", str, typer.Option("smollm2-135m", help="Model to fine-tune.")),
    ]
    for name, field in FinetuneConfig.model_fields.items():
        if name in ("dataset", "repo", "base_model"):
            continue
        default = "" if field.default is None else f" (server default {field.default})"
        help_text = f"{field.description}{default}"
        kinds = set(typing.get_args(field.annotation) or (field.annotation,)) - {type(None)}
        if kinds == {bool}:
            flag = name.replace("_", "-")
            decls = [f"--{flag}/--no-{flag}", *CLI_ALIASES.get(name, ())]
            options.append(option(name, bool | None, typer.Option(None, *decls, help=help_text)))
        elif len(kinds) == 1 and kinds <= {int, float}:
            options.append(option(name, kinds.pop() | None, typer.Option(None, help=help_text)))
        elif kinds == {list[str]}:
            parse = _comma_separated
            options.append(
                option(name, str | None, typer.Option(None, help=f"{help_text} Comma-separated.", callback=parse))
            )
        else:  # a string, a choice of strings, or a choice of a string and a number ("epoch" or 100)
            options.append(option(name, str | None, typer.Option(None, help=help_text, callback=_number_or_text)))
    options.append(
        option(
            "set_", list[str], typer.Option([], "--set", help="Any other config field, KEY=VALUE (VALUE read as JSON).")
        )
    )
    options.append(
        option("watch", bool, typer.Option(False, "--watch", help="Follow the job with a progress bar until it ends."))
    )
    return options


def _comma_separated(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value is not None else None


def _number_or_text(value: str | None) -> int | float | str | None:
    """'100' is the number 100 ('checkpoint_every'), 'epoch' and 'repo/3' stay text."""
    for kind in (int, float):
        try:
            return kind(value) if value is not None else None
        except ValueError:
            pass
    return value


# typer reads the options from the function's signature (mypy knows no __signature__ on functions)
finetune_start.__signature__ = inspect.Signature(_finetune_options())  # type: ignore[attr-defined]
finetune_app.command("start")(finetune_start)


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


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="What the key is for, e.g. 'ci'."),
    scope: str = typer.Option("all", help="all, inference (chat/completions, completions, models) or read (GET)."),
    expires_in_days: int | None = typer.Option(None, help="Days until it stops working (default: never)."),
) -> None:
    """Create an API key and print its secret, which is shown this once."""
    with _api() as client:
        key = client.create_api_key(name, scope=scope, expires_in_days=expires_in_days)
    expires = key["expires_at"][:19].replace("T", " ") if key["expires_at"] else "never"
    typer.echo(f"API key {key['id']} ({key['name']}, scope {key['scope']}, expires {expires})")
    typer.echo(f"secret (shown once): {key['key']}")


@keys_app.command("list")
def keys_list() -> None:
    """Your API keys (never their secrets), oldest first."""
    from rich.console import Console
    from rich.table import Table

    def when(value: str | None) -> str:
        return value[:19].replace("T", " ") if value else "-"

    with _api() as client:
        keys = client.list_api_keys()
    table = Table("id", "prefix", "name", "scope", "status", "created", "last used", "expires", "revoked")
    for key in keys:
        table.add_row(
            key["id"],
            key["prefix"],
            key["name"],
            key["scope"],
            key["status"],
            when(key["created_at"]),
            when(key["last_used_at"]),
            when(key["expires_at"]),
            when(key["revoked_at"]),
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (key_...), from `loraplex keys list`.")) -> None:
    """Revoke a key: every API process refuses it from the next request on. Your last active key cannot be revoked."""
    with _api() as client:
        key = client.revoke_api_key(key_id)
    typer.echo(f"API key {key['id']} ({key['name']}) revoked")
