"""/v1/files, OpenAI's dialect of /v1/datasets: a file is one of the tenant's datasets (one store, two dialects).

Upload goes through POST /v1/datasets' own code (web/routers/datasets.py): the worker validates the file as every
dataset, the answer waits for it, and an invalid file is a 400 naming its first bad line with nothing kept. The
dataset is named after the file (made unique: "train", then "train-2", ...) and its tokens are counted with the
default base model's tokenizer, since an OpenAI file names no model.
"""

import re
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select

from app import volume
from app.models import Dataset
from functions.datasets import detect_file_format
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.openai_ft_replies import FILE_PREFIX, check_limit, file_object, in_openai_terms, our_id, page
from web.openai_ft_schemas import FileDeleted, FileList, FileObject
from web.routers import datasets

router = APIRouter(prefix="/v1/files", tags=["openai fine-tuning"])
DEFAULT_BASE_MODEL = "smollm2-135m"  # whose tokenizer counts a file's tokens (our upload's default)
PURPOSE = "fine-tune"  # the one purpose kept: files are datasets to fine-tune on
MAX_LIST = 10_000  # OpenAI's largest (and default) page of files
NAME_LENGTH = 90  # a file's stem kept in its dataset's name, leaving room for "-<n>" within the 100 names allow


@router.post("", response_model=FileObject)
async def upload_file(
    tenant: CurrentTenant,
    db: Db,
    file: UploadFile | None = None,
    purpose: Annotated[str | None, Form(description="'fine-tune'.")] = None,
) -> FileObject:
    if purpose != PURPOSE:
        message = f"purpose: only '{PURPOSE}' files are kept here, got {purpose!r}"
        raise APIError(400, message, param="purpose", code="invalid_value")
    if file is None:
        raise APIError(400, "file: no file was sent (multipart field 'file')", param="file", code="invalid_value")
    if file.filename is None or (detect_file_format(file.filename) is None and not Path(file.filename).suffix):
        file.filename = f"{file.filename or 'file'}.jsonl"  # an OpenAI file is JSONL; it may come without a name
    name = _free_name(db, tenant.id, Path(file.filename).stem)
    try:
        await datasets.upload_dataset(file, tenant, db, name=name, base_model=DEFAULT_BASE_MODEL, wait=True)
    except APIError as refused:
        raise in_openai_terms(refused, {"name": "file"}) from None
    dataset = datasets.find_dataset(db, tenant.id, name)
    if dataset.data_format == "columns":  # trains only with a prompt_template, which OpenAI's jobs cannot give
        datasets.delete_dataset(name, tenant, db)
        message = (
            "file: expected chat rows ('messages'), 'prompt' and 'completion' rows, or preference rows ('input', "
            "'preferred_output', 'non_preferred_output'); found columns "
            f"{', '.join(dataset.stats.get('columns', []))} (POST /v1/datasets takes them, with a prompt_template)"
        )
        raise APIError(400, message, param="file", code="invalid_file")
    return file_object(dataset)


@router.get("", response_model=FileList)
def list_files(
    tenant: CurrentTenant,
    db: Db,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = MAX_LIST,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> FileList:
    """The tenant's datasets, newest first unless `order` is 'asc'; page on with `after` = the last id."""
    check_limit(limit, MAX_LIST)
    rows: list[Dataset] = []
    if purpose in (None, PURPOSE):
        ordering = (
            (Dataset.created_at, Dataset.id) if order == "asc" else (Dataset.created_at.desc(), Dataset.id.desc())
        )
        rows = list(db.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(*ordering)))
    shown, more = page(rows, our_id(after, FILE_PREFIX) if after else None, limit)
    data = [file_object(d) for d in shown]
    return FileList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=more
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, tenant: CurrentTenant, db: Db) -> FileObject:
    return file_object(find_file(db, tenant.id, file_id, "file_id"))


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, tenant: CurrentTenant, db: Db) -> FileResponse:
    """The file's bytes, as uploaded."""
    dataset = find_file(db, tenant.id, file_id, "file_id")
    path = volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{dataset.name}.{dataset.file_format}")


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, tenant: CurrentTenant, db: Db) -> FileDeleted:
    """Deletes the dataset (DELETE /v1/datasets/{name}): refused (409) while a fine-tuning job names it."""
    dataset = find_file(db, tenant.id, file_id, "file_id")
    try:
        datasets.delete_dataset(dataset.name, tenant, db)
    except APIError as refused:
        raise in_openai_terms(refused, {"name": "file_id"}) from None
    return FileDeleted(id=FILE_PREFIX + dataset.id)


def find_file(db: Db, tenant_id: str, file_id: str, param: str) -> Dataset:
    """The tenant's dataset behind `file_id` ('file-<dataset id>'); another tenant's reads as one that does not
    exist (404 naming `param`)."""
    dataset = db.get(Dataset, our_id(file_id, FILE_PREFIX))
    if dataset is None or dataset.tenant_id != tenant_id:
        raise APIError(404, f"{param}: no such file: {file_id!r}", param=param, code="file_not_found")
    return dataset


def _free_name(db: Db, tenant_id: str, stem: str) -> str:
    """A dataset name from a file's name: its characters our names allow, "-2", "-3", ... added when taken."""
    base = re.sub(r"[^a-zA-Z0-9_.-]", "-", stem).lstrip("_.-")[:NAME_LENGTH] or "file"
    taken = set(
        db.scalars(
            select(Dataset.name).where(Dataset.tenant_id == tenant_id, Dataset.name.startswith(base, autoescape=True))
        )
    )
    return next(name for n in range(1, len(taken) + 2) if (name := base if n == 1 else f"{base}-{n}") not in taken)
