"""`pb.repos`: adapter repositories. A repo holds versions `repo/1`, `repo/2`, ..., one per fine-tuning job."""

from loraplex.api import Api
from loraplex.errors import LoraplexError
from loraplex.resources import Repo


class Repos:
    def __init__(self, client: Api) -> None:
        self._client = client

    def create(self, name: str, description: str = "", exists_ok: bool = False) -> Repo:
        """A new, empty repo with its description; one that exists already is answered as it is when `exists_ok`,
        else LoraplexError 409 naming `name`."""
        try:
            return Repo.model_validate(self._client.create_repo(name, description))
        except LoraplexError as exc:
            if exc.status != 409 or not exists_ok:
                raise
        return self.get(name)

    def get(self, name: str) -> Repo:
        return Repo.model_validate(self._client.get_repo(name))

    def list(self) -> list[Repo]:
        return [Repo.model_validate(r) for r in self._client.list_repos()]


def repo_name(repo: str | Repo) -> str:
    return repo if isinstance(repo, str) else repo.name
