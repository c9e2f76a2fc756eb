"""Graders: score a completion with a number. Shared by reinforcement fine-tuning (reward functions, GRPO) and
evaluations (graders of generated answers). The specs, and their checks before any compute: functions/grader_specs.py.

Built-in graders run in this process (no user code, deterministic, no sandbox); a `python` grader's function runs in
the sandbox (functions/sandbox.py).

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

import functools
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema  # type: ignore[import-untyped]

from functions.grader_specs import (
    ExactMatch,
    GraderSpec,
    JsonSchema,
    Numeric,
    PythonFunction,
    Regex,
    StringCheck,
    TextSimilarity,
    compile_pattern,
)
from functions.sandbox import Item, ItemScore, SandboxLimits, run_reward_function

BUILT_IN_REASONS = {  # failure reasons of the built-in graders (a user function's: functions/sandbox.REASONS)
    "missing_column": "the example lacks the column the grader reads",
    "bad_reference": "the column holds no usable reference (no text, no number)",
    "regex_timeout": "a pattern ran over REGEX_TIMEOUT_SECONDS on this completion",
    "bad_completion": "the completion's JSON is nested too deeply to validate",
    "grader_error": "the grader failed on this input (a bug of ours, reported rather than raised)",
}
FAILURE_SCORE = 0.0  # what a failed item adds to the weighted total (see the module docstring)
REGEX_TIMEOUT_SECONDS = 0.1  # per match: a pattern that backtracks catastrophically fails the item, never hangs
MAX_SIMILARITY_CHARS = 20_000  # text_similarity compares at most this many characters of each side


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
    compiled = compile_pattern(spec.pattern, spec.ignore_case)
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


# ------------------------------------------------------------------------------------------ schemas under the timeout


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    """A jsonschema validator whose `pattern` and `patternProperties` use the `regex` module under the timeout."""
    schema = json.loads(schema_json)
    keywords = {"pattern": _pattern_keyword, "patternProperties": _pattern_properties_keyword}
    return jsonschema.validators.extend(jsonschema.validators.validator_for(schema), keywords)(schema)


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string") and not compile_pattern(pattern, False).search(
        instance, timeout=REGEX_TIMEOUT_SECONDS
    ):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties_keyword(validator: Any, properties: dict, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        compiled = compile_pattern(pattern, False)
        for key, value in instance.items():
            if compiled.search(key, timeout=REGEX_TIMEOUT_SECONDS):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)
