"""What an event's `data` is: the resource as the API returns it at that moment, rendered with the routers' own
response shapes, so that a webhook receiver, the feed and a GET all see one shape.

The domain publishes its events (app/events.py) without knowing these shapes; every process that may publish
calls `register()` first: the API app (web/main.py's create_app) and the workers (app/worker_main.py's wire()).
Each renderer takes the publisher's session, so it sees the change the event reports before it commits.
"""

from typing import Any

from sqlalchemy.orm import Session

from app import events
from app.models import AdapterVersion, Checkpoint, Dataset, Deployment, FinetuneJob, UsageRecord
from functions.deployments import records
from web.routers import deployments, finetuning
from web.schemas import AdapterOut, CheckpointOut, DatasetOut, UsageOut


def register() -> None:
    """Hand app/events.py a renderer per resource of the catalogue (`events.TYPES`) whose data it renders."""
    events.register_renderer("dataset", dataset)
    events.register_renderer("finetune.job", job)
    events.register_renderer("finetune.checkpoint", checkpoint)
    events.register_renderer("adapter.version", adapter_version)
    events.register_renderer("deployment", deployment)
    events.register_renderer("usage.record", usage_record)


def dataset(session: Session, dataset_id: str) -> dict[str, Any]:
    """GET /v1/datasets/{name}."""
    return DatasetOut.model_validate(session.get_one(Dataset, dataset_id)).model_dump(mode="json")


def job(session: Session, job_id: str) -> dict[str, Any]:
    """GET /v1/finetuning/jobs/{id}: with its adapter and charge once completed."""
    return finetuning.shown(session, session.get_one(FinetuneJob, job_id)).model_dump(mode="json")


def checkpoint(session: Session, checkpoint_id: str) -> dict[str, Any]:
    """One item of GET /v1/repos/{repo}/versions/{N}/checkpoints."""
    return CheckpointOut.model_validate(session.get_one(Checkpoint, checkpoint_id)).model_dump(mode="json")


def adapter_version(session: Session, version_id: str) -> dict[str, Any]:
    """What POST /v1/repos/{repo}/versions answers, and one item of the repo's `versions`."""
    return AdapterOut.model_validate(session.get_one(AdapterVersion, version_id)).model_dump(mode="json")


def deployment(session: Session, deployment_id: str) -> dict[str, Any]:
    """GET /v1/deployments/{name}, its replicas read from their rows (what the local runtime's describe() reads;
    every API process sees the same). The rows are read committed, in a session of their own: the ones the
    runtime published before writing this tick's transitions."""
    row = session.get_one(Deployment, deployment_id)
    return deployments.shown(session, row, records.describe(deployment_id)).model_dump(mode="json")


def usage_record(session: Session, record_id: str) -> dict[str, Any]:
    """One record of GET /v1/usage."""
    return UsageOut.model_validate(session.get_one(UsageRecord, int(record_id))).model_dump(mode="json")
