"""Predibase-style prompt templates: `"Route this ticket: {ticket}"` rendered with one dataset row.

One implementation, used when a job's rows are built for training (the server imports it) and when a prompt is
built for inference (`Adapter.render_prompt`), so both see the same text. The syntax is `str.format`'s, narrowed
to what a row can fill:
- `{column}` is replaced by that column's value: a string as it is, a number or a boolean as JSON writes it
  (`3`, `2.5`, `true`), which is how a JSONL value or a CSV cell reads;
- `{{` and `}}` are a literal `{` and `}`;
- nothing else: no positional `{}`, no attribute or index access (`{a.b}`, `{a[0]}`), no conversion (`{a!r}`) and
  no format spec (`{a:>10}`); each is refused with a TemplateError, as is an unmatched brace.

Standard library only: the SDK installs without the server.
"""

import json
import string
from collections.abc import Mapping

__all__ = ["MissingColumn", "TemplateError", "placeholders", "render", "value_text"]

_FORBIDDEN = {".": "attribute access", "[": "index access", "]": "index access"}


class TemplateError(ValueError):
    """A template that cannot be rendered: bad syntax (`column` None) or a column it names (`column` set)."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.message, self.column = message, column


class MissingColumn(TemplateError):
    """A placeholder names a column the row does not have (or has no value for: null)."""

    def __init__(self, column: str, available: list[str]) -> None:
        shown = ", ".join(repr(name) for name in available) or "none"
        super().__init__(
            f"the template uses column {column!r}, which the row does not have; its columns: {shown}", column
        )
        self.available = available


def placeholders(template: str) -> list[str]:
    """The columns a template names, in order of first appearance (each once); TemplateError for bad syntax."""
    names: list[str] = []
    for _, name in _parse(template):
        if name is not None and name not in names:
            names.append(name)
    return names


def render(template: str, row: Mapping[str, object]) -> str:
    """The template with each `{column}` replaced by the row's value; TemplateError for bad syntax, MissingColumn
    for a column the row lacks or holds null, TemplateError (naming the column) for a value that is not text."""
    parts: list[str] = []
    for literal, name in _parse(template):
        parts.append(literal)
        if name is None:
            continue
        value = row.get(name)
        if value is None:
            raise MissingColumn(name, [str(key) for key in row])
        parts.append(value_text(value, name))
    return "".join(parts)


def value_text(value: object, column: str = "value") -> str:
    """A row's value as the template writes it: strings as they are, numbers and booleans as JSON writes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise TemplateError(
        f"column {column!r} holds {type(value).__name__}, not text: a template fills in strings, numbers and booleans",
        column,
    )


def _parse(template: str) -> list[tuple[str, str | None]]:
    """[(literal text, column or None), ...]; `{{` and `}}` already unescaped in the literal text."""
    if not isinstance(template, str):
        raise TemplateError(f"a template is a string, got {type(template).__name__}")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered in format string", "unmatched '{' in format spec", ...
        raise TemplateError(f"invalid template: {exc}; write a literal brace as '{{{{' or '}}}}'") from None
    parsed: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in pieces:
        if name is None:
            parsed.append((literal, None))
            continue
        _check_placeholder(name, spec, conversion)
        parsed.append((literal, name))
    return parsed


def _check_placeholder(name: str, spec: str | None, conversion: str | None) -> None:
    shown = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
    if not name:
        raise TemplateError(f"placeholder {shown!r} names no column: write '{{column}}'")
    for char, what in _FORBIDDEN.items():
        if char in name:
            column = name.split(char, 1)[0]
            raise TemplateError(f"placeholder {shown!r} uses {what}; only '{{column}}' is supported", column or None)
    if conversion:
        raise TemplateError(
            f"placeholder {shown!r} has a conversion ('!{conversion}'); only '{{column}}' is supported", name
        )
    if spec:
        raise TemplateError(
            f"placeholder {shown!r} has a format spec (':{spec}'); only '{{column}}' is supported", name
        )
