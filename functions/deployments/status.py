"""The deployment statuses and their transitions: how the runtime derives a deployment's status from its replicas,
and how every change of status (the runtime's, or one the tenant asks through the API) is recorded with its reason.

A transition is a `DeploymentTransition` row (from, to, reason, and the replicas wanted after an autoscaler
decision) written with the deployment row's own status and reason, and an event on the tenant's feed, all by
`record`. A scaling event is a transition to the same status. What each status still allows is in rules.py.
"""

import logging
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import events
from app.db import session_scope
from app.models import Deployment, DeploymentTransition, utcnow
from functions.deployments.live import Effects, Live

log = logging.getLogger(__name__)

# The statuses of DESIGN.md, exactly.
PENDING, INITIALIZING, READY, STANDBY, STOPPED, ERRORED, UPDATING, DELETED = (
    "Pending",
    "Initializing",
    "Ready",
    "Standby",
    "Stopped",
    "Errored",
    "Updating",
    "Deleted",
)
STATUSES = (PENDING, INITIALIZING, READY, STANDBY, STOPPED, ERRORED, UPDATING, DELETED)
Status = Literal["Pending", "Initializing", "Ready", "Standby", "Stopped", "Errored", "Updating", "Deleted"]


# ---- the runtime's status machine --------------------------------------------------------------------------


def settle(live: Live, effects: Effects) -> str | None:
    """Once per tick: the status the replicas give, recorded when it changed (with this tick's reason, else the
    status's own); unchanged, an autoscaler decision of this tick is recorded as a scaling event. Returns the
    derived status (None: the replicas do not decide it)."""
    status = derived(live)
    scaled, live.scaled = live.scaled, None
    hint, live.hint = live.hint, ""  # hints explain what happened in this tick only
    if status is not None and status != live.status:
        reason = hint or default_reason(status, live)
        transition(live, status, reason, effects, scaled[0] if scaled else None)
    elif scaled is not None and live.status not in (ERRORED, STOPPED, DELETED):
        transition(live, live.status, scaled[1], effects, scaled[0])  # a scaling event
    return status


def derived(live: Live) -> str | None:
    """What the replicas say the status is; None where they do not decide it (Errored and Stopped stay until the
    tenant moves the deployment to Standby; a stop or delete waits for the last replica)."""
    if live.target_state == "deleted":
        return DELETED if not live.replicas else None
    if live.target_state == "stopped":
        return STOPPED if not live.replicas else None
    if live.status in (ERRORED, STOPPED):
        return None
    ready = [r for r in live.replicas if r.state == "ready"]
    starting = [r for r in live.replicas if r.state == "starting"]
    if ready:
        rolling = any(r.config_version != live.config_version for r in live.up())
        return UPDATING if rolling else READY
    if starting:
        return INITIALIZING
    return STANDBY


def transition(live: Live, status: str, reason: str, effects: Effects, replicas: int | None = None) -> None:
    """Move `live` to `status` now; its row and transition record are written by the queued effect."""
    before = live.status
    live.status = status
    live.status_reason = reason
    log.info("deployment %s: %s -> %s (%s)", live.name, before, status, reason)

    def write() -> None:
        with session_scope() as s:
            row = s.get(Deployment, live.id)
            if row is not None:
                record(s, row, before, status, reason, replicas)

    effects.append(write)


def default_reason(status: str, live: Live) -> str:
    """The reason of a transition that nothing in its tick explained."""
    return {
        STANDBY: "no replica up: scales up on the next request" if live.scaling.min_replicas == 0 else "no replica up",
        READY: "a replica is up",
        INITIALIZING: "starting the first replica",
        UPDATING: "config changed: replacing replicas one at a time",
        STOPPED: "stopped: every replica drained",
        DELETED: "deleted: every replica drained",
    }.get(status, status)


# ---- the API's side ----------------------------------------------------------------------------------------


def record_created(session: Session, row: Deployment) -> None:
    """A new deployment's row, Pending, and its first transition (from no status)."""
    row.status, row.status_reason = PENDING, "created"
    session.add(row)
    session.flush()  # the transition needs the row's id
    record(session, row, None, PENDING, "created")


def move(session: Session, row: Deployment, to: str, reason: str) -> None:
    """A transition the tenant asked for (created, stopped, moved to Standby), in the caller's session."""
    record(session, row, row.status, to, reason)


# ---- every transition ---------------------------------------------------------------------------------------


def record(
    session: Session, row: Deployment, before: str | None, to: str, reason: str, replicas: int | None = None
) -> None:
    """Write one transition, the runtime's or the API's, in the caller's transaction: its record, the row's status
    and reason, and its event on the tenant's feed (app/events.py): `deployment.status_changed` when the status
    changed (every one of the eight comes through here), `deployment.scaled` for a scaling event."""
    session.add(
        DeploymentTransition(deployment_id=row.id, from_status=before, to_status=to, reason=reason, replicas=replicas)
    )
    row.status, row.status_reason = to, reason
    if to == DELETED:
        row.deleted_at = utcnow()
        row.replicas = 0
    kind = "deployment.scaled" if before == to else "deployment.status_changed"
    events.publish(session, row.tenant_id, kind, row.id)  # data: the deployment as the API shows it now


def history(session: Session, deployment_id: str, last: int | None = None) -> list[DeploymentTransition]:
    """The deployment's transitions, oldest first: every one, or the `last` few."""
    query = (
        select(DeploymentTransition)
        .where(DeploymentTransition.deployment_id == deployment_id)
        .order_by(DeploymentTransition.id.desc())
    )
    if last is not None:
        query = query.limit(last)
    return list(reversed(session.scalars(query).all()))
