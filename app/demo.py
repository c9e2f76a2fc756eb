"""The main job, end to end on one machine: start the platform, upload a dataset, see the quote, fine-tune
SmolLM2-135M with LoRA on CPU, then ask the base model and the adapter the same questions through the
OpenAI-compatible API and show both answers with what everything cost."""

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from openai import OpenAI
from rich.console import Console
from rich.table import Table

from app.watch import watch_job
from loraplex import Loraplex, LoraplexError

BASE_MODEL = "smollm2-135m"
TABLE_ROWS = 4  # held-out answers shown side by side
# Wide enough for four answer columns even when the output is a log file rather than a terminal.
console = Console(width=None if Console().is_terminal else 140)


def run_demo(port: int, dataset: Path, epochs: int | None) -> int:
    started = time.monotonic()
    run_started = datetime.now(UTC)
    _prepare_model()
    api_key = _demo_key()
    quiet = os.environ | {"LORAPLEX_LOG_LEVEL": os.environ.get("LORAPLEX_LOG_LEVEL", "WARNING")}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "1"], env=quiet
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, server)
        http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=300)
        name = f"{dataset.stem.replace('_', '-')}-{int(time.time())}"
        ds = _upload(http, dataset, name)
        job = _train(Loraplex(base_url, api_key, timeout=300), name, epochs)
        _compare(base_url, api_key, dataset, job["adapter"])
        _costs(http, job, run_started)
        console.print(
            f"\n[bold green]Done in {time.monotonic() - started:.0f} s.[/] Dataset {ds['name']}, "
            f"adapter [bold]{job['adapter']}[/]. Serve it yourself: `loraplex serve`, then "
            f"OpenAI(base_url='http://127.0.0.1:8000/v1', api_key=<key>).chat.completions.create("
            f"model='{job['adapter']}', ...)"
        )
        return 0
    finally:
        server.terminate()
        server.wait(timeout=60)


def _prepare_model() -> None:
    from functions.base_models import ensure_local

    with console.status("Preparing the bundled SmolLM2-135M-Instruct (converted from GGUF once)..."):
        t = time.monotonic()
        path = ensure_local(BASE_MODEL)
    console.print(f"Base model ready at {path} ({time.monotonic() - t:.1f} s)")


def _demo_key() -> str:
    from sqlalchemy import select

    from app.db import migrate, session_scope
    from app.models import Tenant
    from app.tenants import create_key
    from billing.signup import create_tenant

    migrate()
    with session_scope() as s:
        tenant = s.scalar(select(Tenant).where(Tenant.name == "demo"))
        if tenant is None:
            return create_tenant(s, "demo")[1]
        return create_key(s, tenant)


def _wait_healthy(base_url: str, server: subprocess.Popen[bytes]) -> None:
    with console.status("Starting the API server and a worker..."):
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"the server exited with code {server.returncode}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise SystemExit("the server did not become healthy in 120 s")


def _upload(http: httpx.Client, dataset: Path, name: str) -> dict:
    status = console.status(f"Uploading {dataset.name}; a worker validates it and counts tokens...")
    with status, dataset.open("rb") as f:
        r = http.post("/v1/datasets", files={"file": (dataset.name, f)}, data={"name": name, "base_model": BASE_MODEL})
    body = r.json()
    if r.status_code != 201:
        raise SystemExit(f"upload failed ({r.status_code}): {json.dumps(body, indent=2)[:2000]}")
    s = body["stats"]
    console.print(
        f"Dataset [bold]{name}[/]: {s['rows']} rows ({s['train_rows']} train, {s['evaluation_rows']} "
        f"evaluation), {s['total_tokens']:,} tokens, mean {s['mean_tokens_per_row']} / max "
        f"{s['max_tokens_per_row']} per row with the {BASE_MODEL} tokenizer and chat template"
    )
    return body


def _train(client: Loraplex, dataset: str, epochs: int | None) -> dict:
    # What a new user sends: the defaults derive the rest from the dataset (functions/auto_config.py).
    config: dict = {"base_model": BASE_MODEL, "dataset": dataset, "repo": "support-triage"}
    if epochs is not None:
        config["epochs"] = epochs
    try:
        job = client.create_job(**config)
    except LoraplexError as exc:
        raise SystemExit(f"job refused: {exc}") from None
    chosen = job["config"]
    console.print(
        f"Defaults from the dataset: {chosen['epochs']} epochs, learning rate {chosen['learning_rate']:g}, batch "
        f"{chosen['effective_batch_size']}, max_seq_length {chosen['max_seq_length']}, LoRA r{chosen['rank']} on "
        "every linear layer"
    )
    console.print(
        f"Price quote: {job['estimate']['tokens']:,} tokens processed = "
        f"[bold]{job['estimate']['cost']['usd']}[/] (LoRA, up to 16B parameters: $0.50 per 1M tokens)"
    )
    result = watch_job(client, job["id"], console)  # the progress bar of `loraplex jobs watch`, from the SSE stream
    if not result.completed:
        raise SystemExit(f"fine-tuning {result.job['status']}: {result.job['error']}")
    _evaluation(result.job)
    return result.job


def _evaluation(job: dict) -> None:
    """The job's own evaluation on the held-out split: before training (step 0) and at the step it published (the
    evaluated step with the best task metric)."""
    summary = job.get("summary") or {}
    if "baseline" not in summary or "best" not in summary:
        return
    table = Table(title=f"Evaluation on {summary['evaluation_rows']} held-out rows (the job's metrics)")
    for column in ("", "loss", "perplexity", "token accuracy", "sequence accuracy", "char error rate"):
        table.add_column(column, justify="right")
    for label, row in (
        (f"{BASE_MODEL} (step 0)", summary["baseline"]),
        (f"{job['adapter']} (step {summary['best']['step']} of {summary['steps_done']})", summary["best"]),
    ):
        table.add_row(
            label,
            f"{row['loss']:.3f}",
            f"{row['perplexity']:.2f}",
            f"{row['token_accuracy']:.1%}",
            _percent(row["sequence_accuracy"]),
            _percent(row["char_error_rate"]),
        )
    console.print(table)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _compare(base_url: str, api_key: str, dataset: Path, adapter: str) -> None:
    """The held-out rows, asked of the base model and of the adapter through the official openai SDK: a table of
    the first few answers and the exact-match score over all of them."""
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300)
    rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    held_out = [r for r in rows if r.get("split") == "evaluation" and "prompt" in r and "completion" in r]
    if not held_out:
        console.print("(no held-out prompt/completion rows in this dataset: skipping the comparison)")
        return
    table = Table(title="Held-out rows: base model vs fine-tuned adapter", show_lines=True)
    for column in ("prompt", BASE_MODEL, adapter, "expected"):
        table.add_column(column, overflow="fold")
    exact = {BASE_MODEL: 0, adapter: 0}
    with console.status(f"Asking both models the {len(held_out)} held-out rows..."):
        for i, row in enumerate(held_out):
            answers = []
            for model in (BASE_MODEL, adapter):
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": row["prompt"]}], max_tokens=48, temperature=0
                )
                answers.append(reply.choices[0].message.content or "")
                exact[model] += answers[-1].strip() == row["completion"].strip()
            if i < TABLE_ROWS:
                table.add_row(row["prompt"], *answers, row["completion"])
    console.print(table)
    console.print(
        f"Exact answers on {len(held_out)} held-out rows: base model [bold]{exact[BASE_MODEL]}[/], "
        f"fine-tuned [bold]{exact[adapter]}[/]"
    )


def _costs(http: httpx.Client, job: dict, since: datetime) -> None:
    """What this run cost, from the tenant's ledger, and the credit left."""
    usage = http.get("/v1/usage", params={"since": since.isoformat()}).json()
    inference = usage["by_kind"]["inference"]
    charge = http.get(f"/v1/finetuning/jobs/{job['id']}").json()["charge"]
    console.print(f"Fine-tuning charged: [bold]{charge['usd']}[/] (quoted {job['estimate']['cost']['usd']})")
    price = (
        "free: inside the shared endpoint's daily allowance"
        if inference["cost"]["micro_usd"] == 0
        else "$0.20 per 1M tokens beyond the free allowance"
    )
    console.print(
        f"Inference: {inference['records']} requests, {inference['input_tokens']:,} prompt + "
        f"{inference['output_tokens']:,} generated tokens = [bold]{inference['cost']['usd']}[/] ({price})"
    )
    balance = http.get("/v1/billing/balance").json()
    console.print(
        f"This run on the ledger: [bold]{usage['totals']['cost']['usd']}[/]; "
        f"credit left: [bold]{balance['credit']['usd']}[/] of the developer sign-up credit"
    )


if __name__ == "__main__":
    os.environ.setdefault("LORAPLEX_LOG_LEVEL", "WARNING")
    raise SystemExit(run_demo(8765, Path(__file__).parent / "samples" / "support_triage.jsonl", 3))
