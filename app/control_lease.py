"""Which API process runs a control loop for all of them: the one holding its lease row (`deployments`: the
deployment runtime, functions/deployments/runtime.py).

With several API processes on one database (`uvicorn --workers 2`, `loraplex serve` twice) exactly one of them
starts and stops the deployments' replicas; the others serve requests through the replicas it publishes
(functions/deployments/records.py). The holder renews its lease once half of LORAPLEX_DEPLOYMENT_LEASE_SECONDS is
gone; once it has not for the whole of it (the process died, or hangs), the next process to look takes it over.
The dead holder's replicas, started with PR_SET_PDEATHSIG, died with it; the new holder starts its own.

Taking and renewing are one conditional UPDATE (held by me, or expired), or the row's INSERT when there is none,
so two processes never both hold it. Times are wall-clock UTC: the processes must share a clock.
"""

import logging
import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError

from app.db import session_scope
from app.models import ControlLease, utcnow

log = logging.getLogger(__name__)


def this_process() -> str:
    """How the rows name this API process: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """The lease called `name`, as `holder` sees it; `seconds` is how long one taking or renewal lasts."""

    def __init__(self, name: str, holder: str, seconds: float) -> None:
        self.name, self.holder, self.seconds = name, holder, seconds
        self._until: datetime | None = None  # when our hold runs out, as last written (None: not ours)

    @property
    def held(self) -> bool:
        return self._until is not None and utcnow() < self._until

    def hold(self) -> bool:
        """Take the lease, or renew it once half its time is gone; whether this process holds it now."""
        now = utcnow()
        if self._until is not None and now < self._until - timedelta(seconds=self.seconds / 2):
            return True
        until = now + timedelta(seconds=self.seconds)
        try:
            with session_scope() as s:
                taken = s.execute(
                    update(ControlLease)
                    .where(
                        ControlLease.name == self.name,
                        or_(ControlLease.holder == self.holder, ControlLease.expires_at < now),
                    )
                    .values(holder=self.holder, expires_at=until)
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]  # a CursorResult
                if not taken and s.get(ControlLease, self.name) is None:
                    s.add(ControlLease(name=self.name, holder=self.holder, acquired_at=now, expires_at=until))
                    s.flush()
                    taken = 1
        except IntegrityError:  # another process inserted the row a moment before us: it holds the lease
            taken = 0
        was = self._until is not None
        self._until = until if taken else None
        if bool(taken) != was:
            log.info("%s lease %s by %s", self.name, "taken" if taken else "lost", self.holder)
        return bool(taken)

    def release(self) -> None:
        """Give the lease up now (at shutdown), so another process takes over at its next look."""
        if self._until is None:
            return
        self._until = None
        with session_scope() as s:
            s.execute(
                update(ControlLease)
                .where(ControlLease.name == self.name, ControlLease.holder == self.holder)
                .values(expires_at=utcnow() - timedelta(seconds=1))
                .execution_options(synchronize_session=False)
            )
