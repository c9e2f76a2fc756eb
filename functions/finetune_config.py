"""The fine-tuning config users send. Field names follow the ones users know from Predibase."""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from app.names import NAME, VERSION_REF
from app.settings import get_settings
from functions import accelerators
from functions.catalog import get_model, linear_modules
from functions.grader_specs import GraderSpec, parse_graders
from loraplex.prompt_template import TemplateError, placeholders

# Fields that shape a LoRA adapter: meaningless for full fine-tuning, inherited when continuing an adapter.
LORA_FIELDS = ("rank", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules")
MAX_STEPS = 1_000_000  # the most optimizer steps a job may ask for, and so the largest step count a field may name
# Fields that take "auto" (their default): the job derives them from its dataset (functions/auto_config.py) and
# records the values it used. No other field can be derived from a dataset, and "auto" there is refused.
AUTO_FIELDS = ("task", "epochs", "learning_rate", "effective_batch_size", "max_seq_length", "eval_steps")
Auto = Literal["auto"]
# Fields of one training method only (the methods that take them): refused with another method, naming the field.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "grpo"),
    "num_generations": ("grpo",),
    "max_completion_length": ("grpo",),
    "temperature": ("grpo",),
    "reward_functions": ("grpo",),
}
DPO_BETA = 0.1  # the DPO paper's and TRL's default
# GRPO's defaults, for small models on few prompts: TRL's own (8 generations, 256 tokens, beta 0) are for GPUs.
GRPO_BETA = 0.04  # DeepSeekMath's (and TRL's before 0.19): the KL to the reference (the adapter off) is reported
GRPO_NUM_GENERATIONS = 4  # completions per prompt: the group each reward is compared within
GRPO_MAX_COMPLETION_LENGTH = 128  # tokens generated per completion
GRPO_TEMPERATURE = 0.7  # a small model sampled at 1.0 is mostly wrong: a group of zeros teaches nothing (README)
RFT_MAX_PARAMS = 32 * 10**9  # reinforcement fine-tuning is priced up to 32B parameters (billing/prices.rft_tier)
# Settings a user might hope to have derived, that no dataset decides: "auto" there is refused, naming the field.
NOT_DERIVABLE = (
    "rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "train_steps",
    "warmup_ratio",
    "lr_scheduler",
    "eval_fraction",
    "early_stopping_patience",
    "seed",
)


class FinetuneConfig(BaseModel):
    model_config = {"extra": "forbid"}

    base_model: str = Field(description="Catalog name of the model to fine-tune, e.g. 'smollm2-135m'.")
    dataset: str = Field(description="Name of a dataset of yours in status 'ready'.")
    evaluation_dataset: str | None = Field(
        default=None,
        description="Name of another dataset of yours in status 'ready' whose rows (all of them, whatever their "
        "split) are the job's evaluation split, in place of the dataset's own evaluation split or held-out rows.",
    )
    repo: str = Field(description="Adapter repository; the result is saved as its next version, 'repo/N'.")
    method: Literal["sft", "dpo", "grpo"] = Field(
        default="sft",
        description="'sft': supervised fine-tuning, the model learns to write each row's answer. 'dpo': preference "
        "tuning (Direct Preference Optimization, TRL's DPOTrainer) on a preference dataset ('prompt', 'chosen', "
        "'rejected' rows): the model learns to prefer each row's chosen answer over its rejected one, against the "
        "model it starts from (the base model with the adapter off, or the version continue_from_version names); "
        "LoRA only, priced as SFT LoRA. 'auto' learning rate for DPO: a tenth of SFT's (1e-4 for models under 1B). "
        "'grpo': reinforcement fine-tuning (GRPO, TRL's GRPOTrainer) on a dataset of prompts: the model writes "
        "num_generations completions per prompt, reward_functions score them, and it learns towards the better ones "
        "of each group; LoRA only, up to 32B parameters, priced at the RFT rates on prompt and generated tokens; "
        "'auto' learning rate as DPO's.",
    )
    beta: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="method 'dpo' or 'grpo': how far the model may move from the model it starts from (the KL "
        "penalty's weight: lower moves further); 0.1 for 'dpo' if unset (the DPO paper's), 0.04 for 'grpo' "
        "(DeepSeekMath's; the reference is the model with the adapter off, so it costs no second copy).",
    )
    num_generations: int | None = Field(
        default=None,
        ge=2,
        le=64,
        description="method 'grpo': completions sampled per prompt, the group each completion's reward is compared "
        "within (at least 2); 4 if unset (small models, few prompts; TRL's 8 doubles the generation time).",
    )
    max_completion_length: int | None = Field(
        default=None,
        ge=1,
        le=8192,
        description="method 'grpo': tokens generated per completion at most; 128 if unset (short answers: formats, "
        "extraction, arithmetic).",
    )
    temperature: float | None = Field(
        default=None,
        gt=0,
        le=2,
        description="method 'grpo': sampling temperature of the completions; 0.7 if unset (a group needs different "
        "completions to tell better from worse, and some of them right: at 1.0 a small model's are mostly wrong).",
    )
    reward_functions: list[GraderSpec] | None = Field(
        default=None,
        description="method 'grpo': what scores each completion, one or more, each with a name and a weight (the "
        "reward is the weighted sum): built-in graders (exact_match, string_check, regex, json_schema, numeric, "
        "text_similarity: a column of the dataset holds the reference) or 'python' with source defining "
        "`reward_fn(prompt: str, completion: str, example: dict) -> float` (example: the row's columns), run in a "
        "sandbox (no network, no files, time and memory limits); a completion whose function raises, hangs or "
        "returns no number scores 0.0 and the reason is counted. Kept with the job and its version.",
    )
    adapter: Literal["lora", "turbo_lora", "turbo", "adalora", "adaption_prompt", "none"] = Field(
        default="lora",
        description="Adapter type to train: 'lora', or 'none' for full fine-tuning (every weight is trained and the "
        "version holds a whole model).",
    )
    task: Literal["completion", "classification"] | Auto = Field(
        default="auto",
        description="'completion': the model learns to write each row's completion (a classification dataset's "
        "label among them, answered at inference from the labels only). 'classification': for a classification "
        "dataset, the model reads the prompt and a classification head over its last hidden state picks the label "
        "(Predibase's category output); served through the same API, answering the label with each label's "
        "probability in logprobs; served by the native engine only. 'auto': 'completion' (on the quality suite's "
        "classification datasets the head was no better: scripts/results/quality.md).",
    )
    epochs: Annotated[int, Field(ge=1, le=100)] | Auto = Field(
        default="auto",
        description="Passes over the training split; 'auto': enough for about 225 optimizer steps (50 on a "
        "classification dataset; 1 to 10 epochs).",
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
    lora_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input. Off by default: on a CPU, 0.05 made a step 1.45x slower and 0.24 GB "
        "larger (scripts/train_memory.py), and picking the best evaluation step already guards against overfitting.",
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA: scale by alpha/sqrt(rank), not alpha/rank."
    )
    use_dora: bool = Field(default=False, description="DoRA: learn a magnitude per output feature beside the LoRA.")
    target_modules: list[str] | None = Field(
        default=None, description="Linear layers to adapt; every linear layer of the attention and MLP blocks if unset."
    )
    max_seq_length: Annotated[int, Field(ge=16)] | Auto = Field(
        default="auto",
        description="Examples are truncated to this many tokens; 'auto': the longest row, within the model's context "
        "and 2048. A job that would lose over 10% of its completion tokens to truncation is refused.",
    )
    effective_batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        default="auto", description="Examples per optimizer step; 'auto': 8, or 16 from 2,000 rows."
    )
    apply_chat_template: bool = Field(
        default=True, description="Wrap rows in the model's chat template, as chat completions will at inference."
    )
    description: str | None = Field(
        default=None, max_length=2000, description="What the version this job trains is for; shown with the version."
    )
    prompt_template: str | None = Field(
        default=None,
        max_length=20_000,
        description="The prompt each row is trained on, written with the row's columns as '{column}' placeholders: "
        "'Route this ticket: {ticket}' ('{{' and '}}' are literal braces; no format specs, attribute or index "
        "access). For a dataset of any columns (with completion_column), or a prompt/completion dataset ('{prompt}'). "
        "The rendered text is the user message, as at inference: send loraplex.prompt_template.render(template, row) "
        "as the user message to get the trained behaviour. A row where a column it uses is empty is refused.",
    )
    completion_column: str | None = Field(
        default=None,
        min_length=1,
        max_length=1_000,
        description="With prompt_template on a dataset of any columns: the column holding each row's answer ('team'), "
        "learned as a prompt/completion row's completion. A prompt/completion dataset's answer is its 'completion'.",
    )
    # transformers' set_seed seeds numpy too, whose seeds are 32-bit.
    seed: int = Field(
        default=42, ge=0, le=2**32 - 1, description="Seed for shuffling and initialisation (reproducible runs)."
    )
    eval_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | Auto | None = Field(
        default="auto",
        description="Evaluate every this many steps (None: at the end of every epoch); 'auto': about 5 evaluations "
        "over the job. The version published is the evaluated step with the best task metric.",
    )
    eval_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Rows held out for evaluation when the dataset has no evaluation split."
    )
    enable_early_stopping: bool = Field(
        default=True, description="Stop once the evaluation loss has not improved for early_stopping_patience evals."
    )
    early_stopping_patience: int = Field(default=3, ge=1, le=100, description="Evaluations without improvement.")
    checkpoint_every: Literal["epoch"] | int = Field(
        default="epoch",
        description="Save a checkpoint at the end of every epoch ('epoch') or every N optimizer steps; checkpoint k "
        "of version N is 'repo/N@k', servable like a version, and a job whose worker dies resumes from its last one.",
    )
    continue_from_version: str | None = Field(
        default=None,
        description="Start from the weights of one of your versions ('repo/3') or checkpoints ('repo/3@2') of the "
        "same base model instead of from the base model; its LoRA settings carry over.",
    )
    accelerator: str | None = Field(
        default=None,
        description="GPU to train on, on the Modal runtime: a10g, l40s, a100-80gb or h100; if unset, the first GPU "
        "of the model's size tier (a10g up to 16B parameters, a100-80gb above) that holds the job. The local runtime "
        "trains on its own device: leave it unset there.",
    )

    @field_validator(*NOT_DERIVABLE, mode="before")
    @classmethod
    def _auto_only_where_derivable(cls, value: Any) -> Any:
        if value == "auto":
            raise ValueError(
                "'auto' cannot be derived from a dataset for this field; give a value, or leave it unset for its "
                f"default ('auto' is taken by {', '.join(AUTO_FIELDS)})"
            )
        return value

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
    def _completion_column_with_template(self) -> "FinetuneConfig":
        if self.completion_column is not None and self.prompt_template is None:
            raise ValueError("completion_column: goes with prompt_template, which builds each row's prompt")
        return self

    @field_validator("repo")
    @classmethod
    def _repo_name(cls, value: str) -> str:
        return NAME.check(value)

    @field_validator("adapter")
    @classmethod
    def _adapter_available(cls, value: str) -> str:
        if value in ("adalora", "adaption_prompt"):
            # PEFT trains both, but our serving engines (and vLLM) serve LoRA only: refuse before any compute.
            raise ValueError(f"adapter {value!r} cannot be served by the serving engine (LoRA only); use 'lora'")
        if value not in ("lora", "none"):
            raise ValueError(f"adapter {value!r} is not available yet; use 'lora', or 'none' for full fine-tuning")
        return value

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every(cls, value: object) -> object:
        # Checked before the union, so the error names the field rather than one branch of the union.
        if value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STEPS):
            return value
        raise ValueError(f"expected 'epoch' or a number of optimizer steps (1 to {MAX_STEPS}), got {value!r}")

    @field_validator("continue_from_version")
    @classmethod
    def _version_ref(cls, value: str | None) -> str | None:
        if value is not None and not VERSION_REF.fullmatch(value):
            raise ValueError(f"expected 'repo/N' (a version) or 'repo/N@K' (one of its checkpoints), got {value!r}")
        return value

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if value not in accelerators.GPUS:
            raise ValueError(
                f"unknown accelerator {value!r}; one of {', '.join(accelerators.GPUS)} (or leave it unset)"
            )
        if get_settings().runtime != "modal":
            raise ValueError(
                f"{value!r} is a GPU of the Modal runtime (LORAPLEX_RUNTIME=modal); this local runtime trains on its "
                "own device: leave accelerator unset"
            )
        return value

    @model_validator(mode="after")
    def _fits_model(self) -> "FinetuneConfig":
        try:
            model = get_model(self.base_model)
        except KeyError:
            raise ValueError(f"base_model: unknown base model {self.base_model!r}") from None
        if self.max_seq_length != "auto" and self.max_seq_length > model.context_length:
            raise ValueError(
                f"max_seq_length: {self.max_seq_length} exceeds the model's context {model.context_length}"
            )
        allowed = linear_modules(self.base_model)
        unknown = sorted(set(self.target_modules or []) - set(allowed))
        if unknown:
            raise ValueError(f"target_modules: {unknown} not in the model; choose from {list(allowed)}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: give at least one module, or leave it unset")
        if self.train_steps is not None and "epochs" in self.model_fields_set:
            raise ValueError("train_steps: set either epochs or train_steps, not both")
        for name, methods in METHOD_FIELDS.items():
            if name in self.model_fields_set and getattr(self, name) is not None and self.method not in methods:
                raise ValueError(
                    f"{name}: applies to method {' or '.join(map(repr, methods))} only, not {self.method!r}"
                )
        if self.method == "dpo":
            self._fits_dpo()
        if self.method == "grpo":
            self._fits_grpo()
        if self.adapter == "none":
            lora_only = [name for name in LORA_FIELDS if name in self.model_fields_set]
            if lora_only:
                raise ValueError(
                    f"{lora_only[0]}: applies to LoRA adapters only; adapter 'none' trains every weight of the model"
                )
        return self

    def _fits_dpo(self) -> None:
        """What preference tuning cannot take, refused naming the field."""
        if self.adapter == "none":
            raise ValueError(
                "adapter: method 'dpo' trains a LoRA adapter ('lora'): its reference model is the model with the "
                "adapter off, so no second copy of the weights is held"
            )
        if self.task == "classification":
            raise ValueError("task: method 'dpo' learns to prefer answers; 'classification' applies to method 'sft'")
        if self.prompt_template is not None:
            raise ValueError("prompt_template: method 'dpo' reads preference rows ('prompt', 'chosen', 'rejected')")

    def _fits_grpo(self) -> None:
        """What reinforcement fine-tuning cannot take, refused naming the field."""
        if self.adapter != "lora":
            raise ValueError(
                f"adapter: method 'grpo' trains a LoRA adapter ('lora'), not {self.adapter!r}: its reference model "
                "is the model with the adapter off"
            )
        if not self.reward_functions:
            raise ValueError("reward_functions: method 'grpo' needs at least one reward function or grader")
        try:  # names distinct, at most MAX_GRADERS
            parse_graders([spec.model_dump(by_alias=True) for spec in self.reward_functions])
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in ("reward_functions", *error["loc"]))
            raise ValueError(f"{where}: {error['msg']}") from None
        params = get_model(self.base_model).params
        if params > RFT_MAX_PARAMS:
            raise ValueError(
                f"base_model: reinforcement fine-tuning (method 'grpo') is offered up to 32B parameters; "
                f"{self.base_model!r} has {params / 1e9:.1f}B"
            )
        if self.task == "classification":
            raise ValueError("task: method 'grpo' learns from rewards; 'classification' applies to method 'sft'")
        if self.prompt_template is not None:
            raise ValueError("prompt_template: method 'grpo' reads each row's 'prompt' column as the prompt")

    @property
    def dpo_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return GRPO_BETA if self.method == "grpo" else DPO_BETA

    @property
    def grpo(self) -> "GrpoValues":
        """Method 'grpo''s settings with their defaults."""
        return GrpoValues(
            num_generations=self.num_generations or GRPO_NUM_GENERATIONS,
            max_completion_length=self.max_completion_length or GRPO_MAX_COMPLETION_LENGTH,
            temperature=self.temperature if self.temperature is not None else GRPO_TEMPERATURE,
            beta=self.dpo_beta,
            reward_functions=list(self.reward_functions or []),
        )

    @model_validator(mode="after")
    def _fits_gpu(self) -> "FinetuneConfig":
        """On the Modal runtime the job trains on one GPU: the one it names must hold it, and without one some GPU
        must (a job refused here is never queued nor charged)."""
        if get_settings().runtime != "modal":
            return self
        need = accelerators.training_need(self.base_model, self.kind)
        if self.accelerator is not None and not accelerators.fits(need, self.accelerator):
            raise ValueError(f"accelerator: {accelerators.misfit(need, self.accelerator)}")
        if accelerators.training_gpu(self.base_model, self.kind, self.accelerator) is None:
            raise ValueError(f"base_model: {accelerators.misfit(need)}")
        return self

    def stored(self) -> dict:
        """The config as kept on the job: every field, except those that would not validate again as they did
        (epochs when train_steps replaces it, the LoRA fields of a full fine-tuning)."""
        exclude = {"epochs"} if self.train_steps is not None else set()
        if self.adapter == "none":
            exclude |= set(LORA_FIELDS)
        return self.model_dump(exclude=exclude or None, by_alias=True)  # a json_schema grader's "schema"

    @property
    def kind(self) -> str:
        """What the job produces: 'lora' (an adapter) or 'full' (a whole model)."""
        return "full" if self.adapter == "none" else "lora"

    @property
    def technique(self) -> str:
        """The price-table and ledger name of the technique (billing/prices.py)."""
        return "full" if self.adapter == "none" else self.adapter

    @property
    def price_technique(self) -> str:
        """The price-table technique the job is charged at: 'rft' for method 'grpo' (billing/prices.py)."""
        return "rft" if self.method == "grpo" else self.technique

    @property
    def resolved_alpha(self) -> int:
        return self.lora_alpha or 2 * self.rank

    @property
    def resolved_target_modules(self) -> list[str]:
        """Every linear layer of the blocks unless the user chose: adapting only attention (the old q/v default)
        trained worse models on every dataset of scripts/bench_quality.py."""
        return list(self.target_modules or linear_modules(self.base_model))

    def values(self) -> "Values":
        """The training values of a config whose "auto" fields were resolved (functions/auto_config.resolve)."""
        unresolved = [name for name in AUTO_FIELDS if getattr(self, name) == "auto"]
        if self.train_steps is not None and "epochs" in unresolved:  # train_steps replaces epochs
            unresolved.remove("epochs")
        if "task" in unresolved:  # jobs created before the field existed trained completions
            unresolved.remove("task")
        if unresolved:
            raise ValueError(f"{unresolved} still 'auto': resolve the config against its dataset first")
        return Values(
            task="completion" if self.task == "auto" else self.task,
            epochs=1 if self.epochs == "auto" else int(self.epochs),
            learning_rate=float(self.learning_rate),
            effective_batch_size=int(self.effective_batch_size),
            max_seq_length=int(self.max_seq_length),
            eval_steps=None if self.eval_steps is None else int(self.eval_steps),
        )


@dataclass(frozen=True)
class Values:
    """A resolved config's derivable fields, typed as the trainer uses them."""

    task: Literal["completion", "classification"]
    epochs: int
    learning_rate: float
    effective_batch_size: int
    max_seq_length: int
    eval_steps: int | None  # None: at the end of every epoch


@dataclass(frozen=True)
class GrpoValues:
    """Method 'grpo''s settings, defaults filled in."""

    num_generations: int
    max_completion_length: int  # tokens
    temperature: float
    beta: float
    reward_functions: list[GraderSpec]
