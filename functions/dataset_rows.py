"""One row of a dataset upload checked against the file's shape: its split, its texts, its messages and their roles.

The readers (functions/dataset_files.py) hand each row over as a mapping of field names to values (JSON values, or
CSV cells, where the messages are a JSON array in one cell); every problem is logged with the row's line and the
field at fault ("completion", "messages[2].role", "split"), and only a row without problems becomes an Example.

A message is read for its "role", "content" and "weight"; other keys (OpenAI's "name", say) are ignored, as other
fields of a row are, and never reach the chat template. "weight", as OpenAI's fine-tuning reads it, is 0 or 1 on an
assistant message: 0 makes that reply context, not learned; a row must learn at least one reply.

A preference file may also be in OpenAI's preference (DPO) format, fixed by its first row (openai_preference): each
row {"input": {"messages": [...]}, "preferred_output": [one assistant message], "non_preferred_output": [...]} is
read as our chat form (input.messages the prompt, the two outputs the chosen and rejected answers), every problem
named by OpenAI's field ("input.messages[1].role", "preferred_output[0].content"). Function calling is not trained:
tools and tool calls are refused per row; `parallel_tool_calls` and an empty `tools` ask for nothing.
"""

import json
from collections.abc import Iterable, Mapping
from typing import get_args

from functions.datasets import DataFormat, ErrorLog, Example, Split

_ROLES = ("system", "user", "assistant")
_WEIGHTS = (0, 1)
_SPLITS: tuple[Split, ...] = get_args(Split)
_SHAPES = "a 'messages' {0}, 'prompt' and 'completion' {0}s, 'prompt', 'chosen' and 'rejected' {0}s, or a 'text' {0}"
_MAX_NAMES_SHOWN = 20
_OPENAI_ANSWERS = {"preferred_output", "non_preferred_output"}  # OpenAI's preference rows' answers
_TOOL_FIELDS = ("tool_calls", "function_call")  # of a message: function calling, not trained here

# A problem found inside one row: (field, message). The caller adds the row's line.
_Problem = tuple[str | None, str]


class _Missing:
    """Marks a field absent from the row, which reads differently from an explicit null."""


class _Invalid:
    """Marks a value already reported as invalid, so it is not reported again."""


_MISSING = _Missing()
_INVALID = _Invalid()


def detect_format(keys: Iterable[str]) -> DataFormat | None:
    names = set(keys)
    if "messages" in names:
        return "messages"
    if {"chosen", "rejected"} <= names or names >= _OPENAI_ANSWERS:
        return "preference"  # a missing 'prompt' (or 'input') is then each row's error, naming it
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if "text" in names:
        return "text"
    return None


def openai_preference(keys: Iterable[str]) -> bool:
    """Whether a preference file's first row is in OpenAI's preference format (every row is read so then)."""
    names = set(keys)
    return names >= _OPENAI_ANSWERS and not {"chosen", "rejected"} <= names


def unknown_shape(found: list[str], noun: str) -> str:
    shown = ", ".join(repr(name) for name in found[:_MAX_NAMES_SHOWN])
    if len(found) > _MAX_NAMES_SHOWN:
        shown += f", ... ({len(found)} in all)"
    return f"unrecognised dataset shape: expected {_SHAPES.format(noun)}; found {noun}s: {shown or 'none'}"


def validate_row(
    row: Mapping[str, object],
    data_format: DataFormat,
    line: int,
    log: ErrorLog,
    *,
    messages_as_json: bool = False,
    openai_form: bool = False,
) -> Example | None:
    """Check one row against the file's format; log its problems and return the Example when there are none.
    `openai_form`: a preference row in OpenAI's preference format (openai_preference)."""
    problems: list[_Problem] = []
    split = _check_split(row.get("split"), problems)
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    weights: tuple[int, ...] | None = None
    chosen: str | None = None
    rejected: str | None = None
    if data_format == "messages":
        value = row.get("messages", _MISSING)
        if messages_as_json and isinstance(value, str):
            value = _load_messages_cell(value, problems)
        messages, weights = _check_messages(value, problems)
    elif data_format == "preference" and openai_form:
        messages, chosen, rejected = _check_openai_preference(row, problems)
        weights = None if messages is None else (0,) * len(messages)
    elif data_format == "preference":
        prompt, messages, weights, chosen, rejected = _check_preference(row, problems, messages_as_json)
    elif data_format == "prompt_completion":
        prompt = _check_text(row.get("prompt", _MISSING), "prompt", problems)
        completion = _check_text(row.get("completion", _MISSING), "completion", problems)
    else:
        text = _check_text(row.get("text", _MISSING), "text", problems)
    for field, message in problems:
        log.add(line, field, message)
    if problems or split is None:
        return None
    return Example(
        line,
        split,
        prompt=prompt,
        completion=completion,
        messages=messages,
        text=text,
        weights=weights,
        chosen=chosen,
        rejected=rejected,
    )


def _check_preference(
    row: Mapping[str, object], problems: list[_Problem], messages_as_json: bool
) -> tuple[str | None, tuple[dict[str, str], ...] | None, tuple[int, ...] | None, str | None, str | None]:
    """(prompt, prompt messages, their weights, chosen, rejected) of a preference row. The prompt is text, or (the
    chat form) the conversation up to the reply: messages ending with a user turn. Each answer is text, or a list of
    one assistant message; the two must differ, or the row teaches nothing."""
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    weights: tuple[int, ...] | None = None
    value = row.get("prompt", _MISSING)
    if messages_as_json and isinstance(value, str) and value.lstrip().startswith("["):
        value = _load_messages_cell(value, problems, "prompt")
    if isinstance(value, list):
        messages = _check_prompt_messages(value, problems)
        weights = None if messages is None else (0,) * len(messages)  # context only: the answers are learned
    elif value is not _INVALID:
        prompt = _check_text(value, "prompt", problems)
    chosen = _check_answer(row.get("chosen", _MISSING), "chosen", problems, messages_as_json)
    rejected = _check_answer(row.get("rejected", _MISSING), "rejected", problems, messages_as_json)
    if chosen is not None and chosen == rejected:
        problems.append(("rejected", "'chosen' and 'rejected' are the same answer: the row prefers nothing"))
    return prompt, messages, weights, chosen, rejected


def _check_openai_preference(
    row: Mapping[str, object], problems: list[_Problem]
) -> tuple[tuple[dict[str, str], ...] | None, str | None, str | None]:
    """(prompt messages, chosen, rejected) of a row in OpenAI's preference format, checked as our chat form is."""
    messages: tuple[dict[str, str], ...] | None = None
    given = row.get("input", _MISSING)
    if given is _MISSING:
        problems.append(("input", "missing field 'input'"))
    elif not isinstance(given, dict):
        problems.append(("input", f"'input' must be an object with 'messages', got {json_type(given)}"))
    else:
        for name in ("tools", "functions"):
            if given.get(name):  # absent, null and [] ask for nothing
                field = f"input.{name}"
                problems.append((field, f"function calling is not trained here: remove '{field}'"))
        value = given.get("messages", _MISSING)
        if value is _MISSING:
            problems.append(("input.messages", "missing field 'input.messages'"))
        elif not isinstance(value, list):
            problems.append(("input.messages", f"'input.messages' must be an array, got {json_type(value)}"))
        elif not _tool_calls(value, "input.messages", problems):
            messages = _check_prompt_messages(value, problems, "input.messages")
    answers: list[str | None] = []
    for field in ("preferred_output", "non_preferred_output"):
        value = row.get(field, _MISSING)
        if isinstance(value, list) and _tool_calls(value, field, problems):
            answers.append(None)
        else:
            answers.append(_check_answer(value, field, problems, messages_as_json=False))
    chosen, rejected = answers
    if chosen is not None and chosen == rejected:
        message = "'preferred_output' and 'non_preferred_output' are the same answer: the row prefers nothing"
        problems.append(("non_preferred_output", message))
    return messages, chosen, rejected


def _tool_calls(messages: list, field: str, problems: list[_Problem]) -> bool:
    """Whether a message calls a tool (refused, naming it: function calling is not trained here)."""
    found = False
    for index, item in enumerate(messages):
        for name in _TOOL_FIELDS:
            if isinstance(item, dict) and item.get(name):
                where = f"{field}[{index}].{name}"
                problems.append((where, f"function calling is not trained here: answer with 'content', not '{name}'"))
                found = True
    return found


def _check_prompt_messages(
    value: list, problems: list[_Problem], field: str = "prompt"
) -> tuple[dict[str, str], ...] | None:
    """A chat-form prompt: messages (optional system, then user and assistant turns alternating) ending with a user
    turn."""
    if not value:
        problems.append((field, f"'{field}' is empty"))
        return None
    before = len(problems)
    checked = [_check_message(item, f"{field}[{index}]", problems, weighted=False) for index, item in enumerate(value)]
    roles = [role for role, _, _ in checked if role is not None]
    if len(roles) == len(checked) and (order_problem := _check_role_order(roles, field, last="user")):
        problems.append(order_problem)
    if len(problems) > before:
        return None
    return tuple({"role": role, "content": content} for role, content, _ in checked if role and content is not None)


def _check_answer(value: object, field: str, problems: list[_Problem], messages_as_json: bool) -> str | None:
    """A preference row's answer: text, or (the chat form) a list of one assistant message, read for its content."""
    if messages_as_json and isinstance(value, str) and value.lstrip().startswith("["):
        value = _load_messages_cell(value, problems, field)
    if value is _INVALID:
        return None
    if not isinstance(value, list):
        return _check_text(value, field, problems)
    if len(value) != 1:
        problems.append((field, f"'{field}' must be one assistant message (or text), got {len(value)} messages"))
        return None
    role, content, _ = _check_message(value[0], f"{field}[0]", problems, weighted=False)
    if role is not None and role != "assistant":
        problems.append((f"{field}[0].role", f"expected role 'assistant', got {short(role)!r}"))
        return None
    return content


def _check_split(value: object, problems: list[_Problem]) -> Split | None:
    if value is None or value == "":  # absent, null or an empty CSV cell all mean the default
        return "train"
    if not isinstance(value, str):
        problems.append(("split", f"'split' must be a string, got {json_type(value)}"))
        return None
    normalised = value.strip().lower()
    for split in _SPLITS:
        if normalised == split:
            return split
    problems.append(("split", f"unknown split {short(value)!r}: expected 'train' or 'evaluation'"))
    return None


def _check_text(value: object, field: str, problems: list[_Problem]) -> str | None:
    """A non-blank string; the value is kept as given, since leading spaces can matter to a tokenizer."""
    if value is _MISSING:
        problems.append((field, f"missing field '{field}'"))
        return None
    if not isinstance(value, str):
        problems.append((field, f"'{field}' must be a string, got {json_type(value)}"))
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


def _load_messages_cell(cell: str, problems: list[_Problem], field: str = "messages") -> object:
    """Decode a CSV cell holding messages as a JSON array; _INVALID (and a problem) when it cannot be."""
    if not cell.strip():
        problems.append((field, f"'{field}' is empty"))
        return _INVALID
    try:
        return json.loads(cell)
    except json.JSONDecodeError as exc:
        problems.append((field, f"'{field}' is not valid JSON: {exc.msg} (position {exc.pos})"))
    except (ValueError, RecursionError) as exc:
        problems.append((field, f"'{field}' is not valid JSON: {short(str(exc) or type(exc).__name__)}"))
    return _INVALID


def _check_messages(
    value: object, problems: list[_Problem]
) -> tuple[tuple[dict[str, str], ...] | None, tuple[int, ...] | None]:
    """The messages ({"role", "content"} each) and their weights (Example.weights: None when every assistant message
    is learned), or (None, None) with the row's problems."""
    if value is _INVALID:
        return None, None
    if value is _MISSING:
        problems.append(("messages", "missing field 'messages'"))
        return None, None
    if not isinstance(value, list):
        problems.append(("messages", f"'messages' must be an array of messages, got {json_type(value)}"))
        return None, None
    if not value:
        problems.append(("messages", "'messages' is empty"))
        return None, None
    before = len(problems)
    checked = [_check_message(item, f"messages[{index}]", problems) for index, item in enumerate(value)]
    roles = [role for role, _, _ in checked if role is not None]
    # Judge the order only when every role is known, or one bad role would also be reported as bad order.
    if len(roles) == len(checked) and (order_problem := _check_role_order(roles)):
        problems.append(order_problem)
    if len(problems) > before:
        return None, None
    weights = tuple(weight for _, _, weight in checked)
    if 1 not in weights:
        problems.append(
            ("messages", "every assistant message has weight 0: the row teaches nothing; give at least one weight 1")
        )
        return None, None
    messages = tuple(
        {"role": role, "content": content} for role, content, _ in checked if role is not None and content is not None
    )
    every_reply = all(weight == 1 for role, _, weight in checked if role == "assistant")
    return messages, None if every_reply else weights  # None: the default, as an Example built in code has it


def _check_message(
    item: object, field: str, problems: list[_Problem], weighted: bool = True
) -> tuple[str | None, str | None, int]:
    """(role, content, weight): None where invalid; the weight is 0 except on a learned assistant message.
    `weighted`: whether the message may carry a weight (a preference row's messages may not)."""
    if not isinstance(item, dict):
        problems.append((field, f"'{field}' must be an object with 'role' and 'content', got {json_type(item)}"))
        return None, None, 0
    role = item.get("role", _MISSING)
    if role is _MISSING:
        problems.append((f"{field}.role", f"missing field '{field}.role'"))
        role = None
    elif not isinstance(role, str):
        problems.append((f"{field}.role", f"'{field}.role' must be a string, got {json_type(role)}"))
        role = None
    elif role not in _ROLES:
        problems.append((f"{field}.role", f"unknown role {short(role)!r}: expected 'system', 'user' or 'assistant'"))
        role = None
    content = _check_text(item.get("content", _MISSING), f"{field}.content", problems)
    if not weighted:
        if "weight" in item:
            problems.append((f"{field}.weight", f"'{field}.weight': a preference row learns its answers, not weights"))
        return role, content, 0
    return role, content, _check_weight(item.get("weight", _MISSING), role, f"{field}.weight", problems)


def _check_weight(value: object, role: str | None, field: str, problems: list[_Problem]) -> int:
    """The message's weight: 1 (learned) by default on an assistant message, 0 on the others."""
    if value is _MISSING:
        return 1 if role == "assistant" else 0
    # JSON's true and false are not numbers; 1.0 and "1" are not the integers OpenAI's format asks for either.
    if isinstance(value, bool) or not isinstance(value, int) or value not in _WEIGHTS:
        shown = short(json.dumps(value)) if isinstance(value, str | int | float) else json_type(value)
        problems.append((field, f"'{field}' must be 0 or 1, got {shown}"))
        return 0
    if role is not None and role != "assistant":
        problems.append((field, f"'{field}' is only allowed on assistant messages, not on a {role!r} message"))
        return 0
    return value


def _check_role_order(roles: list[str], field: str = "messages", last: str = "assistant") -> _Problem | None:
    """The first problem with the order of the roles, if any.

    Chat templates accept an optional leading system message, then user and assistant turns in strict
    alternation, and we train on assistant replies, so the conversation must end with one (a preference row's
    prompt ends with the user turn its answers reply to: `last`).
    """
    for index, role in enumerate(roles[1:], start=1):
        if role == "system":
            return f"{field}[{index}].role", "'system' is only allowed as the first message"
    offset = 1 if roles[0] == "system" else 0
    turns = roles[offset:]
    if "user" not in turns:
        return field, f"'{field}' needs at least one 'user' message"
    for index, role in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            return (
                f"{field}[{index + offset}].role",
                f"expected role '{expected}', got '{role}': after the optional system message, "
                "roles must alternate user, assistant, user, ...",
            )
    if turns[-1] != last:
        return f"{field}[{len(roles) - 1}].role", f"the last message must have role '{last}'"
    return None


# --- Small helpers --------------------------------------------------------------------------------------


def json_type(value: object) -> str:
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


def short(text: str, limit: int = 80) -> str:
    # Errors echo user input; a 1 MB cell must not turn into a 1 MB error message.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def row_split(value: object, line: int, log: ErrorLog) -> Split | None:
    """A row's split ("train" when unset), or None once logged why the value is not one (for rows checked
    elsewhere: a "columns" dataset's, functions/dataset_files.py)."""
    problems: list[_Problem] = []
    split = _check_split(value, problems)
    for field, message in problems:
        log.add(line, field, message)
    return split
