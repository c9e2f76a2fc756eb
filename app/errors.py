"""Refusals in the domain's own words: what kind of refusal, which field, a stable code; never an HTTP status.

`functions/` and `billing/` raise these; the API maps each kind to its status in one place (`web/errors.py`),
and the engine server carries the kind across its process boundary by name. A domain module may subclass a
kind to name its refusals (`class AdapterRejected(Invalid)`), so callers can catch just those.
"""


class Refusal(Exception):
    """A request the platform will not do, and why. `field` is the user's field (`rank`, `adapters.0`)."""

    def __init__(
        self, message: str, *, field: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.field, self.code, self.retry_after = message, field, code, retry_after


class Invalid(Refusal):
    """The request's content is wrong (a value, a reference, a file); the same request will fail again."""


class TooLarge(Refusal):
    """The request or a file in it is over a size limit."""


class NotFound(Refusal):
    """What the request names does not exist for this tenant."""


class Conflict(Refusal):
    """The resource's state forbids it now (stopped, being deleted, already exists)."""


class PaymentRequired(Refusal):
    """The tenant's credits or plan do not cover it."""


class Busy(Refusal):
    """Too many requests right now; `retry_after` seconds is a fair wait."""


class Unavailable(Refusal):
    """A component that should serve it is down or starting; try again later."""


class Failed(Refusal):
    """It was accepted and then failed on our side (a broken engine, a worker that died)."""


KINDS: dict[str, type[Refusal]] = {
    kind.__name__: kind for kind in (Invalid, TooLarge, NotFound, Conflict, PaymentRequired, Busy, Unavailable, Failed)
}


def kind_of(refusal: Refusal) -> type[Refusal]:
    """The kind a refusal is (its class, or the kind a domain subclass derives from): what the API maps to a status."""
    return next(kind for kind in type(refusal).__mro__ if kind in KINDS.values())
