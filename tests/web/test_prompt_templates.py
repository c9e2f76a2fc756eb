"""Predibase-style prompt templates through the real app, worker and engine, on SQLite and PostgreSQL: a CSV of any
columns (`ticket,team`) is a "columns" dataset listing its columns; a job trains it with `prompt_template` and
`completion_column`, its rows exactly the rendered template as the user turn; the quote counts the rendered rows and
the charge matches it; the version shows its template; asking the adapter with `render(template, row)` as the user
message gives the trained answer. Refused before any compute, naming the field (and column, and line), nothing
created: no template on a columns dataset, a placeholder naming a missing column, an empty value the job reads, a
template on a messages dataset."""

import csv
import io
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db import session_scope
from app.models import FinetuneJob, Repo
from conftest import TINY_MODEL, InProcessWorker
from conftest import openai_sdk as sdk
from finetune_helpers import finish, ready_dataset, refusal
from functions.dataset_files import parse_dataset
from functions.finetune_config import FinetuneConfig
from functions.prompts import IGNORE_INDEX, encode_chat
from functions.templated_rows import rendered
from functions.validate_dataset import row_lengths
from loraplex.prompt_template import render

TEMPLATE = "Route this ticket: {ticket}"
TICKETS = [
    {"ticket": "My parcel arrived damaged", "team": "shipping"},
    {"ticket": "I was charged twice this month", "team": "billing"},
    {"ticket": "Where is my order? It is a week late", "team": "shipping"},
    {"ticket": "Please refund the duplicate payment", "team": "billing"},
    {"ticket": "The courier left the box in the rain", "team": "shipping"},
    {"ticket": "My invoice shows the wrong amount", "team": "billing"},
]


def csv_bytes(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def upload_csv(client: TestClient, headers: dict[str, str], name: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    r = client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (f"{name}.csv", csv_bytes(rows))},
        data={"base_model": TINY_MODEL, "wait": "false"},
    )
    assert r.status_code == 202, r.text
    InProcessWorker().drain()
    dataset = client.get(f"/v1/datasets/{name}", headers=headers).json()
    assert dataset["status"] == "ready", dataset
    return dataset


def nothing_created(client: TestClient, headers: dict[str, str], repo: str) -> None:
    assert client.get(f"/v1/repos/{repo}", headers=headers).status_code == 404
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(FinetuneJob)) == 0
        assert s.scalar(select(func.count()).select_from(Repo)) == 0


def test_a_csv_of_any_columns_trains_through_its_template(client: TestClient, alice: dict[str, str]) -> None:
    dataset = upload_csv(client, alice, "tickets", TICKETS)
    assert dataset["data_format"] == "columns"
    stats = dataset["stats"]
    assert stats["columns"] == ["ticket", "team"] and stats["rows"] == stats["train_rows"] == 6
    assert set(stats["column_tokens"]) == {"ticket", "team"} and stats["total_tokens"] == sum(
        stats["column_tokens"].values()
    )

    # Full fine-tuning: the tiny random model memorises its six rows (loss 10.8 -> 0.04 in 60 steps); LoRA on its
    # two 64-wide layers stayed at 9.6 in 80 steps.
    job = start(client, alice, adapter="none", epochs=30, learning_rate=5e-3, eval_steps=None)
    assert job["config"]["prompt_template"] == TEMPLATE and job["config"]["completion_column"] == "team"
    # The quote counts the rendered rows exactly as training tokenizes them (max_seq_length fits the longest).
    config = FinetuneConfig.model_validate(job["config"])
    parsed = parse_dataset(csv_bytes(TICKETS), "csv")
    exact = sum(sum(runs) for runs in row_lengths(rendered(parsed, config), TINY_MODEL)["train"])
    assert job["estimate"]["tokens"] == exact * 30

    # The worker's training rows are exactly the rendered rows, as the user turn of the chat template.
    from functions.train import _tokenize

    with session_scope() as s:
        data = _tokenize(s.get_one(FinetuneJob, job["id"]), config)
    tokenizer = _tokenizer()
    asked = {encode_chat(tokenizer, [{"role": "user", "content": render(TEMPLATE, row)}]) for row in TICKETS}
    trained = {tuple(t.input_ids[: next(i for i, x in enumerate(t.labels) if x != IGNORE_INDEX)]) for t in data.train}
    assert trained == asked and len(data.train) == len(TICKETS)
    assert data.labels is not None and set(data.labels) == {"billing", "shipping"}  # from the completion column

    finish_job = finish(client, alice, job["id"], timeout=300)
    assert finish_job["status"] == "completed", finish_job
    assert finish_job["charge"] == finish_job["estimate"]["cost"]  # what ran is what was quoted

    version = client.get("/v1/repos/route/versions/1", headers=alice).json()
    assert (version["name"], version["prompt_template"], version["completion_column"]) == ("route/1", TEMPLATE, "team")
    assert version["labels"] == ["billing", "shipping"]
    [listed] = client.get("/v1/repos/route", headers=alice).json()["versions"]
    feed = client.get("/v1/events", headers=alice, params={"type": "adapter.version.published"}).json()
    assert listed == version == feed[0]["data"]  # the event carries the version as GET shows it

    api = sdk(client, alice)
    for row in TICKETS:
        message = render(version["prompt_template"], row)
        reply = api.chat.completions.create(
            model="route/1", messages=[{"role": "user", "content": message}], temperature=0
        )
        assert reply.choices[0].message.content == row["team"], (row, reply.choices[0].message.content)


def start(client: TestClient, headers: dict[str, str], **config: Any) -> dict[str, Any]:
    body = {"base_model": TINY_MODEL, "dataset": "tickets", "repo": "route"}
    body |= {"prompt_template": TEMPLATE, "completion_column": "team"} | config
    r = client.post("/v1/finetuning/jobs", headers=headers, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_refused_before_any_compute_naming_the_field(client: TestClient, alice: dict[str, str]) -> None:
    upload_csv(client, alice, "tickets", TICKETS)
    base = {"dataset": "tickets", "repo": "route"}

    error = refusal(client, alice, **base)
    assert error["param"] == "prompt_template" and "'ticket', 'team'" in error["message"]

    error = refusal(client, alice, **base, prompt_template="{ticket} from {customer}", completion_column="team")
    assert error["param"] == "prompt_template"
    assert "no column 'customer'" in error["message"] and "its columns: 'ticket', 'team'" in error["message"]

    error = refusal(client, alice, **base, prompt_template=TEMPLATE)
    assert error["param"] == "completion_column" and "'ticket', 'team'" in error["message"]

    error = refusal(client, alice, **base, prompt_template=TEMPLATE, completion_column="department")
    assert error["param"] == "completion_column" and "no column 'department'" in error["message"]

    error = refusal(client, alice, **base, prompt_template="{ticket:>40}", completion_column="team")
    assert error["param"] == "prompt_template" and "format spec" in error["message"]

    # An empty value is allowed in the dataset, not where the job reads it: the row is named by line and column.
    upload_csv(client, alice, "gaps", [*TICKETS[:2], {"ticket": "", "team": "billing"}, *TICKETS[3:]])
    error = refusal(client, alice, dataset="gaps", repo="route", prompt_template=TEMPLATE, completion_column="team")
    assert error["param"] == "prompt_template" and "line 4 column 'ticket'" in error["message"]

    chats = [[{"role": "user", "content": f"hi {n}"}, {"role": "assistant", "content": f"hello {n}"}] for n in "abc"]
    ready_dataset(client, alice, [{"messages": chat} for chat in chats], "chats")
    error = refusal(client, alice, dataset="chats", repo="route", prompt_template="{messages}")
    assert error["param"] == "prompt_template" and "is a messages dataset" in error["message"]
    nothing_created(client, alice, "route")


def _tokenizer() -> Any:
    from functions.base_models import load_tokenizer

    return load_tokenizer(TINY_MODEL)
