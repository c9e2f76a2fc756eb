"""Reinforcement fine-tuning (method "grpo"): TRL's GRPOTrainer over a LoRA adapter, rewarded by the job's graders
(functions/graders.py: built-in graders here, users' Python reward functions in the sandbox), and its evaluation.

The dataset is prompts: a prompt/completion dataset (the reference answer is the `completion` column graders may
read), or a dataset of any columns with a `prompt` column (the others are the graders' columns). A row's `example`,
what a reward function reads, is its columns: {"prompt", "completion"} or the row's own. Each row is checked (a
prompt that is not empty text), and a grader reading a column the dataset lacks is refused, when the job is created.

Each optimizer step samples `num_generations` completions for each of `effective_batch_size` prompts (one
generation call: our native engine with the adapter as it is at that step on a CPU, functions/grpo_rollout.py,
else TRL's own `generate` on the model being trained), and scores the step's completions with one
`score_batch` call (so one sandbox start per Python reward function per step): each grader is one of TRL's reward
functions and its weight TRL's reward weight; a failed item scores graders.FAILURE_SCORE (0.0). The reference
model of the KL term is the model with the adapter off (no second copy of the weights).

Tokens processed (what the job is charged): TRL's count of prompt and completion tokens it ran, per completion.
The estimate, before: per train row and epoch, (prompt tokens + max_completion_length) x num_generations.

Evaluation: one greedy completion per held-out prompt, scored by the same graders: the mean reward (and each
grader's mean, spread and failures), and a table of the first SAMPLES completions with their rewards. An
evaluation row's loss is minus its mean reward, so the published step is the evaluated step with the best reward.
"""

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import Invalid
from functions.base_models import load_model, load_tokenizer
from functions.datasets import Example, ParsedDataset, Split
from functions.evaluate import EvalResult
from functions.finetune_config import FinetuneConfig
from functions.grader_specs import GraderSpec, missing_columns
from functions.graders import FAILURE_SCORE, score_batch
from functions.grpo_rollout import EngineRollout
from functions.prompts import example_ids
from functions.sandbox import Item, ItemScore
from functions.trainer import TrainingRun, new_lora, prepare_run, training_arguments

FORMATS = ("prompt_completion", "columns")  # the datasets a GRPO job reads prompts from
SAMPLES = 4  # completions kept with each evaluation, with their rewards
MAX_ROWS_NAMED = 10
EVAL_BATCH = 8  # held-out prompts generated together
# Our metrics rows' columns for GRPO (app/models.py JobMetric), on train and eval rows
METRIC_COLUMNS = ("reward", "reward_std", "kl", "completion_length", "rewards", "samples")


@dataclass(frozen=True)
class PromptRow:
    index: int  # the row's position among the job's rows: how a reward call finds its example
    line: int
    split: Split
    prompt: str
    example: dict[str, Any]  # the row's columns, as reward functions and graders read them
    prompt_tokens: int = 0
    tokens: int = 0  # per pass over the row: (prompt + max_completion_length) x num_generations

    def chat(self, apply_chat_template: bool) -> Any:
        """The prompt as TRL takes it: a conversation of one user turn, or the text as it is."""
        return [{"role": "user", "content": self.prompt}] if apply_chat_template else self.prompt


# --- the dataset ---------------------------------------------------------------------------------------------------


def dataset_columns(data_format: str | None, columns: Sequence[str]) -> list[str] | None:
    """The columns a GRPO job's example holds, or None when the format has no prompts to sample from."""
    if data_format == "prompt_completion":
        return ["prompt", "completion"]
    if data_format == "columns" and "prompt" in columns:
        return list(columns)
    return None


def check_dataset(
    name: str, data_format: str | None, columns: Sequence[str], specs: Sequence[GraderSpec], param: str = "dataset"
) -> None:
    """Refuse (Invalid naming `param`) a dataset without prompts or without a column a grader reads."""
    have = dataset_columns(data_format, columns)
    if have is None:
        raise Invalid(
            f"{param}: method 'grpo' samples completions for prompts: it needs a prompt/completion dataset or a "
            f"dataset with a 'prompt' column; {name!r} is a {data_format} dataset"
            + (f" with columns {list(columns)}" if data_format == "columns" else ""),
            field=param,
        )
    problem = missing_columns(specs, have)
    if problem:
        raise Invalid(f"{param}: {problem} ({name!r} has {have})", field=param)


def prompt_rows(parsed: ParsedDataset, name: str) -> list[PromptRow]:
    """Every row as a prompt with its example; rows without a prompt refused by line (Invalid naming `dataset`)."""
    rows: list[PromptRow] = []
    bad: list[int] = []
    for example in parsed.examples:
        prompt, columns = _prompt(example)
        if not prompt or not prompt.strip():
            bad.append(example.line)
            continue
        rows.append(PromptRow(len(rows), example.line, example.split, prompt, columns))
    if bad:
        lines = ", ".join(map(str, bad[:MAX_ROWS_NAMED])) + (
            f" and {len(bad) - MAX_ROWS_NAMED} more" if len(bad) > MAX_ROWS_NAMED else ""
        )
        raise Invalid(f"dataset: {name!r} has rows with an empty 'prompt' (line {lines})", field="dataset")
    return rows


def _prompt(example: Example) -> tuple[str | None, dict[str, Any]]:
    columns = getattr(example, "columns", None)  # a "columns" dataset's row (functions/dataset_files.ColumnsRow)
    if columns is not None:
        return columns.get("prompt"), dict(columns)
    return example.prompt, {"prompt": example.prompt, "completion": example.completion}


def counted(rows: list[PromptRow], tokenizer: Any, config: FinetuneConfig) -> list[PromptRow]:
    """The rows with their prompt tokens (the chat template's user turn, as training lays it out) and the tokens a
    pass over each processes: (prompt + max_completion_length) x num_generations."""
    grpo = config.grpo
    out = []
    for row in rows:
        ids, _ = example_ids(
            Example(row.line, row.split, prompt=row.prompt, completion=""), tokenizer, config.apply_chat_template
        )
        tokens = (len(ids) + grpo.max_completion_length) * grpo.num_generations
        out.append(PromptRow(row.index, row.line, row.split, row.prompt, row.example, len(ids), tokens))
    return out


# --- training ------------------------------------------------------------------------------------------------------


class Scorer:
    """The job's graders as TRL's reward functions: the first of them called for a step's completions scores them
    with every grader in one score_batch call; the others read that call's scores. Failures are counted per grader
    and reason until `take_failures`."""

    def __init__(self, rows: Sequence[PromptRow], specs: Sequence[GraderSpec]) -> None:
        self.rows, self.specs = {row.index: row for row in rows}, list(specs)
        self._key: tuple | None = None
        self._scores: list[list[ItemScore]] = []
        self.failures: Counter[str] = Counter()  # "grader: reason" -> items

    def functions(self) -> list[Any]:
        def reward_function(i: int, name: str) -> Any:
            def reward(prompts: list, completions: list, row: list[int], **kwargs: Any) -> list[float]:
                return [FAILURE_SCORE if s.value is None else s.value for s in self.scores(row, completions)[i]]

            reward.__name__ = name  # TRL names the metric after it: rewards/<name>/mean
            return reward

        return [reward_function(i, spec.name) for i, spec in enumerate(self.specs)]

    def scores(self, row: list[int], completions: list) -> list[list[ItemScore]]:
        texts = [completion_text(c) for c in completions]
        key = (tuple(row), tuple(texts))
        if key != self._key:
            items = [Item(self.rows[i].prompt, text, self.rows[i].example) for i, text in zip(row, texts, strict=True)]
            batch = score_batch(items, self.specs)
            self._key, self._scores = key, [g.scores for g in batch.graders]
            for g in batch.graders:
                self.failures.update(f"{g.name}: {reason}" for reason in (s.reason for s in g.scores) if reason)
        return self._scores

    def take_failures(self) -> dict[str, int]:
        failures, self.failures = dict(self.failures), Counter()
        return failures


def completion_text(completion: Any) -> str:
    """A completion as TRL hands it over: text, or a conversation's assistant message."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


@dataclass
class GrpoRun(TrainingRun):
    scorer: Scorer = field(default=None)  # type: ignore[assignment]  # set by build_grpo_trainer
    rollout: EngineRollout | None = None  # where completions come from; None: TRL's generate

    def save(self, target: Path) -> None:
        self.trainer.model.save_pretrained(target, selected_adapters=["default"])

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()


def build_grpo_trainer(
    config: FinetuneConfig,
    rows: list[PromptRow],
    workdir: Path,
    precision: str | None = None,
    init_from: Path | None = None,
    checkpoints: bool = False,
) -> GrpoRun:
    """A GRPOTrainer over the train `rows`; raises BaseModelUnavailable when the weights cannot be had."""
    from datasets import Dataset  # type: ignore[import-untyped]
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from functions.dpo import _no_recompute

    grpo = config.grpo
    bf16 = prepare_run(config, precision)
    tokenizer = load_tokenizer(config.base_model)
    model = load_model(config.base_model, "bfloat16" if bf16 else "float32")
    peft_config = None
    rank = config.rank
    if init_from is not None:  # the saved adapter's shape carries over
        saved = LoraConfig.from_pretrained(str(init_from))
        saved.lora_dropout = config.lora_dropout
        model = PeftModel.from_pretrained(model, init_from, config=saved, is_trainable=True)
        rank = saved.r
    else:
        peft_config = new_lora(config, "CAUSAL_LM")
    prompts_per_step = config.values().effective_batch_size
    args = training_arguments(
        config,
        workdir,
        bf16,
        checkpoints,
        arguments=GRPOConfig,
        # One prompt's group a micro-batch, a step's prompts accumulated: one generation and one scoring a step.
        per_device_train_batch_size=grpo.num_generations,
        gradient_accumulation_steps=prompts_per_step,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
        reward_weights=[spec.weight for spec in grpo.reward_functions],
        train_sampling_strategy="random",
        disable_dropout=False,  # lora_dropout is the user's (0 by default)
        log_completions=False,
        **_no_recompute(GRPOConfig),
    )
    scorer = Scorer(rows, grpo.reward_functions)
    dataset = Dataset.from_list([{"prompt": r.chat(config.apply_chat_template), "row": r.index} for r in rows])
    rollout = None
    if EngineRollout.usable(model):
        sequences = prompts_per_step * grpo.num_generations
        rollout = EngineRollout(config.base_model, bf16, rank, sequences, workdir, config.seed)

    class Trainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids: list, images: Any, *args: Any, **kwargs: Any) -> Any:
            """A step's completions (token ids; no sampling logprobs, as TRL's generate gives none) from the
            engine; TRL's own path without one (or for prompts with images)."""
            if rollout is None or images:
                return super()._generate_single_turn(prompt_ids, images, *args, **kwargs)
            step = self.state.global_step
            return rollout.sample(self.model, step, prompt_ids, grpo.max_completion_length, grpo.temperature), None

    trainer = Trainer(
        model=model,
        reward_funcs=scorer.functions(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    steps = max(1, math.ceil(len(rows) / prompts_per_step))
    return GrpoRun(trainer, tokenizer, steps, bf16, config.kind, scorer, rollout)


def step_metrics(logs: dict[str, Any], run: TrainingRun) -> dict[str, Any]:
    """A step's GRPO metrics (TRL's logs) as our metrics row's columns: the total reward's mean and spread, each
    reward's, the failures counted since the last step, the KL to the reference and the completions' mean length."""
    if "reward" not in logs:
        return {}
    specs = run.scorer.specs if isinstance(run, GrpoRun) else []
    rewards: dict[str, Any] = {
        spec.name: {"mean": logs.get(f"rewards/{spec.name}/mean"), "std": logs.get(f"rewards/{spec.name}/std")}
        for spec in specs
    }
    failures = run.scorer.take_failures() if isinstance(run, GrpoRun) else {}
    return {
        "reward": _number(logs.get("reward")),
        "reward_std": _number(logs.get("reward_std")),
        "kl": _number(logs.get("kl")),
        "completion_length": _number(logs.get("completions/mean_length")),
        "rewards": {"graders": rewards, "failures": failures},
    }


def _number(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


# --- evaluation ----------------------------------------------------------------------------------------------------


def evaluate_rewards(run: TrainingRun, config: FinetuneConfig, rows: list[PromptRow]) -> EvalResult:
    """One greedy completion per held-out prompt with the adapter as it is now, scored by the job's graders."""
    prompts = [r.chat(config.apply_chat_template) for r in rows]
    completions = generate(run, prompts, config.grpo.max_completion_length)
    batch = score_batch(
        [Item(r.prompt, c, r.example) for r, c in zip(rows, completions, strict=True)], config.grpo.reward_functions
    )
    mean = sum(batch.totals) / len(batch.totals)
    spread = math.sqrt(sum((t - mean) ** 2 for t in batch.totals) / len(batch.totals))
    rewards = {
        "graders": {g.name: {"mean": g.mean, "std": g.std} for g in batch.graders},
        "failures": {f"{g.name}: {reason}": n for g in batch.graders for reason, n in g.failures.items()},
    }
    samples = [
        {
            "prompt": r.prompt,
            "completion": c,
            "reward": total,
            "scores": {g.name: g.scores[i].value if g.scores[i].ok else g.scores[i].reason for g in batch.graders},
        }
        for i, (r, c, total) in enumerate(zip(rows[:SAMPLES], completions, batch.totals, strict=False))
    ]
    lengths = [len(run.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    return EvalResult(
        loss=-mean,  # lower is better: the published step is the one with the best mean reward
        perplexity=None,
        token_accuracy=None,
        sequence_accuracy=None,
        char_error_rate=None,
        rows=len(rows),
        reward=mean,
        reward_std=spread,
        completion_length=sum(lengths) / len(lengths),
        rewards=rewards,
        samples=samples,
    )


def generate(run: TrainingRun, prompts: list[Any], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` (conversations or text) with the adapter as it is now: from the run's engine,
    else TRL's model's `generate`, EVAL_BATCH at a time, left-padded."""
    import torch

    model, tokenizer = run.trainer.model, run.tokenizer
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]
    rollout = run.rollout if isinstance(run, GrpoRun) else None
    if rollout is not None:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        answers = rollout.greedy(model, run.trainer.state.global_step, ids, max_new_tokens)
        return tokenizer.batch_decode(answers, skip_special_tokens=True)
    training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[str] = []
    try:
        for start in range(0, len(texts), EVAL_BATCH):
            batch = tokenizer(
                texts[start : start + EVAL_BATCH], return_tensors="pt", padding=True, add_special_tokens=False
            )
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.no_grad():
                ids = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )  # [batch, prompt + new]
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if training:
            model.train()
    return out


def profile(dataset: Any, config: FinetuneConfig) -> Any:
    """What auto_config resolves a GRPO job's "auto" fields on and prices it from: each train row as (prompt tokens,
    max_completion_length). Refuses (Invalid naming `dataset`) a dataset without prompts, without a column a grader
    reads, or with an empty prompt."""
    from functions import templated_rows
    from functions.auto_config import Profile

    check_dataset(dataset.name, dataset.data_format, dataset.stats.get("columns") or [], config.grpo.reward_functions)
    rows = counted(prompt_rows(templated_rows.read(dataset), dataset.name), load_tokenizer(dataset.base_model), config)
    completion = config.grpo.max_completion_length
    return Profile(
        lengths=[(r.prompt_tokens, completion) for r in rows if r.split == "train"],
        evaluation_rows=sum(1 for r in rows if r.split == "evaluation"),
        classification=False,
    )
