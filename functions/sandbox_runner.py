"""The code that runs inside the reward-function sandbox (functions/sandbox.py starts it; nothing imports it).

Standard library only and no project imports: it runs under `python -I -S -B` (isolated mode, no site, no
environment variables read) in two phases.

1. `setup` (this file, run by path, as the platform's user): enter new mount, network, PID, IPC and UTS
   namespaces (and a user namespace when not root), fork the namespace's PID 1 (this process stays outside as its
   launcher: it waits for it, passes a SIGTERM on as its SIGKILL, and exits as it did), build a new root on a
   tmpfs from read-only bind mounts of the Python installation and the system libraries only, pivot into it, drop
   to an unprivileged uid (as root: nobody), install the seccomp filter and exec phase 2 with this file's own
   source passed by `-c` (the file itself is not inside the new root). Any failure prints one
   `{"sandbox_error": ...}` line naming the step and exits with SETUP_FAILED: the caller then refuses to run user
   code at all.
2. `run` (inside the new root): say `{"started": true}`, read the source and the limits (first stdin line), set
   the resource limits, define `reward_fn` (`{"ready": true}` or `{"load_error": ...}`), then score one item per
   stdin line, one result line per item on the protocol pipe (a duplicate of fd 1; fd 1 itself then points at
   stderr). User prints go to a per-item capped writer.

Protocol (JSON lines): out `{"started": true}` (or the setup's `{"sandbox_error": str}`) before any user code runs;
in `{"source": str, "limits": {...}}`; out `{"ready": true}` | `{"load_error": str}`; then per item in `{"i": int,
"prompt": str, "completion": str, "example": dict}`, out `{"i": int, "score": float, "output": str}` or
`{"i": int, "reason": str, "detail": str, "output": str}`.
"""

import json
import math
import os
import resource
import signal
import sys
from typing import Any

SETUP_FAILED = 70  # exit status of a setup that could not build the sandbox
DETAIL_CHARS = 500  # an exception message is cut to this many characters
OUTPUT_KEPT_CHARS = 2000  # the first characters of an item's printed output are sent back with its score
USER_FILENAME = "<reward_fn>"

# Linux clone/mount constants (include/uapi/linux/sched.h, mount.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# statvfs f_flag bits -> the mount flags a read-only remount must keep (a user namespace may not clear them)
KEPT_FLAGS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME}
KEPT_FLAGS[4096] = MS_RELATIME
NOBODY = 65534
# seccomp (include/uapi/linux/seccomp.h, filter.h, audit.h)
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000
BPF_LD_W_ABS = 0x20  # load the 32-bit word at offset k of struct seccomp_data (0: the call's number, 4: its arch)
BPF_JEQ = 0x15
BPF_JGE = 0x35
BPF_RET = 0x06
X32_SYSCALL_BIT = 0x40000000
SYS_CLONE3 = 435
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SECCOMP_DENIED = {  # unshare setns mount umount2 pivot_root chroot fsopen fsmount move_mount open_tree mount_setattr
    # open_by_handle_at keyctl add_key request_key bpf perf_event_open userfaultfd io_uring_setup/enter/register
    # ptrace init_module finit_module kexec_load
    "x86_64": [272, 308, 165, 166, 155, 161, 430, 432, 429, 428, 442, 304, 250, 248, 249, 321, 298, 323, 425, 426]
    + [427, 101, 175, 313, 246],
    "aarch64": [97, 268, 40, 39, 41, 51, 430, 432, 429, 428, 442, 265, 219, 217, 218, 280, 241, 282, 425, 426]
    + [427, 117, 105, 273, 104],
}
DEVICES = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]


# ---------------------------------------------------------------------------------------------------------- setup


class SetupError(Exception):
    pass


def setup(config: dict) -> None:
    """Phase 1: build the sandbox, then exec phase 2 inside it. Never returns."""
    step = "start"
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held until the launcher can pass it on
    try:
        libc = _libc()
        _die_with_parent(libc)
        root_uid, uid, gid = os.getuid() == 0, os.getuid(), os.getgid()
        step = "new namespaces"
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        _check(libc.unshare(flags | (0 if root_uid else CLONE_NEWUSER)), "unshare")
        if not root_uid:
            step = "uid and gid maps"
            _map_self(uid, gid)
        with open(__file__) as f:
            source = f.read()
    except (OSError, SetupError) as e:
        _setup_failed(f"{step}: {e}")
    pid = os.fork()  # PID 1 of the new PID namespace
    if pid:
        _wait_and_exit(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        step = "the new root"
        _build_root(libc, config["root"], config["binds"])
        step = "dropping privileges"
        if root_uid:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        _die_with_parent(libc)
        step = "the system-call filter"
        _seccomp(libc)
        step = "exec"
        exe = config["executable"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        os.execve(exe, [exe, "-I", "-S", "-B", "-c", source, "run"], env)
    except (OSError, SetupError, KeyError) as e:
        _setup_failed(f"{step}: {e}")


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _die_with_parent(libc) -> None:
    """SIGKILL when the parent dies (a fork or a change of uid clears it: set again after each)."""
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def _map_self(uid: int, gid: int) -> None:
    """Unprivileged: map only our own uid and gid, to themselves (so the exec in phase 2 drops every capability)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _build_root(libc, root: str, binds: list[str]) -> None:
    """A tmpfs at `root` holding read-only binds of `binds` (symlinks stay symlinks), then pivot into it."""
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755")
    for path in binds:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        _mount(libc, path, target, None, MS_BIND | MS_REC)
    for device in DEVICES:
        os.makedirs(root + "/dev", exist_ok=True)
        open(root + device, "w").close()
        _mount(libc, device, root + device, None, MS_BIND)
    os.makedirs(root + "/work", mode=0o755)
    os.makedirs(root + "/tmp", mode=0o755)
    for mount_point in _mounts_under(root):
        flags = _kept_flags(mount_point)
        _mount(libc, None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
    os.chdir(root)
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        raise SetupError(f"pivot_root: unsupported machine {machine}")
    _check(libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(libc, None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/work")


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: bytes | None = None) -> None:
    result = libc.mount(
        source.encode() if source else None, target.encode(), fstype.encode() if fstype else None, flags, data
    )
    _check(result, f"mount {source or ''} {target}")


def _mounts_under(root: str) -> list[str]:
    """Every mount point strictly below `root` (bind mounts and what they carry recursively), outermost first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # octal escapes such as \040
            if point.startswith(root + "/"):
                found.append(point)
    return sorted(set(found), key=len)


def _kept_flags(mount_point: str) -> int:
    f_flag = os.statvfs(mount_point).f_flag
    return sum(flag for bit, flag in KEPT_FLAGS.items() if f_flag & bit)


def _seccomp(libc) -> None:
    """A seccomp filter, inherited by the function: no new namespaces, mounts, keyrings, BPF, perf events, io_uring,
    ptrace or module loading (the kernel surface a function has no use for); clone3 says ENOSYS so that libc falls
    back to clone, which RLIMIT_NPROC refuses anyway."""
    import ctypes

    machine = os.uname().machine
    if machine not in SECCOMP_DENIED:
        raise SetupError(f"seccomp: unsupported machine {machine}")
    arch, denied = AUDIT_ARCH[machine], SECCOMP_DENIED[machine]
    n = len(denied)
    eperm, enosys, kill = 6 + n, 7 + n, 8 + n  # the return instructions' indexes (5 + n: allow)

    def jump(i: int, target: int) -> int:
        return target - i - 1

    program = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ, 0, jump(1, kill), arch), (BPF_LD_W_ABS, 0, 0, 0)]
    program.append((BPF_JGE, jump(3, eperm), 0, X32_SYSCALL_BIT))  # x86's x32 numbers: the same calls again
    program += [(BPF_JEQ, jump(4 + i, eperm), 0, nr) for i, nr in enumerate(denied)]
    program.append((BPF_JEQ, jump(4 + n, enosys), 0, SYS_CLONE3))
    program += [(BPF_RET, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET, 0, 0, SECCOMP_RET_ERRNO | 1)]
    program += [(BPF_RET, 0, 0, SECCOMP_RET_ERRNO | 38), (BPF_RET, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    assert len(program) == kill + 1

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*instruction) for instruction in program])
    fprog = SockFprog(len(program), filters)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(SECCOMP)")


def _wait_and_exit(pid: int) -> None:
    """The launcher waits for the namespace's PID 1 and exits the same way (a signal N as 128 + N). SIGTERM from
    the caller kills PID 1 first, so the launcher reaps it: no zombie is left for the machine's init."""
    try:
        pidfd = os.pidfd_open(pid)  # names this child even once reaped: never another process that reuses its pid
    except OSError:
        pidfd = -1

    def kill_child(signum: int, frame: object) -> None:
        try:
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, kill_child)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def _setup_failed(message: str) -> None:
    os.write(1, json.dumps({"sandbox_error": message}).encode() + b"\n")
    os._exit(SETUP_FAILED)


# ------------------------------------------------------------------------------------------------------------ run


class WallTimeExceeded(BaseException):  # BaseException: a user's `except Exception` does not swallow it
    pass


class CpuTimeExceeded(BaseException):
    pass


class CappedOutput:
    """sys.stdout / sys.stderr of the user's code: counts what is printed, keeps the first characters only."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        self.size = 0
        self.kept: list[str] = []
        self.kept_chars = 0

    def write(self, text: str) -> int:
        text = str(text)
        self.size += len(text)
        if self.kept_chars < OUTPUT_KEPT_CHARS:
            part = text[: OUTPUT_KEPT_CHARS - self.kept_chars]
            self.kept.append(part)
            self.kept_chars += len(part)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        return "".join(self.kept)


def run() -> None:
    """Phase 2: limits first, then the user's module, then one item per line until stdin closes."""
    out_fd = os.dup(1)  # the protocol pipe; fd 1 itself now carries stray raw writes to the caller's capped stderr
    os.dup2(2, 1)

    def send(message: dict) -> None:
        os.write(out_fd, json.dumps(message).encode() + b"\n")

    send({"started": True})  # before any user code: the caller's proof that the sandbox was built
    stdin = sys.stdin.buffer
    header = json.loads(stdin.readline())
    limits = header["limits"]
    _set_limits(limits)

    output = CappedOutput(limits["output_chars"])
    sys.stdout = sys.stderr = output
    sys.stdin = None  # the items' pipe is the runner's, not the function's
    signal.signal(signal.SIGALRM, _raise(WallTimeExceeded))
    signal.signal(signal.SIGPROF, _raise(CpuTimeExceeded))

    namespace: dict = {"__name__": "reward_module", "__builtins__": __builtins__}
    _, failure = _guarded(lambda: exec(compile(header["source"], USER_FILENAME, "exec"), namespace), limits)
    function: Any = namespace.get("reward_fn")
    if failure is None and not callable(function):
        failure = {"reason": "load_error", "detail": "the source defines no callable reward_fn"}
    if failure is not None:
        send({"load_error": f"{failure['reason']}: {failure['detail']}"})
        return
    send({"ready": True})

    for line in iter(stdin.readline, b""):
        item = json.loads(line)
        output.reset()

        def call(item: dict = item) -> object:
            return function(item["prompt"], item["completion"], item["example"])

        value, failure = _guarded(call, limits)
        result = _number(value) if failure is None else failure
        if "score" in result and output.size > limits["output_chars"]:
            result = {"reason": "output_limit", "detail": f"printed {output.size} characters, over the limit"}
        send({"i": item["i"], **result, "output": output.text()})


def _set_limits(limits: dict) -> None:
    memory, cpu = limits["memory_bytes"], limits["process_cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork, no thread, no subprocess
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # the backstop behind the per-item CPU timer
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


ARMED = [False]  # the timers' handlers raise only while the user's code runs


def _raise(exception: type[BaseException]):
    def handler(signum: int, frame: object) -> None:
        if ARMED[0]:
            raise exception()

    return handler


def _guarded(call, limits: dict) -> tuple[object, dict | None]:
    """Run `call` under the per-item wall-clock and CPU timers: (its value, None) or (None, {"reason", "detail"})."""
    wall, cpu = limits["wall_seconds"], limits["cpu_seconds"]
    try:
        signal.setitimer(signal.ITIMER_REAL, wall, 0.05)  # re-fires until cleared: a swallowed timeout comes back
        signal.setitimer(signal.ITIMER_PROF, cpu, 0.05)
        ARMED[0] = True
        try:
            return call(), None
        finally:
            ARMED[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.setitimer(signal.ITIMER_PROF, 0)
    except WallTimeExceeded:
        return None, {"reason": "timeout", "detail": f"ran over {wall:g} s of wall-clock time"}
    except CpuTimeExceeded:
        return None, {"reason": "cpu_time", "detail": f"used over {cpu:g} s of CPU time"}
    except MemoryError:
        return None, {"reason": "memory", "detail": f"ran out of its {limits['memory_bytes'] // 2**20} MiB of memory"}
    except BaseException as e:  # noqa: BLE001 - anything the user's code raises is a recorded failure
        return None, {"reason": "exception", "detail": _describe(e)}


def _describe(e: BaseException) -> str:
    line = None
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == USER_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(e, SyntaxError) and e.filename == USER_FILENAME:
        line = e.lineno
    where = f" (line {line})" if line else ""
    return f"{type(e).__name__}: {e}"[:DETAIL_CHARS] + where


def _number(value: object) -> dict:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {"reason": "not_a_number", "detail": f"returned {type(value).__name__}, not a float"}
    try:
        number = float(value)
    except OverflowError:
        return {"reason": "not_finite", "detail": "returned an integer too large for a float"}
    if not math.isfinite(number):
        return {"reason": "not_finite", "detail": f"returned {number}"}
    return {"score": number}


if __name__ == "__main__":
    if sys.argv[1:] == ["run"]:
        run()
    else:
        setup(json.loads(sys.argv[1]))
