"""What a deployment in each status may still do, and the refusal it gives otherwise.

One truth for the router (which refuses at once, from the row) and the runtime (which refuses the same a moment
later, from what it runs): both pass the same facts.
"""

from app.errors import Conflict, PaymentRequired, Refusal, Unavailable
from functions.deployments.status import DELETED, ERRORED, STOPPED


def being_deleted(name: str) -> Conflict:
    """Any change to a deployment that is on its way out."""
    return Conflict(f"The deployment '{name}' is being deleted", code="deployment_deleted")


def unpaid(name: str, why: str) -> PaymentRequired:
    """A deployment its tenant cannot pay for (suspension.py): `why` names the way out."""
    return PaymentRequired(f"The deployment '{name}' is held in Standby: {why}", code="payment_required")


def serving_refusal(
    name: str, status: str, target_state: str, status_reason: str | None, suspended_reason: str | None = None
) -> Refusal | None:
    """Why a request to this deployment cannot be served now, or None when it can (it may still have to wait
    for a replica). `suspended_reason`: why the platform holds it in Standby (its tenant cannot pay), if it does."""
    if target_state == "deleted" or status == DELETED:
        return being_deleted(name)
    if target_state == "stopped" or status == STOPPED:
        return Conflict(
            f"The deployment '{name}' is Stopped: it does not scale up until it is moved to Standby "
            f"(POST /v1/deployments/{name}/standby)",
            code="deployment_stopped",
        )
    if suspended_reason is not None:
        return unpaid(name, suspended_reason)
    if status == ERRORED:
        return Unavailable(
            f"The deployment '{name}' is Errored: {status_reason}. Update its config or move it to "
            f"Standby (POST /v1/deployments/{name}/standby) to try again",
            code="deployment_errored",
        )
    return None
