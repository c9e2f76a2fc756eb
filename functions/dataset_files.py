"""An uploaded dataset file (JSON Lines or CSV) read into a ParsedDataset: decoding, lines and records, the shape.

The shape is fixed by the first row (JSONL) or the header (CSV), and so is a preference file's form (ours, or
OpenAI's preference format: JSONL only, its rows are nested objects); each row is then checked on its own
(functions/dataset_rows.py). Columns that are none of the known shapes make a "columns" dataset: each row is kept as
its columns' values as text (ColumnsRow), for a job's prompt_template to render (functions/templated_rows.py).
Nothing raises on bad input: every problem is logged with the line it starts on
(CSV: where the record starts; 0 for the whole file), and reading goes on so that one pass reports them all.
"""

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from functions.dataset_rows import (
    detect_format,
    json_type,
    openai_preference,
    row_split,
    short,
    unknown_shape,
    validate_row,
)
from functions.datasets import DataFormat, ErrorLog, Example, FileFormat, ParsedDataset
from loraplex.prompt_template import value_text

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Columns with a meaning; any other column is ignored, so only these must be unique in a CSV header.
_KNOWN_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "text", "split")
MAX_COLUMNS = 200  # of a "columns" dataset: each is counted in its stats


@dataclass(frozen=True)
class ColumnsRow(Example):
    """A row of a "columns" dataset: {column: value as text}. An empty CSV cell and a JSONL null are ""; a key a JSONL
    row lacks is absent. Neither is an error until a template uses it on that row."""

    columns: dict[str, str] = field(default_factory=dict)


def columns_of(examples: Iterable[Example]) -> list[str]:
    """A "columns" dataset's columns, in the order they first appear (a CSV's header order)."""
    seen: dict[str, None] = {}
    for example in examples:
        if isinstance(example, ColumnsRow):
            seen.update(dict.fromkeys(example.columns))
    return list(seen)


def parse_dataset(data: bytes, file_format: FileFormat, max_rows: int = 200_000) -> ParsedDataset:
    """The upload's valid rows and every problem found in it (at most `max_rows` rows are read)."""
    log = ErrorLog()
    data_format, examples = _parse(data, file_format, max_rows, log)
    return ParsedDataset(data_format, examples, log.errors, log.count)


def _parse(
    data: bytes, file_format: FileFormat, max_rows: int, log: ErrorLog
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


def _parse_jsonl(data: bytes, max_rows: int, log: ErrorLog) -> tuple[DataFormat | None, list[Example]]:
    data_format: DataFormat | None = None
    openai_form = False  # a preference file in OpenAI's format (its first row says)
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
            data_format = detect_format(obj.keys()) or ("columns" if _any_columns(obj) else None)
            if data_format is None:
                log.add(line, None, unknown_shape(list(obj.keys()), "field"))
                return None, []
            openai_form = data_format == "preference" and openai_preference(obj.keys())
        example: Example | None
        if data_format == "columns":
            example = _columns_row(obj, line, log)
        else:
            example = validate_row(obj, data_format, line, log, openai_form=openai_form)
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


def _load_object(raw: bytes, line: int, log: ErrorLog) -> dict[str, object] | None:
    text = _decode_line(raw, line, log)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        log.add(line, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
        return None
    except (ValueError, RecursionError) as exc:  # e.g. an integer with too many digits, nesting too deep
        log.add(line, None, f"invalid JSON: {short(str(exc) or type(exc).__name__)}")
        return None
    if not isinstance(value, dict):
        log.add(line, None, f"expected a JSON object, got {json_type(value)}")
        return None
    return value


def _decode_line(raw: bytes, line: int, log: ErrorLog) -> str | None:
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


def _parse_csv(data: bytes, max_rows: int, log: ErrorLog) -> tuple[DataFormat | None, list[Example]]:
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
    if data_format == "columns":  # names as written: a template names them so
        names = _column_names([name.strip() for name in header.fields], header.start, log)
        data_format, columns = ("columns", names) if names else (None, columns)
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


def _decode_csv(data: bytes, log: ErrorLog) -> tuple[str, set[int]]:
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
            yield _Record(start, end, [], short(str(exc)))
            continue
        end = reader.line_num
        if fields:  # the csv module yields [] for a blank line
            yield _Record(start, end, fields)


def _header_format(columns: list[str], line: int, log: ErrorLog) -> DataFormat | None:
    duplicates = sorted({name for name in columns if name in _KNOWN_FIELDS and columns.count(name) > 1})
    if duplicates:
        log.add(line, None, f"duplicate column(s) in the header: {', '.join(map(repr, duplicates))}")
        return None
    data_format = detect_format(columns) or ("columns" if _any_columns(columns) else None)
    if data_format is None:
        log.add(line, None, unknown_shape(columns, "column"))
    if data_format == "preference" and openai_preference(columns):
        log.add(
            line,
            None,
            "OpenAI's preference format ('input', 'preferred_output', 'non_preferred_output') is JSON "
            "Lines: upload it as a .jsonl file, or use 'prompt', 'chosen' and 'rejected' columns",
        )
        return None
    return data_format


def _any_columns(names: Iterable[str]) -> bool:
    """Whether names of no known shape can be a "columns" dataset: a template needs a column for the prompt and
    another for the answer (one alone, "prompt" without "completion" say, is more likely a mistake)."""
    return len(set(names) - {"split", ""}) >= 2


def _column_names(names: list[str], line: int, log: ErrorLog) -> list[str] | None:
    """A "columns" header's names, "split" (in any case) read as the split; None once logged what is wrong."""
    names = ["split" if name.lower() == "split" else name for name in names]
    blank = [str(number) for number, name in enumerate(names, start=1) if not name]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if blank:
        log.add(line, None, f"header column(s) {', '.join(blank)} have no name: name every column")
    elif duplicates:
        log.add(line, None, f"duplicate column(s) in the header: {', '.join(map(repr, duplicates))}")
    elif len(names) > MAX_COLUMNS:
        log.add(line, None, f"too many columns: {len(names)}; at most {MAX_COLUMNS}")
    else:
        return names
    return None


def _csv_example(
    record: _Record, columns: list[str], data_format: DataFormat, bad_lines: set[int], log: ErrorLog
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
    if data_format == "columns":
        return _columns_row(row, record.start, log)
    return validate_row(row, data_format, record.start, log, messages_as_json=True)


# --- "columns" rows -------------------------------------------------------------------------------------


def _columns_row(row: Mapping[str, object], line: int, log: ErrorLog) -> ColumnsRow | None:
    """A row's values as text: strings as they are, numbers and booleans as JSON writes them (what a template
    fills in), null as "". An object or an array is refused, naming its column."""
    before = log.count
    split = row_split(row.get("split"), line, log)
    columns: dict[str, str] = {}
    for name, value in row.items():
        if name == "split":
            continue
        if value is None:
            columns[name] = ""
        elif isinstance(value, str | bool | int | float):
            text = value_text(value, name)
            if _encodable(text):
                columns[name] = text
            else:
                log.add(line, name, f"'{name}' contains an unpaired surrogate escape (\\ud800-\\udfff)")
        else:
            log.add(
                line, name, f"'{name}' holds a JSON {json_type(value)}: a column's value is text, a number or a boolean"
            )
    if log.count > before or split is None:
        return None
    return ColumnsRow(line, split, columns=columns)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- a preview ------------------------------------------------------------------------------------------

PREVIEW_BYTES = 1024 * 1024  # of a stored file read for its first rows: a preview never reads a whole large file


def first_rows(path: Path, file_format: FileFormat, limit: int) -> list[Example]:
    """The first `limit` valid rows of a stored dataset file as validation parses them (bad rows are the dataset's
    `errors`). Only the file's first PREVIEW_BYTES are read, cut after their last line break so that no row is read
    in part; a file whose first row is longer than that is read whole."""
    with path.open("rb") as file:
        data = file.read(PREVIEW_BYTES)
        if len(data) == PREVIEW_BYTES:
            end = data.rfind(b"\n") + 1
            data = data[:end] if end else data + file.read()
    return parse_dataset(data, file_format, max_rows=limit).examples[:limit]


def row_fields(example: Example) -> dict[str, object]:
    """A parsed row as the API shows it: its line, split and the fields of its shape."""
    shown: dict[str, object] = {"line": example.line, "split": example.split}
    if isinstance(example, ColumnsRow):
        return shown | {"columns": example.columns}
    for name in ("prompt", "completion", "text", "chosen", "rejected"):
        if getattr(example, name) is not None:
            shown[name] = getattr(example, name)
    if example.messages is not None:
        shown["messages"] = [dict(m) for m in example.messages]
    return shown
