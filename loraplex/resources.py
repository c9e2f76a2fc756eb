"""The objects the Predibase-style calls answer: the API's JSON as attributes (`dataset.status`, `job.adapter`), the
fields the SDK relies on typed, every other field the server sends kept as it is (so a newer server's additions are
readable without a newer SDK)."""

from typing import Any

from pydantic import BaseModel, ConfigDict


class Resource(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Dataset(Resource):
    name: str
    status: str  # validating | ready | invalid
    base_model: str
    stats: dict[str, Any] = {}


class FinetuningJob(Resource):
    id: str
    status: str  # queued | training | completed | failed | cancelled
    base_model: str
    dataset: str
    repo: str
    adapter: str | None = None  # "repo/3" once completed
    error: str | None = None
    config: dict[str, Any] = {}


class Quote(Resource):
    """What a job would cost and train, before it is started (`pb.finetuning.jobs.quote`)."""

    estimate: dict[str, Any]  # {"tokens", "cost": {"micro_usd", "usd"}}
    config: dict[str, Any] = {}  # as the job would keep it: its "auto" fields resolved
    auto: dict[str, Any] = {}  # the fields that were "auto", with the values they take
    can_start: bool  # the credit (or card) covers the estimate
    refusal: str | None = None  # when it does not: why, and the way out


class Repo(Resource):
    name: str
    description: str = ""
    versions: list[dict[str, Any]] = []  # the published versions, as GET /v1/repos/{name} shows them


class Deployment(Resource):
    name: str
    status: str  # Pending | Initializing | Ready | Standby | Stopped | Errored | Updating | Deleted
    base_model: str
    endpoint: str = ""  # base_url for the openai SDK, relative to the server
