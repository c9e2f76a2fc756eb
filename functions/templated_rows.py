"""A job's prompt_template applied to its dataset: the checks before any compute, and the rows it trains on.

A "columns" dataset (a CSV or JSONL of any columns, functions/dataset_files.ColumnsRow) trains only through a
template: each row becomes a prompt/completion Example whose prompt is `render(prompt_template, row)` and whose
completion is the row's `completion_column`. A prompt/completion dataset may wrap its prompt in one ('{prompt}').
Everything after (the chat template's user turn, truncation, classification labels, evaluation, the quote) then
works on those Examples as on any prompt/completion dataset's, so training and inference see the same prompt:
loraplex/prompt_template.py is the one renderer, imported by the SDK as well.

Refusals are Invalid naming `prompt_template` or `completion_column` (the API answers 422), raised when the job is
created (before anything is kept) and again by the worker should the dataset change under a queued job.
"""

from collections.abc import Sequence
from statistics import mean
from typing import Any

from app import volume
from app.errors import Invalid
from app.models import Dataset
from app.settings import get_settings
from functions.base_models import load_tokenizer
from functions.dataset_files import ColumnsRow, columns_of, parse_dataset
from functions.datasets import Example, ParsedDataset, detect_labels, single_class_message
from functions.finetune_config import FinetuneConfig
from functions.prompts import example_ids
from loraplex.prompt_template import placeholders, render

TEMPLATED_FORMATS = ("columns", "prompt_completion")
# Rows counted exactly when a job is created: 0.4-0.5 ms a row on this shared 2-core machine (5,000 rows 2.1 s, 20,000
# 11 s, /tmp benchmark of the lengths below); a larger dataset's rows are estimated in one batch (200,000 rows: parse,
# render and count in 14 s, 12 of them the batch encoding).
EXACT_ROWS = 5_000
MAX_ROWS_NAMED = 10  # rows named in one refusal; the count says how many more


def applies(config: FinetuneConfig, data_format: str | None) -> bool:
    """Whether the job's rows are built here: it gives a template, or its dataset has no rows without one."""
    return config.prompt_template is not None or data_format == "columns"


def measured(dataset: Dataset, config: FinetuneConfig) -> tuple[list[tuple[int, ...]], int, dict[str, int] | None]:
    """(train rows' (prompt, completion) tokens, evaluation rows, labels when a classification dataset) of the rows
    the job trains on, rendered: what its "auto" values, truncation and quote are derived from
    (functions/auto_config.dataset_profile). Refusals first from the dataset's stats, then from its rows."""
    check(config, dataset.name, dataset.data_format, dataset.stats.get("columns") or [])
    parsed = rendered(read(dataset), config, dataset.name)
    labels = detect_labels(parsed.examples)
    if labels is not None and len(labels) < 2:
        raise Invalid(f"completion_column: {single_class_message(dataset.name, labels)}", field="completion_column")
    counted = lengths(parsed, load_tokenizer(dataset.base_model))
    return list(counted["train"]), len(counted["evaluation"]), labels


def lengths(parsed: ParsedDataset, tokenizer: Any) -> dict[str, list[tuple[int, int]]]:
    """{split: [(prompt tokens, completion tokens), ...]} of rendered rows, in the chat template as training lays
    them out (apply_chat_template, as validation counts every dataset). Exact up to EXACT_ROWS rows (example_ids,
    the training tokenization). Above, estimated, since counting them exactly would keep the request waiting:
    every prompt and completion encoded as plain text in one batch, plus the tokens the chat template adds around
    each, counted exactly on the first row. Those are the same for every row except where a token merge crosses a
    content's edge (rare: the template's text beside a content ends in a newline or a control token), or where the
    template trims contents (Llama 3's: a row with spaces at an edge is a token or two off). The job's charge counts
    what it trained on, exactly."""
    counted: dict[str, list[tuple[int, int]]] = {"train": [], "evaluation": []}
    if len(parsed.examples) <= EXACT_ROWS:
        for example in parsed.examples:
            prompt, completion = example_ids(example, tokenizer, apply_chat_template=True)
            counted[example.split].append((len(prompt), len(completion)))
        return counted
    # encode_text's arguments, over every row at once
    texts = [e.prompt or "" for e in parsed.examples] + [e.completion or "" for e in parsed.examples]
    plain = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    prompts, completions = plain[: len(parsed.examples)], plain[len(parsed.examples) :]
    first_prompt, first_completion = example_ids(parsed.examples[0], tokenizer, apply_chat_template=True)
    around_prompt, around_completion = len(first_prompt) - prompts[0], len(first_completion) - completions[0]
    for example, prompt_tokens, completion_tokens in zip(parsed.examples, prompts, completions, strict=True):
        counted[example.split].append((around_prompt + prompt_tokens, around_completion + completion_tokens))
    return counted


def read(dataset: Dataset) -> ParsedDataset:
    data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
    parsed = parse_dataset(data, dataset.file_format, get_settings().limits.max_dataset_rows)  # type: ignore[arg-type]  # a FileFormat, checked at upload
    if not parsed.ok:
        raise Invalid(f"dataset: {dataset.name!r} no longer validates: {parsed.errors[0].message}", field="dataset")
    return parsed


def check(config: FinetuneConfig, name: str, data_format: str | None, columns: Sequence[str]) -> None:
    """The refusals a dataset's shape and columns decide, before any row is read."""
    template, answer = config.prompt_template, config.completion_column
    if template is None:
        if data_format == "columns":
            raise Invalid(
                f"prompt_template: {name!r} has columns {_shown(columns)}, not prompt/completion rows: give a "
                f"prompt_template naming the prompt's columns as '{{column}}' and a completion_column, the answer's",
                field="prompt_template",
            )
        return
    if data_format not in TEMPLATED_FORMATS:
        raise Invalid(
            f"prompt_template: applies to a dataset of columns or of prompt/completion rows; {name!r} is a "
            f"{data_format} dataset",
            field="prompt_template",
        )
    if data_format == "prompt_completion":
        columns = ["prompt"]  # its completion stays the answer
        if answer not in (None, "completion"):
            raise Invalid(
                f"completion_column: {name!r} is a prompt/completion dataset, whose answer is its 'completion'",
                field="completion_column",
            )
    elif answer is None:
        raise Invalid(
            f"completion_column: required with prompt_template: the column of {name!r} holding each row's answer, "
            f"one of {_shown(columns)}",
            field="completion_column",
        )
    elif answer not in columns:
        raise Invalid(
            f"completion_column: {name!r} has no column {answer!r}; its columns: {_shown(columns)}",
            field="completion_column",
        )
    for column in placeholders(template):  # the syntax was checked with the config
        if column not in columns:
            raise Invalid(
                f"prompt_template: {name!r} has no column {column!r} (placeholder '{{{column}}}'); its columns: "
                f"{_shown(columns)}",
                field="prompt_template",
            )
        if column == answer:
            raise Invalid(
                f"prompt_template: uses {column!r}, the completion_column: the answer would be given in the prompt",
                field="prompt_template",
            )


def rendered(parsed: ParsedDataset, config: FinetuneConfig, name: str = "the dataset") -> ParsedDataset:
    """The dataset as its job trains on it: with a template, each row a prompt/completion Example whose prompt is
    the rendered template; Invalid naming every row (line and column) with no value where the job reads one."""
    check(config, name, parsed.data_format, columns_of(parsed.examples))  # also where the job's creation checked
    template = config.prompt_template
    if template is None:
        return parsed
    answer = config.completion_column or "completion"
    used = placeholders(template)
    examples: list[Example] = []
    empty: list[tuple[int, str]] = []  # (line, column)
    for example in parsed.examples:
        values = _values(example)
        blank = [(example.line, c) for c in [*used, answer] if not values.get(c, "").strip()]
        if blank:
            empty += blank
            continue
        prompt = render(template, values)
        examples.append(Example(example.line, example.split, prompt=prompt, completion=values[answer]))
    if empty:
        _refuse_empty(empty, answer)
    return ParsedDataset("prompt_completion", examples, parsed.errors, parsed.error_count)


def _values(example: Example) -> dict[str, str]:
    if isinstance(example, ColumnsRow):
        return example.columns
    return {"prompt": example.prompt or "", "completion": example.completion or ""}


def _refuse_empty(empty: list[tuple[int, str]], answer: str) -> None:
    field = "completion_column" if all(column == answer for _, column in empty) else "prompt_template"
    named = ", ".join(f"line {line} column {column!r}" for line, column in empty[:MAX_ROWS_NAMED])
    more = f" and {len(empty) - MAX_ROWS_NAMED} more" if len(empty) > MAX_ROWS_NAMED else ""
    raise Invalid(
        f"{field}: {len(empty)} value(s) the job reads are empty: {named}{more}; fill them, or remove those rows",
        field=field,
    )


def column_stats(parsed: ParsedDataset, tokenizer: Any) -> dict[str, Any]:
    """A "columns" dataset's stats: its columns, each one's tokens over every row and its empty values, and the
    tokens per row of its values alone (a job's template and the chat template add their own: a job counts its
    rendered rows exactly when it is created)."""
    columns = columns_of(parsed.examples)
    rows = [e.columns for e in parsed.examples if isinstance(e, ColumnsRow)]
    per_row = [0] * len(rows)
    column_tokens: dict[str, int] = {}
    empty: dict[str, int] = {}
    for column in columns:
        texts = [row.get(column, "") for row in rows]
        # encode_text's arguments (functions/prompts.py), over a list at once
        counts = [
            len(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ]
        column_tokens[column] = sum(counts)
        per_row = [a + b for a, b in zip(per_row, counts, strict=True)]
        if blank := sum(1 for text in texts if not text.strip()):
            empty[column] = blank
    return {
        "columns": columns,
        "column_tokens": column_tokens,
        "empty_values": empty,
        "total_tokens": sum(per_row),
        "mean_tokens_per_row": round(mean(per_row), 1) if per_row else 0,
        "max_tokens_per_row": max(per_row, default=0),
    }


def _shown(columns: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in columns) or "none"
