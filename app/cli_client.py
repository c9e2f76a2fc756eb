"""The `loraplex` client commands: datasets, fine-tuning, jobs, deployments and API keys of a running server, over
HTTP with the SDK (loraplex/). They need the standard library and the SDK only (argparse, no typer or rich), so they
work from `pip install loraplex` without the server extra; app/cli.py sends these commands here in every install."""

import argparse
import json
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraplex import Loraplex, LoraplexError
from loraplex.configs import CONFIGS, SFTConfig
from loraplex.progress import watch_job

COMMANDS = ("datasets", "finetune", "jobs", "deployments", "keys")
ENV = "over the API (LORAPLEX_API_URL, LORAPLEX_API_KEY)"
# Older spellings of an option, still accepted: SFTConfig's field name -> extra flags.
CLI_ALIASES = {"apply_chat_template": ("--chat-template",)}


class Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def main(argv: Sequence[str]) -> int:
    """Run one client command (`argv` without the program name); answers the exit code."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except Exit as exc:
        return exc.code
    return 0


# ---- the commands -------------------------------------------------------------------------------------------------


def datasets_upload(args: argparse.Namespace) -> None:
    """Upload a dataset and wait until a worker validated it and counted its tokens."""
    with _api() as client:
        ds = client.upload_dataset(args.file, name=args.name, base_model=args.base_model)
    _print_dataset(ds, args.base_model)


def _print_dataset(ds: dict[str, Any], base_model: str) -> None:
    if ds["status"] != "ready":
        print(f"dataset {ds['name']}: still {ds['status']}; see it with GET /v1/datasets/{ds['name']}")
        return
    stats = ds["stats"]
    print(
        f"dataset {ds['name']} ready: {stats.get('rows')} rows ({stats.get('train_rows')} train, "
        f"{stats.get('evaluation_rows')} evaluation), {stats.get('total_tokens')} tokens "
        f"with the {base_model} tokenizer"
    )


def datasets_import(args: argparse.Namespace) -> None:
    """Create a dataset from an s3://, gs:// or https:// URL and wait until a worker validated it."""
    try:
        credentials = json.loads(args.credentials.read_text()) if args.credentials else None
    except ValueError as exc:
        raise SystemExit(f"--credentials: {args.credentials} is not JSON ({exc})") from None
    with _api() as client:
        ds = client.import_dataset(args.url, name=args.name, base_model=args.base_model, credentials=credentials)
    _print_dataset(ds, args.base_model)


def datasets_list(args: argparse.Namespace) -> None:
    """Your datasets, oldest first."""
    with _api() as client:
        rows = client.list_datasets()
    _table(
        ("name", "status", "base model", "rows", "tokens", "created"),
        [
            (
                d["name"],
                d["status"],
                d["base_model"],
                d["stats"].get("rows", "-"),
                d["stats"].get("total_tokens", "-"),
                _when(d["created_at"]),
            )  # fmt: skip
            for d in rows
        ],
    )


def finetune_start(args: argparse.Namespace) -> None:
    """Start a fine-tuning job; options left out take the server's defaults (and the server checks ranges)."""
    with _api() as client:
        job = client.create_job(**_job_config(args))
        print(
            f"job {job['id']} {job['status']}: {job['estimate']['tokens']} tokens to process, "
            f"estimate {job['estimate']['cost']['usd']}"
        )
        if args.watch:
            _watch(client, job["id"])


def finetune_quote(args: argparse.Namespace) -> None:
    """What `finetune start` with the same options would cost and train, without starting anything."""
    with _api() as client:
        quote = client.quote_job(**_job_config(args))
    estimate = quote["estimate"]
    print(f"estimate {estimate['cost']['usd']} for {estimate['tokens']:,} tokens to process")
    for name, value in sorted(quote["auto"].items()):
        print(f"  {name} = {value} (auto)")
    for warning in quote["warnings"]:
        print(f"  warning: {warning}")
    print("your credit covers it" if quote["can_start"] else f"it would be refused: {quote['refusal']}")


def _job_config(args: argparse.Namespace) -> dict[str, Any]:
    """The API's job config from `finetune start`'s (and `quote`'s) options: only those given."""
    config: dict[str, Any] = {"base_model": args.base_model, "dataset": args.dataset, "repo": args.repo}
    config |= {name: getattr(args, name) for name in ["method", *_config_fields()] if getattr(args, name) is not None}
    for key, value in args.set:
        config[key] = value
    return config


def jobs_watch(args: argparse.Namespace) -> None:
    """Follow a job live (step, loss, tokens/s, elapsed, ETA); exit code 0 once it completed, 1 if it failed or was
    cancelled."""
    with _api() as client:
        _watch(client, args.job_id)


def jobs_list(args: argparse.Namespace) -> None:
    """Your fine-tuning jobs, oldest first."""
    with _api() as client:
        jobs = client.list_jobs()
    headers = ("id", "status", "base model", "dataset", "adapter", "steps", "estimate", "charge", "created")
    _table(
        headers,
        [
            (
                j["id"],
                j["status"],
                j["base_model"],
                j["dataset"],
                j["adapter"] or f"{j['repo']}/-",
                j["total_steps"] or "-",
                j["estimate"]["cost"]["usd"],
                j["charge"]["usd"] if j["charge"] else "-",
                _when(j["created_at"]),
            )  # fmt: skip
            for j in jobs
        ],
    )


def jobs_cancel(args: argparse.Namespace) -> None:
    """Cancel a job: a queued job never starts, a training one stops at its next step."""
    with _api() as client:
        job = client.cancel_job(args.job_id)
    print(f"job {job['id']} {job['status']}")


def deployments_create(args: argparse.Namespace) -> None:
    """Create a private deployment that autoscales between min and max replicas."""
    config = _scaling(args) | {"accelerator": args.accelerator, "engine": args.engine}
    config["preloaded_adapters"] = args.preload
    with _api() as client:
        _print_deployment(client.create_deployment(args.name, args.base_model, **config))


def deployments_list(args: argparse.Namespace) -> None:
    """Your deployments with their status and replicas."""
    with _api() as client:
        for d in client.list_deployments():
            _print_deployment(d)


def deployments_get(args: argparse.Namespace) -> None:
    """One deployment, with its status transitions."""
    with _api() as client:
        d = client.get_deployment(args.name)
        transitions = client.deployment_transitions(args.name)
    _print_deployment(d)
    for t in transitions:
        print(f"  {_when(t['at'])}  {t['from_status'] or '-'} -> {t['to_status']}: {t['reason']}")


def deployments_update(args: argparse.Namespace) -> None:
    """Change the config; a change of engine or preloaded adapters rolls the replicas without dropping requests."""
    changes = _scaling(args) | ({"engine": args.engine} if args.engine is not None else {})
    if args.preload:
        changes["preloaded_adapters"] = args.preload
    with _api() as client:
        _print_deployment(client.update_deployment(args.name, **changes))


def deployments_stop(args: argparse.Namespace) -> None:
    """Drain every replica and refuse requests until moved to Standby."""
    with _api() as client:
        _print_deployment(client.stop_deployment(args.name))


def deployments_standby(args: argparse.Namespace) -> None:
    """Move a Stopped or Errored deployment to Standby: it scales up on the next request."""
    with _api() as client:
        _print_deployment(client.standby_deployment(args.name))


def deployments_delete(args: argparse.Namespace) -> None:
    """Delete a deployment once its requests in flight have finished."""
    with _api() as client:
        _print_deployment(client.delete_deployment(args.name, wait=args.wait))


def keys_create(args: argparse.Namespace) -> None:
    """Create an API key and print its secret, which is shown this once."""
    with _api() as client:
        key = client.create_api_key(args.name, scope=args.scope, expires_in_days=args.expires_in_days)
    expires = _when(key["expires_at"]) if key["expires_at"] else "never"
    print(f"API key {key['id']} ({key['name']}, scope {key['scope']}, expires {expires})")
    print(f"secret (shown once): {key['key']}")


def keys_list(args: argparse.Namespace) -> None:
    """Your API keys (never their secrets), oldest first."""
    with _api() as client:
        keys = client.list_api_keys()
    headers = ("id", "prefix", "name", "scope", "status", "created", "last used", "expires", "revoked")
    _table(
        headers,
        [
            (
                k["id"],
                k["prefix"],
                k["name"],
                k["scope"],
                k["status"],
                _when(k["created_at"]),
                _when(k["last_used_at"]),
                _when(k["expires_at"]),
                _when(k["revoked_at"]),
            )  # fmt: skip
            for k in keys
        ],
    )


def keys_revoke(args: argparse.Namespace) -> None:
    """Revoke a key: every API process refuses it from the next request on. Your last active key cannot be revoked."""
    with _api() as client:
        key = client.revoke_api_key(args.key_id)
    print(f"API key {key['id']} ({key['name']}) revoked")


# ---- helpers ------------------------------------------------------------------------------------------------------


@contextmanager
def _api() -> Iterator[Loraplex]:
    """An SDK client from the environment; an API error becomes one line on stderr (and the rows of a refused
    dataset) and exit code 1, not a traceback."""
    try:
        with Loraplex() as client:
            yield client
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for row in exc.body.get("errors", [])[:20]:  # a refused dataset lists its bad rows
            where = f"line {row.get('line')}" + (f", {row['field']}" if row.get("field") else "")
            print(f"  {where}: {row.get('message')}", file=sys.stderr)
        if exc.status == 401:
            print("Set LORAPLEX_API_KEY to a key from `loraplex tenant create`.", file=sys.stderr)
        elif exc.status == 0:
            print("Is the server running? Set LORAPLEX_API_URL to its address (default http://127.0.0.1:8000).",
                  file=sys.stderr)  # fmt: skip
        raise Exit(1) from None


def _watch(client: Loraplex, job_id: str) -> None:
    job, _ = watch_job(client, job_id)
    if job["status"] != "completed":
        raise Exit(1)


def _print_deployment(d: dict[str, Any]) -> None:
    live = d.get("live") or {}
    replicas = ", ".join(f"{r['id']} {r['state']} ({r['in_flight']} in flight)" for r in live.get("replicas", []))
    print(
        f"deployment {d['name']}: {d['status']} ({d['status_reason']}); {d['base_model']} on {d['accelerator']}, "
        f"{d['min_replicas']}..{d['max_replicas']} replicas, scale_up_threshold {d['scale_up_threshold']}, "
        f"cooldown {d['cooldown_time']:g} s, {d['price_per_replica_hour']['usd']}/replica-hour"
    )
    print(f"  replicas: {replicas or 'none'}; endpoint: {d['endpoint']}")


def _scaling(args: argparse.Namespace) -> dict[str, Any]:
    names = ("min_replicas", "max_replicas", "scale_up_threshold", "cooldown_time")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    cells = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def _config_field(name: str) -> Any:
    """A field of the SDK's configs (SFTConfig's, then those of one method only: DPOConfig's beta)."""
    return next(config.model_fields[name] for config in CONFIGS.values() if name in config.model_fields)


def _description(name: str) -> str:
    """The field's help; a field the methods describe differently (beta: its default) says each method's."""
    said = {method: c.model_fields[name].description for method, c in CONFIGS.items() if name in c.model_fields}
    if len(set(said.values())) == 1:
        return next(iter(said.values())) or ""
    return "; ".join(f"{method}: {(text or '').rstrip('.')}" for method, text in said.items()) + "."


def _config_fields() -> list[str]:
    names = dict.fromkeys(name for config in CONFIGS.values() for name in config.model_fields)
    return [name for name in names if name != "base_model"]


def _finetune_options(parser: argparse.ArgumentParser, watch: bool = True) -> None:
    """`finetune start`'s options: --method, and one per field of the SDK's configs (SFTConfig, and DPOConfig's
    beta), which tests/app/test_sdk_configs.py keeps equal to the server's FinetuneConfig (so the CLI, the SDK and
    the API cannot drift), typed from the field, with its description as help. An option left out is not sent, so
    the server applies its default; a field of another method is refused by the server, naming it."""
    parser.add_argument("--dataset", required=True, help="Name of a ready dataset.")
    parser.add_argument("--repo", required=True, help="Adapter repository; the result is its next version, repo/N.")
    parser.add_argument("--base-model", default="smollm2-135m", help="Model to fine-tune (default smollm2-135m).")
    parser.add_argument(
        "--method", choices=list(CONFIGS), help=f"Training method (server default {SFTConfig.method}): "
        "'sft' learns each row's answer; 'dpo' learns to prefer 'chosen' over 'rejected' (a preference dataset); "
        "'grpo' learns from --reward-functions' scores of its own completions (a dataset of prompts)."
    )  # fmt: skip
    for name in _config_fields():
        field = _config_field(name)
        flags = [f"--{name.replace('_', '-')}"]
        default = "" if field.default is None else f" (server default {field.default})"
        help_text = f"{_description(name)}{default}".replace("%", "%%")
        kinds = set(typing.get_args(field.annotation) or (field.annotation,)) - {type(None)}
        if kinds == {bool}:
            flags += CLI_ALIASES.get(name, ())
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif len(kinds) == 1 and kinds <= {int, float}:
            parser.add_argument(*flags, dest=name, type=kinds.pop(), help=help_text)
        elif kinds == {list[str]}:
            parser.add_argument(*flags, dest=name, type=_comma_separated, help=f"{help_text} Comma-separated.")
        elif any(typing.get_origin(kind) is list for kind in kinds):  # GRPO's reward_functions: a list of objects
            parser.add_argument(*flags, dest=name, type=_json_value, help=f"{help_text} JSON, or @file.json.")
        else:  # a string, a choice of strings, or a choice of a string and a number ("epoch" or 100)
            parser.add_argument(*flags, dest=name, type=_number_or_text, help=help_text)
    parser.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="Any other config field (VALUE read as JSON).")  # fmt: skip
    if watch:
        parser.add_argument("--watch", action="store_true", help="Follow the job until it ends.")


def _json_value(value: str) -> Any:
    """JSON given inline, or '@path' of a file holding it."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _comma_separated(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _number_or_text(value: str) -> int | float | str:
    """'100' is the number 100 ('checkpoint_every'), 'epoch' and 'repo/3' stay text."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        return key.strip(), raw  # a bare word: a string


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=f"Loraplex client commands, {ENV}.")
    groups = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(group: Any, name: str, run: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        about = " ".join((run.__doc__ or "").split())
        sub = group.add_parser(name, help=about, description=about)
        sub.set_defaults(run=run)
        return sub

    def group(name: str, about: str) -> Any:
        sub = groups.add_parser(name, help=f"{about}, {ENV}.", description=f"{about}, {ENV}.")
        return sub.add_subparsers(title="commands", required=True, metavar="COMMAND")

    datasets = group("datasets", "Datasets")
    add = command(datasets, "upload", datasets_upload).add_argument
    add("file", type=_existing_file, help="JSONL or CSV file.")
    add("--name", help="Dataset name (default: the file name without extension).")
    add("--base-model", default="smollm2-135m", help="Whose tokenizer counts the tokens.")
    add = command(datasets, "import", datasets_import).add_argument
    add("url", help="s3://bucket/key, gs://bucket/key or https://... of a JSONL or CSV file.")
    add("--name", help="Dataset name (default: the file name without extension).")
    add("--base-model", default="smollm2-135m", help="Whose tokenizer counts the tokens.")
    add("--credentials", type=_existing_file, help="A JSON file of the credentials for this read (never stored).")
    command(datasets, "list", datasets_list)

    finetune = group("finetune", "Fine-tuning")
    _finetune_options(command(finetune, "start", finetune_start))
    _finetune_options(command(finetune, "quote", finetune_quote), watch=False)

    jobs = group("jobs", "Fine-tuning jobs")
    command(jobs, "watch", jobs_watch).add_argument("job_id", help="The job's id (ft_...).")
    command(jobs, "list", jobs_list)
    command(jobs, "cancel", jobs_cancel).add_argument("job_id", help="The job's id (ft_...).")

    deployments = group("deployments", "Private deployments")
    create = command(deployments, "create", deployments_create)
    create.add_argument("name", help="Lowercase letters, digits and dashes.")
    create.add_argument("--base-model", default="smollm2-135m", help="Base model to serve.")
    create.add_argument("--accelerator", default="cpu", help="cpu here; a10g, l40s, a100-80gb, h100 on Modal.")
    create.add_argument("--engine", default="native", help="native or vllm.")
    update = command(deployments, "update", deployments_update)
    update.add_argument("name")
    update.add_argument("--engine")
    for sub in (create, update):
        sub.add_argument("--min-replicas", type=int, help="Replicas kept up when idle (0: Standby when idle).")
        sub.add_argument("--max-replicas", type=int, help="Most replicas.")
        sub.add_argument("--scale-up-threshold", type=int, help="Concurrent requests per replica before another.")
        sub.add_argument("--cooldown-time", type=float, help="Seconds of lower load before scaling down.")
        sub.add_argument("--preload", action="append", default=[], help="Adapter loaded on every replica (repeat).")
    command(deployments, "list", deployments_list)
    for name, run in (("get", deployments_get), ("stop", deployments_stop), ("standby", deployments_standby)):
        command(deployments, name, run).add_argument("name")
    delete = command(deployments, "delete", deployments_delete)
    delete.add_argument("name")
    delete.add_argument("--wait", type=float, default=60.0, help="Seconds to wait for the drain.")

    keys = group("keys", "API keys")
    add = command(keys, "create", keys_create).add_argument
    add("name", help="What the key is for, e.g. 'ci'.")
    add("--scope", default="all", help="all, inference (chat/completions, completions, models) or read (GET).")
    add("--expires-in-days", type=int, help="Days until it stops working (default: never).")
    command(keys, "list", keys_list)
    command(keys, "revoke", keys_revoke).add_argument("key_id", help="The key's id (key_...).")
    return parser
