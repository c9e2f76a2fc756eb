"""Handler for `dataset.uploaded`: validate every row, then count tokens with the base model's tokenizer.

Result on the dataset row: status `ready` with stats and each training row's token lengths (from which a fine-tuning
job derives its "auto" values and its truncation, functions/auto_config.py), or `invalid` with every row error (line,
field, message). A row's lengths alternate context and learned tokens (functions/prompts.length_runs): (prompt,
completion) for a row that learns one reply, (context, learned, context, learned, ...) for a conversation.
"""

from statistics import mean

from app import events, volume
from app.db import session_scope
from app.models import Dataset
from app.queue import EventInfo
from app.settings import get_settings
from functions.base_models import BaseModelUnavailable, load_tokenizer
from functions.dataset_files import parse_dataset
from functions.datasets import ParsedDataset, detect_labels
from functions.preference import pair_runs
from functions.prompts import example_pieces, length_runs
from functions.templated_rows import column_stats


def run(event: EventInfo) -> None:
    dataset = _load(event.subject_id)
    if dataset is None or dataset.status in ("ready", "invalid"):
        return  # deleted, or already handled by an earlier attempt
    data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
    parsed = parse_dataset(data, dataset.file_format, get_settings().limits.max_dataset_rows)  # type: ignore[arg-type]  # a FileFormat, checked at upload
    if not parsed.ok:
        _save(dataset.id, "invalid", parsed, errors=[e.to_dict() for e in parsed.errors], stats=_row_stats(parsed))
        return
    if parsed.data_format == "columns":  # no prompt nor answer until a job's prompt_template names the columns
        _save_columns(dataset.id, dataset.base_model, parsed)
        return
    try:
        lengths = row_lengths(parsed, dataset.base_model)
    except BaseModelUnavailable as exc:  # retrying will not bring a network: tell the user now
        error = {"line": 0, "field": "base_model", "message": str(exc)}
        _save(dataset.id, "invalid", parsed, errors=[error], stats=_row_stats(parsed))
        return
    stats = _row_stats(parsed) | token_stats(lengths) | {"tokenizer": dataset.base_model} | label_stats(parsed)
    _save(dataset.id, "ready", parsed, errors=[], stats=stats, lengths=lengths["train"])


def fail(event: EventInfo, reason: str) -> None:
    with session_scope() as s:
        dataset = s.get(Dataset, event.subject_id)
        if dataset is not None and dataset.status == "validating":
            dataset.status = "invalid"
            dataset.errors = [{"line": 0, "field": None, "message": f"validation could not finish: {reason}"}]
            events.publish(s, dataset.tenant_id, "dataset.invalid", dataset.id)


def row_lengths(parsed: ParsedDataset, base_model: str) -> dict[str, list[tuple[int, ...]]]:
    """{split: [(context tokens, learned tokens, ...), ...]} with the model's tokenizer and chat template, as
    fine-tuning sees the rows, before any truncation (a job's max_seq_length decides that)."""
    tokenizer = load_tokenizer(base_model)
    lengths: dict[str, list[tuple[int, ...]]] = {"train": [], "evaluation": []}
    for example in parsed.examples:
        if example.chosen is not None:  # a preference row: (prompt, chosen, prompt, rejected)
            lengths[example.split].append(pair_runs(example, tokenizer))
        else:
            lengths[example.split].append(length_runs(example_pieces(example, tokenizer, apply_chat_template=True)))
    return lengths


def token_stats(lengths: dict[str, list[tuple[int, ...]]]) -> dict:
    """Token counts per split (untruncated: each job reports what its own max_seq_length cuts); completion tokens
    are the learned ones (completions, weighted assistant turns and their ends of turn; a preference row's two
    answers). A preference row counts its prompt twice, as training processes it: once with each answer."""
    per_row = {split: [sum(runs) for runs in rows] for split, rows in lengths.items()}
    every = per_row["train"] + per_row["evaluation"]
    return {
        "total_tokens": sum(every),
        "completion_tokens": sum(sum(runs[1::2]) for rows in lengths.values() for runs in rows),
        "train_tokens": sum(per_row["train"]),
        "evaluation_tokens": sum(per_row["evaluation"]),
        "mean_tokens_per_row": round(mean(every), 1),
        "max_tokens_per_row": max(every),
    }


def label_stats(parsed: ParsedDataset) -> dict:
    """{"labels": {label: training rows}} for a classification dataset (text in, category out), else {}."""
    labels = detect_labels(parsed.examples)
    return {"labels": labels} if labels is not None else {}


def _row_stats(parsed: ParsedDataset) -> dict:
    train = sum(1 for e in parsed.examples if e.split == "train")
    return {
        "rows": len(parsed.examples),
        "train_rows": train,
        "evaluation_rows": len(parsed.examples) - train,
        "error_count": parsed.error_count,
    }


def _save_columns(dataset_id: str, base_model: str, parsed: ParsedDataset) -> None:
    """A "columns" dataset: its columns and their tokens (functions/templated_rows.column_stats); no row lengths,
    which only a template decides (a job counts its rendered rows)."""
    try:
        stats = column_stats(parsed, load_tokenizer(base_model))
    except BaseModelUnavailable as exc:
        error = {"line": 0, "field": "base_model", "message": str(exc)}
        _save(dataset_id, "invalid", parsed, errors=[error], stats=_row_stats(parsed))
        return
    _save(dataset_id, "ready", parsed, errors=[], stats=_row_stats(parsed) | stats | {"tokenizer": base_model})


def _load(dataset_id: str) -> Dataset | None:
    with session_scope() as s:
        return s.get(Dataset, dataset_id)


def _save(
    dataset_id: str,
    status: str,
    parsed: ParsedDataset,
    errors: list,
    stats: dict,
    lengths: list[tuple[int, ...]] | None = None,
) -> None:
    with session_scope() as s:
        dataset = s.get_one(Dataset, dataset_id)
        dataset.status = status
        dataset.data_format = parsed.data_format
        dataset.errors = errors
        dataset.stats = stats
        dataset.train_lengths = [list(runs) for runs in lengths] if lengths is not None else None
        events.publish(s, dataset.tenant_id, f"dataset.{status}", dataset.id)  # dataset.ready | dataset.invalid
