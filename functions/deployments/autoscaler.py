"""How many replicas a deployment needs now: a pure function of its scaling config, the load it observes, its
replicas and the time, so that every decision can be replayed in a test with a made-up clock.

    needed  = ceil(concurrent requests / scale_up_threshold)   (requests waiting for a replica count too)
    up      : needed > replicas   -> target = min(max_replicas, needed), at once
    down    : needed < replicas for cooldown_time seconds -> target = max(min_replicas, needed)
    always  : min_replicas <= target <= max_replicas; a request waiting on zero replicas wakes one (Standby)

`ScalerMemory.busy_at` is the one thing carried between decisions: the last time the load needed every replica
(or a scale-up happened). The cooldown counts from there, so a short lull does not stop a replica.
"""

import math
from dataclasses import dataclass
from typing import Literal

ReplicaState = Literal["starting", "ready", "draining"]


@dataclass(frozen=True)
class ScalingConfig:
    min_replicas: int
    max_replicas: int
    scale_up_threshold: int  # concurrent requests per replica above which another one is started
    cooldown_time: float  # seconds


@dataclass(frozen=True)
class ReplicaView:
    id: str
    state: ReplicaState
    in_flight: int  # requests it is serving now


@dataclass(frozen=True)
class ScalerMemory:
    busy_at: float  # last time the load needed all current replicas (seconds, the caller's clock)


@dataclass(frozen=True)
class Decision:
    target: int  # replicas wanted (starting + ready, draining ones not counted)
    reason: str  # why, for people: goes into the status transition when it changes the status
    memory: ScalerMemory


def concurrency(replicas: tuple[ReplicaView, ...], waiting: int) -> int:
    """Concurrent requests: those on replicas (draining ones too: they are still being served) and those waiting."""
    return waiting + sum(r.in_flight for r in replicas)


def decide(
    config: ScalingConfig, replicas: tuple[ReplicaView, ...], waiting: int, memory: ScalerMemory, now: float
) -> Decision:
    """The target replica count for this moment. `waiting`: requests that have no replica yet (a Standby
    deployment's first request, or all replicas starting)."""
    current = sum(1 for r in replicas if r.state != "draining")
    load = concurrency(replicas, waiting)
    needed = math.ceil(load / config.scale_up_threshold)
    floor, ceiling = config.min_replicas, config.max_replicas

    if current == 0 and load > 0 and ceiling > 0:
        target = min(ceiling, max(floor, needed, 1))
        return Decision(target, f"{load} request(s) waiting with no replica up: waking", ScalerMemory(now))
    if needed > current and current < ceiling:
        target = min(ceiling, needed)
        per = load / max(current, 1)
        reason = (
            f"{load} concurrent request(s) = {per:.1f} per replica > scale_up_threshold "
            f"{config.scale_up_threshold}: {current} -> {target} replicas"
        )
        return Decision(max(target, floor), reason, ScalerMemory(now))
    if current < floor:
        return Decision(floor, f"below min_replicas {floor}: {current} -> {floor} replicas", ScalerMemory(now))
    if current > ceiling:
        return Decision(ceiling, f"above max_replicas {ceiling}: {current} -> {ceiling} replicas", ScalerMemory(now))
    if needed >= current:
        return Decision(current, "load needs every replica", ScalerMemory(now))
    # Fewer replicas would do: wait out the cooldown from the last time all of them were needed.
    idle_for = now - memory.busy_at
    target = max(floor, needed)
    if target < current and idle_for >= config.cooldown_time:
        reason = (
            f"{load} concurrent request(s) for {idle_for:.0f} s >= cooldown_time {config.cooldown_time:g} s: "
            f"{current} -> {target} replicas"
        )
        return Decision(target, reason, ScalerMemory(now))
    return Decision(current, f"cooling down: {idle_for:.0f} of {config.cooldown_time:g} s", memory)
