"""The new-job form's fields, read from the fine-tuning config's JSON schema (FinetuneConfig.model_json_schema(),
the schema the API validates against): each field's help text, default, and input. A field added to the config
appears in the form without a change here.

    enum                      a select of its values
    boolean                   a checkbox
    integer / number          a number input; with "auto", "epoch" or null beside the number, a select of those
                              and "a number" next to it
    string (or null)          a text input (a textarea past 1,000 characters); empty: unset
    list of strings (or null) a text input, comma-separated; empty: unset

The page fills the selects a schema cannot know (the tenant's ready datasets, the catalog's base models) through
`choices`. The script (static/jobs.js) reads the same fields (`spec`) to send only what the user set.
"""

from dataclasses import dataclass, field
from typing import Any

from functions.finetune_config import FinetuneConfig

LONG_TEXT = 1000  # a string field that may be longer than this gets a textarea
# The fieldsets, in order; a field of the schema named in none of them goes to the last ("More").
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Job", ("base_model", "dataset", "repo", "description", "evaluation_dataset")),
    (
        "Training",
        ("adapter", "task", "epochs", "train_steps", "learning_rate", "lr_scheduler", "warmup_ratio")
        + ("effective_batch_size", "max_seq_length"),
    ),
    ("LoRA", ("rank", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules")),
    ("Rows", ("apply_chat_template", "prompt_template", "completion_column")),
    ("Evaluation", ("eval_steps", "eval_fraction", "enable_early_stopping", "early_stopping_patience")),
    ("More", ("checkpoint_every", "continue_from_version", "seed", "accelerator")),
)
OPEN_GROUPS = ("Job", "Training")  # shown open; the others are folded (every field is still on the page)
NULL_LABEL = "none"  # how a null alternative of a number reads in its select


@dataclass(frozen=True)
class Option:
    value: str  # as the select sends it: "" for null
    label: str


@dataclass
class FormField:
    name: str  # the config's field name: the input's name and label, as in the API and the SDK
    help: str  # the schema's description
    kind: str  # select | checkbox | number | text | textarea | list
    required: bool
    default: Any  # the schema's default (JSON), None when required or null
    default_text: str  # how the page states the default
    options: list[Option] = field(default_factory=list)  # select
    # number: the values beside a number the field takes ("auto", "epoch", None), as the select of its mode offers
    alternatives: list[Option] = field(default_factory=list)
    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None

    @property
    def number_default(self) -> Any:
        """The default when it is a number (what the number input starts with), else None."""
        return self.default if isinstance(self.default, int | float) and not isinstance(self.default, bool) else None

    def spec(self) -> dict[str, Any]:
        """What the script needs to read the input back into the request's JSON."""
        return {
            "name": self.name,
            "kind": self.kind,
            "required": self.required,
            "default": self.default,
            "integer": self.integer,
            "alternatives": [a.value for a in self.alternatives],
        }


@dataclass
class Group:
    title: str
    open: bool
    fields: list[FormField]


def groups(choices: dict[str, list[Option]] | None = None) -> list[Group]:
    """The form's fieldsets. `choices`: options for string fields the schema leaves open (a select then replaces
    the text input; a nullable field gets an empty option first, "unset")."""
    schema = FinetuneConfig.model_json_schema()
    required = set(schema.get("required", []))
    picks = choices or {}
    made = {name: form_field(name, p, name in required, picks.get(name)) for name, p in schema["properties"].items()}
    placed = {name for _, names in GROUPS for name in names}
    out = []
    for title, names in GROUPS:
        members = [made[n] for n in names if n in made]
        if title == GROUPS[-1][0]:
            members += [f for n, f in made.items() if n not in placed]
        out.append(Group(title, title in OPEN_GROUPS, members))
    return out


def specs(form: list[Group]) -> list[dict[str, Any]]:
    return [f.spec() for g in form for f in g.fields]


def form_field(name: str, prop: dict[str, Any], required: bool, choices: list[Option] | None) -> FormField:
    branches = prop.get("anyOf", [prop])
    nullable = any(b.get("type") == "null" for b in branches)
    consts = [b["const"] for b in branches if "const" in b]
    enums = [v for b in branches for v in b.get("enum", [])]
    numbers = [b for b in branches if b.get("type") in ("integer", "number")]
    default = prop.get("default")
    base = {
        "name": name,
        "help": prop.get("description", ""),
        "required": required,
        "default": default,
        "default_text": "required" if required else _shown(default),
    }
    if choices is not None:
        options = ([Option("", "unset")] if nullable else []) + choices
        return FormField(kind="select", options=options, **base)
    if enums:
        return FormField(kind="select", options=[Option(str(v), str(v)) for v in [*consts, *enums]], **base)
    if any(b.get("type") == "boolean" for b in branches):
        return FormField(kind="checkbox", **base)
    if numbers:
        number = numbers[0]
        others = [Option(str(c), str(c)) for c in consts] + ([Option("", NULL_LABEL)] if nullable else [])
        # A number whose only other value is null (its default) needs no select: an empty input leaves it unset.
        alternatives = others if consts or default is not None else []
        return FormField(
            kind="number",
            alternatives=alternatives,
            integer=number["type"] == "integer",
            minimum=number.get("minimum", number.get("exclusiveMinimum")),
            maximum=number.get("maximum", number.get("exclusiveMaximum")),
            **base,
        )
    if any(b.get("type") == "array" for b in branches):
        return FormField(kind="list", **base)
    longest = max((b.get("maxLength", 0) for b in branches), default=0)
    return FormField(kind="textarea" if longest > LONG_TEXT else "text", max_length=longest or None, **base)


def _shown(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)
