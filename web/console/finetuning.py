"""The fine-tuning pages: the tenant's jobs, the new-job form (generated from the config's schema: config_form.py),
and one job with its live curves (static/job.js follows GET /v1/finetuning/jobs/{id}/events)."""

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from functions.accelerators import GPUS
from functions.catalog import list_models
from web.console import config_form
from web.console.config_form import Option
from web.console.render import Page, page
from web.errors import APIError
from web.routers import datasets, finetuning
from web.schemas import JobOut

router = APIRouter(include_in_schema=False)
RUNNING = ("queued", "training")  # a job that may still be cancelled


@router.get("/jobs", response_class=HTMLResponse)
def job_list(request: Request, who: Page) -> HTMLResponse:
    jobs = finetuning.list_jobs(who.tenant, who.db)
    return page(request, "jobs.html", who, jobs=list(reversed(jobs)))  # newest first


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job(request: Request, who: Page) -> HTMLResponse:
    ready = [d for d in datasets.list_datasets(who.tenant, who.db) if d.status == "ready"]
    named = [Option(d.name, f"{d.name} ({d.base_model}, {d.stats.get('rows', '?')} rows)") for d in ready]
    choices = {
        "base_model": [Option(m.name, m.name) for m in list_models()],
        "dataset": named,
        "evaluation_dataset": named,
        "accelerator": [Option(gpu, gpu) for gpu in GPUS],
    }
    form = config_form.groups(choices)
    return page(
        request,
        "job_new.html",
        who,
        groups=form,
        data={"fields": config_form.specs(form), "datasets": {d.name: d.base_model for d in ready}},
        has_datasets=bool(ready),
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, who: Page) -> HTMLResponse:
    try:
        job = finetuning.get_job(job_id, who.tenant, who.db)
    except APIError:  # another tenant's job answers exactly like a missing one, as in the API
        return page(request, "job.html", who, status_code=404, job=None, job_id=job_id)
    return page(
        request,
        "job.html",
        who,
        job=job,
        running=job.status in RUNNING,
        config=_config_rows(job),
        data={"job": job.model_dump(mode="json")},
    )


def _config_rows(job: JobOut) -> list[tuple[str, str, bool]]:
    """(field, value as text, whether "auto" chose it) for each field of the job's stored config."""
    auto = job.summary.get("auto", {})
    return [(name, _text(value), name in auto) for name, value in job.config.items()]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
