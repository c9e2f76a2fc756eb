"""Graders' specs: what a job (GRPO's reward functions) or an evaluation asks a completion to be scored by, checked
before any compute. The scoring is functions/graders.py.

Two kinds, one spec each (`GraderSpec`, discriminated by `type`; every spec has a `name` and a `weight`):
- built-in graders (no user code): `exact_match`, `string_check`, `regex`, `json_schema`, `numeric`,
  `text_similarity`; a regex or a schema's patterns are compiled here, so a bad one is refused with the field;
- `python`: a user's source defining `reward_fn(prompt: str, completion: str, example: dict) -> float`, run in the
  sandbox when scored. `check_source` refuses a bad source (syntax, signature) without running it.
"""

import ast
import functools
import json
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import jsonschema  # type: ignore[import-untyped]
import regex  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

MAX_SOURCE_BYTES = 64 * 1024  # a reward function's source
MAX_PATTERN_CHARS = 1000  # a regex grader's pattern, and each `pattern` in a JSON schema
MAX_SCHEMA_BYTES = 64 * 1024
MAX_GRADERS = 16
REWARD_FN_PARAMETERS = ["prompt", "completion", "example"]


# ------------------------------------------------------------------------------------------------------ the specs


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=64)
    """How results and metrics name this grader; defaults to its type. Distinct among a job's graders."""
    weight: float = 1.0
    """Its share of the weighted total (GRPO's reward); finite, may be negative or 0 (reported, not rewarded)."""

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError("must be a finite number")
        return weight

    @model_validator(mode="after")
    def _default_name(self) -> "_Grader":
        if not self.name:
            self.name = getattr(self, "type", "")
        return self


class ExactMatch(_Grader):
    """1.0 when the completion equals the example's `column` (any of them when the column holds a list), else 0.0."""

    type: Literal["exact_match"]
    column: str = Field(min_length=1)
    """The example column holding the expected answer (a string, or a list of accepted strings)."""
    strip: bool = True
    """Compare without leading and trailing whitespace."""
    ignore_case: bool = False
    """Compare case-insensitively (str.casefold)."""


class StringCheck(_Grader):
    """1.0 when the completion contains / does not contain / starts / ends with a string, else 0.0."""

    type: Literal["string_check"]
    operation: Literal["contains", "not_contains", "starts_with", "ends_with"]
    value: str | None = None
    """The string to look for; exactly one of `value` and `column`."""
    column: str | None = None
    """The example column holding the string to look for."""
    ignore_case: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "StringCheck":
        if (self.value is None) == (self.column is None):
            raise ValueError("give exactly one of value (a fixed string) and column (an example column)")
        return self


class Regex(_Grader):
    """1.0 when the pattern matches the completion (`match`: the whole of it, or anywhere in it), else 0.0.

    Patterns use the `regex` module (a superset of `re`), compiled when the spec is checked; each match runs under
    REGEX_TIMEOUT_SECONDS, so a pattern that backtracks catastrophically fails the item with `regex_timeout`."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)
    match: Literal["full", "search"] = "search"
    """`full`: the pattern must match the whole completion; `search`: anywhere in it."""
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        compile_pattern(pattern, False)
        return pattern


class JsonSchema(_Grader):
    """1.0 when the completion is JSON valid against `schema` (JSON Schema, draft 2020-12 unless `$schema` says
    otherwise), else 0.0. A completion wrapped in one Markdown code fence (```json ... ```) is unwrapped first."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")
    """The JSON Schema the completion must satisfy."""
    allow_code_fence: bool = True

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"is over {MAX_SCHEMA_BYTES} bytes as JSON")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise ValueError(f"is not a valid JSON Schema{f' at {where}' if where else ''}: {e.message}") from None
        for pattern in schema_patterns(schema):
            compile_pattern(pattern, False)
        return schema


class Numeric(_Grader):
    """1.0 when the last number in the completion is within tolerance of the example's `column`, else 0.0.

    Numbers read: an optional sign, digits with optional thousands commas, an optional decimal part and exponent
    (`-1,234.5e3`, `.5`, `$42` reads 42). The reference may be a number, or text read the same way (its last
    number: `#### 72` reads 72). Within tolerance: |answer - reference| <= max(rel_tol * max(|a|, |r|), abs_tol)
    (math.isclose). A completion without a number scores 0.0."""

    type: Literal["numeric"]
    column: str = Field(min_length=1)
    """The example column holding the reference number."""
    abs_tol: float = Field(default=1e-6, ge=0)
    rel_tol: float = Field(default=0.0, ge=0)

    @field_validator("abs_tol", "rel_tol")
    @classmethod
    def _finite_tolerance(cls, tolerance: float) -> float:
        if not math.isfinite(tolerance):
            raise ValueError("must be a finite number")
        return tolerance


class TextSimilarity(_Grader):
    """1 - normalized Levenshtein distance between the completion and the example's `column`, in [0, 1]:
    1 - edits / max(len(completion), len(reference)) in characters (1.0 when both are empty). A true metric, unlike
    difflib's ratio (whose 'junk' heuristic changes answers over 200 characters); each side is cut to
    MAX_SIMILARITY_CHARS characters."""

    type: Literal["text_similarity"]
    column: str = Field(min_length=1)
    """The example column holding the reference text."""
    strip: bool = True
    ignore_case: bool = False


class PythonFunction(_Grader):
    """A user's reward function, run in the sandbox: `reward_fn(prompt, completion, example) -> float`."""

    type: Literal["python"]
    source: str
    """Python source defining `reward_fn(prompt: str, completion: str, example: dict) -> float` at the top level;
    standard library only."""
    columns: list[str] = Field(default_factory=list, max_length=64)
    """The example columns the function reads, if the user names them: a dataset without one is refused before
    any compute (unnamed, a missing column is the function's KeyError on each item)."""

    @field_validator("source")
    @classmethod
    def _checked(cls, source: str) -> str:
        problem = check_source(source)
        if problem:
            raise ValueError(problem)
        return source


GraderSpec = Annotated[
    ExactMatch | StringCheck | Regex | JsonSchema | Numeric | TextSimilarity | PythonFunction,
    Field(discriminator="type"),
]
_GRADERS: TypeAdapter[list[GraderSpec]] = TypeAdapter(list[GraderSpec])


def parse_graders(raw: Any) -> list[GraderSpec]:
    """A job's graders from JSON-like data; raises pydantic.ValidationError naming the index and the field (for
    example `1.regex.pattern` or `2.name`)."""
    graders = _GRADERS.validate_python(raw)
    if not graders:
        _raise_error("", "at least one grader is required", raw)
    if len(graders) > MAX_GRADERS:
        _raise_error("", f"at most {MAX_GRADERS} graders", raw)
    seen: set[str] = set()
    for i, grader in enumerate(graders):
        if grader.name in seen:
            _raise_error(f"{i}.name", f"duplicate name {grader.name!r}: give each grader a distinct name", raw)
        seen.add(grader.name)
    return graders


def _raise_error(loc: str, message: str, raw: Any) -> None:
    from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

    location = tuple(int(p) if p.isdigit() else p for p in loc.split(".") if p)
    error = InitErrorDetails(
        type=PydanticCustomError("graders", "{message}", {"message": message}), loc=location, input=raw
    )
    raise ValidationError.from_exception_data("graders", [error])


def required_columns(spec: GraderSpec) -> set[str]:
    """The example columns the grader reads (a dataset without one of them is refused before any compute); for a
    user function, the columns its spec names."""
    if isinstance(spec, PythonFunction):
        return set(spec.columns)
    column = getattr(spec, "column", None)
    return {column} if column else set()


def missing_columns(specs: Sequence[GraderSpec], columns: Sequence[str]) -> str | None:
    """An error naming the first grader whose column the dataset lacks, or None."""
    for spec in specs:
        missing = sorted(required_columns(spec) - set(columns))
        if missing:
            return f"grader {spec.name!r} reads column {missing[0]!r}, which the dataset does not have"
    return None


def check_source(source: str) -> str | None:
    """What is wrong with a reward function's source, or None. Parses and compiles it; never runs it."""
    size = len(source.encode("utf-8", errors="replace"))
    if size > MAX_SOURCE_BYTES:
        return f"the source is {size} bytes, over the {MAX_SOURCE_BYTES}-byte limit"
    try:
        tree = ast.parse(source, "<reward_fn>")
        compile(tree, "<reward_fn>", "exec", dont_inherit=True)
    except SyntaxError as e:
        return f"syntax error at line {e.lineno}: {e.msg}" if e.lineno else f"syntax error: {e.msg}"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; nesting too deep for the compiler
        return f"the source does not compile: {type(e).__name__}: {e}"[:300]
    definitions = [node for node in tree.body if getattr(node, "name", None) == "reward_fn"]
    if not definitions:
        return "the source has no top-level `def reward_fn(prompt, completion, example)`"
    definition = definitions[-1]
    if not isinstance(definition, ast.FunctionDef):
        kind = "an async def" if isinstance(definition, ast.AsyncFunctionDef) else "a class"
        return f"reward_fn is {kind}; it must be a plain `def reward_fn(prompt, completion, example)`"
    args = definition.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if names != REWARD_FN_PARAMETERS or args.vararg or args.kwarg or args.kwonlyargs:
        found = ", ".join(
            names
            + ([f"*{args.vararg.arg}"] if args.vararg else [])
            + [a.arg for a in args.kwonlyargs]
            + ([f"**{args.kwarg.arg}"] if args.kwarg else [])
        )
        return f"reward_fn must take exactly (prompt, completion, example); it takes ({found})"
    return None


# ------------------------------------------------------------------------------------------ patterns and schemas


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, ignore_case: bool) -> Any:
    """The compiled pattern (a regex.Pattern); a ValueError naming the problem when it does not compile."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"the pattern is over {MAX_PATTERN_CHARS} characters")
    try:
        return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    except (regex.error, RecursionError, OverflowError) as e:
        raise ValueError(f"the pattern does not compile: {e}") from None


def schema_patterns(schema: Any) -> list[str]:
    """Every `pattern` and `patternProperties` key in a schema (they run under the same timeout)."""
    found: list[str] = []
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            found.append(schema["pattern"])
        if isinstance(schema.get("patternProperties"), dict):
            found.extend(schema["patternProperties"])
        for value in schema.values():
            found.extend(schema_patterns(value))
    elif isinstance(schema, list):
        for value in schema:
            found.extend(schema_patterns(value))
    return found
