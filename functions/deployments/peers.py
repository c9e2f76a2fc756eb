"""What the deployment runtime exchanges with the other API processes each tick, through the rows of records.py:
the holder publishes its replicas and takes in the others' load reports; every process reports its own load."""

from app.models import LoadReport
from functions.deployments import records
from functions.deployments.live import Fleet
from functions.deployments.remote_leases import RemoteLeasing


def publish(fleet: Fleet, published: records.Published) -> None:
    """The holder's replicas' rows, for every API process."""
    with fleet.lock:
        replicas = [
            (r, live.accelerator, dict(live.adapter_names))
            for live in fleet.deployments.values()
            for r in live.replicas
        ]
    published.publish(replicas)


def merge_reports(fleet: Fleet, reports: dict[str, list[LoadReport]], now: float, adapter_cache_size: int) -> None:
    """The other processes' load (`reports`, by deployment) into the holder's autoscaler figures: their waiting
    requests (a wake from Standby, timed from `now`), what they stream from each replica (not drained under them),
    and the adapters they sent to each (routing prefers the replica that holds one)."""
    with fleet.lock:
        for live in fleet.deployments.values():
            theirs = reports.get(live.id, [])
            live.remote_waiting = sum(report.waiting for report in theirs)
            if live.remote_waiting and live.wake_from is None and not any(r.state == "ready" for r in live.replicas):
                live.wake_from = now
            for r in live.replicas:
                r.remote_in_flight = sum(int(report.in_flight.get(r.record_id, 0)) for report in theirs)
                for report in theirs:
                    for key, name in report.adapters.get(r.record_id, []):
                        if key not in r.adapters:
                            r.note_adapter(key, adapter_cache_size)
                        live.adapter_names.setdefault(key, name)


def loads(fleet: Fleet, remote: RemoteLeasing) -> dict[str, records.Load]:
    """This process's load per deployment, for its reports: what it leased from the holder's replicas, and (the
    holder) its own requests waiting and streaming."""
    out = remote.loads()
    with fleet.lock:
        for live in fleet.deployments.values():
            own = records.Load(live.waiting, {r.record_id: r.in_flight for r in live.replicas if r.in_flight})
            other = out.get(live.id)
            if other is not None:
                own = records.Load(own.waiting + other.waiting, own.in_flight | other.in_flight, dict(other.adapters))
            if not own.idle() or other is not None:
                out[live.id] = own
    return out
