"""Deployments benchmark on the bundled SmolLM2-135M: cold start from Standby to the first token, and a load test
of concurrent clients against a deployment with max_replicas 2.

    .venv/bin/python scripts/bench_deployments.py [--load-seconds 60] [--clients 8] [--cold-starts 3]

It starts `loraplex serve` as a real server process on a fresh data directory (the bundled weights are linked in
from the main volume, converting them once if needed), creates a tenant, and talks to the server over HTTP:

1. Cold start, with the pre-warmed interpreter (the default) and without it (a second server started with
   LORAPLEX_DEPLOYMENT_PREWARM=false): a deployment with min_replicas 0 and a 1 s cooldown is let fall to Standby,
   then one streamed request is timed to its first token. The breakdown (imports, weight load, health, first
   token) comes from the replica's own timings, reported by the runtime in GET /v1/deployments/{name}/metrics.
2. Load: `--clients` threads send chat requests (32 new tokens) back to back for `--load-seconds` to a
   deployment with min_replicas 1, max_replicas 2, scale_up_threshold 2: throughput, latency percentiles,
   replicas over time (sampled every second), and the count of errors by status (only 429 is acceptable).

Writes scripts/results/deployments_benchmark.json and .md.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    weights = _bundled_weights()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": MODEL,
    }
    with Server(weights, prewarm=True) as server:
        report["cold_start_prewarmed"] = cold_starts(server, "cold", args.cold_starts)
        report["load"] = load_test(server, args.load_seconds, args.clients, args.max_tokens)
    with Server(weights, prewarm=False) as server:
        report["cold_start_fresh_process"] = cold_starts(server, "fresh", max(1, args.cold_starts - 1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deployments_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "deployments_benchmark.md").write_text(markdown(report, args))
    print((RESULTS / "deployments_benchmark.md").read_text())


# ---- the server under test ------------------------------------------------------------------------------------


def _bundled_weights() -> Path:
    """The converted SmolLM2 directory on the main volume (converted from the bundled GGUF once)."""
    from functions.base_models import ensure_local

    return ensure_local(MODEL).resolve()


class Server:
    """`loraplex serve --workers N` (0 here: nothing is queued) on a fresh data directory, and a tenant's HTTP client
    (`key` its API key)."""

    def __init__(self, weights: Path, prewarm: bool, workers: int = 0) -> None:
        self.workers = workers
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-deployments-")
        data = Path(self.tmp.name)
        (data / "volume" / "base_models").mkdir(parents=True)
        (data / "volume" / "base_models" / MODEL).symlink_to(weights)
        self.env = os.environ | {
            "LORAPLEX_DATA_DIR": str(data),
            "DATABASE_URL": f"sqlite:///{data / 'loraplex.db'}",
            "LORAPLEX_LOG_LEVEL": "WARNING",
            "LORAPLEX_DEPLOYMENT_PREWARM": str(prewarm).lower(),
            "LORAPLEX_DEPLOYMENT_METRICS_INTERVAL": "5",
            "LORAPLEX_DEPLOYMENT_TICK_SECONDS": "0.1",
        }
        self.env.pop("LORAPLEX_DATABASE_URL", None)
        with socket_port() as port:
            self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.http: httpx.Client | None = None

    def __enter__(self) -> "Server":
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "app.cli", "serve", "--port", port, "--workers", str(self.workers)]
        self.process = subprocess.Popen(command, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the server did not start")
        self.key = key = (
            subprocess.run(
                [sys.executable, "-m", "app.cli", "tenant", "create", f"bench-{os.getpid()}-{time.time_ns()}"],
                env=self.env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.split("API key (shown once): ")[1]
            .strip()
        )
        limits = httpx.Limits(max_connections=64)
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.http is not None:
            self.http.close()
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.tmp.cleanup()

    def deployment(self, name: str) -> dict[str, Any]:
        assert self.http is not None
        return dict(self.http.get(f"/v1/deployments/{name}").json())

    def wait_status(self, name: str, status: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.deployment(name)
            if d["status"] == status:
                return d
            time.sleep(0.1)
        raise RuntimeError(f"{name} never became {status}")


class socket_port:
    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return int(self.s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.s.close()


# ---- 1. cold start ------------------------------------------------------------------------------------------


def cold_starts(server: Server, name: str, runs: int) -> dict[str, Any]:
    assert server.http is not None
    r = server.http.post(
        "/v1/deployments", json={"name": name, "base_model": MODEL, "min_replicas": 0, "cooldown_time": 1}
    )
    r.raise_for_status()
    results = []
    for _ in range(runs):
        server.wait_status(name, "Standby")
        time.sleep(8)  # the replica is gone; the spare interpreter (if any) has finished its imports
        results.append(one_cold_start(server, name))
        print(f"cold start ({name}): {results[-1]}", flush=True)
    server.http.delete(f"/v1/deployments/{name}", params={"wait": 60})
    ttft = [r["first_token_s"] for r in results]
    return {"runs": results, "first_token_s_median": statistics.median(ttft), "first_token_s_max": max(ttft)}


def one_cold_start(server: Server, name: str) -> dict[str, Any]:
    assert server.http is not None
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0, "stream": True}
    started = time.monotonic()
    first = None
    with server.http.stream("POST", f"/v1/deployments/{name}/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and first is None:
                chunk = json.loads(line.removeprefix("data: "))
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.monotonic() - started
    total = time.monotonic() - started
    metrics = server.http.get(f"/v1/deployments/{name}/metrics").json()
    record = metrics["cold_starts"][-1]
    ready_s = record["seconds"]
    return {
        "first_token_s": round(first or total, 3),
        "total_s": round(total, 3),
        "replica_ready_s": ready_s,  # the request's arrival to the replica answering /health
        "after_ready_to_first_token_s": round((first or total) - ready_s, 3),
        "prewarmed_interpreter": record.get("prewarmed"),
        "imports_s": record.get("imports_s"),  # in the replica process, before it got its command
        "handoff_to_weights_loaded_s": record.get("handoff_to_loaded_s"),
        "weights_load_s": record.get("load_s"),  # tokenizer + weights + engine set-up
        "spawn_to_healthy_s": record.get("healthy_s"),
    }


# ---- 2. load ------------------------------------------------------------------------------------------------


def load_test(server: Server, seconds: float, clients: int, max_tokens: int) -> dict[str, Any]:
    assert server.http is not None
    config = {"name": "load", "base_model": MODEL, "min_replicas": 1, "max_replicas": 2}
    config |= {"scale_up_threshold": 2, "cooldown_time": 20}
    server.http.post("/v1/deployments", json=config).raise_for_status()
    server.wait_status("load", "Ready")
    time.sleep(8)  # let the spare interpreter finish its imports: the scale-up uses it
    latencies: list[float] = []
    tokens: list[int] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": max_tokens, "min_tokens": max_tokens}

    def client() -> None:
        assert server.http is not None
        while not stop.is_set():
            began = time.monotonic()
            try:
                r = server.http.post("/v1/deployments/load/chat/completions", json=body)
            except httpx.HTTPError as exc:
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            with lock:
                if r.status_code == 200:
                    latencies.append(time.monotonic() - began)
                    tokens.append(r.json()["usage"]["completion_tokens"])
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            if r.status_code == 429:
                time.sleep(float(r.headers.get("Retry-After", "1")))

    timeline: list[dict[str, Any]] = []
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() - started < seconds:
        d = server.deployment("load")
        states = [r["state"] for r in d["live"]["replicas"]]
        timeline.append(
            {
                "t": round(time.monotonic() - started, 1),
                "status": d["status"],
                "ready": states.count("ready"),
                "starting": states.count("starting"),
                "in_flight": d["live"]["in_flight"],
            }
        )
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.monotonic() - started
    transitions = server.http.get("/v1/deployments/load/transitions").json()
    metrics = server.http.get("/v1/deployments/load/metrics", params={"minutes": 5}).json()
    usage = server.http.get("/v1/usage", params={"limit": 1000}).json()
    replica_seconds = sum(r["compute_ms"] for r in usage["records"] if r["kind"] == "deployment") / 1000
    server.http.delete("/v1/deployments/load", params={"wait": 120})
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3) if ordered else 0.0

    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests_ok": len(latencies),
        "errors_by_status": errors,
        "errors_other_than_429": sum(n for k, n in errors.items() if k != "429"),
        "requests_per_second": round(len(latencies) / elapsed, 2),
        "generated_tokens_per_second": round(sum(tokens) / elapsed, 1),
        "latency_s": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
        "max_ready_replicas": max((p["ready"] for p in timeline), default=0),
        "replicas_over_time": timeline,
        "scaling_events": [t for t in transitions if t["from_status"] == t["to_status"] or t["replicas"] is not None],
        "server_side_points": metrics["points"],
        "replica_seconds_metered": round(replica_seconds, 1),
    }


# ---- report -------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    warm, fresh, load = report["cold_start_prewarmed"], report["cold_start_fresh_process"], report["load"]

    def rows(runs: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"| {r['first_token_s']:.2f} | {r['replica_ready_s']:.2f} | {r['after_ready_to_first_token_s']:.2f} | "
            f"{r['imports_s'] if r['imports_s'] is not None else '-'} | {r['weights_load_s'] or '-'} | "
            f"{'yes' if r['prewarmed_interpreter'] else 'no'} |"
            for r in runs
        )

    events = "; ".join(
        f"{e['from_status']}->{e['to_status']} ({e['replicas']}): {e['reason']}" for e in load["scaling_events"]
    )
    timeline = " ".join(
        f"{p['t']:.0f}s:{p['ready']}" + (f"+{p['starting']}" if p["starting"] else "")
        for p in load["replicas_over_time"][::5]
    )
    return f"""# Deployments benchmark

`scripts/bench_deployments.py` on {report["machine"]["cpus"]} CPU cores (shared), the bundled `{MODEL}` served by
`loraplex serve` over HTTP. Replicas are engine processes started by the deployment runtime in the API process.

## Cold start: Standby to first token (target 5 s)

With the pre-warmed interpreter (default, `LORAPLEX_DEPLOYMENT_PREWARM=true`): median
**{warm["first_token_s_median"]:.2f} s**, worst {warm["first_token_s_max"]:.2f} s.
A fresh process per replica (`LORAPLEX_DEPLOYMENT_PREWARM=false`): median
**{fresh["first_token_s_median"]:.2f} s**, worst {fresh["first_token_s_max"]:.2f} s.

| first token, s | replica ready, s | ready to first token, s | replica imports, s | weights + engine, s | warm |
|---|---|---|---|---|---|
{rows(warm["runs"])}
{rows(fresh["runs"])}

"Replica ready" is measured by the runtime from the request's arrival to the replica answering /health with its
engine loaded; "imports" are the replica process's own imports (torch, transformers, the engine), done ahead of
time by a pre-warmed interpreter; "weights + engine load" is tokenizer, safetensors weights, the engine's bf16/fp32
copy and its KV cache.

## Load: {load["clients"]} concurrent clients for {load["seconds"]:.0f} s, max_replicas 2

Deployment: min_replicas 1, max_replicas 2, scale_up_threshold 2, cooldown_time 20 s; each request asks
{args.max_tokens} new tokens (chat, not streamed).

| requests ok | requests/s | generated tokens/s | p50 s | p90 s | p99 s | max s | errors other than 429 | 429s |
|---|---|---|---|---|---|---|---|---|
| {load["requests_ok"]} | {load["requests_per_second"]} | {load["generated_tokens_per_second"]} | \
{load["latency_s"]["p50"]} | {load["latency_s"]["p90"]} | {load["latency_s"]["p99"]} | {load["latency_s"]["max"]} | \
{load["errors_other_than_429"]} | {load["errors_by_status"].get("429", 0)} |

Ready replicas over time (every 5 s; `+n`: starting): {timeline}.
Most ready replicas: {load["max_ready_replicas"]}. Replica time on the ledger: {load["replica_seconds_metered"]} s.
Scaling events: {events or "none"}.

Raw figures: [deployments_benchmark.json](deployments_benchmark.json).
"""


if __name__ == "__main__":
    main()
