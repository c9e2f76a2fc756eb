"""Which replica takes a request: the least-loaded ready replica that already holds the request's adapter (no
adapter load, no eviction of another one), else the least-loaded ready replica.

A holder that is already at the scale-up threshold is passed over for a less loaded replica: otherwise one hot
adapter would pile onto one replica while the replicas the autoscaler started for it stay idle.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    id: str
    in_flight: int
    adapters: frozenset[str]  # adapter keys it served or preloaded (still resident, as far as we know)
    order: int = 0  # tie-break: older replicas first


def pick(candidates: list[Candidate], adapter_key: str | None, threshold: int) -> Candidate | None:
    """None when no replica is ready. `adapter_key` None: the base model alone, which every replica holds."""
    if not candidates:
        return None

    def load(c: Candidate) -> tuple[int, int]:
        return (c.in_flight, c.order)

    if adapter_key is not None:
        holders = [c for c in candidates if adapter_key in c.adapters and c.in_flight < threshold]
        if holders:
            return min(holders, key=load)
    return min(candidates, key=load)
