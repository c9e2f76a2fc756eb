"""A fine-tuning config's "auto" fields, derived from its dataset, and what truncation will cost the job.

The rules come from scripts/bench_quality.py (scripts/results/quality.md): the same 135M model, four public
datasets, our defaults against hand settings. What they found and what follows:
- learning_rate: LoRA on a small model learns its task at 1e-3; 2e-4 (the common default for 7B
  models) left classification near chance after two epochs. Larger models take smaller rates (the rule halves it
  per size tier); full fine-tuning moves every weight, so it takes a rate 20x below LoRA's.
- epochs: about TARGET_STEPS optimizer steps, whatever the dataset's size: a 400-row dataset gets 5 epochs, a
  10,000-row one 1; evaluations every ~1/5 of the job, with the best one published, keep the extra steps from
  overfitting. Generation needs them: on g2p (400 rows, word → ARPAbet), 2 epochs (90 steps) gave held-out exact
  match 0.000 and CER 0.467, 5 epochs (225 steps) 0.090 and 0.338, the evaluation loss flat over the last 45
  steps. A label set is learned sooner (TARGET_STEPS_CLASSIFICATION): spam's best step was its last of one
  epoch, names' its 27th of 45. Long rows cap the epochs at about TARGET_TOKENS trained tokens: g2p's 5 epochs
  are 92k tokens of 51-token rows, while 225 steps of extract's 290-token rows (7 epochs, 550k tokens) would take
  about an hour here, where one epoch of a hand loop already answered 0.910 of its held-out rows exactly.
- task: a classification dataset trains on its completions (the label tokens carry the loss; inference is
  constrained to the labels), not with a classification head (task "classification"): the head was no better on
  the suite (held-out accuracy: spam 0.915 against the defaults' 0.960, names 0.905 against 0.890, within the
  ~2-point standard error of 200 rows), and its versions are served by the native engine only, never by vLLM.
- effective_batch_size: 8 below 2,000 rows (more, smaller steps), 16 above; 4 for a classification dataset below
  2,000 rows: on spam (one epoch either way, 7.6 and 7.9 min), batches of 4 answered 0.960 of the held-out emails
  where batches of 8 answered 0.885 (0.920 and 0.930 in earlier runs), against TF-IDF's 0.965. A label is one
  token of loss per row, so a step of 8 rows moves the adapter on little signal; twice the steps learn it better.
- max_seq_length: the longest row rounded up to 64, so nothing is cut unless the model's context (or 2,048, the
  most this runtime trains cheaply) is shorter than a row.
- eval_steps: TARGET_EVALUATIONS evaluations over the job.

Truncation is told, never silent: every job records how many rows were cut, how many completion tokens were lost
and how many rows were dropped for having no completion token left; over MAX_LOST_SHARE of the completion tokens
the job is refused before any compute, naming max_seq_length.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app import volume
from app.errors import Invalid
from app.models import Dataset
from app.settings import get_settings
from functions import templated_rows
from functions.catalog import get_model
from functions.dataset_files import parse_dataset
from functions.finetune_config import AUTO_FIELDS, FinetuneConfig

TARGET_STEPS = 225  # optimizer steps an "auto" job aims for
TARGET_STEPS_CLASSIFICATION = 100  # a label set is learned sooner: one epoch of a 400-row dataset in batches of 4
CLASSIFICATION_TASK = "completion"  # what "auto" trains on a classification dataset (see the module docstring)
TARGET_TOKENS = 150_000  # trained tokens (rows x epochs) an "auto" job stays under, past one epoch
MAX_AUTO_EPOCHS = 10
TARGET_EVALUATIONS = 5
MAX_AUTO_SEQ_LENGTH = 2048
SEQ_LENGTH_MULTIPLE = 64
LARGE_DATASET_ROWS = 2000  # from here on, batches of 16
CLASSIFICATION_BATCH = 4  # a smaller dataset's batches when it is a classification dataset
MAX_LOST_SHARE = 0.10  # of the train split's completion tokens, lost to truncation: over it the job is refused
MIN_ROWS_TO_HOLD_OUT = 10  # smaller datasets without an evaluation split train on every row


@dataclass(frozen=True)
class Truncation:
    """What max_seq_length cuts from the train split. A row's lengths alternate context and learned (completion)
    tokens: (prompt, completion), or (context, learned, context, learned, ...) for a conversation."""

    max_seq_length: int
    rows: int
    rows_cut: int  # longer than max_seq_length
    rows_dropped: int  # no completion token left: not trained on
    completion_tokens: int
    completion_tokens_lost: int
    tokens: int  # tokens trained on per epoch, after truncation (what the job is priced on)
    longest: int  # the longest row, before truncation

    @classmethod
    def of(cls, lengths: Sequence[Sequence[int]], max_seq_length: int, pairs: bool = False) -> "Truncation":
        """`pairs`: preference rows, (prompt, chosen, prompt, rejected): two sequences, each cut to max_seq_length,
        and a row is dropped when either answer keeps no token."""
        rows = [_sequences(runs, pairs) for runs in lengths]
        learned = [sum(sum(seq[1::2]) for seq in row) for row in rows]
        learned_kept = [[_learned_within(seq, max_seq_length) for seq in row] for row in rows]
        kept = [row for row, n in zip(rows, learned_kept, strict=True) if min(n) > 0]
        return cls(
            max_seq_length=max_seq_length,
            rows=len(lengths),
            rows_cut=sum(1 for row in rows if max(sum(seq) for seq in row) > max_seq_length),
            rows_dropped=len(lengths) - len(kept),
            completion_tokens=sum(learned),
            completion_tokens_lost=sum(learned) - sum(sum(n) for n in learned_kept),
            tokens=sum(min(sum(seq), max_seq_length) for row in kept for seq in row),
            longest=max((sum(seq) for row in rows for seq in row), default=0),
        )

    @property
    def lost_share(self) -> float:
        return self.completion_tokens_lost / self.completion_tokens if self.completion_tokens else 0.0

    def refusal(self) -> str | None:
        """Why the job must not run, or None."""
        if self.lost_share <= MAX_LOST_SHARE:
            return None
        return (
            f"max_seq_length: {self.max_seq_length} tokens would cut {self.rows_cut} of {self.rows} training rows and "
            f"lose {self.lost_share:.0%} of their completion tokens ({self.rows_dropped} rows would keep none and be "
            f"dropped); at most {MAX_LOST_SHARE:.0%} may be lost. Raise max_seq_length (the longest row has "
            f"{self.longest} tokens) or shorten the rows"
        )

    def record(self) -> dict[str, Any]:
        return {
            "max_seq_length": self.max_seq_length,
            "rows": self.rows,
            "rows_cut": self.rows_cut,
            "rows_dropped": self.rows_dropped,
            "completion_tokens": self.completion_tokens,
            "completion_tokens_lost": self.completion_tokens_lost,
        }


def _sequences(runs: Sequence[int], pairs: bool) -> list[Sequence[int]]:
    return [runs[:2], runs[2:4]] if pairs else [runs]


def _learned_within(runs: Sequence[int], limit: int) -> int:
    """The learned tokens among a row's first `limit` tokens; `runs` alternate context and learned tokens."""
    kept = start = 0
    for n, count in enumerate(runs):
        if n % 2:
            kept += max(0, min(count, limit - start))
        start += count
    return kept


@dataclass(frozen=True)
class Profile:
    """What the rules read of a dataset: its train rows' token lengths (as Truncation reads them), and more."""

    lengths: list[tuple[int, ...]]  # train split, one per row
    evaluation_rows: int
    classification: bool
    preference: bool = False  # rows of (prompt, chosen, prompt, rejected): two sequences each

    def truncation(self, max_seq_length: int) -> "Truncation":
        return Truncation.of(self.lengths, max_seq_length, pairs=self.preference)

    @property
    def train_rows(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        """The longest sequence: a row, or a preference row's prompt with its longer answer."""
        return max((sum(seq) for runs in self.lengths for seq in _sequences(runs, self.preference)), default=0)


def dataset_profile(dataset: Dataset, config: FinetuneConfig | None = None) -> Profile:
    """The profile of a validated dataset. One validated before lengths were kept has them counted now, once.
    With `config`: the profile of the rows the job trains on, which its prompt_template renders (counted now)."""
    if config is not None and templated_rows.applies(config, dataset.data_format):
        lengths, evaluation_rows, labels = templated_rows.measured(dataset, config)  # refusals name the field
        return Profile(lengths=lengths, evaluation_rows=evaluation_rows, classification=labels is not None)
    if dataset.train_lengths is None:
        from functions.validate_dataset import row_lengths  # the validation handler's own counting

        data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
        parsed = parse_dataset(data, dataset.file_format, get_settings().limits.max_dataset_rows)  # type: ignore[arg-type]  # a FileFormat, checked at upload
        dataset.train_lengths = [list(runs) for runs in row_lengths(parsed, dataset.base_model)["train"]]
    return Profile(
        lengths=[tuple(int(n) for n in runs) for runs in dataset.train_lengths],
        evaluation_rows=int(dataset.stats.get("evaluation_rows", 0)),
        classification=dataset.stats.get("labels") is not None,
        preference=dataset.data_format == "preference",
    )


@dataclass(frozen=True)
class Resolved:
    config: FinetuneConfig  # no "auto" left
    auto: dict[str, Any]  # the fields that were "auto", with the values used
    warnings: list[str]
    truncation: Truncation

    def record(self) -> dict[str, Any]:
        """What the job keeps of it in its summary."""
        return {"auto": self.auto, "warnings": self.warnings, "truncation": self.truncation.record()}


def resolve(config: FinetuneConfig, profile: Profile) -> Resolved:
    """The config with its "auto" fields derived from `profile`; raises Invalid (naming max_seq_length) when
    truncation would lose too much."""
    chosen: dict[str, Any] = {}
    auto = [name for name in AUTO_FIELDS if getattr(config, name) == "auto"]
    if config.train_steps is not None and "epochs" in auto:
        auto.remove("epochs")  # train_steps decides the length of the job
    if config.task == "classification" and not profile.classification:
        raise Invalid(
            "task: 'classification' needs a classification dataset (every completion one of at most "
            "a few short labels, each with enough rows); this dataset's completions are free text: use 'completion'",
            field="task",
        )
    if "task" in auto:
        chosen["task"] = CLASSIFICATION_TASK if profile.classification else "completion"
    context = get_model(config.base_model).context_length
    if "max_seq_length" in auto:
        longest = math.ceil(max(profile.longest, 1) / SEQ_LENGTH_MULTIPLE) * SEQ_LENGTH_MULTIPLE
        chosen["max_seq_length"] = max(16, min(longest, context, MAX_AUTO_SEQ_LENGTH))
    if "effective_batch_size" in auto:
        small = CLASSIFICATION_BATCH if profile.classification else 8
        chosen["effective_batch_size"] = small if profile.train_rows < LARGE_DATASET_ROWS else 16
    batch = chosen.get("effective_batch_size", config.effective_batch_size)
    held_out = _held_out(config, profile)
    rows = profile.train_rows - held_out
    steps_per_epoch = max(1, math.ceil(rows / int(batch)))
    if "epochs" in auto:
        target = TARGET_STEPS_CLASSIFICATION if profile.classification else TARGET_STEPS
        seq = int(chosen.get("max_seq_length", config.max_seq_length))
        epoch_tokens = profile.truncation(seq).tokens * rows / max(profile.train_rows, 1)  # less held out
        by_tokens = round(TARGET_TOKENS / max(epoch_tokens, 1))
        chosen["epochs"] = max(1, min(MAX_AUTO_EPOCHS, round(target / steps_per_epoch), by_tokens))
    if "learning_rate" in auto:
        chosen["learning_rate"] = learning_rate(config)
    if "eval_steps" in auto:
        total = config.train_steps or steps_per_epoch * int(chosen.get("epochs", config.epochs))
        chosen["eval_steps"] = max(1, total // TARGET_EVALUATIONS)
    resolved = config.model_copy(update=chosen)
    truncation = profile.truncation(resolved.values().max_seq_length)
    refusal = truncation.refusal()
    if refusal is not None:
        raise Invalid(refusal, field="max_seq_length", code="truncation")
    return Resolved(resolved, chosen, _warnings(resolved, profile, held_out, truncation), truncation)


def learning_rate(config: FinetuneConfig) -> float:
    """The rate 'auto' derives for the base model's size and the technique (OpenAI's learning_rate_multiplier
    multiplies it: web/openai_ft_replies.py)."""
    params = get_model(config.base_model).params
    lora = 1e-3 if params < 1e9 else 5e-4 if params < 10e9 else 2e-4
    if config.method == "dpo":  # tuning a model that already answers, towards the preferred answers: a tenth
        return lora / 10
    if config.method == "grpo":  # towards its own better answers: a fifth (measured: scripts/bench_grpo.py, README)
        return lora / 5
    return lora if config.kind == "lora" else lora / 20


def _held_out(config: FinetuneConfig, profile: Profile) -> int:
    """Rows the job will hold out of the train split for evaluation (functions/train.py draws them)."""
    if profile.evaluation_rows or config.eval_fraction == 0 or profile.train_rows < MIN_ROWS_TO_HOLD_OUT:
        return 0
    return max(1, round(profile.train_rows * config.eval_fraction))


def _warnings(config: FinetuneConfig, profile: Profile, held_out: int, truncation: Truncation) -> list[str]:
    warnings = []
    if not profile.evaluation_rows and not held_out:
        why = (
            "eval_fraction is 0"
            if config.eval_fraction == 0
            else f"{profile.train_rows} rows are too few to hold out an evaluation split (at least "
            f"{MIN_ROWS_TO_HOLD_OUT} are needed)"
        )
        warnings.append(
            f"no evaluation: the dataset has no evaluation split and {why}. The job trains on every row, cannot "
            "stop early or pick its best step, and publishes its last step; defaults were derived from the "
            f"{profile.train_rows} training rows alone"
        )
    if truncation.rows_cut:
        warnings.append(
            f"max_seq_length {truncation.max_seq_length}: {truncation.rows_cut} of {truncation.rows} training rows "
            f"are cut, losing {truncation.completion_tokens_lost} of {truncation.completion_tokens} completion tokens"
            + (f"; {truncation.rows_dropped} keep no completion token: dropped" if truncation.rows_dropped else "")
        )
    return warnings
