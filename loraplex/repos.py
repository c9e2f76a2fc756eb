"""`pb.repos`: adapter repositories. A repo holds versions `repo/1`, `repo/2`, ..., one per fine-tuning job."""

from loraplex.api import Api
from loraplex.errors import LoraplexError
from loraplex.resources import Repo


class Repos:
    def __init__(self, client: Api) -> None:
        self._client = client

    def create(self, name: str, description: str = "", exists_ok: bool = False) -> Repo:
        """The repo `name`: an existing one when `exists_ok` (else 409 naming `name`), or a new, empty one. The
        server creates a repo with its first job (or imported version), so a new repo is the name until then, and
        its `description` is kept on this object only: the API has no route to store one yet."""
        try:
            existing = self.get(name)
        except LoraplexError as exc:
            if exc.status != 404:
                raise
            return Repo(name=name, description=description, versions=[])
        if not exists_ok:
            raise LoraplexError(
                409, f"name: a repo named {name!r} exists (exists_ok=True uses it)", param="name", code="already_exists"
            )
        return existing

    def get(self, name: str) -> Repo:
        return Repo.model_validate(self._client.get_repo(name))

    def list(self) -> list[Repo]:
        return [Repo.model_validate(r) for r in self._client.list_repos()]


def repo_name(repo: str | Repo) -> str:
    return repo if isinstance(repo, str) else repo.name
