"""Built-in graders on real completions, their specs' validation (the bad field named), the reward function's
source check (never executed), and a batch scored with several weighted graders, a user function among them."""

import random
import sys
import time

import pytest
from pydantic import ValidationError

from conftest import require_sandbox
from functions.grader_specs import GraderSpec, check_source, missing_columns, parse_graders, required_columns
from functions.graders import grade, last_number, levenshtein, score_batch
from functions.sandbox import Item, ItemScore, SandboxLimits

LIMITS = SandboxLimits(wall_seconds=1.0, cpu_seconds=0.5, memory_bytes=256 * 2**20, batch_seconds=10.0)


def _one(spec: dict) -> GraderSpec:
    [parsed] = parse_graders([spec])
    return parsed


def _values(spec: dict, items: list[Item]) -> list[float | None]:
    parsed = _one(spec)
    return [grade(parsed, item).value for item in items]


def _error(raw: object) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        parse_graders(raw)
    [error] = caught.value.errors()
    return ".".join(str(p) for p in error["loc"]), error["msg"]


# ------------------------------------------------------------------------------------------------------ built-ins


def test_exact_match() -> None:
    items = [
        Item("q", " Paris\n", {"answer": "Paris"}),
        Item("q", "paris", {"answer": "Paris"}),
        Item("q", "Lyon", {"answer": "Paris"}),
        Item("q", "Lutetia", {"answer": ["Paris", "Lutetia"]}),  # a list: any accepted answer
        Item("q", "42", {"answer": 42}),
    ]
    assert _values({"type": "exact_match", "column": "answer"}, items) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert _values({"type": "exact_match", "column": "answer", "ignore_case": True}, items) == [1, 1, 0, 1, 1]
    assert _values({"type": "exact_match", "column": "answer", "strip": False}, items) == [0, 0, 0, 1, 1]


def test_string_check() -> None:
    items = [Item("q", "The answer is 42.", {"word": "answer"}), Item("q", "I don't know", {"word": "ANSWER"})]
    assert _values({"type": "string_check", "operation": "contains", "column": "word"}, items) == [1.0, 0.0]
    spec = {"type": "string_check", "operation": "contains", "column": "word", "ignore_case": True}
    assert _values(spec, items[1:]) == [0.0]
    assert _values({"type": "string_check", "operation": "not_contains", "value": "know"}, items) == [1.0, 0.0]
    assert _values({"type": "string_check", "operation": "starts_with", "value": "The"}, items) == [1.0, 0.0]
    assert _values({"type": "string_check", "operation": "ends_with", "value": "."}, items) == [1.0, 0.0]


def test_regex() -> None:
    items = [Item("q", "Answer: 42"), Item("q", "42"), Item("q", "no number")]
    assert _values({"type": "regex", "pattern": r"\d+"}, items) == [1.0, 1.0, 0.0]
    assert _values({"type": "regex", "pattern": r"\d+", "match": "full"}, items) == [0.0, 1.0, 0.0]
    assert _values({"type": "regex", "pattern": "answer: \\d+", "ignore_case": True}, items) == [1.0, 0.0, 0.0]


def test_regex_that_backtracks_catastrophically_fails_fast() -> None:
    spec = _one({"type": "regex", "pattern": r"(a|aa)+$"})
    started = time.monotonic()
    score = grade(spec, Item("q", "a" * 60 + "b"))
    assert (score.reason, score.detail) == ("regex_timeout", "the pattern ran over 0.1 s on this completion")
    assert time.monotonic() - started < 1.0


def test_json_schema() -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^[A-Z]"}, "population": {"type": "integer"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    items = [
        Item("q", '{"city": "Paris", "population": 2100000}'),
        Item("q", 'Sure!\n```json\n{"city": "Lyon"}\n```'),  # prose around the fence: not JSON
        Item("q", '```json\n{"city": "Lyon"}\n```'),
        Item("q", '{"city": "paris"}'),  # pattern
        Item("q", '{"population": 3}'),  # required
        Item("q", '{"city": "Nice", "mayor": "x"}'),  # additionalProperties
        Item("q", "{not json"),
        Item("q", "[" * 100_000),  # deeper than the parser goes
    ]
    assert _values({"type": "json_schema", "schema": schema}, items) == [1, 0, 1, 0, 0, 0, 0, 0]
    no_fence = {"type": "json_schema", "schema": schema, "allow_code_fence": False}
    assert _values(no_fence, items[2:3]) == [0.0]


def test_json_schema_pattern_runs_under_the_timeout() -> None:
    spec = _one({"type": "json_schema", "schema": {"type": "string", "pattern": "(a|aa)+$"}})
    score = grade(spec, Item("q", '"' + "a" * 60 + 'b"'))
    assert (score.reason, score.detail) == ("regex_timeout", "a schema pattern ran over 0.1 s")


def test_numeric() -> None:
    items = [
        Item("q", "3 apples and 4 pears: 7", {"answer": 7}),
        Item("q", "The total is $1,234.50.", {"answer": "#### 1234.5"}),  # GSM8K-style reference: its last number
        Item("q", "about 6.99", {"answer": 7}),
        Item("q", "-2.5e3", {"answer": "-2500"}),
        Item("q", "no idea", {"answer": 7}),
        Item("q", "7", {"answer": "seven"}),
        Item("q", "7", {"answer": True}),
    ]
    scores = [grade(_one({"type": "numeric", "column": "answer"}), item) for item in items]
    assert [s.value for s in scores] == [1.0, 1.0, 0.0, 1.0, 0.0, None, None]
    assert [s.reason for s in scores[5:]] == ["bad_reference", "bad_reference"]
    assert _values({"type": "numeric", "column": "answer", "abs_tol": 0.05}, items[2:3]) == [1.0]
    assert _values({"type": "numeric", "column": "answer", "rel_tol": 0.01}, items[2:3]) == [1.0]
    assert last_number("x = .5, y = 1,000,000 and 3.") == 3.0
    assert last_number("1,000,000") == 1_000_000.0
    assert last_number("nothing") is None


def test_text_similarity() -> None:
    items = [
        Item("q", "kitten", {"ref": "sitting"}),
        Item("q", "same", {"ref": "same"}),
        Item("q", "", {"ref": ""}),
        Item("q", "abc", {"ref": "xyz"}),
        Item("q", " Hello ", {"ref": "hello"}),
    ]
    values = _values({"type": "text_similarity", "column": "ref"}, items)
    assert values == [pytest.approx(1 - 3 / 7), 1.0, 1.0, 0.0, pytest.approx(0.8)]
    assert _values({"type": "text_similarity", "column": "ref", "ignore_case": True}, items[4:]) == [1.0]


def test_levenshtein_matches_the_textbook_recurrence() -> None:
    def reference(a: str, b: str) -> int:
        previous = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            current = [i]
            for j, cb in enumerate(b, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
            previous = current
        return previous[-1]

    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 90)))
        assert levenshtein(a, b) == reference(a, b), (a, b)
    started = time.monotonic()
    assert levenshtein("x" * 20_000, "y" * 20_000) == 20_000  # the longest compared
    assert time.monotonic() - started < 2.0


def test_missing_column_is_a_failure_not_a_crash() -> None:
    score = grade(_one({"type": "exact_match", "column": "answer"}), Item("q", "x", {"other": 1}))
    assert score == ItemScore(None, "missing_column", "the example has no column 'answer'")


# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("raw", "loc", "message"),
    [
        ([{"type": "regex", "pattern": "(unclosed"}], "0.regex.pattern", "the pattern does not compile: missing )"),
        ([{"type": "regex", "pattern": "a" * 1001}], "0.regex.pattern", "String should have at most 1000 characters"),
        ([{"type": "exact_match"}], "0.exact_match.column", "Field required"),
        (
            [{"type": "exact_match", "column": "a", "strp": True}],
            "0.exact_match.strp",
            "Extra inputs are not permitted",
        ),
        ([{"type": "numeric", "column": "a", "abs_tol": -1}], "0.numeric.abs_tol", "greater than or equal to 0"),
        ([{"type": "exact_match", "column": "a", "weight": "inf"}], "0.exact_match.weight", "must be a finite number"),
        (
            [{"type": "json_schema", "schema": {"type": "strnig"}}],
            "0.json_schema.schema",
            "not a valid JSON Schema at type",
        ),
        (
            [{"type": "json_schema", "schema": {"properties": {"a": {"pattern": "("}}}}],
            "0.json_schema.schema",
            "is not a valid JSON Schema at properties/a/pattern: '(' is not a 'regex'",
        ),
        ([{"type": "string_check", "operation": "contains"}], "0.string_check", "give exactly one of value"),
        ([{"type": "string_check", "operation": "has", "value": "x"}], "0.string_check.operation", "Input should be"),
        ([{"type": "bleu"}], "0", "does not match any of the expected tags"),
        ([], "", "at least one grader is required"),
        (
            [{"type": "numeric", "column": "a"}, {"type": "numeric", "column": "b"}],
            "1.name",
            "duplicate name 'numeric': give each grader a distinct name",
        ),
        ([{"type": "python", "source": "def reward_fn(p):\n    return 1"}], "0.python.source", "must take exactly"),
    ],
)
def test_bad_spec_names_the_field(raw: object, loc: str, message: str) -> None:
    found_loc, found_message = _error(raw)
    assert found_loc == loc
    assert message in found_message


def test_required_columns() -> None:
    specs = parse_graders(
        [
            {"type": "exact_match", "column": "answer"},
            {"type": "string_check", "operation": "contains", "value": "x"},
            {"type": "string_check", "name": "has_keyword", "operation": "contains", "column": "keyword"},
            {"type": "regex", "pattern": "x"},
            {"type": "json_schema", "schema": {"type": "object"}},
            {"type": "numeric", "column": "target"},
            {"type": "text_similarity", "column": "reference"},
            {"type": "python", "source": "def reward_fn(prompt, completion, example):\n    return 1.0\n"},
            {
                "type": "python",
                "name": "reads_rule",
                "source": "def reward_fn(prompt, completion, example):\n    return float(example['rule'] > '')",
                "columns": ["rule"],
            },
        ]
    )
    columns = [{"answer"}, set(), {"keyword"}, set(), set(), {"target"}, {"reference"}, set(), {"rule"}]
    assert [required_columns(s) for s in specs] == columns
    assert missing_columns(specs, ["prompt", "answer", "keyword", "target", "reference", "rule"]) is None
    assert missing_columns(specs, ["prompt", "answer", "keyword", "target", "reference"]) == (
        "grader 'reads_rule' reads column 'rule', which the dataset does not have"
    )
    assert missing_columns(specs, ["prompt", "answer", "keyword"]) == (
        "grader 'numeric' reads column 'target', which the dataset does not have"
    )


# ------------------------------------------------------------------------------------------------ source check


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("def reward_fn(prompt, completion, example):\n    return 1.0\n", None),
        ("import math\n\ndef reward_fn(prompt, completion, example=None):\n    return math.pi\n", None),
        ("def reward_fn(prompt, completion, example):\n    return (\n", "syntax error at line 2: '(' was never closed"),
        ("def f():\n    pass\nreturn 1\n", "syntax error at line 3: 'return' outside function"),
        ("x = 1\n", "the source has no top-level `def reward_fn(prompt, completion, example)`"),
        (
            "if True:\n    def reward_fn(prompt, completion, example):\n        return 1\n",
            "the source has no top-level `def reward_fn(prompt, completion, example)`",
        ),
        (
            "async def reward_fn(prompt, completion, example):\n    return 1\n",
            "reward_fn is an async def; it must be a plain `def reward_fn(prompt, completion, example)`",
        ),
        (
            "def reward_fn(completion, prompt, example):\n    return 1\n",
            "reward_fn must take exactly (prompt, completion, example); it takes (completion, prompt, example)",
        ),
        (
            "def reward_fn(prompt, completion, example, **kwargs):\n    return 1\n",
            "reward_fn must take exactly (prompt, completion, example); "
            "it takes (prompt, completion, example, **kwargs)",
        ),
        ("x = '\0'\n", "syntax error: source code string cannot contain null bytes"),
        ("#" * 70_000, "the source is 70000 bytes, over the 65536-byte limit"),
    ],
)
def test_check_source(source: str, problem: str | None) -> None:
    assert check_source(source) == problem


def test_check_source_never_runs_the_code(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    source = "print('ran')\nimport sys\nsys.exit(3)\n\ndef reward_fn(prompt, completion, example):\n    return 1\n"
    assert check_source(source) is None
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------------- batches


def test_score_batch_weights_graders_and_counts_failures() -> None:
    require_sandbox()
    reward_fn = """
import json

def reward_fn(prompt, completion, example):
    data = json.loads(completion)
    return min(len(data["steps"]) / 4, 1.0)
"""
    specs = parse_graders(
        [
            {"type": "python", "name": "steps", "source": reward_fn, "weight": 0.5},
            {"type": "json_schema", "name": "valid", "schema": {"type": "object", "required": ["answer"]}},
            {"type": "numeric", "name": "correct", "column": "answer", "weight": 2.0},
        ]
    )
    items = [
        Item("2+2?", '{"steps": ["2+2", "=4"], "answer": 4}', {"answer": 4}),
        Item("3*3?", '{"steps": ["3*3", "=9", "check", "done"], "answer": 9}', {"answer": 9}),
        Item("5-1?", "four", {"answer": 4}),  # not JSON: the function raises, the schema and the number give 0
        Item("7+1?", '{"answer": 8}', {"answer": 8}),  # no steps: KeyError
    ]
    result = score_batch(items, specs, LIMITS)
    steps, valid, correct = result.graders
    assert [s.value for s in steps.scores] == [0.5, 1.0, None, None]
    assert steps.scores[2].detail == "JSONDecodeError: Expecting value: line 1 column 1 (char 0) (line 5)"
    assert steps.scores[3].detail == "KeyError: 'steps' (line 6)"
    assert steps.failures == {"exception": 2}
    assert (steps.mean, steps.std) == (0.75, 0.25)  # failures left out
    assert [s.value for s in valid.scores] == [1.0, 1.0, 0.0, 1.0]
    assert [s.value for s in correct.scores] == [1.0, 1.0, 0.0, 1.0]
    assert valid.failures == {} and correct.failures == {}
    # per item: 0.5 * steps (a failure counts 0.0) + 1 * valid + 2 * correct
    assert result.totals == [3.25, 3.5, 0.0, 3.0]


def test_score_batch_of_built_ins_needs_no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")  # the sandbox would refuse; built-ins never ask for it
    specs = parse_graders([{"type": "exact_match", "column": "a"}, {"type": "regex", "pattern": "^y", "weight": -1}])
    result = score_batch([Item("q", "yes", {"a": "yes"}), Item("q", "no", {})], specs)
    assert result.totals == [0.0, 0.0]
    assert result.graders[0].failures == {"missing_column": 1}
    assert result.graders[1].mean == 0.5
