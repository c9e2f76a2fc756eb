"""Graders: score a completion with a number. Shared by reinforcement fine-tuning (reward functions, GRPO) and
evaluations (graders of generated answers).

Two kinds, one spec each (`GraderSpec`, discriminated by `type`; every spec has a `name` and a `weight`):
- built-in graders, run in this process (no user code, deterministic, no sandbox):
  `exact_match`, `string_check`, `regex`, `json_schema`, `numeric`, `text_similarity`;
- `python`: a user's source defining `reward_fn(prompt: str, completion: str, example: dict) -> float`, run in the
  sandbox (functions/sandbox.py). `check_source` refuses a bad source without running it.

`score_batch(items, graders)` scores a batch with several graders and returns, per grader, one `ItemScore` per item
(a float, or a failure with its reason, counted per reason) and the weighted total per item.

A failed item scores FAILURE_SCORE (0.0) in the weighted total: GRPO needs a number for every completion of a
group, and a completion that breaks the grader (not JSON where JSON was asked, a hang, a crash) deserves the floor
of the usual 0..1 scale, so the policy learns away from it. TRL 1.16's GRPOTrainer also adds nothing for a reward
function that returns None (a nansum), but it leaves a completion for which every function returned None out of
the group's baseline with advantage 0; each ItemScore keeps value None and its reason, so a caller that prefers
that for a failure which is not the completion's (`batch_timeout`) can pass None instead. A grader's own mean and
spread leave failures out (they are counted apart, per reason), so a grader that fails often shows as failing, not
as scoring low.
"""

import ast
import functools
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import jsonschema  # type: ignore[import-untyped]
import regex  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from functions.sandbox import Item, ItemScore, SandboxLimits, run_reward_function

BUILT_IN_REASONS = {  # failure reasons of the built-in graders (a user function's: functions/sandbox.REASONS)
    "missing_column": "the example lacks the column the grader reads",
    "bad_reference": "the column holds no usable reference (no text, no number)",
    "regex_timeout": "a pattern ran over REGEX_TIMEOUT_SECONDS on this completion",
    "bad_completion": "the completion's JSON is nested too deeply to validate",
    "grader_error": "the grader failed on this input (a bug of ours, reported rather than raised)",
}
FAILURE_SCORE = 0.0  # what a failed item adds to the weighted total (see the module docstring)
MAX_SOURCE_BYTES = 64 * 1024  # a reward function's source
MAX_PATTERN_CHARS = 1000  # a regex grader's pattern, and each `pattern` in a JSON schema
REGEX_TIMEOUT_SECONDS = 0.1  # per match: a pattern that backtracks catastrophically fails the item, never hangs
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SIMILARITY_CHARS = 20_000  # text_similarity compares at most this many characters of each side
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
        _compile(pattern, False)
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
        for pattern in _schema_patterns(schema):
            _compile(pattern, False)
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


# ------------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class GraderScores:
    name: str
    weight: float
    scores: list[ItemScore]  # one per item

    @property
    def failures(self) -> dict[str, int]:
        """Failed items per reason."""
        return dict(Counter(s.reason for s in self.scores if s.reason))

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.scores if s.value is not None]

    @property
    def mean(self) -> float | None:
        """Mean over the items that did not fail."""
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Population standard deviation over the items that did not fail."""
        return statistics.pstdev(self.values) if self.values else None


@dataclass(frozen=True)
class BatchScores:
    graders: list[GraderScores]  # in the order of the specs
    totals: list[float]  # per item: sum of weight * score, a failure counting FAILURE_SCORE


def score_batch(
    items: Sequence[Item], graders: Sequence[GraderSpec], limits: SandboxLimits = SandboxLimits()
) -> BatchScores:
    """Score every item with every grader. Raises only SandboxUnavailable (a python grader on a machine without the
    sandbox); whatever a grader or a user function does to an item is that item's failure."""
    results = []
    for spec in graders:
        if isinstance(spec, PythonFunction):
            scores = run_reward_function(spec.source, items, limits)
        else:
            scores = [grade(spec, item) for item in items]
        results.append(GraderScores(spec.name, spec.weight, scores))
    totals = [math.fsum(r.weight * _value(r.scores[i]) for r in results) for i in range(len(items))]
    return BatchScores(results, totals)


def _value(score: ItemScore) -> float:
    return FAILURE_SCORE if score.value is None else score.value


def grade(spec: GraderSpec, item: Item) -> ItemScore:
    """One built-in grader on one item (never raises: an item it cannot grade is a failure with its reason)."""
    if isinstance(spec, PythonFunction):
        raise TypeError("a python grader runs in the sandbox: use score_batch or run_reward_function")
    column = getattr(spec, "column", None)
    if column is not None and column not in item.example:
        return ItemScore(None, "missing_column", f"the example has no column {column!r}")
    reference = item.example[column] if column is not None else None
    try:
        return ItemScore(_BUILT_IN[spec.type](spec, item.completion, reference))
    except _Ungradable as e:
        return ItemScore(None, e.reason, e.detail)
    except Exception as e:  # a bug of ours on an odd input: the item's failure, never the batch's
        return ItemScore(None, "grader_error", f"{type(e).__name__}: {e}"[:500])


class _Ungradable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _exact_match(spec: ExactMatch, completion: str, reference: Any) -> float:
    accepted = reference if isinstance(reference, list) else [reference]
    if not accepted or not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in accepted):
        raise _Ungradable("bad_reference", f"column {spec.column!r} holds neither text nor a list of texts")

    def normal(text: str) -> str:
        text = text.strip() if spec.strip else text
        return text.casefold() if spec.ignore_case else text

    return 1.0 if normal(completion) in {normal(str(a)) for a in accepted} else 0.0


def _string_check(spec: StringCheck, completion: str, reference: Any) -> float:
    needle = spec.value if spec.value is not None else reference
    if not isinstance(needle, str):
        raise _Ungradable("bad_reference", f"column {spec.column!r} does not hold text")
    if spec.ignore_case:
        completion, needle = completion.casefold(), needle.casefold()
    found = {
        "contains": needle in completion,
        "not_contains": needle not in completion,
        "starts_with": completion.startswith(needle),
        "ends_with": completion.endswith(needle),
    }[spec.operation]
    return 1.0 if found else 0.0


def _regex(spec: Regex, completion: str, reference: Any) -> float:
    compiled = _compile(spec.pattern, spec.ignore_case)
    try:
        matched = (compiled.fullmatch if spec.match == "full" else compiled.search)(
            completion, timeout=REGEX_TIMEOUT_SECONDS
        )
    except TimeoutError:
        raise _Ungradable(
            "regex_timeout", f"the pattern ran over {REGEX_TIMEOUT_SECONDS:g} s on this completion"
        ) from None
    return 1.0 if matched else 0.0


def _json_schema(spec: JsonSchema, completion: str, reference: Any) -> float:
    text = completion.strip()
    if spec.allow_code_fence:
        fenced = _FENCE.fullmatch(text)
        text = fenced.group(1) if fenced else text
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return 0.0
    try:
        return 0.0 if next(_validator(json.dumps(spec.schema_, sort_keys=True)).iter_errors(document), None) else 1.0
    except TimeoutError:
        raise _Ungradable("regex_timeout", f"a schema pattern ran over {REGEX_TIMEOUT_SECONDS:g} s") from None
    except RecursionError:
        raise _Ungradable("bad_completion", "the JSON is nested too deeply to validate") from None


def _numeric(spec: Numeric, completion: str, reference: Any) -> float:
    if isinstance(reference, bool) or not isinstance(reference, int | float | str):
        raise _Ungradable("bad_reference", f"column {spec.column!r} holds no number")
    try:
        expected = float(reference) if not isinstance(reference, str) else last_number(reference)
    except OverflowError:
        expected = None
    if expected is None or not math.isfinite(expected):
        raise _Ungradable("bad_reference", f"column {spec.column!r} holds no number")
    answer = last_number(completion)
    if answer is None:
        return 0.0
    return 1.0 if math.isclose(answer, expected, rel_tol=spec.rel_tol, abs_tol=spec.abs_tol) else 0.0


def _text_similarity(spec: TextSimilarity, completion: str, reference: Any) -> float:
    if not isinstance(reference, str):
        raise _Ungradable("bad_reference", f"column {spec.column!r} does not hold text")

    def normal(text: str) -> str:
        text = text.strip() if spec.strip else text
        return (text.casefold() if spec.ignore_case else text)[:MAX_SIMILARITY_CHARS]

    a, b = normal(completion), normal(reference)
    longest = max(len(a), len(b))
    return 1.0 - levenshtein(a, b) / longest if longest else 1.0


_BUILT_IN: dict[str, Callable[[Any, str, Any], float]] = {
    "exact_match": _exact_match,
    "string_check": _string_check,
    "regex": _regex,
    "json_schema": _json_schema,
    "numeric": _numeric,
    "text_similarity": _text_similarity,
}

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```", re.DOTALL)


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = None
    for found in _NUMBER.finditer(text):  # noqa: B007 - the last one is kept
        pass
    if found is None:
        return None
    try:
        value = float(found.group().replace(",", ""))
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) by Myers' bit-parallel algorithm (Hyyrö's form):
    one pass over `a` with `b`'s columns as the bits of Python ints, O(len(a) * len(b) / 64) word operations."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    mask = (1 << len(b)) - 1
    last = 1 << (len(b) - 1)
    positions: dict[str, int] = {}  # character -> the bits of b where it occurs
    for i, ch in enumerate(b):
        positions[ch] = positions.get(ch, 0) | (1 << i)
    plus, minus, distance = mask, 0, len(b)  # vertical deltas of the current column: +1 bits, -1 bits
    for ch in a:
        eq = positions.get(ch, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        h_plus = (minus | ~(xh | plus)) & mask
        h_minus = plus & xh
        if h_plus & last:
            distance += 1
        elif h_minus & last:
            distance -= 1
        h_plus = ((h_plus << 1) | 1) & mask
        h_minus = (h_minus << 1) & mask
        plus = (h_minus | ~(xv | h_plus)) & mask
        minus = h_plus & xv
    return distance


# --------------------------------------------------------------------------------------------- regex and schemas


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, ignore_case: bool) -> Any:
    """The compiled pattern (a regex.Pattern); a ValueError naming the problem when it does not compile."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"the pattern is over {MAX_PATTERN_CHARS} characters")
    try:
        return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    except (regex.error, RecursionError, OverflowError) as e:
        raise ValueError(f"the pattern does not compile: {e}") from None


def _schema_patterns(schema: Any) -> list[str]:
    """Every `pattern` and `patternProperties` key in a schema (they run under the same timeout)."""
    found: list[str] = []
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            found.append(schema["pattern"])
        if isinstance(schema.get("patternProperties"), dict):
            found.extend(schema["patternProperties"])
        for value in schema.values():
            found.extend(_schema_patterns(value))
    elif isinstance(schema, list):
        for value in schema:
            found.extend(_schema_patterns(value))
    return found


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    """A jsonschema validator whose `pattern` and `patternProperties` use the `regex` module under the timeout."""
    schema = json.loads(schema_json)
    keywords = {"pattern": _pattern_keyword, "patternProperties": _pattern_properties_keyword}
    return jsonschema.validators.extend(jsonschema.validators.validator_for(schema), keywords)(schema)


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string") and not _compile(pattern, False).search(
        instance, timeout=REGEX_TIMEOUT_SECONDS
    ):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties_keyword(validator: Any, properties: dict, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        compiled = _compile(pattern, False)
        for key, value in instance.items():
            if compiled.search(key, timeout=REGEX_TIMEOUT_SECONDS):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)
