"""Response bodies, one per entity, read from the ORM rows by attribute name (pydantic `from_attributes`): a field
whose name differs from the row's says where it reads (`validation_alias`), and the few values a row lacks are
passed in beside it (`with_values`). Users see names (`repo/3`, dataset names), never paths."""

from datetime import datetime
from typing import Annotated, Any

from pydantic import AliasPath, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from sqlalchemy.orm import object_session

from app.models import AdapterVersion, FinetuneJob
from billing.prices import usd

FROM_ROWS = ConfigDict(from_attributes=True)
# What a version shows of the config of the job that trained it (a version keeps no copy of its own).
JOB_FIELDS = ("prompt_template", "completion_column", "description")


class Money(BaseModel):
    micro_usd: int
    usd: str

    @classmethod
    def of(cls, micro_usd: int) -> "Money":
        return cls(micro_usd=micro_usd, usd=usd(micro_usd))


# A row's micro-USD column, shown as Money.
MoneyColumn = Annotated[Money, BeforeValidator(lambda value: Money.of(value) if isinstance(value, int) else value)]


def with_values(row: object, **added: Any) -> Any:
    """The row's attributes and a few values added, read as one object by `model_validate`."""
    return _With(row, added)


class _With:
    def __init__(self, row: object, added: dict[str, Any]) -> None:
        self._row, self._added = row, added

    def __getattr__(self, name: str) -> Any:
        return self._added[name] if name in self._added else getattr(self._row, name)


class DatasetOut(BaseModel):
    model_config = FROM_ROWS

    id: str
    name: str
    status: str  # validating | ready | invalid
    file_format: str
    data_format: str | None
    base_model: str
    size_bytes: int
    stats: dict[str, Any]
    errors: list[dict[str, Any]]
    created_at: datetime


class Estimate(BaseModel):
    tokens: int  # dataset training tokens x epochs
    cost: Money


class JobOut(BaseModel):
    model_config = FROM_ROWS

    id: str
    status: str  # queued | training | completed | failed | cancelled
    base_model: str
    dataset: str = Field(validation_alias=AliasPath("dataset", "name"))
    repo: str = Field(validation_alias=AliasPath("repo", "name"))
    # "repo/3" once completed
    adapter: str | None = Field(default=None, validation_alias=AliasPath("adapter_version", "name"))
    version: int | None  # the version number it trains, taken when training starts
    # "repo/3@1", ... as they are saved
    checkpoints: Annotated[list[str], BeforeValidator(lambda rows: [c.name for c in rows])]
    config: dict[str, Any]
    estimate: Estimate
    charge: Money | None = None  # the actual charge once completed
    error: str | None
    attempts: int
    total_steps: int | None
    # steps_done, stopped_early, baseline / best / final evaluation
    summary: Annotated[dict[str, Any], BeforeValidator(lambda value: value or {})]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class MetricOut(BaseModel):
    model_config = FROM_ROWS

    kind: str  # train: one row per optimizer step; eval: one row per evaluation (step 0: before training)
    step: int
    epoch: float
    loss: float  # training loss, or evaluation loss on eval rows
    learning_rate: float
    tokens_per_second: float
    perplexity: float | None = None
    token_accuracy: float | None = None
    sequence_accuracy: float | None = None
    char_error_rate: float | None = None
    # Classification datasets: {"labels", "accuracy", "per_class": {label: {"accuracy", "support"}},
    # "confusion_matrix": {"rows": reference labels, "columns": answered labels + "(other)", "counts"}}
    classification: dict[str, Any] | None = None
    # Preference tuning (method "dpo"): mean implicit rewards (beta x log-probability ratio to the reference model)
    # of the chosen and rejected answers, their margin, and the share of rows where chosen out-rewards rejected.
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    # Reinforcement fine-tuning (method "grpo"; an eval row's loss is minus its mean reward): the weighted total
    # reward's mean and spread, the KL to the reference (train rows), the completions' mean length in tokens,
    # {"graders": {name: {"mean", "std"}}, "failures": {"grader: reason": items}}, and on eval rows sample completions
    # [{"prompt", "completion", "reward", "scores": {grader: value or failure reason}}].
    reward: float | None = None
    reward_std: float | None = None
    kl: float | None = None
    completion_length: float | None = None
    rewards: dict[str, Any] | None = None
    samples: list[dict[str, Any]] | None = None
    attempt: int
    at: datetime = Field(validation_alias="created_at")


class CheckpointOut(BaseModel):
    model_config = FROM_ROWS

    name: str  # "repo/3@2": servable and downloadable like a version
    version: int
    checkpoint: int = Field(validation_alias="number")
    step: int
    epoch: float
    kind: str  # lora | full
    base_model: str
    job_id: str
    created_at: datetime


class AdapterOut(BaseModel):
    model_config = FROM_ROWS

    name: str  # "repo/3"
    version: int
    kind: str  # lora: a PEFT adapter of base_model | full: a whole model (full fine-tuning)
    base_model: str
    adapter_type: str  # lora | none
    rank: int  # 0 for a full model
    target_modules: list[str]
    job_id: str | None
    labels: list[str] | None  # a classification adapter's labels: it answers only one of them; None otherwise
    # The job's prompt_template and completion_column when it trained with one: render a row with it
    # (loraplex.prompt_template.render) and send that as the user message to get the trained behaviour
    prompt_template: str | None = None
    completion_column: str | None = None
    description: str | None = None  # the job's `description`
    created_at: datetime

    @model_validator(mode="before")
    @classmethod
    def _job_template(cls, row: Any) -> Any:
        """A version keeps no copy of its job's config: its template is read from the job, in the row's session."""
        session = object_session(row) if isinstance(row, AdapterVersion) and row.job_id else None
        job = session.get(FinetuneJob, row.job_id) if session is not None else None
        if job is None:
            return row
        return with_values(row, **{name: job.config.get(name) for name in JOB_FIELDS})


class RepoIn(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(description="Letters, digits, '.', '_' and '-' (starting with a letter or digit), at most 100.")
    description: str = Field(default="", max_length=2000, description="What the repo's adapters are for.")


class RepoOut(BaseModel):
    model_config = FROM_ROWS

    name: str
    description: str
    versions: list[AdapterOut]
    checkpoints: list[CheckpointOut]  # of published versions and of versions still training
    created_at: datetime


class UsageOut(BaseModel):
    model_config = FROM_ROWS

    kind: str
    technique: str
    base_model: str
    adapter: str | None
    input_tokens: int
    output_tokens: int
    compute_ms: int
    cost: MoneyColumn = Field(validation_alias="amount_micro_usd")
    reference: str | None
    created_at: datetime


def job_out(job: FinetuneJob, charge_micro_usd: int | None = None) -> JobOut:
    estimate = Estimate(tokens=job.estimated_tokens, cost=Money.of(job.estimate_micro_usd))
    charge = Money.of(charge_micro_usd) if charge_micro_usd is not None else None
    return JobOut.model_validate(with_values(job, estimate=estimate, charge=charge))
