"""The datasets pages: the list (with the upload), and one dataset (its validation report, token statistics, the rows
over a max sequence length, a preview of its first rows, delete)."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from functions.auto_config import MAX_AUTO_SEQ_LENGTH, Truncation
from functions.catalog import get_model, list_models
from web.console.render import Page, page
from web.errors import APIError
from web.routers import datasets

router = APIRouter(include_in_schema=False)
PREVIEW_ROWS = 10
SEQ_LENGTHS = (128, 256, 512, 1024, 2048, 4096)  # max_seq_length values the truncation table is shown for


@router.get("/datasets", response_class=HTMLResponse)
def dataset_list(request: Request, who: Page) -> HTMLResponse:
    models = [m.name for m in list_models()]
    return page(request, "datasets.html", who, datasets=datasets.list_datasets(who.tenant, who.db), models=models)


@router.get("/datasets/{name}", response_class=HTMLResponse)
def dataset_page(name: str, request: Request, who: Page) -> HTMLResponse:
    try:
        dataset = datasets.get_dataset(name, who.tenant, who.db)
    except APIError:  # another tenant's answers exactly like a missing one, as in the API
        return page(request, "dataset.html", who, status_code=404, dataset=None, name=name)
    rows = datasets.dataset_rows(name, who.tenant, who.db, limit=PREVIEW_ROWS)
    row = datasets.find_dataset(who.db, who.tenant.id, name)
    preview = [(r["line"], r["split"], _row_text(r)) for r in rows]
    cuts = _cuts(row.train_lengths, row.base_model, pairs=row.data_format == "preference")
    return page(request, "dataset.html", who, dataset=dataset, rows=preview, cuts=cuts)


def _row_text(row: dict[str, Any]) -> str:
    """A previewed row as lines of text: "role: content" per message, "name: value" per field or column."""
    answers = "".join(f"\n{name}: {row[name]}" for name in ("chosen", "rejected") if name in row)  # a preference row
    if "messages" in row:
        return "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"]) + answers
    if "columns" in row:
        return "\n".join(f"{name}: {value}" for name, value in row["columns"].items())
    if "text" in row:
        return str(row["text"])
    return "\n".join(f"{name}: {row[name]}" for name in ("prompt", "completion", "chosen", "rejected") if name in row)


def _cuts(lengths: list[Any] | None, base_model: str, pairs: bool = False) -> list[Truncation]:
    """What each max_seq_length up to the model's trainable context would cut from the training split (the rows
    over it, the completion tokens lost), from the token lengths validation counted; none for a "columns" dataset,
    whose rows only a job's template makes."""
    if not lengths:
        return []
    try:
        context = min(get_model(base_model).context_length, MAX_AUTO_SEQ_LENGTH)
    except KeyError:
        context = MAX_AUTO_SEQ_LENGTH
    runs = [tuple(int(n) for n in row) for row in lengths]
    cuts = [Truncation.of(runs, n, pairs) for n in sorted({n for n in SEQ_LENGTHS if n < context} | {context})]
    fits = next((i for i, cut in enumerate(cuts) if not cut.rows_cut), len(cuts) - 1)
    return cuts[: fits + 1]  # the lengths that cut rows, and the first that cuts none
