"""The pre-warmed interpreter: one launcher process (launcher.py) that has done its slow imports and waits for a
replica's command on stdin, so the next replica to start skips them (its cold start is the model load alone).

The runtime keeps one while some deployment may need a replica, and spawns it only when no replica is loading:
its imports would otherwise take CPU from that replica's first requests on a small machine.
"""

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from app.supervisor import die_with_parent

QUIET_SECONDS = 5.0  # a spare is spawned this long after the last replica start ended
_numbers = itertools.count()


class Spare:
    """A launcher process that has done its imports and waits for its command on stdin."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"spare-{os.getpid()}-{next(_numbers)}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.spawned_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "functions.deployments.launcher"],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def hand_off(self, command: dict[str, Any]) -> subprocess.Popen[bytes]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.close()
        self._log.close()
        return self.process

    def discard(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()
        self.log_path.unlink(missing_ok=True)


class Prewarm:
    """Holds at most one spare, in `log_dir`; times are the runtime's clock."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.spare: Spare | None = None
        self._after = 0.0  # no spare before this time

    def keep(self, wanted: bool, starting: bool, now: float, stopping: bool) -> None:
        """Once per tick: `wanted` while some deployment may need a replica, `starting` while a replica loads."""
        if starting:
            self._after = now + QUIET_SECONDS
        if self.spare is not None and (not self.spare.alive() or not wanted):
            self.discard()
        if wanted and self.spare is None and now >= self._after and not stopping:
            self.spare = Spare(self.log_dir)

    def take(self) -> Spare | None:
        """The spare for a replica about to start (None: there is none); the next one comes after QUIET_SECONDS."""
        spare, self.spare = self.spare, None
        return spare

    def discard(self) -> None:
        if self.spare is not None:
            self.spare.discard()
            self.spare = None
