"""Parse and validate an uploaded fine-tuning dataset (JSON Lines or CSV).

Three shapes are accepted, fixed by the first row (JSONL) or the header (CSV):
    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}                      (continued pretraining)
Any row may carry "split": "train" (the default) or "evaluation".

The parser never raises on bad input: every problem becomes a RowError with the 1-based line it starts on,
so the user can fix the whole file in one pass instead of one error per upload.
"""

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal, NamedTuple, get_args

DataFormat = Literal["prompt_completion", "messages", "text"]
Split = Literal["train", "evaluation"]
FileFormat = Literal["jsonl", "csv"]

MAX_REPORTED_ERRORS = 1000
# Text in, category out: a training split whose every answer is one of a few short labels, each seen at least
# twice, is a classification dataset (detect_labels). Twice, so that one-off short answers ("Hi Ann!", "red")
# of a generation dataset are not taken for classes.
MAX_CLASSES = 50
MAX_LABEL_WORDS = 5
MIN_ROWS_PER_CLASS = 2

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_ROLES = ("system", "user", "assistant")
_SPLITS: tuple[Split, ...] = get_args(Split)
# Columns with a meaning; any other column is ignored, so only these must be unique in a CSV header.
_KNOWN_FIELDS = ("messages", "prompt", "completion", "text", "split")
_EXTENSIONS: dict[str, FileFormat] = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_SHAPES = "a 'messages' {0}, 'prompt' and 'completion' {0}s, or a 'text' {0}"
_MAX_NAMES_SHOWN = 20


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
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None


@dataclass(frozen=True)
class ParsedDataset:
    data_format: DataFormat | None  # None when the file's shape cannot be determined
    examples: list[Example]  # only the valid rows
    errors: list[RowError]  # at most MAX_REPORTED_ERRORS of them
    error_count: int  # every error, including those past the cap

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and bool(self.examples)


def answer_of(example: Example) -> str | None:
    """The text the model learns to answer: the completion, or the last (assistant) message; None for raw text."""
    if example.completion is not None:
        return example.completion
    if example.messages:
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


def detect_file_format(filename: str) -> FileFormat | None:
    """The file format from the name's extension; None when it is not one we parse.

    A .json upload is parsed as JSON Lines: parse_dataset rejects a plain JSON document with one clear error.
    """
    return _EXTENSIONS.get(PurePath(filename).suffix.lower())


def parse_dataset(data: bytes, file_format: FileFormat, max_rows: int = 200_000) -> ParsedDataset:
    log = _ErrorLog()
    data_format, examples = _parse(data, file_format, max_rows, log)
    return ParsedDataset(data_format, examples, log.errors, log.count)


class _ErrorLog:
    """Counts every error but stores only the first MAX_REPORTED_ERRORS, so a garbage upload stays small."""

    def __init__(self) -> None:
        self.errors: list[RowError] = []
        self.count = 0

    def add(self, line: int, field: str | None, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(RowError(line, field, message))


# A problem found inside one row: (field, message). The caller adds the row's line.
_Problem = tuple[str | None, str]


class _Missing:
    """Marks a field absent from the row, which reads differently from an explicit null."""


class _Invalid:
    """Marks a value already reported as invalid, so it is not reported again."""


_MISSING = _Missing()
_INVALID = _Invalid()


def _parse(
    data: bytes, file_format: FileFormat, max_rows: int, log: _ErrorLog
) -> tuple[DataFormat | None, list[Example]]:
    if data.startswith(_UTF16_BOMS):
        # Otherwise every line would fail to decode, burying the one fix the user needs under a thousand errors.
        log.add(0, None, "file is UTF-16 encoded; save it as UTF-8")
        return None, []
    data = data.removeprefix(_UTF8_BOM)
    if not data.strip():
        log.add(0, None, "file is empty")
        return None, []
    if file_format == "jsonl":
        return _parse_jsonl(data, max_rows, log)
    if file_format == "csv":
        return _parse_csv(data, max_rows, log)
    raise ValueError(f"unknown file format {file_format!r}")


def _too_many_rows(max_rows: int) -> str:
    return f"too many rows: the limit is {max_rows} rows; rows from here on were not read"


# --- JSON Lines -----------------------------------------------------------------------------------------


def _parse_jsonl(data: bytes, max_rows: int, log: _ErrorLog) -> tuple[DataFormat | None, list[Example]]:
    data_format: DataFormat | None = None
    examples: list[Example] = []
    rows = 0
    # Split on b"\n" only: str.splitlines would also break on U+2028 and friends, which are legal inside JSON.
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows += 1
        if rows > max_rows:
            log.add(line, None, _too_many_rows(max_rows))
            break
        if rows == 1 and (whole_file_problem := _whole_json_document(raw, data)):
            log.add(0, None, whole_file_problem)
            return None, []
        obj = _load_object(raw, line, log)
        if obj is None:
            continue
        if data_format is None:
            data_format = _detect_format(obj.keys())
            if data_format is None:
                log.add(line, None, _unknown_shape(list(obj.keys()), "field"))
                return None, []
        example = _validate_row(obj, data_format, line, log)
        if example is not None:
            examples.append(example)
    return data_format, examples


def _whole_json_document(first_line: bytes, data: bytes) -> str | None:
    """Recognise a .json upload holding one JSON document (an array, a pretty-printed object), not JSON Lines.

    Such a file would otherwise fail on nearly every line; one whole-file error says what to fix. Only a first
    line that cannot be a JSONL row (an array, or an object not closed on its line) costs the extra parse.
    """
    head = first_line.strip()
    if not (head.startswith(b"[") or (head.startswith(b"{") and not head.endswith(b"}"))):
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list):
        return "file is a JSON array, not JSON Lines; put one JSON object on each line"
    return "file is one JSON object spread over several lines, not JSON Lines; put one JSON object on each line"


def _load_object(raw: bytes, line: int, log: _ErrorLog) -> dict[str, object] | None:
    text = _decode_line(raw, line, log)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        log.add(line, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
        return None
    except (ValueError, RecursionError) as exc:  # e.g. an integer with too many digits, nesting too deep
        log.add(line, None, f"invalid JSON: {_short(str(exc) or type(exc).__name__)}")
        return None
    if not isinstance(value, dict):
        log.add(line, None, f"expected a JSON object, got {_json_type(value)}")
        return None
    return value


def _decode_line(raw: bytes, line: int, log: _ErrorLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        log.add(line, None, _not_utf8(raw, exc))
        return None


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    return f"line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"


# --- CSV ------------------------------------------------------------------------------------------------


class _Record(NamedTuple):
    start: int  # line the record starts on
    end: int  # line it ends on (a quoted field may span lines)
    fields: list[str]
    error: str | None = None  # set when the csv module could not parse the record


def _parse_csv(data: bytes, max_rows: int, log: _ErrorLog) -> tuple[DataFormat | None, list[Example]]:
    text, bad_lines = _decode_csv(data, log)
    records = _read_records(text)
    header = next(records, None)
    if header is None:  # unreachable for non-blank input, kept so a bad assumption cannot raise
        log.add(0, None, "file is empty")
        return None, []
    if header.error:
        log.add(header.start, None, f"invalid CSV header: {header.error}")
        return None, []
    columns = [name.strip().lower() for name in header.fields]
    data_format = _header_format(columns, header.start, log)
    if data_format is None:
        return None, []
    examples: list[Example] = []
    rows = 0
    for record in records:
        rows += 1
        if rows > max_rows:
            log.add(record.start, None, _too_many_rows(max_rows))
            break
        example = _csv_example(record, columns, data_format, bad_lines, log)
        if example is not None:
            examples.append(example)
    if rows == 0:
        log.add(0, None, "file has a header but no rows")
    return data_format, examples


def _decode_csv(data: bytes, log: _ErrorLog) -> tuple[str, set[int]]:
    """Decode the file, reporting each line with bytes that are not UTF-8.

    The rest is decoded with replacement characters so every other row still gets validated; the rows that
    touch a bad line are dropped by the caller (their error is already reported).
    """
    try:
        return data.decode("utf-8"), set()
    except UnicodeDecodeError:
        pass
    bad_lines: set[int] = set()
    for line, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.add(line, None, _not_utf8(raw, exc))
            bad_lines.add(line)
    # b"\n" is never part of a bad sequence, so replacement keeps the line numbers intact.
    return data.decode("utf-8", errors="replace"), bad_lines


def _read_records(text: str) -> Iterator[_Record]:
    """Yield the non-blank CSV records with the lines they span.

    strict=True turns malformed quoting into an error instead of silently merging fields; the reader resumes
    on the next line after an error, so one bad record does not hide the rest.
    """
    # newline="\n": split lines only on "\n" and leave "\r\n" untranslated, as the csv module expects.
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if reader.line_num < start:  # nothing consumed: stop rather than loop forever
                return
            end = reader.line_num
            yield _Record(start, end, [], _short(str(exc)))
            continue
        end = reader.line_num
        if fields:  # the csv module yields [] for a blank line
            yield _Record(start, end, fields)


def _header_format(columns: list[str], line: int, log: _ErrorLog) -> DataFormat | None:
    duplicates = sorted({name for name in columns if name in _KNOWN_FIELDS and columns.count(name) > 1})
    if duplicates:
        log.add(line, None, f"duplicate column(s) in the header: {', '.join(map(repr, duplicates))}")
        return None
    data_format = _detect_format(columns)
    if data_format is None:
        log.add(line, None, _unknown_shape(columns, "column"))
    return data_format


def _csv_example(
    record: _Record, columns: list[str], data_format: DataFormat, bad_lines: set[int], log: _ErrorLog
) -> Example | None:
    if record.error:
        log.add(record.start, None, f"invalid CSV: {record.error}")
        return None
    if any(line in bad_lines for line in range(record.start, record.end + 1)):
        return None  # reported by _decode_csv; its text holds replacement characters
    if len(record.fields) != len(columns):
        log.add(record.start, None, f"row has {len(record.fields)} fields but the header has {len(columns)}")
        return None
    row = dict(zip(columns, record.fields, strict=True))
    return _validate_row(row, data_format, record.start, log, messages_as_json=True)


# --- Shape and row validation ---------------------------------------------------------------------------


def _detect_format(keys: Iterable[str]) -> DataFormat | None:
    names = set(keys)
    if "messages" in names:
        return "messages"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if "text" in names:
        return "text"
    return None


def _unknown_shape(found: list[str], noun: str) -> str:
    shown = ", ".join(repr(name) for name in found[:_MAX_NAMES_SHOWN])
    if len(found) > _MAX_NAMES_SHOWN:
        shown += f", ... ({len(found)} in all)"
    return f"unrecognised dataset shape: expected {_SHAPES.format(noun)}; found {noun}s: {shown or 'none'}"


def _validate_row(
    row: Mapping[str, object], data_format: DataFormat, line: int, log: _ErrorLog, *, messages_as_json: bool = False
) -> Example | None:
    """Check one row against the file's format; log its problems and return the Example when there are none."""
    problems: list[_Problem] = []
    split = _check_split(row.get("split"), problems)
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    if data_format == "messages":
        value = row.get("messages", _MISSING)
        if messages_as_json and isinstance(value, str):
            value = _load_messages_cell(value, problems)
        messages = _check_messages(value, problems)
    elif data_format == "prompt_completion":
        prompt = _check_text(row.get("prompt", _MISSING), "prompt", problems)
        completion = _check_text(row.get("completion", _MISSING), "completion", problems)
    else:
        text = _check_text(row.get("text", _MISSING), "text", problems)
    for field, message in problems:
        log.add(line, field, message)
    if problems or split is None:
        return None
    return Example(line, split, prompt=prompt, completion=completion, messages=messages, text=text)


def _check_split(value: object, problems: list[_Problem]) -> Split | None:
    if value is None or value == "":  # absent, null or an empty CSV cell all mean the default
        return "train"
    if not isinstance(value, str):
        problems.append(("split", f"'split' must be a string, got {_json_type(value)}"))
        return None
    normalised = value.strip().lower()
    for split in _SPLITS:
        if normalised == split:
            return split
    problems.append(("split", f"unknown split {_short(value)!r}: expected 'train' or 'evaluation'"))
    return None


def _check_text(value: object, field: str, problems: list[_Problem]) -> str | None:
    """A non-blank string; the value is kept as given, since leading spaces can matter to a tokenizer."""
    if value is _MISSING:
        problems.append((field, f"missing field '{field}'"))
        return None
    if not isinstance(value, str):
        problems.append((field, f"'{field}' must be a string, got {_json_type(value)}"))
        return None
    if not value.strip():
        problems.append((field, f"'{field}' is empty"))
        return None
    if not _is_encodable(value):
        problems.append((field, f"'{field}' contains an unpaired surrogate escape (\\ud800-\\udfff)"))
        return None
    return value


def _is_encodable(value: str) -> bool:
    # JSON allows "\ud800" on its own; such a string cannot be written back as UTF-8 or tokenized.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_messages_cell(cell: str, problems: list[_Problem]) -> object:
    """Decode a CSV cell holding the messages as a JSON array; _INVALID (and a problem) when it cannot be."""
    if not cell.strip():
        problems.append(("messages", "'messages' is empty"))
        return _INVALID
    try:
        return json.loads(cell)
    except json.JSONDecodeError as exc:
        problems.append(("messages", f"'messages' is not valid JSON: {exc.msg} (position {exc.pos})"))
    except (ValueError, RecursionError) as exc:
        problems.append(("messages", f"'messages' is not valid JSON: {_short(str(exc) or type(exc).__name__)}"))
    return _INVALID


def _check_messages(value: object, problems: list[_Problem]) -> tuple[dict[str, str], ...] | None:
    if value is _INVALID:
        return None
    if value is _MISSING:
        problems.append(("messages", "missing field 'messages'"))
        return None
    if not isinstance(value, list):
        problems.append(("messages", f"'messages' must be an array of messages, got {_json_type(value)}"))
        return None
    if not value:
        problems.append(("messages", "'messages' is empty"))
        return None
    before = len(problems)
    checked = [_check_message(item, f"messages[{index}]", problems) for index, item in enumerate(value)]
    roles = [role for role, _ in checked if role is not None]
    # Judge the order only when every role is known, or one bad role would also be reported as bad order.
    if len(roles) == len(checked) and (order_problem := _check_role_order(roles)):
        problems.append(order_problem)
    if len(problems) > before:
        return None
    return tuple(
        {"role": role, "content": content} for role, content in checked if role is not None and content is not None
    )


def _check_message(item: object, field: str, problems: list[_Problem]) -> tuple[str | None, str | None]:
    if not isinstance(item, dict):
        problems.append((field, f"'{field}' must be an object with 'role' and 'content', got {_json_type(item)}"))
        return None, None
    role = item.get("role", _MISSING)
    if role is _MISSING:
        problems.append((f"{field}.role", f"missing field '{field}.role'"))
        role = None
    elif not isinstance(role, str):
        problems.append((f"{field}.role", f"'{field}.role' must be a string, got {_json_type(role)}"))
        role = None
    elif role not in _ROLES:
        problems.append((f"{field}.role", f"unknown role {_short(role)!r}: expected 'system', 'user' or 'assistant'"))
        role = None
    content = _check_text(item.get("content", _MISSING), f"{field}.content", problems)
    return role, content


def _check_role_order(roles: list[str]) -> _Problem | None:
    """The first problem with the order of the roles, if any.

    Chat templates accept an optional leading system message, then user and assistant turns in strict
    alternation, and we train on assistant replies, so the conversation must end with one.
    """
    for index, role in enumerate(roles[1:], start=1):
        if role == "system":
            return f"messages[{index}].role", "'system' is only allowed as the first message"
    offset = 1 if roles[0] == "system" else 0
    turns = roles[offset:]
    if "user" not in turns:
        return "messages", "'messages' needs at least one 'user' message"
    for index, role in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            return (
                f"messages[{index + offset}].role",
                f"expected role '{expected}', got '{role}': after the optional system message, "
                "roles must alternate user, assistant, user, ...",
            )
    if turns[-1] != "assistant":
        return f"messages[{len(roles) - 1}].role", "the last message must have role 'assistant'"
    return None


# --- Small helpers --------------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """The JSON name of a value's type, as the user wrote it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(text: str, limit: int = 80) -> str:
    # Errors echo user input; a 1 MB cell must not turn into a 1 MB error message.
    return text if len(text) <= limit else text[: limit - 3] + "..."
