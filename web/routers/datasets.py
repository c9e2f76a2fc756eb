"""/v1/datasets: upload (JSONL or CSV) or import from a URL (s3://, gs://, https://), list, get, delete. Validation
runs in a worker, never here; both ways in share every step after the bytes arrive (`create_dataset`)."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile, status
from fastapi.responses import JSONResponse
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from app import volume
from app.errors import TooLarge
from app.models import Dataset, FinetuneJob
from app.names import NAME
from app.queue import emit
from app.settings import get_settings
from functions import dataset_fetch, dataset_files
from functions.catalog import get_model
from functions.datasets import FileFormat, detect_file_format
from web.bodies import size_text
from web.dataset_schemas import DatasetImport
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.schemas import DatasetOut

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
CHUNK = 1024 * 1024  # bytes read from the upload at a time
POLL_SECONDS = 0.2
MAX_PREVIEW_ROWS = 100  # rows a preview answers at most


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
async def upload_dataset(
    file: UploadFile,
    tenant: CurrentTenant,
    db: Db,
    name: Annotated[str | None, Form(description="Dataset name; the file name without extension if unset.")] = None,
    base_model: Annotated[str, Form(description="Whose tokenizer counts the tokens.")] = "smollm2-135m",
    wait: Annotated[bool, Form(description="Wait for validation and answer 422 with every row error.")] = True,
) -> JSONResponse | DatasetOut:
    file_format = detect_file_format(file.filename or "")
    if file_format is None:
        raise APIError(422, f"file: {file.filename!r} is not .jsonl or .csv", param="file", code="unsupported_format")
    name = name or Path(file.filename or "").stem
    limit = get_settings().limits.max_upload_bytes
    return await create_dataset(
        db, tenant.id, name, base_model, file_format, wait, lambda target: _save_limited(file, target, limit)
    )


@router.post("/import", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
async def import_dataset(body: DatasetImport, tenant: CurrentTenant, db: Db) -> JSONResponse | DatasetOut:
    """A dataset from a URL instead of an upload: the same size limit, validation, answers (201, 202, 422) and
    atomic write. The URL and credentials are checked before any byte is fetched; both are forgotten after."""
    source = await asyncio.to_thread(dataset_fetch.source_of, body.url, body.credentials)  # resolves a host name
    limit = get_settings().limits.max_upload_bytes

    async def fetch(target: Path) -> int:
        try:
            return await asyncio.to_thread(dataset_fetch.fetch, source, target, limit)  # never on the event loop
        except TooLarge:
            message = f"url: larger than the {size_text(limit)} limit (LORAPLEX_MAX_UPLOAD_BYTES)"
            raise APIError(413, message, param="url", code="file_too_large") from None

    name = body.name or source.stem
    return await create_dataset(db, tenant.id, name, body.base_model, source.file_format, body.wait, fetch)


async def create_dataset(
    db: Db,
    tenant_id: str,
    name: str,
    base_model: str,
    file_format: FileFormat,
    wait: bool,
    write: Callable[[Path], Awaitable[int]],
) -> JSONResponse | DatasetOut:
    """Every new dataset's steps, whatever its bytes come from: check the name and base model, add the row, let
    `write` fill a temporary file (returning its size, raising to refuse it) renamed into place only when it
    succeeds, queue the validation, and answer as `wait` asks. A failure anywhere leaves neither row nor file."""
    if not NAME.matches(name):
        raise APIError(422, f"name: {NAME.rule}", param="name")
    _check_base_model(base_model)
    if db.scalar(select(Dataset.id).where(Dataset.tenant_id == tenant_id, Dataset.name == name)):
        raise APIError(409, f"name: a dataset named {name!r} already exists", param="name", code="already_exists")

    dataset = Dataset(tenant_id=tenant_id, name=name, base_model=base_model, file_format=file_format, size_bytes=0)
    db.add(dataset)
    db.flush()  # assigns the id used in the file name
    path = volume.dataset_path(tenant_id, dataset.id, file_format)
    with volume.atomic_file(path) as tmp:
        dataset.size_bytes = await write(tmp)
    try:
        emit(db, "dataset.uploaded", dataset.id)
        db.commit()
    except IntegrityError:
        path.unlink(missing_ok=True)
        raise APIError(409, f"name: a dataset named {name!r} already exists", param="name") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if wait:
        return await _wait_for_validation(db, dataset)
    return _still_validating(dataset)


@router.get("", response_model=list[DatasetOut])
def list_datasets(tenant: CurrentTenant, db: Db) -> list[DatasetOut]:
    rows = db.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at))
    return [DatasetOut.model_validate(d) for d in rows]


@router.get("/{name}", response_model=DatasetOut)
def get_dataset(name: str, tenant: CurrentTenant, db: Db) -> DatasetOut:
    return DatasetOut.model_validate(find_dataset(db, tenant.id, name))


@router.get("/{name}/rows", response_model=list[dict[str, Any]])
def dataset_rows(
    name: str,
    tenant: CurrentTenant,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=MAX_PREVIEW_ROWS, description="How many rows, from the first.")] = 10,
) -> list[dict[str, Any]]:
    """A preview: the first valid rows of the stored file as validation parses them, each with its line and split
    (`{"line": 3, "split": "train", "prompt": ..., "completion": ...}`); bad rows are the dataset's `errors`."""
    dataset = find_dataset(db, tenant.id, name)
    path = volume.dataset_path(tenant.id, dataset.id, dataset.file_format)
    rows = dataset_files.first_rows(path, dataset.file_format, limit)  # type: ignore[arg-type]  # a FileFormat, checked at upload
    return [dataset_files.row_fields(row) for row in rows]


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(name: str, tenant: CurrentTenant, db: Db) -> None:
    dataset = find_dataset(db, tenant.id, name)
    used = or_(FinetuneJob.dataset_id == dataset.id, FinetuneJob.evaluation_dataset_id == dataset.id)
    if db.scalar(select(FinetuneJob.id).where(used)):
        raise APIError(409, f"dataset {name!r} is used by fine-tuning jobs and is kept for their record", param="name")
    path = volume.dataset_path(tenant.id, dataset.id, dataset.file_format)
    db.delete(dataset)
    db.commit()
    path.unlink(missing_ok=True)


def find_dataset(db: Db, tenant_id: str, name: str, param: str = "dataset") -> Dataset:
    dataset = db.scalar(select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.name == name))
    if dataset is None:
        raise APIError(404, f"dataset {name!r} not found", param=param, code="dataset_not_found")
    return dataset


def _check_base_model(base_model: str) -> None:
    try:
        get_model(base_model)
    except KeyError:
        raise APIError(422, f"base_model: unknown base model {base_model!r}", param="base_model") from None


async def _save_limited(file: UploadFile, target: Path, limit: int) -> int:
    """Copy the upload to `target`; 413 past `limit` bytes and 422 for an empty file (the caller removes it)."""
    size = 0
    with target.open("wb") as out:
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                message = f"file: larger than the {size_text(limit)} limit"
                raise APIError(413, message, param="file", code="file_too_large")
            out.write(chunk)
    if size == 0:
        raise APIError(422, "file: the file is empty", param="file", code="empty_file")
    return size


async def _wait_for_validation(db: Db, dataset: Dataset) -> JSONResponse | DatasetOut:
    """Poll the row the worker updates. An invalid upload is removed whole and answered with its errors."""
    deadline = time.monotonic() + get_settings().limits.upload_wait_seconds
    while dataset.status == "validating" and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        db.rollback()  # end the read transaction so the next read sees the worker's commit
        db.refresh(dataset)
    if dataset.status == "validating":
        return _still_validating(dataset)
    if dataset.status == "invalid":
        errors = dataset.errors
        db.delete(dataset)
        db.commit()
        volume.dataset_path(dataset.tenant_id, dataset.id, dataset.file_format).unlink(missing_ok=True)
        # A whole-file problem may belong to another field (base_model whose tokenizer cannot be had).
        param = errors[0]["field"] if not errors[0]["line"] and errors[0].get("field") == "base_model" else "file"
        raise APIError(422, _summary(errors, param), param=param, code="invalid_dataset", errors=errors)
    return DatasetOut.model_validate(dataset)


def _summary(errors: list[dict], param: str) -> str:
    first = errors[0]
    where = f"line {first['line']}" + (f", field '{first['field']}'" if first.get("field") else "")
    if not first["line"]:  # line 0 is the whole file: naming a "line 0" would send the user looking for it
        where = f"field '{first['field']}'" if first.get("field") else ""
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    if param != "file":
        return f"{param}: {first['message']}"
    return f"file: {where + ': ' if where else ''}{first['message']}{more}"


def _still_validating(dataset: Dataset) -> JSONResponse:
    """202: the upload is stored and its validation still runs; GET /v1/datasets/{name} tells when it is done."""
    body = DatasetOut.model_validate(dataset).model_dump(mode="json")
    return JSONResponse(body, status_code=status.HTTP_202_ACCEPTED)
