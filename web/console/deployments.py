"""The deployments pages: the list with the create form, and one deployment (status and its transitions, replicas,
config, the update form, stop/standby/delete, and the health charts its script polls from the API).

The forms are generated from the API's own config models (DeploymentConfig, DeploymentUpdate): every field with its
description, default and bounds, so the console offers exactly what POST and PATCH /v1/deployments accept.
"""

from dataclasses import dataclass
from typing import Any, get_args

from annotated_types import Ge, Le, MaxLen
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from app.errors import NotFound
from functions.catalog import list_models
from functions.deployments.config import ACCELERATORS, ENGINES, DeploymentConfig, DeploymentUpdate
from web.console.render import Page, page
from web.deps import Runtime
from web.routers import deployments

router = APIRouter(include_in_schema=False)

FIRST = ("name", "base_model", "description")  # shown first; the rest in the model's order
UNCHANGEABLE = ("base_model",)  # the update form shows these without an input: the API refuses a change


@dataclass(frozen=True)
class Input:
    """One form control for a config field: `kind` is text, textarea, number, select or list (comma-separated)."""

    name: str
    kind: str
    help: str
    value: Any
    required: bool
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: str = "1"


@router.get("/deployments", response_class=HTMLResponse)
def deployment_list(request: Request, who: Page, runtime: Runtime) -> HTMLResponse:
    shown = deployments.list_deployments(who.tenant, who.db, runtime)
    return page(request, "deployments.html", who, deployments=shown, inputs=config_inputs(DeploymentConfig))


@router.get("/deployments/{name}", response_class=HTMLResponse)
def deployment_page(request: Request, name: str, who: Page, runtime: Runtime) -> HTMLResponse:
    try:
        shown = deployments.get_deployment(name, who.tenant, who.db, runtime)
    except NotFound:  # another tenant's deployment reads as missing, as in the API
        return page(request, "deployment.html", who, status_code=404, missing=name)
    history = deployments.transitions(name, who.tenant, who.db)
    current = shown.model_dump()
    inputs = [i for i in config_inputs(DeploymentUpdate, current) if i.name not in UNCHANGEABLE]
    return page(request, "deployment.html", who, d=shown, transitions=history, inputs=inputs)


def config_inputs(model: type[BaseModel], values: dict[str, Any] | None = None) -> list[Input]:
    """A control per field of `model`, filled with `values` (an existing deployment's) or the field's default."""
    names = [*(n for n in FIRST if n in model.model_fields), *(n for n in model.model_fields if n not in FIRST)]
    return [_input(n, model.model_fields[n], values) for n in names]


def _input(name: str, info: FieldInfo, values: dict[str, Any] | None) -> Input:
    annotation = _unoptional(info.annotation)
    bounds = {type(m): m for m in info.metadata}
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    value = values[name] if values is not None else default
    help = info.description or ""
    if MaxLen in bounds:
        help = (help + f" At most {bounds[MaxLen].max_length} characters.").strip()
    choices = _choices(name)
    if choices:
        return Input(name, "select", help, value, info.is_required(), choices)
    if annotation in (int, float):
        return Input(
            name,
            "number",
            help,
            value,
            True,
            minimum=bounds[Ge].ge if Ge in bounds else None,
            maximum=bounds[Le].le if Le in bounds else None,
            step="1" if annotation is int else "any",
        )
    if getattr(annotation, "__origin__", None) is list:
        return Input(name, "list", help + " Separate them with commas.", ", ".join(value or []), False)
    return Input(name, "textarea" if MaxLen in bounds else "text", help, value or "", info.is_required())


def _unoptional(annotation: Any) -> Any:
    """`int | None` (an update's field) as `int`."""
    members = [a for a in get_args(annotation) if a is not type(None)]
    return members[0] if len(members) == 1 and type(None) in get_args(annotation) else annotation


def _choices(name: str) -> tuple[str, ...]:
    if name == "base_model":
        return tuple(m.name for m in list_models())
    return {"accelerator": ACCELERATORS, "engine": ENGINES}.get(name, ())
