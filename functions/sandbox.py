"""Users' Python reward and grader functions, run in a sandbox process: never in the API's or a worker's process.

One call, `run_reward_function(source, items, limits)`, scores a batch of (prompt, completion, example) items with
the source's `reward_fn(prompt, completion, example) -> float` and returns one `ItemScore` per item: a float, or a
failure with its reason (REASONS). User code can make an item fail in every way it likes (raise, hang, spin,
allocate, print megabytes, return "1" or NaN, exit, crash the interpreter): the item fails with the reason, the
batch goes on, and nothing is raised into the caller. The one exception is `SandboxUnavailable`: on a machine where
the sandbox cannot be built, user code is refused, never run unsandboxed. The function may import the standard
library only (no site-packages); the example reaches it as JSON (values that are not JSON become strings).

What isolates what (functions/sandbox_runner.py does the work inside; it imports nothing of the project):
- a fresh interpreter: the base Python started as `python -I -S -B` (no site-packages, no PYTHON* variables, no
  user site), through `subprocess` with `close_fds` (only stdin, stdout and stderr, all pipes, are inherited), in a
  new session, with an environment of PATH and LANG only (no LORAPLEX_*, DATABASE_URL, Stripe keys, HOME);
- Linux namespaces (unshare(2)): a new network namespace (a loopback that is down: no connection to 127.0.0.1, to
  the machine's services, to abstract Unix sockets or to the internet, no name resolution), a new mount namespace
  whose root is a 1 MiB tmpfs holding read-only bind mounts of the Python installation and the system libraries
  (/lib*, /usr/lib*) and /dev/null, zero, random, urandom, and nothing else of the machine (no /etc, no /proc, no
  home directory but the path down to the Python installation, not the platform's data directory with other
  tenants' datasets, the SQLite database and the console secret, not the project with its secrets), the old root
  detached by pivot_root; a new PID namespace (the function is its PID 1: it sees, and can signal, no other
  process), IPC and UTS namespaces. As root the function runs as `nobody` (65534) with no capabilities; started by
  an unprivileged user (a laptop), in a user namespace that maps only that user's uid, which the exec strips of
  every capability; `no_new_privs` either way;
- a seccomp filter (a deny-list): no unshare, setns or mount calls (no namespace of its own to gain capabilities
  in, no remount), no keyrings, BPF, perf events, userfaultfd, io_uring, ptrace or module loading, no x32 or
  foreign-architecture calls;
- resource limits (setrlimit) in the function's process: RLIMIT_NPROC 0 (no fork, subprocess or thread),
  RLIMIT_AS (memory: an allocation over it raises MemoryError), RLIMIT_FSIZE 0 and the read-only root (no file
  written), RLIMIT_NOFILE 16, RLIMIT_CORE 0, RLIMIT_CPU (the batch's CPU budget, behind the per-item timer); every
  hard limit equals its soft one, so the code cannot raise them;
- time: per item a wall-clock timer and a CPU-time timer inside the process (they interrupt the call, and re-fire
  if the code swallows them), the parent's per-item deadline (the limit plus GRACE_SECONDS: the process is killed
  and a new one takes the next item) and the batch's deadline (items not reached fail with `batch_timeout`).
  Killing is SIGTERM to the launcher, which kills the function and reaps it (SIGKILL to the whole process group if
  it does not within KILL_SECONDS); a caller that dies takes its sandboxes with it (parent-death signals);
- output: the function's prints go to a writer that counts and keeps the first 2,000 characters (over
  `output_chars` the item fails with `output_limit`); raw writes to file descriptors 1 and 2 reach a pipe the
  parent drains, keeping the first STDERR_KEPT bytes; the protocol's lines are capped at MAX_LINE_BYTES, and the
  runner's first line is written before any user code runs, so a function cannot pass for a missing sandbox.
Not isolated: the kernel itself (the filter is a deny-list, not an allow-list: a kernel exploit through an allowed
call escapes, as from any container), and the CPU and memory bandwidth the function uses within its limits.
Machines that forbid namespaces (unprivileged containers, some serverless platforms): `SandboxUnavailable`, with
the step and the kernel's refusal in its message.

Cost (tests/functions/test_sandbox.py `test_overhead_per_batch` bounds it): one process per function per batch.
Measured on the project machine (2 cores, other jobs running: load average 2 to 3), medians of 20: a batch of one
trivial item takes 44 to 45 ms (72 ms at the busiest; a bare `python -I -S -B -c pass` takes 6 ms, and the two
interpreter start-ups, the namespaces, the mounts and the filter make the rest); each further item adds 0.03 to
0.07 ms (1,000 items of 400 characters: 75 to 140 ms a batch).
"""

import contextlib
import functools
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 2**20
GRACE_SECONDS = 1.0  # the parent kills an item's process this long after the item's own wall-clock limit
STARTUP_SECONDS = 10.0  # building the sandbox and starting its interpreter, before any user code
KILL_SECONDS = 2.0  # the launcher's time to kill and reap the function before the whole group gets SIGKILL
MAX_LINE_BYTES = 256 * 1024  # a protocol line longer than this is a protocol failure
STDERR_KEPT = 8 * 1024  # bytes of the process's raw stderr kept for a crash's detail; the rest is read and dropped
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
REASONS = {  # every failure reason an item can get, and what it means
    "exception": "the function raised (the detail has the exception's type, message and line)",
    "not_a_number": "the function returned something other than an int or a float (bool and None included)",
    "not_finite": "the function returned NaN or an infinity",
    "timeout": "the item ran over its wall-clock limit",
    "cpu_time": "the item ran over its CPU-time limit",
    "memory": "the item ran out of the memory limit",
    "output_limit": "the item printed more than the output limit",
    "crashed": "the sandbox process died during the item (exit status or signal in the detail)",
    "load_error": "the source failed to load (raised at the top level, or defines no callable reward_fn)",
    "batch_timeout": "the batch ran over its wall-clock limit before this item finished",
    "protocol": "the sandbox process sent something that is not a well-formed answer",
    "bad_item": "the item's example could not be sent as JSON",
}


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (not Linux, or namespaces forbidden): user code is refused."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 5.0
    """Wall-clock time per item (the user's module loading counts as one item)."""
    cpu_seconds: float = 5.0
    """CPU time per item."""
    memory_bytes: int = 512 * MIB
    """Address space of the function's process (RLIMIT_AS), interpreter included."""
    batch_seconds: float = 300.0
    """Wall-clock time for the whole batch, restarts included."""
    output_chars: int = 1 * MIB
    """Characters an item may print before it fails with `output_limit`."""

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "batch_seconds", "output_chars"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"SandboxLimits.{name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class Item:
    prompt: str
    completion: str
    example: Mapping[str, Any] = field(default_factory=dict)  # the dataset row's columns


@dataclass(frozen=True)
class ItemScore:
    value: float | None  # None: the item failed
    reason: str | None = None  # a key of REASONS (or a built-in grader's reason) when it failed
    detail: str = ""
    output: str = ""  # the first characters the function printed for this item

    @property
    def ok(self) -> bool:
        return self.value is not None


def run_reward_function(source: str, items: Sequence[Item], limits: SandboxLimits = SandboxLimits()) -> list[ItemScore]:
    """Score `items` with the source's reward_fn in a sandbox: one ItemScore per item, in order."""
    scores: list[ItemScore | None] = [None] * len(items)
    batch_deadline = time.monotonic() + limits.batch_seconds
    start = 0
    while start < len(items):
        if time.monotonic() >= batch_deadline:
            break
        with _Sandbox(limits, remaining=len(items) - start) as sandbox:
            start = sandbox.score(source, items, start, scores, batch_deadline)
    return [score or _batch_timeout(limits) for score in scores]


def check_available() -> None:
    """Raise SandboxUnavailable when this machine cannot build the sandbox (probed once per process)."""
    problem = _probe()
    if problem:
        raise SandboxUnavailable(problem)


@functools.cache
def _probe() -> str | None:
    try:
        [score] = run_reward_function("def reward_fn(prompt, completion, example):\n    return 1.0\n", [Item("", "")])
    except SandboxUnavailable as e:
        return str(e)
    return None if score.value == 1.0 else f"the sandbox's probe failed: {score.reason}: {score.detail}"


class _Sandbox:
    """One sandbox process: start, load the source, then one item at a time, each under the parent's deadline."""

    def __init__(self, limits: SandboxLimits, remaining: int) -> None:
        self.limits = limits
        self.remaining = remaining
        self.root = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.selector = selectors.DefaultSelector()
        self.stdout = bytearray()
        self.stderr = bytearray()

    def __enter__(self) -> "_Sandbox":
        if not sys.platform.startswith("linux"):
            raise SandboxUnavailable(f"the sandbox needs Linux namespaces; this is {sys.platform}")
        executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self.root = tempfile.mkdtemp(prefix="loraplex-sandbox-")
        config = {"root": self.root, "binds": _binds(executable), "executable": executable}
        try:
            self.process = subprocess.Popen(
                [executable, "-I", "-S", "-B", RUNNER, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.root,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                close_fds=True,
                start_new_session=True,
            )
        except OSError as e:  # out of processes or file descriptors: the platform's failure, not the user's
            os.rmdir(self.root)
            raise SandboxUnavailable(f"the sandbox process could not start: {e}") from e
        assert self.process.stdout and self.process.stderr
        assert self.process.stdin
        os.set_blocking(self.process.stdin.fileno(), False)
        for stream in (self.process.stdout, self.process.stderr):
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, selectors.EVENT_READ)
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.selector.close()
        assert self.process
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream:
                stream.close()
        with contextlib.suppress(OSError):
            os.rmdir(self.root)  # the tmpfs was mounted in the sandbox's namespace only: here the directory is empty

    def kill(self) -> None:
        """SIGTERM to the launcher, which kills the function and reaps it; SIGKILL to the group if that fails."""
        assert self.process
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=KILL_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def score(
        self, source: str, items: Sequence[Item], start: int, scores: list[ItemScore | None], batch_deadline: float
    ) -> int:
        """Score items from `start` on; return the index the next process starts at (len(items) when done)."""
        if not self._started(batch_deadline):
            return len(items)  # the batch's time ran out: the rest are batch timeouts
        failure = self._load(source, batch_deadline)
        if failure is not None:
            scores[start:] = [failure] * (len(items) - start)
            return len(items)
        return self._score_items(items, start, scores, batch_deadline)

    def _started(self, batch_deadline: float) -> bool:
        """Wait for the runner's first line, written before any user code: the sandbox was built, or why not."""
        answer = self._exchange(b"", min(time.monotonic() + STARTUP_SECONDS, batch_deadline))
        if answer == {"started": True}:
            return True
        if answer == "timeout" and time.monotonic() >= batch_deadline:
            return False
        if isinstance(answer, dict) and isinstance(answer.get("sandbox_error"), str):
            problem = answer["sandbox_error"]
        else:
            stderr = bytes(self.stderr).decode(errors="replace").strip()[-300:]
            problem = {"timeout": f"no start within {STARTUP_SECONDS:g} s", "exited": "the interpreter exited"}.get(
                str(answer), "an unexpected first line"
            ) + (f": {stderr}" if stderr else "")
        raise SandboxUnavailable(f"the sandbox cannot be built on this machine: {problem}")

    def _load(self, source: str, batch_deadline: float) -> ItemScore | None:
        """Send the source and the limits; None when reward_fn is ready, else the failure every item gets."""
        limits = self.limits
        header = {
            "source": source,
            "limits": {
                "wall_seconds": limits.wall_seconds,
                "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_bytes,
                "process_cpu_seconds": math.ceil(limits.cpu_seconds * (self.remaining + 1) + 2),
                "output_chars": limits.output_chars,
            },
        }
        seconds = limits.wall_seconds + GRACE_SECONDS
        answer = self._exchange(json.dumps(header).encode() + b"\n", min(time.monotonic() + seconds, batch_deadline))
        if answer == {"ready": True}:
            return None
        if answer == "timeout" and time.monotonic() >= batch_deadline:
            return _batch_timeout(limits)
        if isinstance(answer, dict) and isinstance(answer.get("load_error"), str):
            return ItemScore(None, "load_error", answer["load_error"][:1000])
        return self._failure(answer, "loading the source", seconds)

    def _score_items(
        self, items: Sequence[Item], start: int, scores: list[ItemScore | None], batch_deadline: float
    ) -> int:
        """One item at a time under its deadline; stop at the first that kills the process (its index + 1)."""
        seconds = self.limits.wall_seconds + GRACE_SECONDS
        for i in range(start, len(items)):
            item = items[i]
            try:
                line = json.dumps(
                    {"i": i, "prompt": item.prompt, "completion": item.completion, "example": dict(item.example)},
                    default=str,
                ).encode()
            except (TypeError, ValueError) as e:
                scores[i] = ItemScore(None, "bad_item", f"{type(e).__name__}: {e}"[:500])
                continue
            answer = self._exchange(line + b"\n", min(time.monotonic() + seconds, batch_deadline))
            if isinstance(answer, dict):
                scores[i] = score = _item_score(answer, i)
                if score.reason != "protocol":
                    continue
                return i + 1  # a process that sends nonsense is not trusted with the next item
            if answer == "timeout" and time.monotonic() >= batch_deadline:
                return len(items)
            scores[i] = self._failure(answer, "the item", seconds)
            return i + 1
        return len(items)

    def _exchange(self, line: bytes, deadline: float) -> dict | str:
        """Send one line, wait for one answer line: the parsed answer, or "timeout", "exited" or "protocol"."""
        assert self.process and self.process.stdin
        stdin = self.process.stdin
        pending = memoryview(line)
        writing = bool(line)
        if writing:
            self.selector.register(stdin, selectors.EVENT_WRITE)
        try:
            while True:
                if b"\n" in self.stdout:
                    raw, _, rest = bytes(self.stdout).partition(b"\n")
                    self.stdout[:] = rest
                    return _parse(raw)
                if len(self.stdout) > MAX_LINE_BYTES:
                    self.kill()
                    return "protocol"
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    return "timeout"
                for key, _ in self.selector.select(left):
                    if key.fileobj is stdin:
                        try:
                            pending = pending[os.write(key.fd, pending) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            pending = pending[:0]  # the process is gone: its stdout's end says so
                        if not pending:
                            self.selector.unregister(stdin)
                            writing = False
                    elif key.fileobj is self.process.stdout:
                        data = os.read(key.fd, 65536)
                        if not data:
                            try:
                                self.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                            except subprocess.TimeoutExpired:
                                self.kill()
                            return "exited"
                        self.stdout += data
                    else:
                        data = os.read(key.fd, 65536)
                        if not data:
                            self.selector.unregister(key.fileobj)
                        elif len(self.stderr) < STDERR_KEPT:
                            self.stderr += data[: STDERR_KEPT - len(self.stderr)]
        finally:
            if writing:
                self.selector.unregister(stdin)

    def _failure(self, answer: dict | str, during: str, seconds: float) -> ItemScore:
        if answer == "timeout":
            return ItemScore(None, "timeout", f"no answer within {seconds:g} s: the process was killed")
        if answer == "exited":
            assert self.process
            code = self.process.returncode
            code = 128 - code if code < 0 else code  # the launcher itself killed: as the launcher reports a signal
            if code > 128 and code - 128 == signal.SIGXCPU:
                return ItemScore(None, "cpu_time", "the process ran over its CPU-time limit and was killed")
            status = f"was killed by {_signal_name(code - 128)}" if code > 128 else f"exited with status {code}"
            stderr = bytes(self.stderr).decode(errors="replace").strip()[-300:]
            return ItemScore(
                None, "crashed", f"the process {status} during {during}" + (f": {stderr}" if stderr else "")
            )
        return ItemScore(None, "protocol", f"malformed answer during {during}")


def _batch_timeout(limits: SandboxLimits) -> ItemScore:
    return ItemScore(None, "batch_timeout", f"the batch ran over {limits.batch_seconds:g} s")


def _parse(raw: bytes) -> dict | str:
    try:
        answer = json.loads(raw, parse_constant=_reject)
    except ValueError:
        return "protocol"
    return answer if isinstance(answer, dict) else "protocol"


def _reject(constant: str) -> None:
    raise ValueError(f"{constant} is not a score")


def _item_score(answer: dict, i: int) -> ItemScore:
    output = answer.get("output")
    output = output[:2000] if isinstance(output, str) else ""
    if answer.get("i") != i:
        return ItemScore(None, "protocol", "an answer for another item")
    score = answer.get("score")
    if "score" in answer:
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            return ItemScore(None, "protocol", "a score that is not a finite number")
        return ItemScore(float(score), output=output)
    reason, detail = answer.get("reason"), answer.get("detail")
    if reason not in REASONS or not isinstance(detail, str):
        return ItemScore(None, "protocol", "an unknown failure reason")
    return ItemScore(None, reason, detail[:1000], output)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _binds(executable: str) -> list[str]:
    """What the sandbox's root shows, read-only: the Python installation and the system's shared libraries."""
    python = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(executable))}
    libraries = [p for p in ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.lexists(p)]
    directories = sorted(python | {os.path.realpath(p) for p in libraries if not os.path.islink(p)})
    kept: list[str] = []
    for path in directories:  # sorted: a parent comes before what it contains
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    links = [p for p in libraries if os.path.islink(p)]
    return kept + links
