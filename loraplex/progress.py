"""Following a fine-tuning job in plain text (no terminal library): one line per update, rewritten in place on a
terminal, and a last line saying how the job ended. `pb.adapters.create`, `pb.finetuning.jobs.watch` and the CLI's
`jobs watch` print this."""

import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from loraplex.api import FINAL_STATUSES, Api
from loraplex.errors import LoraplexError

PLAIN_EVERY_SECONDS = 5.0  # off a terminal, a progress line this often at most (and at every status change)


def watch_job(client: Api, job_id: str, out: TextIO | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Print the job's progress until it ends, then one line on how it ended. Answers (the job as it ended, its
    last training-step row or None). Raises LoraplexError when the job is unknown or its event stream is lost."""
    out = out or sys.stdout
    live = out.isatty()
    job: dict[str, Any] | None = None
    first = last = None  # the first and last training rows of this attempt: the ETA's measure
    printed_at = 0.0
    for event, data in client.stream_events(job_id):
        if event == "status":
            if job is not None and data["attempts"] != job["attempts"]:
                first = last = None  # a retried job trains again from step 1
            changed = job is None or data["status"] != job["status"]
            job = data
        elif event == "metric" and data.get("kind", "train") == "train":
            first, last = first or data, data
            changed = False
        else:
            continue
        if job is None or (not live and not changed and time.monotonic() - printed_at < PLAIN_EVERY_SECONDS):
            continue
        line = progress_line(job, first, last)
        out.write(f"\r\033[K{line}" if live else f"{line}\n")
        out.flush()
        printed_at = time.monotonic()
    if job is None or job["status"] not in FINAL_STATUSES:
        raise LoraplexError(0, f"the event stream of job {job_id} ended before the job did")
    out.write(("\n" if live else "") + summary(job, last) + "\n")
    out.flush()
    return job, last


def progress_line(job: dict[str, Any], first: dict[str, Any] | None, last: dict[str, Any] | None) -> str:
    """`ft_… training  step 12/40  loss 1.234  850 tok/s  elapsed 0:00:31  ETA 0:01:12`."""
    total = job.get("total_steps")
    attempt = f" (attempt {job['attempts']})" if job.get("attempts", 1) > 1 else ""
    parts = [f"{job['id']} {job['status']}{attempt}", f"step {last['step'] if last else 0}/{total or '-'}"]
    if last:
        parts += [f"loss {last['loss']:.3f}", f"{last['tokens_per_second']:.0f} tok/s"]
    started, finished = timestamp(job.get("started_at")), timestamp(job.get("finished_at"))
    if started is not None:
        parts.append(f"elapsed {clock((finished or time.time()) - started)}")
    if first and last and total and last["step"] > first["step"]:
        per_step = (timestamp(last["at"]) - timestamp(first["at"])) / (last["step"] - first["step"])  # type: ignore[operator]  # metric rows have times
        parts.append(f"ETA {clock((total - last['step']) * per_step)}")
    return "  ".join(parts)


def summary(job: dict[str, Any], last: dict[str, Any] | None) -> str:
    """One line on how the job ended, with the reason when it did not complete."""
    if job["status"] == "completed":
        parts = [f"adapter {job['adapter']}", f"{job['total_steps']} steps"]
        if last:
            parts += [f"final loss {last['loss']:.3f}", f"{last['tokens_per_second']:.0f} tokens/s"]
        if job.get("charge"):
            parts.append(f"charged {job['charge']['usd']}")
        return f"Job {job['id']} completed: " + ", ".join(parts)
    reason = job.get("error") or ("cancelled on request" if job["status"] == "cancelled" else "no reason recorded")
    return f"Job {job['id']} {job['status']}: {reason}"


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def timestamp(value: str | None) -> float | None:
    """Seconds since the epoch of an API datetime (ISO 8601, UTC)."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
