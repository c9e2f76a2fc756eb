"""Fine-tuning datasets as the platform uses them: a row's shape, its errors, the parsed dataset, and what it teaches.

Four shapes are accepted, fixed by the first row (JSONL) or the header (CSV):
    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                       (multi-turn: every assistant message is learned, but one with "weight": 0, which is context)
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}                      (continued pretraining)
    preference         {"prompt": ..., "chosen": ..., "rejected": ...}  (preference tuning, method "dpo"); the chat
                       form: "prompt" a list of messages ending with a user turn, "chosen" and "rejected" each a
                       string or a list of one assistant message; or OpenAI's preference (DPO) format, read as
                       the chat form: {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
                       "non_preferred_output": [...]} (JSONL only; no tools)
Any row may carry "split": "train" (the default) or "evaluation".

Reading an upload (JSON Lines or CSV) is functions/dataset_files.py (parse_dataset); checking one row is
functions/dataset_rows.py. Parsing never raises on bad input: every problem becomes a RowError with the 1-based
line it starts on, so the user can fix the whole file in one pass instead of one error per upload.
"""

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

# "columns": any other columns, trained through a job's prompt_template (functions/templated_rows.py)
DataFormat = Literal["prompt_completion", "messages", "text", "preference", "columns"]
Split = Literal["train", "evaluation"]
FileFormat = Literal["jsonl", "csv"]

MAX_REPORTED_ERRORS = 1000
# Text in, category out: a training split whose every answer is one of a few short labels, each seen at least
# twice, is a classification dataset (detect_labels). Twice, so that one-off short answers ("Hi Ann!", "red")
# of a generation dataset are not taken for classes.
MAX_CLASSES = 50
MAX_LABEL_WORDS = 5
MIN_ROWS_PER_CLASS = 2

_EXTENSIONS: dict[str, FileFormat] = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class RowError:
    line: int  # 1-based line in the file (CSV: where the record starts); 0 = the whole file
    field: str | None  # e.g. "completion", "messages[2].role", "split"; None for whole-row errors
    message: str

    def to_dict(self) -> dict[str, object]:
        return {"line": self.line, "field": self.field, "message": self.message}


@dataclass(frozen=True)
class Example:
    line: int
    split: Split
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None  # each {"role", "content"}
    text: str | None = None
    # Per message, parallel to `messages`: 1 where it is learned (an assistant message, weight 1 by default), 0 where
    # it is context (system and user messages, assistant messages given "weight": 0). None: every assistant message
    # is learned.
    weights: tuple[int, ...] | None = None
    # A preference row's two answers to its prompt (`prompt`, or `messages` in the chat form: the conversation up to
    # the reply): the preferred one and the other.
    chosen: str | None = None
    rejected: str | None = None

    def learned(self) -> tuple[bool, ...]:
        """Per message: whether the model learns it."""
        if self.messages is None:
            return ()
        if self.weights is None:
            return tuple(m["role"] == "assistant" for m in self.messages)
        return tuple(m["role"] == "assistant" and w == 1 for m, w in zip(self.messages, self.weights, strict=True))


@dataclass(frozen=True)
class ParsedDataset:
    data_format: DataFormat | None  # None when the file's shape cannot be determined
    examples: list[Example]  # only the valid rows
    errors: list[RowError]  # at most MAX_REPORTED_ERRORS of them
    error_count: int  # every error, including those past the cap

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and bool(self.examples)


class ErrorLog:
    """Counts every error but stores only the first MAX_REPORTED_ERRORS, so a garbage upload stays small."""

    def __init__(self) -> None:
        self.errors: list[RowError] = []
        self.count = 0

    def add(self, line: int, field: str | None, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(RowError(line, field, message))


def detect_file_format(filename: str) -> FileFormat | None:
    """The file format from the name's extension; None when it is not one we parse.

    A .json upload is parsed as JSON Lines: parse_dataset rejects a plain JSON document with one clear error.
    """
    return _EXTENSIONS.get(PurePath(filename).suffix.lower())


def answer_of(example: Example) -> str | None:
    """The text the model learns to answer: the completion, or the last (assistant) message when it is the only one
    learned; None for raw text and for conversations that learn several turns, or an earlier one (not label rows)."""
    if example.completion is not None:
        return example.completion
    learned = example.learned()
    if example.messages and learned[-1] and sum(learned) == 1:
        return example.messages[-1]["content"]
    return None


def detect_labels(examples: Iterable[Example]) -> dict[str, int] | None:
    """{label: training rows} when the training split is a classification dataset: every answer, stripped, is
    one of at most MAX_CLASSES labels of at most MAX_LABEL_WORDS words, each answered by at least
    MIN_ROWS_PER_CLASS rows. None otherwise. A single label is returned as such: the caller refuses it."""
    counts: Counter[str] = Counter()
    for example in examples:
        if example.split != "train":
            continue
        answer = answer_of(example)
        if answer is None or len(answer.split()) > MAX_LABEL_WORDS:
            return None
        counts[answer.strip()] += 1
        if len(counts) > MAX_CLASSES:
            return None
    if not counts or min(counts.values()) < MIN_ROWS_PER_CLASS:
        return None
    return dict(sorted(counts.items()))


def single_class_message(dataset: str, labels: Mapping[str, int]) -> str:
    """Why a classification dataset with one label cannot be trained on (the job is refused before any compute)."""
    [(label, rows)] = labels.items()
    return (
        f"{dataset!r} is a classification dataset with a single class ({label!r}, {rows} training rows): "
        "a model cannot learn to tell classes apart from it; add rows of at least one other class"
    )
