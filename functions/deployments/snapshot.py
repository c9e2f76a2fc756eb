"""What the runtime holds, read under its lock for the API (a deployment's replicas and load), Prometheus (the
gauges) and the tests (the replicas' process ids)."""

from typing import Any

from functions.deployments.live import Fleet
from functions.deployments.metrics import Gauges


def describe(fleet: Fleet, deployment_id: str, now: float) -> dict[str, Any]:
    """Live replicas and load, for GET /v1/deployments/{name}; `now` is the runtime's clock."""
    with fleet.lock:
        live = fleet.deployments.get(deployment_id)
        if live is None:
            return {"replicas": [], "in_flight": 0, "waiting": 0}
        return {
            "replicas": [
                {
                    "id": r.id,
                    "state": r.state,
                    "in_flight": r.in_flight,
                    "served": r.served,
                    "adapters": [live.adapter_names.get(k, "(loaded)") for k in r.adapters],
                    "config_version": r.config_version,
                    "prewarmed": r.prewarmed,
                    "up_seconds": round(now - r.spawned_at, 1),
                    "start_seconds": round(r.ready_at - r.spawned_at, 3) if r.ready_at is not None else None,
                }
                for r in live.replicas
                if r.state in ("starting", "ready", "draining", "stopping")
            ],
            "in_flight": sum(r.in_flight for r in live.replicas),
            "waiting": live.waiting,
        }


def gauges(fleet: Fleet) -> list[Gauges]:
    """Per deployment: its replicas by state, requests in flight and waiting."""
    with fleet.lock:
        out = []
        for live in fleet.deployments.values():
            states: dict[str, int] = {}
            for r in live.replicas:
                states[r.state] = states.get(r.state, 0) + 1
            out.append(
                Gauges(
                    live.id,
                    live.name,
                    live.tenant_id,
                    live.accelerator,
                    live.status,
                    states,
                    sum(r.in_flight for r in live.replicas),
                    live.waiting,
                )
            )
        return out


def replica_pids(fleet: Fleet, deployment_id: str) -> list[int]:
    """The process ids of the deployment's ready replicas."""
    with fleet.lock:
        live = fleet.deployments.get(deployment_id)
        return [r.pid for r in live.replicas if r.pid is not None and r.state == "ready"] if live else []
