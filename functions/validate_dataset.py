"""Handler for `dataset.uploaded`: validate every row, then count tokens with the base model's tokenizer.

Result on the dataset row: status `ready` with stats and each training row's (prompt, completion) token lengths
(from which a fine-tuning job derives its "auto" values and its truncation, functions/auto_config.py), or
`invalid` with every row error (line, field, message).
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
from functions.prompts import example_ids


def run(event: EventInfo) -> None:
    dataset = _load(event.subject_id)
    if dataset is None or dataset.status in ("ready", "invalid"):
        return  # deleted, or already handled by an earlier attempt
    data = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).read_bytes()
    parsed = parse_dataset(data, dataset.file_format, get_settings().limits.max_dataset_rows)  # type: ignore[arg-type]  # a FileFormat, checked at upload
    if not parsed.ok:
        _save(dataset.id, "invalid", parsed, errors=[e.to_dict() for e in parsed.errors], stats=_row_stats(parsed))
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


def row_lengths(parsed: ParsedDataset, base_model: str) -> dict[str, list[tuple[int, int]]]:
    """{split: [(prompt tokens, completion tokens), ...]} with the model's tokenizer and chat template, as
    fine-tuning sees the rows, before any truncation (a job's max_seq_length decides that)."""
    tokenizer = load_tokenizer(base_model)
    lengths: dict[str, list[tuple[int, int]]] = {"train": [], "evaluation": []}
    for example in parsed.examples:
        prompt, completion = example_ids(example, tokenizer, apply_chat_template=True)
        lengths[example.split].append((len(prompt), len(completion)))
    return lengths


def token_stats(lengths: dict[str, list[tuple[int, int]]]) -> dict:
    """Token counts per split (untruncated: each job reports what its own max_seq_length cuts)."""
    per_row = {split: [p + c for p, c in rows] for split, rows in lengths.items()}
    every = per_row["train"] + per_row["evaluation"]
    return {
        "total_tokens": sum(every),
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


def _load(dataset_id: str) -> Dataset | None:
    with session_scope() as s:
        return s.get(Dataset, dataset_id)


def _save(
    dataset_id: str,
    status: str,
    parsed: ParsedDataset,
    errors: list,
    stats: dict,
    lengths: list[tuple[int, int]] | None = None,
) -> None:
    with session_scope() as s:
        dataset = s.get_one(Dataset, dataset_id)
        dataset.status = status
        dataset.data_format = parsed.data_format
        dataset.errors = errors
        dataset.stats = stats
        dataset.train_lengths = [list(pair) for pair in lengths] if lengths is not None else None
        events.publish(s, dataset.tenant_id, f"dataset.{status}", dataset.id)  # dataset.ready | dataset.invalid
