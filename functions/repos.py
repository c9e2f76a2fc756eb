"""Adapter repos, their versions and checkpoints: a repo found or created, a version number allocated, a version
published, and a reference ('repo', 'repo/3', 'repo/3@2') resolved to its weights.

Publishing is shared by imports (web/routers/repos.py) and training (functions/train.py): an import takes the
repo's next version number from the repo row's counter (one UPDATE, which serializes concurrent publishers), a
training job publishes the number it took when it started (its checkpoints are already saved under it), and the
version row goes in before any file is moved, so the unique (repo, version) index guards the directory; the files
are renamed into place in the same transaction. A full fine-tuning publishes a whole model directory the same way
(kind "full").
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import events, volume
from app.db import session_scope
from app.models import AdapterVersion, Checkpoint, Dataset, FinetuneJob, Repo
from app.names import VERSION_REF

CHECKPOINTS_DIR = "checkpoints"  # inside a version's directory (app/volume.py)


# ---- repos and version numbers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """A version or checkpoint of a tenant, as serving and continuing need it."""

    name: str  # "repo/3" or "repo/3@2"
    key: str  # its row id: stable and unique per version and per checkpoint
    kind: str  # lora | full
    base_model: str
    path: Path  # PEFT directory, or whole-model directory
    labels: tuple[str, ...] = ()  # a classification adapter's labels: what serving may answer (none: free text)


def get_or_create_repo(session: Session, tenant_id: str, name: str) -> Repo:
    """The tenant's repo of this name, created (and flushed) if it does not exist yet."""
    repo = session.scalar(select(Repo).where(Repo.tenant_id == tenant_id, Repo.name == name))
    if repo is None:
        repo = Repo(tenant_id=tenant_id, name=name)
        session.add(repo)
        session.flush()
    return repo


def allocate_version(session: Session, repo_id: str) -> int:
    """Take the repo's next version number for good. The UPDATE locks the repo row until the caller's transaction
    ends (PostgreSQL) or takes the database's write lock (SQLite), so concurrent takers get distinct numbers."""
    session.execute(
        update(Repo)
        .where(Repo.id == repo_id)
        .values(last_version=Repo.last_version + 1)
        .execution_options(synchronize_session=False)
    )
    number = session.scalar(select(Repo.last_version).where(Repo.id == repo_id))
    if number is None:
        raise RuntimeError(f"repo {repo_id} vanished while taking a version number")
    return number


# ---- publishing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionSpec:
    """What the version row records about the files."""

    base_model: str
    adapter_type: str  # lora | none
    rank: int  # 0 for a full model
    target_modules: list[str]
    kind: str = "lora"  # lora | full
    labels: list[str] | None = None  # a classification dataset's labels (functions/datasets.detect_labels)


@dataclass(frozen=True)
class Published:
    """A version once published: its row id, number and directory."""

    id: str
    version: int
    path: Path


def publish_adapter(
    tenant_id: str,
    repo_name: str,
    files_dir: Path,
    *,
    base_model: str,
    adapter_type: str,
    rank: int,
    target_modules: list[str],
    kind: str = "lora",
    labels: list[str] | None = None,
    version: int | None = None,
    repo_id: str | None = None,
    job_id: str | None = None,
    guard: Callable[[Session], bool] | None = None,
    on_published: Callable[[Session, AdapterVersion], None] | None = None,
) -> Published | None:
    """Save the files of `files_dir` as version `repo/N` and record it, in one transaction.

    N is `version` when given (a training job's number, taken when it started), else the repo's next number.
    `labels`: the label set of a classification dataset the adapter was trained on; serving then answers only one
    of them (web/inference.py).
    The repo is `repo_id`, or the tenant's repo named `repo_name`, created if missing (in the same transaction).
    `guard(session)` runs first and may decline (returns False: nothing is kept, None is returned);
    `on_published(session, version)` runs after the version row exists and writes whatever else must commit
    with it (training: the job row and the usage record). On any failure the directory is removed again; the
    checkpoints saved under the version while it trained stay where they are.
    """
    spec = VersionSpec(base_model, adapter_type, rank, target_modules, kind, list(labels) if labels else None)
    parent = volume.adapter_dir(tenant_id, repo_name, 0).parent
    parent.mkdir(parents=True, exist_ok=True)
    # Copied beside its final place before the transaction, so only a rename happens while rows are locked.
    staged = Path(tempfile.mkdtemp(dir=parent, prefix=".incoming.", suffix=".tmp"))
    try:
        shutil.copytree(files_dir, staged, dirs_exist_ok=True)
        for _ in range(3):  # another publisher to the same repo may take the same version number first
            try:
                return _publish_once(tenant_id, repo_name, repo_id, staged, spec, version, job_id, guard, on_published)
            except IntegrityError:
                continue
        raise RuntimeError("could not allocate an adapter version after 3 tries")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _publish_once(
    tenant_id: str,
    repo_name: str,
    repo_id: str | None,
    staged: Path,
    spec: VersionSpec,
    version: int | None,
    job_id: str | None,
    guard: Callable[[Session], bool] | None,
    on_published: Callable[[Session, AdapterVersion], None] | None,
) -> Published | None:
    with session_scope() as s:
        if guard is not None and not guard(s):
            return None
        if repo_id is None:  # a concurrent creator of the same name makes this an IntegrityError: retried
            repo_id = get_or_create_repo(s, tenant_id, repo_name).id
        number = version if version is not None else allocate_version(s, repo_id)
        adapter = AdapterVersion(
            repo_id=repo_id,
            version=number,
            base_model=spec.base_model,
            adapter_type=spec.adapter_type,
            kind=spec.kind,
            rank=spec.rank,
            target_modules=spec.target_modules,
            labels=spec.labels,
            job_id=job_id,
        )
        s.add(adapter)
        # The row goes in before the files move: the unique (repo, version) index makes a concurrent publisher
        # of the same number wait for this transaction and then fail, so it never touches this directory.
        s.flush()
        final = volume.adapter_dir(tenant_id, repo_name, number)
        moved = False
        try:
            _adopt_checkpoints(final, staged)
            if final.exists():  # left by an attempt that crashed before committing: no row owns it
                shutil.rmtree(final)
            os.replace(staged, final)
            moved = True
            events.publish(s, tenant_id, "adapter.version.published", adapter.id)  # before a job's success on it
            if on_published is not None:
                on_published(s, adapter)
            s.commit()  # here rather than on leaving the block, so a failed commit still takes the files back
        except BaseException:
            # Taken back before the rollback releases the version number, so a publisher that takes the number
            # next never has its directory touched by this one; a retry finds the files staged again.
            if moved:
                try:
                    os.replace(final, staged)
                except OSError:
                    shutil.rmtree(final, ignore_errors=True)
            _return_checkpoints(staged, final)
            raise
        return Published(adapter.id, number, final)


def _adopt_checkpoints(final: Path, staged: Path) -> None:
    """Move the checkpoints a job saved under its version while training into the staged directory, so that
    renaming the staged directory into place keeps them (one rename: they are never copied)."""
    saved = final / CHECKPOINTS_DIR
    if saved.is_dir():
        os.replace(saved, staged / CHECKPOINTS_DIR)


def _return_checkpoints(staged: Path, final: Path) -> None:
    """Undo _adopt_checkpoints after a failed publish: the checkpoints outlive the attempt (the staged directory
    is removed), so a retry or a continued job still finds them."""
    adopted = staged / CHECKPOINTS_DIR
    if adopted.is_dir():
        final.mkdir(parents=True, exist_ok=True)
        os.replace(adopted, final / CHECKPOINTS_DIR)


# ---- resolving a reference: 'repo', 'repo/3', 'repo/3@2' -------------------------------------------------------


def find(session: Session, tenant_id: str, reference: str) -> Weights | None:
    """The tenant's version ('repo/3'), checkpoint ('repo/3@2') or latest version of a repo ('repo'); None when it
    does not exist (or is another tenant's: both read the same)."""
    if "/" not in reference:
        repo = session.scalar(select(Repo).where(Repo.tenant_id == tenant_id, Repo.name == reference))
        if repo is None or not repo.versions:
            return None
        reference = repo.versions[-1].name
    match = VERSION_REF.fullmatch(reference)
    if match is None:
        return None
    checkpoint = int(match["checkpoint"]) if match["checkpoint"] is not None else None
    return find_parts(session, tenant_id, match["repo"], int(match["version"]), checkpoint)


def find_parts(session: Session, tenant_id: str, repo: str, version: int, checkpoint: int | None) -> Weights | None:
    if checkpoint is None:
        row = session.scalar(
            select(AdapterVersion)
            .join(Repo)
            .where(Repo.tenant_id == tenant_id, Repo.name == repo, AdapterVersion.version == version)
        )
        if row is None:
            return None
        path = volume.adapter_dir(tenant_id, repo, version)
        return Weights(row.name, row.id, row.kind, row.base_model, path, tuple(row.labels or ()))
    # A checkpoint answers from its version's labels once that version is published, and from its job's dataset's
    # labels while the job still trains (the labels the version will publish): one query, an outer join.
    published = and_(AdapterVersion.repo_id == Checkpoint.repo_id, AdapterVersion.version == Checkpoint.version)
    result = session.execute(
        select(Checkpoint, AdapterVersion.labels, Dataset.stats)
        .join(Repo, Repo.id == Checkpoint.repo_id)
        .join(FinetuneJob, FinetuneJob.id == Checkpoint.job_id)
        .join(Dataset, Dataset.id == FinetuneJob.dataset_id)
        .outerjoin(AdapterVersion, published)
        .where(
            Repo.tenant_id == tenant_id,
            Repo.name == repo,
            Checkpoint.version == version,
            Checkpoint.number == checkpoint,
        )
    ).first()
    if result is None:
        return None
    found, labels, stats = result
    if labels is None:
        labels = list(stats.get("labels") or ())  # {label: training rows} of a classification dataset
    path = volume.checkpoint_dir(tenant_id, repo, version, checkpoint)
    return Weights(found.name, found.id, found.kind, found.base_model, path, tuple(labels or ()))
