"""What the runtime holds, read under its lock: the replicas' process ids (for the tests and operators). What the
API and Prometheus show is read from the rows every process sees (records.py)."""

from functions.deployments.live import Fleet


def replica_pids(fleet: Fleet, deployment_id: str) -> list[int]:
    """The process ids of the deployment's ready replicas."""
    with fleet.lock:
        live = fleet.deployments.get(deployment_id)
        return [r.pid for r in live.replicas if r.pid is not None and r.state == "ready"] if live else []
