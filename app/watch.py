"""Following a fine-tuning job live: one rich progress bar (step/total, loss, tokens/s, elapsed, ETA) driven by
the job's server-sent events. `loraplex jobs watch`, `loraplex finetune start --watch` and the demo all use
this one function, so they show the same thing and none of them polls."""

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from loraplex.client import FINAL_STATUSES, Loraplex
from loraplex.errors import LoraplexError
from loraplex.progress import summary, timestamp

OUTCOME_STYLES = {"completed": "bold green", "failed": "bold red"}  # cancelled: the default, bold yellow


@dataclass
class WatchResult:
    job: dict[str, Any]  # the job as its final status event had it
    last_metric: dict[str, Any] | None  # the last training-step row seen, if any

    @property
    def completed(self) -> bool:
        return self.job["status"] == "completed"


def _clock(seconds: float | None) -> Text:
    if seconds is None:
        return Text("-:--:--", style="progress.remaining")
    seconds = int(max(seconds, 0))
    return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed")


class _ElapsedColumn(ProgressColumn):
    """Time since the job started training (not since we began watching: `jobs watch` may attach late)."""

    def render(self, task: Task) -> Text:
        started, finished = task.fields.get("started"), task.fields.get("finished")
        return _clock((finished or time.time()) - started if started is not None else None)


class _EtaColumn(ProgressColumn):
    """Remaining steps times the seconds per step measured between the metric rows' own timestamps, so the
    model loading before step 1 and a burst of rows read at once on resume do not skew it."""

    def render(self, task: Task) -> Text:
        per_step, seen_at = task.fields.get("seconds_per_step"), task.fields.get("seen_at")
        if per_step is None or task.total is None or seen_at is None:
            return _clock(None)
        return _clock((task.total - task.completed) * per_step - (time.monotonic() - seen_at))


def watch_job(client: Loraplex, job_id: str, console: Console | None = None) -> WatchResult:
    """Show the job's progress until it ends, print one line saying how it ended, and return the final job.
    Raises LoraplexError when the job is unknown or the event stream cannot be kept up."""
    console = console or Console()
    job: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    first: dict[str, Any] | None = None  # first training row of this attempt seen here: the ETA's baseline
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        _ElapsedColumn(),
        TextColumn("ETA"),
        _EtaColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"{job_id} queued", total=None, steps="-/-", loss="-", tps="-", started=None, finished=None)
        for event, data in client.stream_events(job_id):
            if event == "status":
                if job is not None and data["attempts"] != job["attempts"]:
                    first = last = None  # a retried job trains again from step 1
                job = data
                attempt = f" (attempt {data['attempts']})" if data["attempts"] > 1 else ""
                bar.update(
                    task,
                    description=f"{job_id} {data['status']}{attempt}",
                    total=data["total_steps"],
                    steps=f"{last['step'] if last else 0}/{data['total_steps'] or '-'}",
                    started=timestamp(data.get("started_at")),
                    finished=timestamp(data.get("finished_at")),  # the clock stops when the job does
                )
            elif event == "metric" and data.get("kind", "train") == "train":
                first, last = first or data, data
                total = job["total_steps"] if job else None
                steps_between = last["step"] - first["step"]
                per_step = (
                    (timestamp(last["at"]) - timestamp(first["at"])) / steps_between  # type: ignore[operator]  # metric rows have times
                    if steps_between > 0
                    else None
                )
                bar.update(
                    task,
                    completed=last["step"],
                    steps=f"{last['step']}/{total or '-'}",
                    loss=f"{last['loss']:.3f}",
                    tps=f"{last['tokens_per_second']:.0f}",
                    seconds_per_step=per_step,
                    seen_at=time.monotonic(),
                )
        if job is None or job["status"] not in FINAL_STATUSES:
            raise LoraplexError(0, f"the event stream of job {job_id} ended before the job did")
        if job["status"] == "completed" and job["total_steps"]:
            bar.update(task, completed=job["total_steps"])
    # the SDK's words for how it ended, coloured by outcome
    console.print(escape(summary(job, last)), style=OUTCOME_STYLES.get(job["status"], "bold yellow"))
    return WatchResult(job, last)
