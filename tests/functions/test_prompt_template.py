"""Prompt templates (loraplex/prompt_template.py) and the rows a job builds with one (functions/templated_rows.py):
placeholders, escaping, values as text, every refusal naming its field (and column, and line); a CSV or JSONL of any
columns read as a "columns" dataset; and the training example of a rendered row is token for token the prompt
inference builds from the same rendered text as the user message."""

from pathlib import Path
from typing import Any

import pytest

from app.errors import Invalid
from functions.dataset_files import ColumnsRow, columns_of, parse_dataset
from functions.finetune_config import FinetuneConfig
from functions.prompts import encode_chat, example_ids
from functions.templated_rows import check, rendered
from loraplex.prompt_template import MissingColumn, TemplateError, placeholders, render

TICKETS = b"ticket,Team,split\nMy parcel arrived damaged,shipping,\nI was charged twice,billing,evaluation\n"


def config(**fields: Any) -> FinetuneConfig:
    return FinetuneConfig.model_validate({"base_model": "smollm2-135m", "dataset": "d", "repo": "r"} | fields)


# --- loraplex.prompt_template ---------------------------------------------------------------------------


def test_placeholders_in_order_of_first_use() -> None:
    assert placeholders("Route this ticket: {ticket}") == ["ticket"]
    assert placeholders("{b} then {a}, again {b}") == ["b", "a"]
    assert placeholders("{first name}: {0}") == ["first name", "0"]  # any column name but . [ ] ! :
    assert placeholders("no columns") == []


def test_render_fills_values_and_unescapes_braces() -> None:
    row = {"ticket": "My parcel", "n": 3, "x": 2.5, "ok": True, "unused": None}
    assert render("Route this ticket: {ticket}", row) == "Route this ticket: My parcel"
    assert render("{{ticket}} is {ticket}; {{{ticket}}}", row) == "{ticket} is My parcel; {My parcel}"
    assert render("{n} {x} {ok}", row) == "3 2.5 true"  # as JSON writes them
    assert render("{ticket}{ticket}", row) == "My parcelMy parcel"


@pytest.mark.parametrize(
    ("template", "column", "says"),
    [
        ("{}", None, "names no column"),
        ("{ticket.title}", "ticket", "attribute access"),
        ("{ticket[0]}", "ticket", "index access"),
        ("{ticket!r}", "ticket", "conversion"),
        ("{ticket:>20}", "ticket", "format spec"),
        ("{ticket", None, "invalid template"),
        ("ticket}", None, "invalid template"),
    ],
)
def test_refused_syntax(template: str, column: str | None, says: str) -> None:
    with pytest.raises(TemplateError) as refused:
        placeholders(template)
    assert refused.value.column == column and says in str(refused.value)
    with pytest.raises(TemplateError):
        render(template, {"ticket": "t"})


def test_missing_column_names_it_and_the_columns_there_are() -> None:
    with pytest.raises(MissingColumn) as missing:
        render("{ticket} for {team}", {"ticket": "t", "priority": "high"})
    assert missing.value.column == "team" and missing.value.available == ["ticket", "priority"]
    assert "'team'" in str(missing.value) and "'priority'" in str(missing.value)
    with pytest.raises(MissingColumn):
        render("{team}", {"team": None})  # null is no value
    with pytest.raises(TemplateError) as nested:
        render("{team}", {"team": {"name": "x"}})
    assert nested.value.column == "team"


# --- the config -----------------------------------------------------------------------------------------


def test_config_refuses_a_bad_template_and_a_lone_completion_column() -> None:
    with pytest.raises(ValueError, match="format spec"):
        config(prompt_template="{ticket:>3}")
    with pytest.raises(ValueError, match="uses no column"):
        config(prompt_template="Route this ticket")
    with pytest.raises(ValueError, match="completion_column: goes with prompt_template"):
        config(completion_column="team")
    assert config(prompt_template="{ticket}", completion_column="team").stored()["prompt_template"] == "{ticket}"


# --- "columns" datasets ---------------------------------------------------------------------------------


def test_csv_of_any_columns_is_a_columns_dataset() -> None:
    parsed = parse_dataset(TICKETS, "csv")
    assert parsed.ok and parsed.data_format == "columns"
    assert columns_of(parsed.examples) == ["ticket", "Team"]  # names as written; "split" is the split
    first, second = parsed.examples
    assert isinstance(first, ColumnsRow) and first.columns == {
        "ticket": "My parcel arrived damaged",
        "Team": "shipping",
    }
    assert (first.line, first.split, second.line, second.split) == (2, "train", 3, "evaluation")


def test_jsonl_values_become_text_and_nested_ones_are_refused_per_row() -> None:
    data = b'{"q": "a", "n": 3, "f": 0.5, "b": false, "z": null}\n{"q": {"x": 1}, "n": [1]}\n{"n": 4}\n'
    parsed = parse_dataset(data, "jsonl")
    assert parsed.data_format == "columns"
    assert [(e.line, e.field) for e in parsed.errors] == [(2, "q"), (2, "n")]
    assert "'q' holds a JSON object" in parsed.errors[0].message
    rows = [e.columns for e in parsed.examples if isinstance(e, ColumnsRow)]
    assert rows == [{"q": "a", "n": "3", "f": "0.5", "b": "false", "z": ""}, {"n": "4"}]


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (b"a,,b", "header column(s) 2 have no name"),
        (b"a,b,a", "duplicate column(s) in the header: 'a'"),
        (b"ticket,split", "unrecognised dataset shape"),  # a template needs a prompt's column and an answer's
    ],
)
def test_a_columns_header_needs_unique_names(header: bytes, says: str) -> None:
    parsed = parse_dataset(header + b"\n1,2,3\n", "csv")
    assert parsed.data_format is None and parsed.errors[0].message.startswith(says)


# --- rows rendered for a job ----------------------------------------------------------------------------


def test_rendered_rows_are_prompt_completion_examples() -> None:
    job = config(prompt_template="Route this ticket: {ticket}", completion_column="Team")
    check(job, "tickets", "columns", ["ticket", "Team"])
    done = rendered(parse_dataset(TICKETS, "csv"), job)
    assert done.data_format == "prompt_completion"
    assert [(e.line, e.split, e.prompt, e.completion) for e in done.examples] == [
        (2, "train", "Route this ticket: My parcel arrived damaged", "shipping"),
        (3, "evaluation", "Route this ticket: I was charged twice", "billing"),
    ]


def test_a_prompt_completion_dataset_wraps_its_prompt() -> None:
    parsed = parse_dataset(b'{"prompt": "hi", "completion": "hello"}\n', "jsonl")
    job = config(prompt_template="Answer politely: {prompt}")
    check(job, "greetings", "prompt_completion", [])
    [example] = rendered(parsed, job).examples
    assert (example.prompt, example.completion) == ("Answer politely: hi", "hello")


@pytest.mark.parametrize(
    ("fields", "data_format", "field", "says"),
    [
        ({}, "columns", "prompt_template", "has columns 'ticket', 'Team'"),
        ({"prompt_template": "{ticket}"}, "columns", "completion_column", "required with prompt_template"),
        (
            {"prompt_template": "{ticket}", "completion_column": "team"},
            "columns",
            "completion_column",
            "no column 'team'",
        ),
        ({"prompt_template": "{body}", "completion_column": "Team"}, "columns", "prompt_template", "no column 'body'"),
        ({"prompt_template": "{Team}", "completion_column": "Team"}, "columns", "prompt_template", "the answer would"),
        ({"prompt_template": "{ticket}"}, "messages", "prompt_template", "is a messages dataset"),
        ({"prompt_template": "{text}"}, "text", "prompt_template", "is a text dataset"),
        ({"prompt_template": "{question}"}, "prompt_completion", "prompt_template", "no column 'question'"),
        (
            {"prompt_template": "{prompt}", "completion_column": "x"},
            "prompt_completion",
            "completion_column",
            "'completion'",
        ),
    ],
)
def test_refusals_name_the_field_and_the_column(fields: dict, data_format: str, field: str, says: str) -> None:
    with pytest.raises(Invalid) as refused:
        check(config(**fields), "tickets", data_format, ["ticket", "Team"])
    assert refused.value.field == field and refused.value.message.startswith(f"{field}: ")
    assert says in refused.value.message
    if "no column" in says:
        assert "its columns: 'ticket', 'Team'" in refused.value.message or data_format == "prompt_completion"


def test_an_empty_value_the_template_reads_refuses_the_row_by_line_and_column() -> None:
    data = b"ticket,team,note\nparcel damaged,shipping,\n,billing,x\ncharged twice,,\n"
    parsed = parse_dataset(data, "csv")
    assert parsed.ok  # empty cells are allowed in the dataset ...
    with pytest.raises(Invalid) as refused:  # ... not where a job reads them
        rendered(parsed, config(prompt_template="{ticket}", completion_column="team"))
    assert refused.value.field == "prompt_template"
    assert "line 3 column 'ticket', line 4 column 'team'" in refused.value.message
    with pytest.raises(Invalid) as answer:
        rendered(
            parse_dataset(b"ticket,team\nparcel,shipping\ncharged,\n", "csv"),
            config(prompt_template="{ticket}", completion_column="team"),
        )
    assert answer.value.field == "completion_column" and "line 3 column 'team'" in answer.value.message
    # the unused empty "note" column costs nothing
    rendered(
        parse_dataset(data.replace(b"\n,billing", b"\nx,billing").replace(b",,\n", b",y,\n"), "csv"),
        config(prompt_template="{ticket}", completion_column="team"),
    )


def test_the_training_prompt_is_the_inference_prompt_of_the_rendered_text(smollm_tokenizer_dir: Path) -> None:
    """Trained as inference asks: a rendered row's prompt ids are exactly the ids /v1/chat/completions builds for
    render(template, row) as the user message."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    template = "Route this ticket: {ticket}\nAnswer with a team."
    job = config(prompt_template=template, completion_column="Team")
    parsed = parse_dataset(TICKETS, "csv")
    for row, example in zip(parsed.examples, rendered(parsed, job).examples, strict=True):
        assert isinstance(row, ColumnsRow)
        prompt_ids, completion_ids = example_ids(example, tokenizer, apply_chat_template=True)
        asked = encode_chat(tokenizer, [{"role": "user", "content": render(template, row.columns)}])
        assert tuple(prompt_ids) == asked
        assert tokenizer.decode(completion_ids).startswith(row.columns["Team"])


def test_a_large_dataset_is_quoted_by_an_estimate_close_to_the_exact_count(
    smollm_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above EXACT_ROWS rows the quote encodes prompts and completions as plain text in one batch and adds the chat
    template's own tokens, counted on the first row: on these varied rows (spaces at the edges, digits, accents,
    emoji, a spelled special token, newlines) it is the exact count with SmolLM2's ChatML template. (A template that
    trims contents, as Llama 3's does, would put rows with edge spaces a token or two off.)"""
    from transformers import AutoTokenizer

    import functions.templated_rows as templated_rows

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    tickets = [
        "My parcel arrived damaged",
        "  leading and trailing spaces  ",
        "Order #48213 was charged 2x (EUR 19.99)",
        "Café crème: délicieux, mais la livraison était en retard",
        "Box was wet 🌧️ and the label torn",
        "Someone wrote <|im_end|> in the form",
        "line one\nline two\n\nline four",
        "?",
    ]
    rows = [
        {"ticket": t, "team": team, "split": split}
        for t in tickets
        for team, split in [("billing", ""), ("shipping", "evaluation")]
    ]
    data = "ticket,team,split\n" + "".join(f'"{r["ticket"]}",{r["team"]},{r["split"]}\n' for r in rows)
    job = config(prompt_template="Route this ticket:\n{ticket}", completion_column="team")
    parsed = rendered(parse_dataset(data.encode(), "csv"), job)
    exact = templated_rows.lengths(parsed, tokenizer)
    monkeypatch.setattr(templated_rows, "EXACT_ROWS", 0)
    estimated = templated_rows.lengths(parsed, tokenizer)
    assert {split: len(rows) for split, rows in estimated.items()} == {"train": 8, "evaluation": 8}
    assert estimated == exact
