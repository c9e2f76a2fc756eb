"""Worker start-up (an entry point): wires the domain's handlers into the queue, which imports nothing above it.

Every process that handles events calls `wire()` first: `loraplex worker`, the Modal event functions (with Modal's
spawn), and the test suite's in-process worker.
"""

from collections.abc import Callable
from typing import Any

from app import queue


def _validate_dataset() -> Any:
    from functions import validate_dataset

    return validate_dataset


def _train() -> Any:
    from functions import train  # imports torch: fetched when the first job arrives, not at start-up

    return train


def _flush_stripe_outbox() -> None:
    from billing.outbox import flush_if_configured

    flush_if_configured()  # owed Stripe calls; a no-op without a Stripe key


def _flush_webhooks() -> None:
    from functions.webhooks import flush

    flush()  # due webhook deliveries, each pass bounded by the delivery timeout


def wire(spawner: Callable[[str, str], None] | None = None) -> None:
    from web import event_renderers  # the events the handlers publish carry the API's shapes

    event_renderers.register()
    queue.register(
        {"dataset.uploaded": _validate_dataset, "finetune.requested": _train},
        spawner=spawner,
        periodic=(_flush_stripe_outbox, _flush_webhooks),
    )
