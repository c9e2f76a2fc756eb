"""Load test of streaming chat completions: many concurrent clients for a while, against a running server.

    .venv/bin/python scripts/load_serving.py --url http://127.0.0.1:8000 --key lpx_... --clients 200 --seconds 60

Each client streams one request after another until the time is up. A request counts as completed when its
stream ends with a finish_reason and [DONE]; as refused when it is a 429 that carries Retry-After (the client
waits that long, capped at 1 s, and goes on). Anything else (5xx, a broken stream, a 429 without Retry-After)
is a failure. Prints and returns the counts with latency percentiles.
"""

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import httpx


async def run_load(url: str, headers: dict[str, str], model: str, clients: int, seconds: float) -> dict[str, Any]:
    counts = {"completed": 0, "refused_429": 0, "failed": 0}
    failures: list[str] = []
    first_token_ms: list[float] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as http:

        async def client(n: int) -> None:
            rng = random.Random(n)
            while time.monotonic() < deadline:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Client {n} says hello number {rng.randint(0, 999)}."}],
                    "max_tokens": rng.randint(4, 24),
                    "stream": True,
                }
                started = time.monotonic()
                try:
                    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                        if response.status_code == 429 and response.headers.get("retry-after"):
                            counts["refused_429"] += 1
                            await response.aread()
                            await asyncio.sleep(min(1.0, float(response.headers["retry-after"])))
                            continue
                        if response.status_code != 200:
                            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                        finish, done, first = None, False, None
                        async for line in response.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                choice = (json.loads(line[6:])["choices"] or [{}])[0]
                                if first is None and choice.get("delta", {}).get("content"):
                                    first = time.monotonic()
                                finish = choice.get("finish_reason") or finish
                        if not (done and finish):
                            raise RuntimeError("the stream ended without a finish_reason and [DONE]")
                        counts["completed"] += 1
                        if first is not None:
                            first_token_ms.append((first - started) * 1000)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    counts["failed"] += 1
                    failures.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(client(n) for n in range(clients)))
    first_token_ms.sort()
    return counts | {
        "clients": clients,
        "seconds": seconds,
        "first_token_ms_p50": round(statistics.median(first_token_ms), 1) if first_token_ms else None,
        "first_token_ms_p99": round(first_token_ms[int(0.99 * (len(first_token_ms) - 1))], 1)
        if first_token_ms
        else None,
        "failures": failures[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"}
    result = asyncio.run(run_load(args.url, headers, args.model, args.clients, args.seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
