"""Bodies of OpenAI's fine-tuning API (/v1/files, /v1/fine_tuning/jobs) in OpenAI's names and shapes, so that the
official `openai` SDK parses them unchanged. The same rows are shown in our own shapes by web/schemas.py: a file is
a dataset, a fine-tuning job one of ours (web/openai_ft_replies.py reads one into the other)."""

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.names import NAME

FORBID = ConfigDict(extra="forbid")
Auto = Literal["auto"]
# Our config's own ranges (functions/finetune_config.py), so a value refused names OpenAI's field, not ours.
Epochs = Annotated[int, Field(ge=1, le=100)]
BatchSize = Annotated[int, Field(ge=1, le=1024)]
# A multiple of the rate "auto" derives (1e-3 for LoRA below 1B parameters): 10 is a rate of 1e-2 there.
Multiplier = Annotated[float, Field(gt=0, le=10)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # as our config's: numpy's seeds are 32-bit
Beta = Annotated[float, Field(gt=0, le=10)]
# Where our own API trains what OpenAI's other methods ask for (a refusal says so).
OUR_METHODS = {
    "reinforcement": "reinforcement fine-tuning is offered through our own API: POST /v1/finetuning/jobs with "
    '"method": "grpo" and reward_functions (graders or a Python reward function)',
}


# ---- requests ------------------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    """Each 'auto' (derived from the dataset as our config's 'auto') or a value."""

    model_config = FORBID

    n_epochs: Epochs | Auto = Field(default="auto", description="Our `epochs`.")
    batch_size: BatchSize | Auto = Field(default="auto", description="Our `effective_batch_size`.")
    learning_rate_multiplier: Multiplier | Auto = Field(
        default="auto", description="Our `learning_rate` is the rate 'auto' derives times this."
    )


class DpoHyperparameters(Hyperparameters):
    beta: Beta | Auto = Field(
        default="auto", description="Our `beta` (the KL penalty's weight: lower moves further); 'auto': 0.1."
    )


class Supervised(BaseModel):
    model_config = FORBID

    hyperparameters: Hyperparameters | None = None


class Dpo(BaseModel):
    model_config = FORBID

    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = FORBID

    type: str = Field(description="'supervised' (our method 'sft') or 'dpo' (preference tuning, our method 'dpo').")
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _offered(cls, value: str) -> str:
        if value in OUR_METHODS:
            raise ValueError(f"{value!r} is not offered through this API; {OUR_METHODS[value]}")
        if value not in ("supervised", "dpo"):
            raise ValueError(f"unknown method {value!r}; 'supervised' or 'dpo'")
        return value

    def hyperparameters(self) -> Hyperparameters | None:
        """The hyperparameters given in the method's own settings (method.<type>.hyperparameters)."""
        settings = self.dpo if self.type == "dpo" else self.supervised
        return settings.hyperparameters if settings is not None else None


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs. A field OpenAI defines and we do not implement is refused naming it."""

    model_config = FORBID

    model: str = Field(description="Catalog name of the base model, e.g. 'smollm2-135m'.")
    training_file: str = Field(description="A file's id ('file-...'), or a dataset's; status 'processed'.")
    validation_file: str | None = Field(default=None, description="Its rows are the job's evaluation split.")
    suffix: str | None = Field(default=None, description="The adapter repository; 'ft-<model>' if unset.")
    seed: Seed | None = None
    hyperparameters: Hyperparameters | None = Field(default=None, description="Or method.supervised.hyperparameters.")
    method: Method | None = None
    metadata: dict[str, Any] | None = None
    integrations: list[Any] | None = None

    @field_validator("suffix")
    @classmethod
    def _repo_name(cls, value: str | None) -> str | None:
        return None if value is None else NAME.check(value)

    @field_validator("metadata", "integrations")
    @classmethod
    def _not_implemented(cls, value: Any) -> Any:
        if value:  # null, {} and [] ask for nothing
            raise ValueError("not implemented here; leave it unset")
        return value

    @model_validator(mode="after")
    def _one_place(self) -> "JobCreate":
        for name in ("supervised", "dpo", "reinforcement"):  # (a cross-field check: the message names the field)
            if self.method is not None and name != self.method.type and getattr(self.method, name) is not None:
                raise ValueError(f"method.{name}: settings of method {name!r}, given with type {self.method.type!r}")
        if self.hyperparameters is not None and self.method is not None and self.method.hyperparameters() is not None:
            where = f"method.{self.method.type}.hyperparameters"
            raise ValueError(f"hyperparameters: give them here or in {where}, not both")
        return self

    @property
    def dpo(self) -> bool:
        """Whether the job is preference tuning (our method 'dpo'); else supervised (our 'sft')."""
        return self.method is not None and self.method.type == "dpo"

    def chosen(self) -> tuple[Hyperparameters, str]:
        """The hyperparameters asked for and the field that holds them (which a refusal of one names); a DPO job's
        are DpoHyperparameters (with beta) when given in method.dpo."""
        given = self.method.hyperparameters() if self.method is not None else None
        if self.method is not None and given is not None:
            return given, f"method.{self.method.type}.hyperparameters"
        return self.hyperparameters or Hyperparameters(), "hyperparameters"


# ---- responses -----------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str  # "file-<dataset id>"
    object: Literal["file"] = "file"
    bytes: int
    created_at: int  # unix seconds
    filename: str  # the dataset's name and format: "<name>.jsonl"
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["uploaded", "processed", "error"]  # the dataset validating | ready | invalid
    status_details: str | None = None  # why it is invalid
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class JobHyperparameters(BaseModel):
    """As the job resolved them (None where the job has none: one of our jobs given train_steps has no epochs)."""

    n_epochs: int | None
    batch_size: int | None
    learning_rate_multiplier: float | None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class SupervisedOut(BaseModel):
    hyperparameters: JobHyperparameters


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut


class DpoHyperparametersOut(JobHyperparameters):
    beta: float  # as trained: the one given, or 0.1 for 'auto'


class DpoOut(BaseModel):
    hyperparameters: DpoHyperparametersOut


class DpoMethodOut(BaseModel):
    type: Literal["dpo"] = "dpo"
    dpo: DpoOut


class FineTuningJob(BaseModel):
    id: str  # "ftjob-<our job id>"
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str  # the base model
    fine_tuned_model: str | None  # "ft:<base model>:<repo>:<N>" once succeeded: a `model` of the inference routes
    organization_id: str  # the tenant
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    method: MethodOut | DpoMethodOut
    result_files: list[str] = []
    trained_tokens: int | None  # once succeeded: tokens trained on, as charged
    error: JobError | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = []
    user_provided_suffix: str  # the adapter repository
    metadata: dict[str, str] | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: float
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None  # our evaluation is always over the whole evaluation split
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(BaseModel):
    id: str  # "ftckpt-<our checkpoint id>"
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str  # "ft:<base model>:<repo>:<N>:ckpt-<k>", servable as `model`
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


Item = TypeVar("Item", bound=BaseModel)


class Page(BaseModel, Generic[Item]):
    """A page of a cursor-paged list: ask for the next one with `after` = the last item's id."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool
