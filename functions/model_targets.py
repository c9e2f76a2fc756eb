"""What a request's `model` names, for one tenant: a catalog base model, or one of the tenant's adapters or full
fine-tunings; and which of those a private deployment serves.

`model` is a base model ("smollm2-135m"), a version ("repo/3"), a checkpoint ("repo/3@2": checkpoint 2 of
version 3) or a repo ("repo": its latest version); a version or checkpoint also by the name OpenAI's fine-tuning API
gives it, "ft:smollm2-135m:repo:3" ("ft:smollm2-135m:repo:3:ckpt-2"), which names its base model too. The shared
endpoints serve any of them; a deployment serves its own base model and the tenant's LoRA adapters of it.

A version trained on a classification dataset (and its checkpoints, once it is published) carries its labels: the
request is then answered with one of them (Target.labels, web/inference.py). They come with the version's row, in
the query that resolves `model`.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound
from app.names import NAME
from functions import repos
from functions.catalog import get_model
from functions.engine.protocol import AdapterRef

# OpenAI's form of a version's name, "ft:<base model>:<repo>:<N>", and of a checkpoint's, "...:ckpt-<k>" (catalog
# names and repo names hold no ':').
FINE_TUNED = re.compile(
    rf"ft:(?P<base>[^:]+):(?P<repo>{NAME.pattern}):(?P<version>[0-9]{{1,9}})(?::ckpt-(?P<checkpoint>[0-9]{{1,9}}))?"
)


def fine_tuned_name(base_model: str, reference: str) -> str:
    """OpenAI's name of the version 'repo/3' ('ft:smollm2-135m:repo:3') or checkpoint 'repo/3@2' (':ckpt-2')."""
    version, _, checkpoint = reference.partition("@")
    repo, _, number = version.rpartition("/")
    return f"ft:{base_model}:{repo}:{number}" + (f":ckpt-{checkpoint}" if checkpoint else "")


@dataclass(frozen=True)
class Target:
    """What a `model` string resolved to."""

    model: str  # echoed back as given
    base_model: str  # for a full fine-tuning's version or checkpoint: the base model it was trained from
    adapter: AdapterRef | None
    adapter_name: str | None  # "repo/3", "repo/3@2"
    # A full fine-tuning's model directory, which the engine loads as its weights in place of base_model's;
    # None for catalog base models and adapters.
    model_dir: Path | None = None
    labels: tuple[str, ...] = ()  # a classification adapter's labels: the answer is one of them (none: free text)


def resolve_model(db: Session, tenant_id: str, model: str) -> Target:
    """An adapter resolves to an AdapterRef keyed by its version's or checkpoint's row id; a full fine-tuning to its
    model directory. Another tenant's adapter resolves exactly like one that does not exist (NotFound, same
    message)."""
    not_found = NotFound(f"The model '{model}' does not exist", field="model", code="model_not_found")
    reference, base_model = model, None
    if (named := FINE_TUNED.fullmatch(model)) is not None:  # "ft:base:repo:3" is "repo/3" of that base model
        checkpoint = f"@{named['checkpoint']}" if named["checkpoint"] else ""
        reference, base_model = f"{named['repo']}/{named['version']}{checkpoint}", named["base"]
    elif "/" not in model:
        try:
            return Target(model, get_model(model).name, None, None)
        except KeyError:
            pass  # a repo's name: its latest version
    weights = repos.find(db, tenant_id, reference)
    if weights is None or base_model not in (None, weights.base_model):
        raise not_found
    if weights.kind == "full":
        return Target(model, weights.base_model, None, weights.name, model_dir=weights.path, labels=weights.labels)
    adapter = AdapterRef(weights.key, weights.path, weights.base_model)
    return Target(model, weights.base_model, adapter, weights.name, labels=weights.labels)


def deployment_target(db: Session, tenant_id: str, deployment: str, base_model: str, model: str) -> Target:
    """On the deployment named `deployment`, which serves `base_model`: `model` is "" or that base model for the
    base model alone, else one of the tenant's LoRA adapters of it (Invalid otherwise)."""
    if model in ("", base_model):
        return Target(model or base_model, base_model, None, None)
    target = resolve_model(db, tenant_id, model)
    if target.adapter is None:
        raise Invalid(
            f"model: the deployment '{deployment}' serves {base_model!r} and its LoRA adapters; "
            f"{model!r} is another model",
            field="model",
            code="model_not_served",
        )
    if target.base_model != base_model:
        raise Invalid(
            f"model: {model!r} is an adapter of {target.base_model!r}; the deployment '{deployment}' serves "
            f"{base_model!r}",
            field="model",
            code="model_not_served",
        )
    return target
