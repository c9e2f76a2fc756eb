"""Reward functions and graders of a GRPO job (GRPOConfig.reward_functions), as the server takes them
(functions/grader_specs.py; tests/app/test_sdk_configs.py keeps the schemas equal). Each has a `name` (metrics name it;
its type if unset) and a `weight` (its share of the reward). The server also compiles patterns, schemas and sources
and checks a function's signature, naming the field."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PATTERN_CHARS = 1000


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=64)
    weight: float = 1.0

    @model_validator(mode="after")
    def _default_name(self) -> "_Grader":
        if not self.name:
            self.name = getattr(self, "type", "")
        return self


class ExactMatch(_Grader):
    """1.0 when the completion equals the example's `column` (any of them when it holds a list), else 0.0."""

    type: Literal["exact_match"]
    column: str = Field(min_length=1)
    strip: bool = True
    ignore_case: bool = False


class StringCheck(_Grader):
    """1.0 when the completion contains / does not contain / starts / ends with `value` or the `column`'s text."""

    type: Literal["string_check"]
    operation: Literal["contains", "not_contains", "starts_with", "ends_with"]
    value: str | None = None
    column: str | None = None
    ignore_case: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "StringCheck":
        if (self.value is None) == (self.column is None):
            raise ValueError("give exactly one of value (a fixed string) and column (an example column)")
        return self


class Regex(_Grader):
    """1.0 when `pattern` matches the completion (`match`: 'full', or 'search' anywhere), else 0.0."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)
    match: Literal["full", "search"] = "search"
    ignore_case: bool = False


class JsonSchema(_Grader):
    """1.0 when the completion is JSON valid against `schema` (a Markdown code fence unwrapped first), else 0.0."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")
    allow_code_fence: bool = True


class Numeric(_Grader):
    """1.0 when the completion's last number is within tolerance of the example's `column`, else 0.0."""

    type: Literal["numeric"]
    column: str = Field(min_length=1)
    abs_tol: float = Field(default=1e-6, ge=0)
    rel_tol: float = Field(default=0.0, ge=0)


class TextSimilarity(_Grader):
    """1 - normalized Levenshtein distance between the completion and the example's `column`, in [0, 1]."""

    type: Literal["text_similarity"]
    column: str = Field(min_length=1)
    strip: bool = True
    ignore_case: bool = False


class PythonFunction(_Grader):
    """Your reward function, run in the server's sandbox: `source` defines
    `reward_fn(prompt: str, completion: str, example: dict) -> float` (standard library only; `example` is the
    dataset row's columns). `columns`: the columns it reads, checked against the dataset before any compute."""

    type: Literal["python"]
    source: str
    columns: list[str] = Field(default_factory=list, max_length=64)


GraderSpec = Annotated[
    ExactMatch | StringCheck | Regex | JsonSchema | Numeric | TextSimilarity | PythonFunction,
    Field(discriminator="type"),
]
