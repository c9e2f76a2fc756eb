"""The playground: chat with a base model, an adapter version or a checkpoint, or the same prompt to two of them side
by side, streamed from POST /v1/chat/completions by the page's script (static/playground.js), which also shows the
`openai` SDK and curl equivalents of what it sent.

The models to choose from are read as the API lists them: the catalog's base models (GET /v1/models) and the tenant's
repos with their versions and checkpoints (GET /v1/repos). `?model=` and `?compare=` preselect them; a name that is not
the tenant's answers 404, as the API does.
"""

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from functions.catalog import list_models
from web.console.render import Page, SignedIn, page
from web.routers import repos
from web.schemas import CheckpointOut

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Choice:
    """One option of the model selects: `value` is what `model` says in the request."""

    value: str
    label: str


@dataclass(frozen=True)
class Group:
    label: str
    choices: list[Choice]


@router.get("/playground", response_class=HTMLResponse)
def playground(request: Request, who: Page, model: str | None = None, compare: str | None = None) -> HTMLResponse:
    groups = _model_groups(who)
    names = {choice.value for group in groups for choice in group.choices}
    unknown = next((name for name in (model, compare) if name is not None and name not in names), None)
    if unknown is not None:  # another tenant's adapter answers exactly like a missing one
        return page(request, "playground.html", who, 404, groups=[], missing=f"model {unknown!r} not found")
    return page(request, "playground.html", who, groups=groups, model=model, compare=compare, missing=None)


def _model_groups(who: SignedIn) -> list[Group]:
    """Base models first (as GET /v1/models lists them), then one group per repo: each version and its
    checkpoints (as GET /v1/repos lists them)."""
    bases = Group("Base models", [Choice(m.name, m.name) for m in list_models()])
    groups = [bases]
    for repo in repos.list_repos(who.tenant, who.db):
        choices = []
        published = {version.version for version in repo.versions}
        for version in repo.versions:
            choices.append(Choice(version.name, f"{version.name} (on {version.base_model})"))
            choices += [_checkpoint(c) for c in repo.checkpoints if c.version == version.version]
        choices += [_checkpoint(c) for c in repo.checkpoints if c.version not in published]  # a version in training
        if choices:
            groups.append(Group(f"Repo {repo.name}", choices))
    return groups


def _checkpoint(checkpoint: CheckpointOut) -> Choice:
    return Choice(checkpoint.name, f"{checkpoint.name} (checkpoint, step {checkpoint.step})")
