"""`pb.adapters`: train an adapter and wait for it (`create`), read one (`get`: its base model, config, metrics,
status), download its weights (`download`). An adapter is a repo's version, `repo/N`; `repo` alone is its latest."""

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraplex.api import Api
from loraplex.configs import SFTConfig
from loraplex.errors import JobFailedError, LoraplexError
from loraplex.finetuning import Jobs
from loraplex.prompt_template import render
from loraplex.resources import Dataset, Repo, Resource


class Adapter(Resource):
    name: str  # "repo/N"
    repo: str
    version: int
    base_model: str
    status: str  # the job's (queued, training, completed, failed, cancelled), or "imported" for an uploaded version
    job_id: str | None = None
    config: dict[str, Any] = {}  # the job's config as the server recorded it, "auto" fields resolved
    metrics: list[dict[str, Any]] = []  # the job's rows: kind "train" per step, "eval" per evaluation
    summary: dict[str, Any] = {}  # steps_done, stopped_early, baseline / best / final evaluation
    prompt_template: str | None = None  # the job's prompt template, when it trained with one
    description: str | None = None  # the job's description

    def render_prompt(self, row: Mapping[str, object]) -> str:
        """The prompt this adapter was trained on for `row` (its prompt template filled with the row's columns),
        to send as the user message; a version trained without a template answers the row's `prompt`."""
        return render(self.prompt_template or "{prompt}", row)


class Adapters:
    def __init__(self, client: Api) -> None:
        self._client = client

    def create(
        self,
        config: SFTConfig | Mapping[str, Any],
        dataset: str | Dataset,
        repo: str | Repo,
        description: str | None = None,
        show_progress: bool = True,
    ) -> Adapter:
        """Train an adapter and block until it is ready, printing progress (unless `show_progress` is off); answer
        the adapter (`repo/N`). A job that fails or is cancelled raises JobFailedError with the job's error."""
        jobs = Jobs(self._client)
        job = jobs.create(config, dataset, repo, description=description)
        final = jobs.watch(job.id, show_progress=show_progress, out=sys.stdout)
        if final.status != "completed" or final.adapter is None:
            raise JobFailedError(final.to_dict())
        return self.get(final.adapter)

    def get(self, adapter_id: str) -> Adapter:
        """`repo/N` (or `repo`, its latest version), also while its job still trains or after it failed."""
        repo, version = self._parse(adapter_id)
        published = self._client.get_repo(repo)["versions"]  # 404 naming the repo when there is none
        if version is None:
            if not published:
                raise _not_found(adapter_id)
            version = max(v["version"] for v in published)
        row = next((v for v in published if v["version"] == version), None)
        if row is None:  # not published: a job still training it, or one that failed
            job = next((j for j in self._client.list_jobs() if j["repo"] == repo and j["version"] == version), None)
            if job is None:
                raise _not_found(adapter_id)
            row = {"name": f"{repo}/{version}", "version": version, "base_model": job["base_model"]}
            row["job_id"] = job["id"]
        else:
            job = self._client.get_job(row["job_id"]) if row.get("job_id") else None
        fields: dict[str, Any] = dict(row) | {"repo": repo, "status": job["status"] if job else "imported"}
        if job is not None:
            config = job["config"]
            fields |= {"config": config, "summary": job["summary"]}
            fields |= {name: config.get(name) for name in ("prompt_template", "description")}
            fields["metrics"] = self._client.metrics(job["id"])
        return Adapter.model_validate(fields)

    def download(self, adapter_id: str, dest: str | Path | None = None) -> Path:
        """Save the version's weights as a .tar.gz (folder `<repo>-<N>/`: the PEFT directory, or a whole model for a
        full fine-tuning) to `dest`: a file path, or a directory to put `<repo>-<N>.tar.gz` in (default: here).
        Answers the file's path; nothing is left behind when the download fails."""
        repo, version = self._parse(adapter_id)
        if version is None:
            version = self.get(adapter_id).version
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{repo}-{version}.tar.gz"
        return self._client.download_version(repo, version, target)

    @staticmethod
    def _parse(adapter_id: str) -> tuple[str, int | None]:
        repo, sep, number = adapter_id.partition("/")
        if not repo or (sep and not number.isdigit()):
            raise ValueError(f"adapter_id: expected 'repo/N' or 'repo', got {adapter_id!r}")
        return repo, int(number) if sep else None


def _not_found(adapter_id: str) -> LoraplexError:
    return LoraplexError(404, f"adapter {adapter_id!r} not found", param="adapter_id", code="adapter_not_found")
