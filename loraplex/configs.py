"""Typed configs, as Predibase's SDK has them: `SFTConfig` (a fine-tuning job's settings), `DPOConfig` (a
preference-tuning job's: SFTConfig's fields and `beta`; its `method` is "dpo"), `GRPOConfig` (reinforcement
fine-tuning's: SFTConfig's fields, `beta`, `num_generations`, `max_completion_length`, `temperature` and
`reward_functions`; its `method` is "grpo") and `DeploymentConfig` (a private deployment's). One class per
training method, as Predibase has SFTConfig and GRPOConfig: the server's `method` field is the class, never a field
of it. Field names, types, defaults and ranges are the server's own
(functions/finetune_config.py FinetuneConfig, functions/deployments/config.py DeploymentConfig) minus what the SDK
passes beside the config (dataset, repo; a deployment's name); tests/app/test_sdk_configs.py fails, naming the field,
when they drift. A mistake is caught here, before any request; what needs the server's knowledge (a known base model,
its layers, the accelerators of its runtime) the server checks, naming the field as well."""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraplex.graders import GraderSpec
from loraplex.prompt_template import TemplateError, placeholders

MAX_STEPS = 1_000_000  # the most optimizer steps a job may ask for
MAX_THRESHOLD = 10_000  # concurrent requests per replica
MAX_COOLDOWN = 7 * 24 * 3600.0  # seconds
Auto = Literal["auto"]  # derived from the dataset by the server, which records the value it used
FORBID = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently dropped


class SFTConfig(BaseModel):
    """Supervised fine-tuning: what `pb.adapters.create(config=...)` and `pb.finetuning.jobs.create` send. Fields
    left unset are not sent: the server applies its defaults (the same as here) and records them on the job."""

    model_config = FORBID
    method: ClassVar[str] = "sft"  # the server's `method`: sent when it is not the default

    base_model: str = Field(description="Catalog name of the model to fine-tune, e.g. 'smollm2-135m'.")
    evaluation_dataset: str | None = Field(
        default=None, description="Another ready dataset whose rows are the job's evaluation split."
    )
    adapter: Literal["lora", "turbo_lora", "turbo", "adalora", "adaption_prompt", "none"] = Field(
        default="lora", description="'lora', or 'none' for full fine-tuning (the version holds a whole model)."
    )
    task: Literal["completion", "classification"] | Auto = Field(
        default="auto", description="'completion', 'classification' (a label picked by a head), or 'auto'."
    )
    epochs: Annotated[int, Field(ge=1, le=100)] | Auto = Field(
        default="auto", description="Passes over the training split; 'auto': about 225 optimizer steps."
    )
    train_steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="Optimizer steps to train for, instead of epochs."
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] | Auto = Field(
        default="auto", description="Peak learning rate (AdamW); 'auto': by technique and model size."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps warming up from 0.")
    rank: int = Field(default=16, ge=1, le=256, description="LoRA rank r.")
    lora_alpha: int | None = Field(default=None, ge=1, le=4096, description="LoRA alpha; twice the rank if unset.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA: scale by alpha/sqrt(rank).")
    use_dora: bool = Field(default=False, description="DoRA: a learnt magnitude per output feature.")
    target_modules: list[str] | None = Field(
        default=None, description="Linear layers to adapt; every linear layer of the blocks if unset."
    )
    max_seq_length: Annotated[int, Field(ge=16)] | Auto = Field(
        default="auto", description="Examples are truncated to this many tokens; 'auto': the longest row."
    )
    effective_batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        default="auto", description="Examples per optimizer step; 'auto': 8, or 16 from 2,000 rows."
    )
    apply_chat_template: bool = Field(default=True, description="Wrap rows in the model's chat template.")
    prompt_template: str | None = Field(
        default=None,
        max_length=20_000,
        description="Each row's prompt, with its columns as '{column}' placeholders: 'Route this ticket: {ticket}'.",
    )
    completion_column: str | None = Field(
        default=None,
        min_length=1,
        max_length=1_000,
        description="With prompt_template on a dataset of any columns: the column holding each row's answer.",
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for shuffling and initialisation.")
    eval_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | Auto | None = Field(
        default="auto", description="Evaluate every this many steps (None: every epoch); 'auto': about 5 in all."
    )
    eval_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Rows held out for evaluation when the dataset has no evaluation split."
    )
    enable_early_stopping: bool = Field(
        default=True, description="Stop once the evaluation loss has not improved for early_stopping_patience evals."
    )
    early_stopping_patience: int = Field(default=3, ge=1, le=100, description="Evaluations without improvement.")
    checkpoint_every: Literal["epoch"] | int = Field(
        default="epoch", description="A checkpoint every epoch ('epoch') or every N optimizer steps ('repo/N@k')."
    )
    continue_from_version: str | None = Field(
        default=None, description="Start from one of your versions ('repo/3') or checkpoints ('repo/3@2')."
    )
    accelerator: str | None = Field(
        default=None, description="GPU to train on, on the Modal runtime (a10g, l40s, a100-80gb, h100)."
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every(cls, value: object) -> object:
        if value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STEPS):
            return value
        raise ValueError(f"expected 'epoch' or a number of optimizer steps (1 to {MAX_STEPS}), got {value!r}")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                names = placeholders(value)
            except TemplateError as exc:
                raise ValueError(exc.message) from None
            if not names:
                raise ValueError("the template uses no column: name at least one as '{column}'")
        return value

    @model_validator(mode="after")
    def _completion_column_with_template(self) -> "SFTConfig":
        if self.completion_column is not None and self.prompt_template is None:
            raise ValueError("completion_column: goes with prompt_template, which builds each row's prompt")
        return self

    def request_fields(self) -> dict[str, Any]:
        """The fields set, as the API's JSON takes them (unset ones take the server's defaults)."""
        method = {} if self.method == "sft" else {"method": self.method}
        return self.model_dump(mode="json", exclude_unset=True) | {"base_model": self.base_model} | method


class DPOConfig(SFTConfig):
    """Preference tuning (Direct Preference Optimization) of a LoRA adapter on a preference dataset ('prompt',
    'chosen', 'rejected' rows): the model learns to prefer each chosen answer over the rejected one. Priced as SFT
    LoRA. SFTConfig's fields, and `beta`."""

    method: ClassVar[str] = "dpo"
    beta: float | None = Field(
        default=None, gt=0, le=10, description="How far the model may move from where it starts (lower: further); 0.1."
    )

    @model_validator(mode="after")
    def _fits_dpo(self) -> "DPOConfig":
        if self.adapter == "none":
            raise ValueError("adapter: method 'dpo' trains a LoRA adapter ('lora')")
        if self.task == "classification":
            raise ValueError("task: method 'dpo' learns to prefer answers; 'classification' applies to method 'sft'")
        if self.prompt_template is not None:
            raise ValueError("prompt_template: method 'dpo' reads preference rows ('prompt', 'chosen', 'rejected')")
        return self


class GRPOConfig(SFTConfig):
    """Reinforcement fine-tuning (GRPO) of a LoRA adapter on a dataset of prompts (a prompt/completion dataset, or
    one with a 'prompt' column): the model writes `num_generations` completions per prompt, `reward_functions` score
    them, and it learns towards the better ones of each group. Priced at the RFT rates ($10 per 1M tokens up to 16B,
    $20 up to 32B) on (prompt + max_completion_length) x num_generations tokens per row and epoch (estimated), the
    tokens processed (charged). SFTConfig's fields, and these."""

    method: ClassVar[str] = "grpo"
    beta: float | None = Field(
        default=None, gt=0, le=10, description="KL penalty's weight to the model it starts from; 0.04 if unset."
    )
    num_generations: int | None = Field(
        default=None, ge=2, le=64, description="Completions sampled per prompt (at least 2); 4 if unset."
    )
    max_completion_length: int | None = Field(
        default=None, ge=1, le=8192, description="Tokens generated per completion at most; 128 if unset."
    )
    temperature: float | None = Field(
        default=None, gt=0, le=2, description="Sampling temperature of the completions; 0.7 if unset."
    )
    reward_functions: list[GraderSpec] | None = Field(
        default=None,
        description="Built-in graders and Python reward functions (loraplex.graders), each with a name and a weight.",
    )

    @model_validator(mode="after")
    def _fits_grpo(self) -> "GRPOConfig":
        if self.adapter != "lora":
            raise ValueError(f"adapter: method 'grpo' trains a LoRA adapter ('lora'), not {self.adapter!r}")
        if not self.reward_functions:
            raise ValueError("reward_functions: method 'grpo' needs at least one reward function or grader")
        if self.task == "classification":
            raise ValueError("task: method 'grpo' learns from rewards; 'classification' applies to method 'sft'")
        if self.prompt_template is not None:
            raise ValueError("prompt_template: method 'grpo' reads each row's 'prompt' column as the prompt")
        return self

    def request_fields(self) -> dict[str, Any]:
        return super().request_fields() | (
            {"reward_functions": [f.model_dump(mode="json", by_alias=True, exclude_unset=True) | {"type": f.type}
                                  for f in self.reward_functions]} if self.reward_functions else {}
        )  # fmt: skip


CONFIGS: dict[str, type[SFTConfig]] = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}  # by `method`


def finetune_config(fields: Any) -> SFTConfig:
    """A config given as a dict of the server's fields: the class its `method` names ('sft' if unset), checked."""
    fields = dict(fields)
    method = fields.pop("method", "sft")
    if method not in CONFIGS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, CONFIGS))}, got {method!r}")
    return CONFIGS[method].model_validate(fields)


class DeploymentConfig(BaseModel):
    """A private deployment: what `pb.deployments.create(name=..., config=...)` sends."""

    model_config = FORBID

    base_model: str = Field(description="Catalog name of the base model, e.g. 'smollm2-135m'.")
    min_replicas: int = Field(default=0, ge=0, description="Replicas kept up even when idle; 0 allows Standby.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas the autoscaler starts.")
    scale_up_threshold: int = Field(
        default=1, ge=1, le=MAX_THRESHOLD, description="Concurrent requests per replica before another is started."
    )
    cooldown_time: float = Field(
        default=3600.0, ge=0, le=MAX_COOLDOWN, description="Seconds of lower load before replicas are stopped."
    )
    accelerator: str = Field(default="cpu", description="cpu locally; a10g, l40s, a100-80gb, h100 on Modal.")
    engine: str = Field(default="native", description="native (our batched multi-LoRA engine) or vllm.")
    preloaded_adapters: list[str] = Field(
        default_factory=list, description="Adapters ('repo/3' or 'repo') loaded on every replica as it starts."
    )
    description: str = Field(default="", max_length=1000)

    @model_validator(mode="after")
    def _replicas(self) -> "DeploymentConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} is more than max_replicas ({self.max_replicas})")
        return self

    def request_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True) | {"base_model": self.base_model}
