"""What /v1/deployments answers: a deployment (its row, what runs of it now, its price and last transitions) and
its transitions, read from the ORM rows (pydantic `from_attributes`) with the few figures the row lacks passed in.
Times are the rows' `isoformat()`; a deployment's `endpoint` is the base_url for the openai SDK, relative to the
server."""

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator

from app.models import Deployment, DeploymentTransition
from web.schemas import FROM_ROWS, Money, with_values


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


IsoTime = Annotated[str, BeforeValidator(_iso)]


class TransitionOut(BaseModel):
    model_config = FROM_ROWS

    at: IsoTime
    from_status: str | None  # null: the record was created
    to_status: str  # the same as from_status for a scaling event
    reason: str
    replicas: int | None  # replicas wanted after an autoscaler decision


class DeploymentOut(BaseModel):
    model_config = FROM_ROWS

    id: str
    name: str
    description: str
    base_model: str
    accelerator: str
    engine: str
    min_replicas: int
    max_replicas: int
    scale_up_threshold: int
    cooldown_time: float
    preloaded_adapters: Annotated[list[str], BeforeValidator(lambda value: list(value or []))]
    status: str  # Pending | Initializing | Ready | Standby | Stopped | Errored | Updating | Deleted
    status_reason: str
    suspended_reason: str | None  # set while held in Standby because the tenant cannot pay: why, and the way out
    config_version: int
    replicas: int  # up now (ready or draining)
    cold_start_ms: int | None  # the last wake from zero replicas: first request to a ready replica
    price_per_replica_hour: Money
    endpoint: str  # base_url for the openai SDK, relative to the server
    live: dict[str, Any]  # replicas (state, in-flight requests, adapters held), requests waiting
    transitions: list[TransitionOut]  # the last 20, oldest first
    created_at: IsoTime
    updated_at: IsoTime
    deleted_at: IsoTime | None

    @classmethod
    def of(
        cls, row: Deployment, live: dict[str, Any], price_micro_usd: int, transitions: Sequence[DeploymentTransition]
    ) -> "DeploymentOut":
        """`live` is the runtime's describe(), `price_micro_usd` one replica-hour's."""
        shown = with_values(
            row,
            replicas=sum(1 for r in live["replicas"] if r["state"] in ("ready", "draining")),
            price_per_replica_hour=Money.of(price_micro_usd),
            endpoint=f"/v1/deployments/{row.name}",
            live=live,
            transitions=transitions,
        )
        return cls.model_validate(shown)
