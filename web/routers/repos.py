"""/v1/repos: adapter repositories (created by POST, or by their first job or import), their versions (`repo/1`,
`repo/2`, ...) and checkpoints (`repo/2@1`), import of versions, and export of versions and checkpoints."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from fastapi import Path as InPath
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask

from app.models import AdapterVersion, Checkpoint, Repo
from app.names import MAX_NUMBER, NAME
from app.settings import get_settings
from functions import adapter_files, repos
from functions.adapter_check import HEAD_FILES, AdapterRejected, check_peft_dir
from functions.catalog import get_model
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.schemas import AdapterOut, CheckpointOut, RepoIn, RepoOut

router = APIRouter(prefix="/v1/repos", tags=["adapters"])
# A version or checkpoint number in a path: bounded here, as a larger one cannot exist and overflows the database's
# integers (a 500) when looked up.
Number = Annotated[int, InPath(ge=1, le=MAX_NUMBER)]


@router.get("", response_model=list[RepoOut])
def list_repos(tenant: CurrentTenant, db: Db) -> list[RepoOut]:
    repos = db.scalars(select(Repo).where(Repo.tenant_id == tenant.id).order_by(Repo.name))
    return [RepoOut.model_validate(r) for r in repos]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RepoOut)
def create_repo(body: RepoIn, tenant: CurrentTenant, db: Db) -> RepoOut:
    """An empty repo with its description, before its first job or import (which otherwise create it)."""
    if not NAME.matches(body.name):
        raise APIError(422, f"name: {NAME.rule}", param="name")
    exists = APIError(409, f"name: a repo named {body.name!r} exists", param="name", code="already_exists")
    if db.scalar(select(Repo.id).where(Repo.tenant_id == tenant.id, Repo.name == body.name)):
        raise exists
    repo = Repo(tenant_id=tenant.id, name=body.name, description=body.description)
    db.add(repo)
    try:
        db.commit()
    except IntegrityError:  # created by a concurrent request between the look and the insert
        raise exists from None
    return RepoOut.model_validate(repo)


@router.get("/{name}", response_model=RepoOut)
def get_repo(name: str, tenant: CurrentTenant, db: Db) -> RepoOut:
    repo = db.scalar(select(Repo).where(Repo.tenant_id == tenant.id, Repo.name == name))
    if repo is None:
        raise APIError(404, f"repo {name!r} not found", param="name", code="repo_not_found")
    return RepoOut.model_validate(repo)


@router.get("/{name}/versions/{version}", response_model=AdapterOut)
def get_version(name: str, version: Number, tenant: CurrentTenant, db: Db) -> AdapterOut:
    """One version `repo/N`, with the prompt_template its job trained with (if any)."""
    row = db.scalar(
        select(AdapterVersion)
        .join(Repo)
        .where(Repo.tenant_id == tenant.id, Repo.name == name, AdapterVersion.version == version)
    )
    if row is None:  # another tenant's answers exactly like a missing one
        raise APIError(404, f"adapter {name}/{version} not found", param="version", code="adapter_not_found")
    return AdapterOut.model_validate(row)


@router.post("/{name}/versions", status_code=status.HTTP_201_CREATED, response_model=AdapterOut)
def import_version(
    name: str,
    tenant: CurrentTenant,
    db: Db,
    base_model: Annotated[str, Form(description="The base model the adapter was trained on, e.g. 'smollm2-135m'.")],
    files: Annotated[
        list[UploadFile] | None, File(description="adapter_config.json and adapter_model.safetensors.")
    ] = None,
    archive: Annotated[UploadFile | None, File(description="A .zip or .tar.gz of the PEFT directory.")] = None,
) -> AdapterOut:
    """Import a PEFT LoRA adapter as the repo's next version (the repo is created if missing). The adapter is
    checked against the base model from its files alone; a refusal leaves nothing behind."""
    if not NAME.matches(name):
        raise APIError(422, f"repo: {NAME.rule}", param="repo")
    try:
        get_model(base_model)
    except KeyError:
        raise APIError(422, f"base_model: unknown base model {base_model!r}", param="base_model") from None
    uploads = [f for f in files or [] if f.filename]
    if bool(uploads) == (archive is not None):
        raise APIError(
            422,
            "files: send either the adapter's files (adapter_config.json and adapter_model.safetensors) "
            "or one archive of its directory, not both and not neither",
            param="files" if archive is None else "archive",
            code="invalid_value",
        )
    limit = get_settings().limits.max_upload_bytes
    # The upload is unpacked and checked outside the volume; only a checked adapter is published onto it. A refusal
    # (AdapterRejected, UploadTooLarge) reaches the API's error handler as it is.
    with tempfile.TemporaryDirectory(prefix="loraplex-import-") as work:
        if archive is not None:
            received = adapter_files.unpack_archive(archive.file, Path(work) / "received", limit)
        else:
            received = adapter_files.save_files(
                ((f.filename or "", f.file) for f in uploads), Path(work) / "received", limit
            )
        head = [n for n in HEAD_FILES if (received / n).exists()]
        if head:  # kept, it would need checks of its own; dropped, the version would answer as another model
            raise AdapterRejected(
                f"{head[0]}: an adapter with a classification head cannot be imported; import its LoRA alone "
                "(adapter_config.json and adapter_model.safetensors) or train it here with task 'classification'",
                field=head[0],
            )
        info = check_peft_dir(received, base_model)
        checked = Path(work) / "checked"  # exactly the files that were checked; READMEs and the like stay out
        checked.mkdir()
        for file_name in adapter_files.STORED_FILES:
            shutil.copyfile(received / file_name, checked / file_name)
        published = repos.publish_adapter(
            tenant.id,
            name,
            checked,
            base_model=base_model,
            adapter_type=info.adapter_type,
            rank=info.rank,
            target_modules=info.target_modules,
        )
    if published is None:  # only a guard declines, and none was given
        raise RuntimeError("publish_adapter declined without a guard")
    return AdapterOut.model_validate(db.get_one(AdapterVersion, published.id))


@router.get("/{name}/versions/{version}/download", response_class=FileResponse)
def download_version(name: str, version: Number, tenant: CurrentTenant, db: Db) -> FileResponse:
    """The version as a .tar.gz (folder `<repo>-<N>/`): its PEFT directory, loadable with
    PeftModel.from_pretrained, or for a full fine-tuning the whole model directory (safetensors, config,
    tokenizer), loadable with AutoModelForCausalLM.from_pretrained."""
    weights = repos.find_parts(db, tenant.id, name, version, None)
    if weights is None:  # another tenant's answers exactly like a missing one
        raise APIError(404, f"adapter {name}/{version} not found", param="version", code="adapter_not_found")
    created = db.get_one(AdapterVersion, weights.key).created_at
    return _archive(weights, f"{name}-{version}", created.timestamp())


@router.get("/{name}/versions/{version}/checkpoints", response_model=list[CheckpointOut])
def list_checkpoints(name: str, version: Number, tenant: CurrentTenant, db: Db) -> list[CheckpointOut]:
    """The checkpoints of a version, including one still training (its checkpoints exist before it does)."""
    rows = db.scalars(
        select(Checkpoint)
        .join(Repo)
        .where(Repo.tenant_id == tenant.id, Repo.name == name, Checkpoint.version == version)
        .order_by(Checkpoint.number)
    ).all()
    if not rows and repos.find_parts(db, tenant.id, name, version, None) is None:
        raise APIError(404, f"adapter {name}/{version} not found", param="version", code="adapter_not_found")
    return [CheckpointOut.model_validate(c) for c in rows]


@router.get("/{name}/versions/{version}/checkpoints/{checkpoint}/download", response_class=FileResponse)
def download_checkpoint(name: str, version: Number, checkpoint: Number, tenant: CurrentTenant, db: Db) -> FileResponse:
    """Checkpoint `repo/N@K` as a .tar.gz (folder `<repo>-<N>-checkpoint-<K>/`), in the same format as a version."""
    weights = repos.find_parts(db, tenant.id, name, version, checkpoint)
    if weights is None:
        raise APIError(
            404, f"checkpoint {name}/{version}@{checkpoint} not found", param="checkpoint", code="checkpoint_not_found"
        )
    created = db.get_one(Checkpoint, weights.key).created_at
    return _archive(weights, f"{name}-{version}-checkpoint-{checkpoint}", created.timestamp())


def _archive(weights: repos.Weights, folder: str, mtime: float) -> FileResponse:
    """A temporary .tar.gz of the weights' directory, removed once sent."""
    fd, tmp = tempfile.mkstemp(prefix="loraplex-export-", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as out:
            if weights.kind == "full":
                adapter_files.export_model_archive(weights.path, out, folder, mtime)
            else:
                adapter_files.export_archive(weights.path, out, folder, weights.base_model, mtime)
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(
        tmp,
        media_type="application/gzip",
        filename=f"{folder}.tar.gz",
        background=BackgroundTask(os.unlink, tmp),
    )
