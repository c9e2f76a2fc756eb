import json
import random

import pytest

from functions.dataset_files import parse_dataset
from functions.datasets import (
    MAX_REPORTED_ERRORS,
    Example,
    ParsedDataset,
    RowError,
    answer_of,
    detect_file_format,
    detect_labels,
)


def jsonl(*rows: object) -> bytes:
    """One line per row: dicts and lists are dumped as JSON, strings are taken as the raw line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    return "\n".join(lines).encode() + b"\n"


def where(parsed: ParsedDataset) -> list[tuple[int, str | None]]:
    return [(error.line, error.field) for error in parsed.errors]


PC = {"prompt": "2+2?", "completion": "4"}
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# --- detect_file_format ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("train.jsonl", "jsonl"),
        ("train.JSONL", "jsonl"),
        ("data.json", "jsonl"),
        ("dir/sheet.csv", "csv"),
        ("Sheet.CSV", "csv"),
        ("notes.txt", None),
        ("jsonl", None),
        ("archive.jsonl.gz", None),
        ("", None),
    ],
)
def test_detect_file_format(filename: str, expected: str | None) -> None:
    assert detect_file_format(filename) == expected


# --- Valid files ----------------------------------------------------------------------------------------


def test_jsonl_prompt_completion_with_splits_and_blank_lines() -> None:
    data = jsonl(
        PC,
        "",
        {**PC, "split": "evaluation"},
        {**PC, "split": "EVALUATION"},
        "   ",
        {**PC, "split": "Train"},
        {**PC, "split": ""},
        {**PC, "split": None},
    )
    parsed = parse_dataset(data, "jsonl")
    assert parsed.ok
    assert parsed.data_format == "prompt_completion"
    assert parsed.errors == [] and parsed.error_count == 0
    assert [(e.line, e.split) for e in parsed.examples] == [
        (1, "train"),
        (3, "evaluation"),
        (4, "evaluation"),
        (6, "train"),
        (7, "train"),
        (8, "train"),
    ]
    assert parsed.examples[0] == Example(line=1, split="train", prompt="2+2?", completion="4")


def test_jsonl_messages() -> None:
    conversation: list[dict[str, object]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye", "weight": 1, "name": "bot"},  # other keys are dropped
    ]
    parsed = parse_dataset(jsonl({"messages": CHAT}, {"messages": conversation, "split": "evaluation"}), "jsonl")
    assert parsed.ok and parsed.data_format == "messages"
    assert parsed.examples[0].messages == tuple(CHAT)
    second = parsed.examples[1]
    assert (second.line, second.split, second.prompt, second.text) == (2, "evaluation", None, None)
    assert second.messages is not None
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert second.messages[-1] == {"role": "assistant", "content": "bye"}
    assert second.weights is None and second.learned() == (False, False, True, False, True)


def test_jsonl_text_keeps_values_verbatim() -> None:
    parsed = parse_dataset(jsonl({"text": "  leading space\n"}, {"text": "b", "source": "wiki"}), "jsonl")
    assert parsed.ok and parsed.data_format == "text"
    assert [e.text for e in parsed.examples] == ["  leading space\n", "b"]


@pytest.mark.parametrize(
    ("first_row", "expected"),
    [
        ({"messages": CHAT, "prompt": "p", "completion": "c", "text": "t"}, "messages"),
        ({"prompt": "p", "completion": "c", "text": "t"}, "prompt_completion"),
        ({"prompt": "p", "text": "t"}, "text"),
    ],
)
def test_format_priority(first_row: dict[str, object], expected: str) -> None:
    parsed = parse_dataset(jsonl(first_row), "jsonl")
    assert parsed.ok
    assert parsed.data_format == expected


def test_keys_of_another_format_are_ignored() -> None:
    parsed = parse_dataset(jsonl(PC, {**PC, "text": 5, "messages": "x", "id": 7}), "jsonl")
    assert parsed.ok and len(parsed.examples) == 2


def test_csv_prompt_completion_with_splits_crlf_and_multiline_cells() -> None:
    data = b' Prompt ,COMPLETION,split,notes\r\n2+2?,4,,x\r\n"multi\r\nline",done,Evaluation,\r\n\r\nq,a,train,\r\n'
    parsed = parse_dataset(data, "csv")
    assert parsed.ok and parsed.data_format == "prompt_completion"
    assert [(e.line, e.split, e.prompt, e.completion) for e in parsed.examples] == [
        (2, "train", "2+2?", "4"),
        (3, "evaluation", "multi\r\nline", "done"),
        (6, "train", "q", "a"),
    ]


def test_csv_messages_cell_holds_a_json_array() -> None:
    cell = json.dumps(CHAT).replace('"', '""')
    data = f'messages,split\n"{cell}",evaluation\n'.encode()
    parsed = parse_dataset(data, "csv")
    assert parsed.ok and parsed.data_format == "messages"
    assert parsed.examples == [Example(line=2, split="evaluation", messages=tuple(CHAT))]


def test_csv_text() -> None:
    parsed = parse_dataset(b"text\nhello world\nsecond\n", "csv")
    assert parsed.ok and parsed.data_format == "text"
    assert [(e.line, e.text) for e in parsed.examples] == [(2, "hello world"), (3, "second")]


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_utf8_bom_is_stripped(file_format: str) -> None:
    body = jsonl(PC) if file_format == "jsonl" else b"prompt,completion\np,c\n"
    parsed = parse_dataset(b"\xef\xbb\xbf" + body, file_format)  # type: ignore[arg-type]
    assert parsed.ok and parsed.data_format == "prompt_completion"


# --- Row errors in JSONL --------------------------------------------------------------------------------

ROLE_ERRORS = [
    (  # unknown role
        [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}],
        ("messages[0].role", "unknown role 'bot'"),
    ),
    (  # system not first
        [*CHAT, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}],
        ("messages[2].role", "'system' is only allowed as the first message"),
    ),
    (  # last message not assistant
        [*CHAT, {"role": "user", "content": "again"}],
        ("messages[2].role", "the last message must have role 'assistant'"),
    ),
    (  # no user message
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}],
        ("messages", "needs at least one 'user' message"),
    ),
    (  # two user turns in a row
        [{"role": "system", "content": "s"}, CHAT[0], CHAT[0], CHAT[1]],
        ("messages[2].role", "expected role 'assistant', got 'user'"),
    ),
    (  # assistant before any user
        [CHAT[1], *CHAT],
        ("messages[0].role", "expected role 'user', got 'assistant'"),
    ),
    ([CHAT[0], {"role": "assistant", "content": " \n"}], ("messages[1].content", "'messages[1].content' is empty")),
    ([CHAT[0], {"role": "assistant"}], ("messages[1].content", "missing field 'messages[1].content'")),
    ([CHAT[0], {"content": "x"}], ("messages[1].role", "missing field 'messages[1].role'")),
    ([CHAT[0], {"role": 1, "content": "x"}], ("messages[1].role", "must be a string, got number")),
    ([CHAT[0], {"role": "assistant", "content": ["x"]}], ("messages[1].content", "must be a string, got array")),
    ([CHAT[0], "hello"], ("messages[1]", "must be an object with 'role' and 'content', got string")),
    ([], ("messages", "'messages' is empty")),
    ("user: hi", ("messages", "must be an array of messages, got string")),
]


@pytest.mark.parametrize(("messages", "expected"), ROLE_ERRORS)
def test_messages_errors(messages: object, expected: tuple[str, str]) -> None:
    parsed = parse_dataset(jsonl({"messages": CHAT}, {"messages": messages}, {"messages": CHAT}), "jsonl")
    assert not parsed.ok
    assert [e.line for e in parsed.examples] == [1, 3]
    assert parsed.error_count == 1
    (error,) = parsed.errors
    field, message = expected
    assert (error.line, error.field) == (2, field)
    assert message in error.message


# --- multi-turn conversations and weights (OpenAI's fine-tuning format) -----------------------------------

TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello", "weight": 0},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "weight": 1},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_weights_are_kept_per_message() -> None:
    parsed = parse_dataset(jsonl({"messages": TURNS}, {"messages": CHAT}), "jsonl")
    assert parsed.ok
    first, second = parsed.examples
    assert first.messages == tuple({"role": m["role"], "content": m["content"]} for m in TURNS)  # no weight key
    assert first.weights == (0, 0, 0, 0, 1, 0, 1)  # the default on an assistant message is 1; 0 elsewhere
    assert first.learned() == (False, False, False, False, True, False, True)
    assert second.weights is None  # every reply learned: the default, as an Example built in code has it
    # Examples built in code without weights learn every assistant message
    assert Example(1, "train", messages=tuple(TURNS)).learned() == (False, False, True, False, True, False, True)


def test_csv_messages_cell_with_weights() -> None:
    cell = json.dumps(TURNS).replace('"', '""')
    parsed = parse_dataset(f'messages\n"{cell}"\n'.encode(), "csv")
    assert parsed.ok and parsed.examples[0].weights == (0, 0, 0, 0, 1, 0, 1)
    bad = json.dumps([CHAT[0], {**CHAT[1], "weight": "1"}]).replace('"', '""')
    parsed = parse_dataset(f'messages\n"{cell}"\n"{bad}"\n'.encode(), "csv")
    assert where(parsed) == [(3, "messages[1].weight")]


@pytest.mark.parametrize(
    ("index", "weight", "message"),
    [
        (4, True, "'messages[4].weight' must be 0 or 1, got true"),
        (4, False, "'messages[4].weight' must be 0 or 1, got false"),
        (4, 0.5, "'messages[4].weight' must be 0 or 1, got 0.5"),
        (4, 1.0, "'messages[4].weight' must be 0 or 1, got 1.0"),
        (4, "1", "'messages[4].weight' must be 0 or 1, got \"1\""),
        (4, 2, "'messages[4].weight' must be 0 or 1, got 2"),
        (4, -1, "'messages[4].weight' must be 0 or 1, got -1"),
        (4, None, "'messages[4].weight' must be 0 or 1, got null"),
        (4, [1], "'messages[4].weight' must be 0 or 1, got array"),
        (0, 1, "'messages[0].weight' is only allowed on assistant messages, not on a 'system' message"),
        (3, 0, "'messages[3].weight' is only allowed on assistant messages, not on a 'user' message"),
    ],
)
def test_bad_weights_are_named_with_their_line_and_field(index: int, weight: object, message: str) -> None:
    turns = [dict(m) for m in TURNS]
    turns[index]["weight"] = weight
    parsed = parse_dataset(jsonl({"messages": CHAT}, "", {"messages": turns}, {"messages": TURNS}), "jsonl")
    assert [e.line for e in parsed.examples] == [1, 4]
    assert [e.to_dict() for e in parsed.errors] == [
        {"line": 3, "field": f"messages[{index}].weight", "message": message}
    ]


def test_a_row_that_learns_no_turn_is_refused() -> None:
    silent = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in TURNS]
    parsed = parse_dataset(
        jsonl({"messages": TURNS}, {"messages": silent}, {"messages": [CHAT[0], {**CHAT[1], "weight": 0}]}), "jsonl"
    )
    assert [e.line for e in parsed.examples] == [1]
    assert where(parsed) == [(2, "messages"), (3, "messages")]
    assert "every assistant message has weight 0: the row teaches nothing" in parsed.errors[0].message


def test_weight_problems_with_other_problems_of_the_row() -> None:
    """Each problem once: a bad role and a weight on it, a bad weight and a bad order."""
    turns = [CHAT[0], {"role": "bot", "content": "x", "weight": 1}, {**CHAT[1], "weight": 0.5}]
    parsed = parse_dataset(jsonl({"messages": turns}), "jsonl")
    assert where(parsed) == [(1, "messages[1].role"), (1, "messages[2].weight")]
    turns = [CHAT[0], {**CHAT[1], "weight": 0}, CHAT[0]]
    parsed = parse_dataset(jsonl({"messages": turns}), "jsonl")
    assert where(parsed) == [(1, "messages[2].role")]  # the order: no "teaches nothing" on top


def test_only_a_row_that_learns_one_final_reply_is_a_label_row() -> None:
    def chat(*turns: dict[str, object], weights: tuple[int, ...] | None = None) -> Example:
        return Example(1, "train", messages=tuple(turns), weights=weights)  # type: ignore[arg-type]

    reply = {"role": "assistant", "content": "spam"}
    assert answer_of(chat(CHAT[0], reply)) == "spam"
    assert answer_of(chat(CHAT[0], CHAT[1], CHAT[0], reply)) is None  # two replies learned
    assert answer_of(chat(CHAT[0], CHAT[1], CHAT[0], reply, weights=(0, 0, 0, 1))) == "spam"  # context, then a label
    assert answer_of(chat(CHAT[0], CHAT[1], CHAT[0], reply, weights=(0, 1, 0, 0))) is None  # the label not at the end
    labelled = [chat(CHAT[0], {**reply, "content": label}) for label in ("spam", "ham") * 2]
    assert detect_labels(labelled) == {"ham": 2, "spam": 2}
    assert detect_labels([*labelled, chat(CHAT[0], CHAT[1], CHAT[0], reply)]) is None


def test_bad_role_is_not_also_reported_as_bad_order() -> None:
    parsed = parse_dataset(
        jsonl({"messages": [{"role": "human", "content": "x"}, {"role": "gpt", "content": ""}]}), "jsonl"
    )
    assert where(parsed) == [(1, "messages[0].role"), (1, "messages[1].role"), (1, "messages[1].content")]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p"}, [("completion", "missing field 'completion'")]),
        ({"text": "t"}, [("prompt", "missing field 'prompt'"), ("completion", "missing field 'completion'")]),
        ({"prompt": "p", "completion": ""}, [("completion", "'completion' is empty")]),
        ({"prompt": "", "completion": "c"}, [("prompt", "'prompt' is empty")]),
        ({"prompt": " \t\n", "completion": "c"}, [("prompt", "'prompt' is empty")]),
        ({"prompt": 42, "completion": "c"}, [("prompt", "'prompt' must be a string, got number")]),
        ({"prompt": "p", "completion": None}, [("completion", "'completion' must be a string, got null")]),
        ({"prompt": "p", "completion": True}, [("completion", "'completion' must be a string, got boolean")]),
        ({"prompt": {"a": 1}, "completion": "c"}, [("prompt", "'prompt' must be a string, got object")]),
        ({**PC, "split": "validation"}, [("split", "unknown split 'validation': expected 'train' or 'evaluation'")]),
        ({**PC, "split": "eval"}, [("split", "unknown split 'eval': expected 'train' or 'evaluation'")]),
        ({**PC, "split": 1}, [("split", "'split' must be a string, got number")]),
        ({"prompt": "\ud800", "completion": "c"}, [("prompt", "'prompt' contains an unpaired surrogate escape")]),
    ],
)
def test_prompt_completion_row_errors(row: dict[str, object], expected: list[tuple[str, str]]) -> None:
    parsed = parse_dataset(jsonl(PC, row), "jsonl")
    assert parsed.data_format == "prompt_completion"
    assert [e.line for e in parsed.examples] == [1]
    assert [(e.line, e.field) for e in parsed.errors] == [(2, field) for field, _ in expected]
    for error, (_, message) in zip(parsed.errors, expected, strict=True):
        assert error.message.startswith(message)


def test_text_row_errors() -> None:
    parsed = parse_dataset(jsonl({"text": "a"}, {"text": ""}, {"text": 3}, {"body": "x"}), "jsonl")
    assert where(parsed) == [(2, "text"), (3, "text"), (4, "text")]
    assert parsed.errors[2].message == "missing field 'text'"


def test_invalid_json_on_line_3_of_5() -> None:
    data = jsonl(PC, PC, '{"prompt": "p", "completion": }', PC, PC)
    parsed = parse_dataset(data, "jsonl")
    assert not parsed.ok
    assert [e.line for e in parsed.examples] == [1, 2, 4, 5]
    assert where(parsed) == [(3, None)]
    assert parsed.errors[0].message == "invalid JSON: Expecting value (column 31)"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "expected a JSON object, got array"),
        ('"just a string"', "expected a JSON object, got string"),
        ("42", "expected a JSON object, got number"),
        ("null", "expected a JSON object, got null"),
        ("{'prompt': 'single quotes'}", "invalid JSON: Expecting property name enclosed in double quotes"),
        ("[" * 100_000, "invalid JSON: "),  # too deep for the parser: RecursionError, not a crash
        ("1" * 5000, "invalid JSON: "),  # too many digits for int(): ValueError, not a crash
    ],
)
def test_lines_that_are_not_objects(line: str, message: str) -> None:
    parsed = parse_dataset(jsonl(PC, line, PC), "jsonl")
    assert where(parsed) == [(2, None)]
    assert parsed.errors[0].message.startswith(message)
    assert len(parsed.examples) == 2


def test_undecodable_bytes_in_jsonl() -> None:
    data = jsonl(PC) + b'{"prompt": "caf\xe9", "completion": "c"}\n' + jsonl(PC)
    parsed = parse_dataset(data, "jsonl")
    assert not parsed.ok
    assert [e.line for e in parsed.examples] == [1, 3]
    assert parsed.errors == [RowError(2, None, "line is not valid UTF-8 (byte 0xe9 at column 16)")]


def test_line_numbers_count_blank_lines_and_crlf() -> None:
    data = b"\r\n" + json.dumps(PC).encode() + b"\r\n\r\n" + b"{bad\r\n"
    parsed = parse_dataset(data, "jsonl")
    assert [e.line for e in parsed.examples] == [2]
    assert where(parsed) == [(4, None)]


def test_unknown_shape_in_jsonl_is_a_columns_dataset() -> None:
    """Fields of no known shape are columns, for a job's prompt_template (tests/functions/test_prompt_template.py);
    a first row with no field at all is still one whole-file error."""
    parsed = parse_dataset(jsonl("not json", {"input": "a", "output": "b"}, PC), "jsonl")
    assert parsed.data_format == "columns" and len(parsed.examples) == 2
    assert where(parsed) == [(1, None)]
    parsed = parse_dataset(jsonl({}, PC), "jsonl")
    assert parsed.data_format is None and parsed.examples == []
    message = parsed.errors[0].message
    assert "'messages'" in message and "'prompt' and 'completion'" in message and "'text'" in message
    assert "found fields: none" in message


def test_rows_of_another_format_after_the_first() -> None:
    parsed = parse_dataset(jsonl({"text": "t"}, PC, {"messages": CHAT}), "jsonl")
    assert parsed.data_format == "text"
    assert where(parsed) == [(2, "text"), (3, "text")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (json.dumps([PC, PC], indent=2).encode(), "file is a JSON array, not JSON Lines"),
        (json.dumps([PC, PC]).encode(), "file is a JSON array, not JSON Lines"),
        (json.dumps(PC, indent=2).encode(), "file is one JSON object spread over several lines"),
    ],
)
def test_a_plain_json_document_is_one_whole_file_error(data: bytes, message: str) -> None:
    parsed = parse_dataset(data, "jsonl")
    assert where(parsed) == [(0, None)]
    assert parsed.errors[0].message.startswith(message)


# --- Errors in CSV --------------------------------------------------------------------------------------


def test_csv_multiline_field_then_bad_row_reports_the_start_line() -> None:
    data = b'prompt,completion\n"line one\nline two\nline three",done\nonly-one-field\n"p",""\n'
    parsed = parse_dataset(data, "csv")
    assert [e.line for e in parsed.examples] == [2]
    assert parsed.errors == [
        RowError(5, None, "row has 1 fields but the header has 2"),
        RowError(6, "completion", "'completion' is empty"),
    ]


def test_csv_row_with_too_many_fields() -> None:
    parsed = parse_dataset(b'text\nok\n"a\nb",extra\nfine\n', "csv")
    assert where(parsed) == [(3, None)]
    assert [e.line for e in parsed.examples] == [2, 5]


def test_csv_malformed_quoting_is_reported_and_parsing_goes_on() -> None:
    parsed = parse_dataset(b'prompt,completion\np,"c"junk\np,c\n', "csv")
    assert where(parsed) == [(2, None)]
    assert parsed.errors[0].message.startswith("invalid CSV: ")
    assert [e.line for e in parsed.examples] == [3]


def test_csv_unterminated_quote() -> None:
    parsed = parse_dataset(b'prompt,completion\np,c\np,"never closed\nmore\n', "csv")
    assert where(parsed) == [(3, None)]
    assert [e.line for e in parsed.examples] == [2]


def test_undecodable_bytes_in_csv() -> None:
    data = b'prompt,completion\np,c\n"multi\nbad \xff\xfe here",c\nq,\xc3\nr,d\n'
    parsed = parse_dataset(data, "csv")
    assert not parsed.ok
    assert parsed.errors == [
        RowError(4, None, "line is not valid UTF-8 (byte 0xff at column 5)"),
        RowError(5, None, "line is not valid UTF-8 (byte 0xc3 at column 3)"),
    ]
    assert [e.line for e in parsed.examples] == [2, 6]


def test_csv_undecodable_bytes_alone_still_make_the_dataset_invalid() -> None:
    parsed = parse_dataset(b"text,comment\nfine,\xff\n", "csv")
    assert where(parsed) == [(2, None)]
    assert parsed.examples == [] and not parsed.ok


def test_csv_split_and_messages_cell_errors() -> None:
    good = json.dumps(CHAT).replace('"', '""')
    bad_role = json.dumps([CHAT[0], {"role": "bot", "content": "x"}]).replace('"', '""')
    data = f'messages,split\n"{good}",test\n"[not json",\n,\n"{bad_role}",\n"{good}",\n'.encode()
    parsed = parse_dataset(data, "csv")
    assert where(parsed) == [(2, "split"), (3, "messages"), (4, "messages"), (5, "messages[1].role")]
    assert parsed.errors[1].message.startswith("'messages' is not valid JSON: ")
    assert parsed.errors[2].message == "'messages' is empty"
    assert [e.line for e in parsed.examples] == [6]


@pytest.mark.parametrize(
    ("header", "found"),
    [
        (b"prompt,answer", "found columns: 'prompt', 'answer'"),  # completion column missing: columns
        (b"question,response,id", "found columns: 'question', 'response', 'id'"),
        (b"split", "found columns: 'split'"),  # nothing but the split: no shape at all
    ],
)
def test_csv_header_without_a_known_shape(header: bytes, found: str) -> None:
    parsed = parse_dataset(header + b"\na,b,c\n", "csv")
    if header != b"split":  # any columns make a "columns" dataset (a job's prompt_template names them)
        assert parsed.data_format == "columns"
        return
    assert parsed.data_format is None and parsed.examples == []
    assert where(parsed) == [(1, None)]
    assert parsed.errors[0].message.startswith("unrecognised dataset shape: expected a 'messages' column")
    assert parsed.errors[0].message.endswith(found)


def test_csv_duplicate_known_column() -> None:
    parsed = parse_dataset(b"prompt,completion,Prompt,x,x\np,c,q,1,2\n", "csv")
    assert parsed.errors == [RowError(1, None, "duplicate column(s) in the header: 'prompt'")]


# --- Whole-file errors and limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "file_format", "message"),
    [
        (b"", "jsonl", "file is empty"),
        (b"", "csv", "file is empty"),
        (b" \n\r\n\t\n", "jsonl", "file is empty"),
        (b"\n\n", "csv", "file is empty"),
        (b"\xef\xbb\xbf", "jsonl", "file is empty"),
        (b"prompt,completion\n", "csv", "file has a header but no rows"),
        (b"\xef\xbb\xbftext\r\n\r\n", "csv", "file has a header but no rows"),
        ("text\nhi\n".encode("utf-16"), "csv", "file is UTF-16 encoded; save it as UTF-8"),
    ],
)
def test_whole_file_errors(data: bytes, file_format: str, message: str) -> None:
    parsed = parse_dataset(data, file_format)  # type: ignore[arg-type]
    assert parsed.errors == [RowError(0, None, message)]
    assert parsed.error_count == 1 and parsed.examples == [] and not parsed.ok


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_more_than_max_rows(file_format: str) -> None:
    if file_format == "jsonl":
        data = jsonl(PC, "", PC, PC, PC)  # data rows on lines 1, 3, 4, 5
        first_excess = 4
    else:
        data = b"prompt,completion\np,c\n\np,c\np,c\np,c\n"  # data rows on lines 2, 4, 5, 6
        first_excess = 5
    parsed = parse_dataset(data, file_format, max_rows=2)  # type: ignore[arg-type]
    assert len(parsed.examples) == 2
    assert parsed.error_count == 1 and not parsed.ok
    (error,) = parsed.errors
    assert (error.line, error.field) == (first_excess, None)
    assert "the limit is 2 rows" in error.message


def test_exactly_max_rows_is_fine() -> None:
    assert parse_dataset(jsonl(PC, PC), "jsonl", max_rows=2).ok


def test_error_cap_keeps_counting() -> None:
    data = jsonl(PC, *([{"prompt": "p"}] * 1500))
    parsed = parse_dataset(data, "jsonl")
    assert len(parsed.errors) == MAX_REPORTED_ERRORS == 1000
    assert parsed.error_count == 1500
    assert parsed.errors[0].line == 2 and parsed.errors[-1].line == 1001
    assert len(parsed.examples) == 1


# --- Result objects and robustness ----------------------------------------------------------------------


def test_row_error_to_dict() -> None:
    error = RowError(3, "messages[2].role", "the last message must have role 'assistant'")
    assert error.to_dict() == {
        "line": 3,
        "field": "messages[2].role",
        "message": "the last message must have role 'assistant'",
    }


def test_ok_needs_examples_and_no_errors() -> None:
    assert ParsedDataset("text", [Example(1, "train", text="t")], [], 0).ok
    assert not ParsedDataset("text", [], [], 0).ok
    assert not ParsedDataset("text", [Example(1, "train", text="t")], [], 1).ok


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_random_bytes_never_raise(file_format: str) -> None:
    rng = random.Random(1234)
    alphabet = b'{}[]",:\n\r \\abc\x00\xff\xc3\xa9prompt'
    for _ in range(300):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        parsed = parse_dataset(data, file_format)  # type: ignore[arg-type]
        assert parsed.ok or parsed.error_count > 0
