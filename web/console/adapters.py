"""The adapters pages: the tenant's repos with their versions (and the versions still training), and one repo with
each version's config, evaluation metrics, checkpoints and downloads, and the import of a PEFT adapter."""

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from functions.catalog import list_models
from web.console.render import Page, page
from web.errors import APIError
from web.routers import finetuning, repos
from web.schemas import AdapterOut, CheckpointOut, JobOut

router = APIRouter(include_in_schema=False)
TRAINING = ("queued", "training")  # a job whose version is not published yet
# The evaluation metrics a version's summary shows, in order: (key of the job summary's rows, label)
METRICS = (
    ("loss", "Evaluation loss"),
    ("perplexity", "Perplexity"),
    ("token_accuracy", "Token accuracy"),
    ("sequence_accuracy", "Sequence accuracy"),
    ("char_error_rate", "Character error rate"),
)


@dataclass
class Version:
    """A version as the repo page shows it: the API's version, its job (None when imported), its checkpoints."""

    adapter: AdapterOut
    job: JobOut | None
    checkpoints: list[CheckpointOut]

    @property
    def evaluations(self) -> list[tuple[str, dict[str, Any]]]:
        """The job summary's evaluations: before training (step 0), the best step and the last, as [(label, row)]."""
        summary = self.job.summary if self.job is not None else {}
        shown = [("Before training", "baseline"), ("Best", "best"), ("Last", "final")]
        return [(label, summary[key]) for label, key in shown if isinstance(summary.get(key), dict)]

    @property
    def config(self) -> list[tuple[str, str]]:
        """The job's config as (field, value) rows; the fields left to "auto" show the value the job used."""
        if self.job is None:
            return []
        auto = self.job.summary.get("auto", {}) if isinstance(self.job.summary.get("auto"), dict) else {}
        rows = []
        for name, value in self.job.config.items():
            if value is None or name in ("dataset", "repo", "base_model", "description"):
                continue
            used = f"{auto[name]} (auto)" if value == "auto" and name in auto else _text(value)
            rows.append((name, used))
        return rows


@router.get("/adapters", response_class=HTMLResponse)
def adapter_list(request: Request, who: Page) -> HTMLResponse:
    training = [job for job in finetuning.list_jobs(who.tenant, who.db) if job.status in TRAINING]
    return page(request, "adapters.html", who, repos=repos.list_repos(who.tenant, who.db), training=_by_repo(training))


@router.get("/adapters/{name}", response_class=HTMLResponse)
def repo_page(name: str, request: Request, who: Page) -> HTMLResponse:
    try:
        repo = repos.get_repo(name, who.tenant, who.db)
    except APIError:  # another tenant's repo answers exactly like a missing one, as in the API
        return page(request, "repo.html", who, status_code=404, repo=None, name=name)
    jobs = {job.id: job for job in finetuning.list_jobs(who.tenant, who.db) if job.repo == name}
    versions = [
        Version(v, jobs.get(v.job_id or ""), repos.list_checkpoints(name, v.version, who.tenant, who.db))
        for v in reversed(repo.versions)  # newest first
    ]
    training = [job for job in jobs.values() if job.status in TRAINING]
    return page(
        request,
        "repo.html",
        who,
        repo=repo,
        versions=versions,
        training=training,
        metrics=METRICS,
        models=[m.name for m in list_models()],
        base_model=repo.versions[-1].base_model if repo.versions else "smollm2-135m",
    )


def _by_repo(jobs: list[JobOut]) -> dict[str, list[JobOut]]:
    found: dict[str, list[JobOut]] = {}
    for job in jobs:
        found.setdefault(job.repo, []).append(job)
    return found


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
