"""What the runtime holds of each deployment, shared by its loop, its pool threads and the request path.

`Live` is one deployment as it runs here (its config as last read, its replicas, its status); `Fleet` is all of
them with the lock that guards them and the event that wakes the loop. Everything that reads or changes a `Live`
or its replicas does so under `Fleet.lock`; database writes decided under the lock are queued as `Effects` and
run after it is released (requests take the same lock).
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.db import session_scope
from app.models import Deployment
from functions.deployments.autoscaler import ScalerMemory, ScalingConfig
from functions.deployments.replica import Replica

Effects = list[Callable[[], None]]  # database writes, run outside the lock in the order queued


def set_columns(effects: Effects, deployment_id: str, **values: Any) -> None:
    """Queue a write of some columns of the deployment's row (skipped if the row is gone)."""

    def write() -> None:
        with session_scope() as s:
            row = s.get(Deployment, deployment_id)
            if row is not None:
                for column, value in values.items():
                    setattr(row, column, value)

    effects.append(write)


@dataclass(eq=False)
class Live:
    """A deployment as the runtime holds it."""

    id: str
    tenant_id: str
    name: str
    base_model: str
    accelerator: str
    engine: str
    scaling: ScalingConfig
    config_version: int
    preloaded: list[str]
    target_state: str
    status: str
    status_reason: str
    memory: ScalerMemory
    replicas: list[Replica] = field(default_factory=list)
    waiting: int = 0  # requests of this process waiting for a replica
    remote_waiting: int = 0  # the other API processes' requests waiting, as they last reported
    wake_from: float | None = None  # when a request found no replica (the cold start's start)
    hint: str = ""  # why a status change in this tick happens
    scaled: tuple[int, str] | None = None  # an autoscaler decision that changed the replica count: (target, why)
    no_start_before: float = 0.0
    next_number: int = 1
    adapter_names: dict[str, str] = field(default_factory=dict)  # adapter key -> "repo/3" (users see names)
    replicas_written: int = -1  # the `replicas` figure last written to the row
    suspended: str | None = None  # why the platform holds it in Standby (the row's suspended_reason), or None
    held: str | None = None  # the hold the runtime last applied (suspension.py `apply`)

    @classmethod
    def of_row(cls, row: Deployment, now: float) -> "Live":
        """The deployment as its row says, with no replica yet; `now` starts its autoscaler's memory."""
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            base_model=row.base_model,
            accelerator=row.accelerator,
            engine=row.engine,
            scaling=ScalingConfig(row.min_replicas, row.max_replicas, row.scale_up_threshold, row.cooldown_time),
            config_version=row.config_version,
            preloaded=list(row.preloaded_adapters or []),
            target_state=row.target_state,
            status=row.status,
            status_reason=row.status_reason,
            memory=ScalerMemory(now),
            replicas_written=row.replicas,
            suspended=row.suspended_reason,
            held=row.suspended_reason,
        )

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in ("starting", "ready")]


@dataclass(eq=False)
class Fleet:
    """Every deployment the runtime holds, by id, and how the request path and the pool threads reach the loop."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    deployments: dict[str, Live] = field(default_factory=dict)
    wake: threading.Event = field(default_factory=threading.Event)  # set: the loop ticks now, not at its next tick
    dirty: bool = True  # a row changed: the loop re-reads the rows on its next tick
