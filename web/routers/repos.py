"""/v1/repos: adapter repositories and their versions (`repo/1`, `repo/2`, ...)."""

from fastapi import APIRouter
from sqlalchemy import select

from app.models import Repo
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.schemas import RepoOut

router = APIRouter(prefix="/v1/repos", tags=["adapters"])


@router.get("", response_model=list[RepoOut])
def list_repos(tenant: CurrentTenant, db: Db) -> list[RepoOut]:
    return [RepoOut.of(r) for r in db.scalars(select(Repo).where(Repo.tenant_id == tenant.id).order_by(Repo.name))]


@router.get("/{name}", response_model=RepoOut)
def get_repo(name: str, tenant: CurrentTenant, db: Db) -> RepoOut:
    repo = db.scalar(select(Repo).where(Repo.tenant_id == tenant.id, Repo.name == name))
    if repo is None:
        raise APIError(404, f"repo {name!r} not found", param="name", code="repo_not_found")
    return RepoOut.of(repo)
