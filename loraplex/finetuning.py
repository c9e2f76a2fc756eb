"""`pb.finetuning.jobs`: fine-tuning jobs without blocking (create, get, cancel, list), and `watch` to follow one."""

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from loraplex.api import Api
from loraplex.configs import SFTConfig, finetune_config
from loraplex.datasets import dataset_name
from loraplex.progress import watch_job
from loraplex.repos import repo_name
from loraplex.resources import Dataset, FinetuningJob, Quote, Repo


class Jobs:
    def __init__(self, client: Api) -> None:
        self._client = client

    def create(
        self,
        config: SFTConfig | Mapping[str, Any],
        dataset: str | Dataset,
        repo: str | Repo,
        description: str | None = None,
        watch: bool = False,
        show_progress: bool = True,
    ) -> FinetuningJob:
        """Queue a job training `config` on `dataset` into `repo`'s next version, and answer it at once (with
        `watch`, once it ended, its progress printed unless `show_progress` is off). `config` may be a dict of
        SFTConfig's fields (with `"method": "dpo"`, DPOConfig's), checked the same way. `description`: what the
        version is for (shown with it)."""
        body = _body(config, dataset, repo, description)
        job = FinetuningJob.model_validate(self._client.create_job(**body))
        return self.watch(job.id, show_progress=show_progress) if watch else job

    def quote(self, config: SFTConfig | Mapping[str, Any], dataset: str | Dataset, repo: str | Repo) -> Quote:
        """What `create` with the same arguments would cost (the price estimate) and train (the config with its
        "auto" fields resolved), and whether your credit covers it, without starting anything. A config the job
        would refuse is refused here the same way."""
        return Quote.model_validate(self._client.quote_job(**_body(config, dataset, repo, None)))

    def get(self, job_id: str) -> FinetuningJob:
        return FinetuningJob.model_validate(self._client.get_job(job_id))

    def cancel(self, job_id: str) -> FinetuningJob:
        """Cancel: a queued job never starts, a training one stops at its next step; a finished one stays as it is."""
        return FinetuningJob.model_validate(self._client.cancel_job(job_id))

    def list(self) -> list[FinetuningJob]:
        return [FinetuningJob.model_validate(j) for j in self._client.list_jobs()]

    def watch(self, job_id: str, show_progress: bool = True, out: TextIO | None = None) -> FinetuningJob:
        """Block until the job ended (completed, failed or cancelled) and answer it as it ended; its progress is
        printed to `out` (stdout) as it trains. It does not raise for a failed job: look at `status` and `error`."""
        if show_progress:
            final, _ = watch_job(self._client, job_id, out or sys.stdout)
            return FinetuningJob.model_validate(final)
        final_status: dict[str, Any] | None = None
        for event, data in self._client.stream_events(job_id):
            if event == "status":
                final_status = data
        return FinetuningJob.model_validate(final_status or self._client.get_job(job_id))


def _body(
    config: SFTConfig | Mapping[str, Any], dataset: str | Dataset, repo: str | Repo, description: str | None
) -> dict[str, Any]:
    """The API's job body: the config's fields that were set (checked as SFTConfig, or as the config class its
    `method` names: DPOConfig), the dataset and repo."""
    sft = config if isinstance(config, SFTConfig) else finetune_config(config)
    body = sft.request_fields() | {"dataset": dataset_name(dataset), "repo": repo_name(repo)}
    if description is not None:
        body["description"] = description
    return body


class Finetuning:
    def __init__(self, client: Api) -> None:
        self.jobs = Jobs(client)
