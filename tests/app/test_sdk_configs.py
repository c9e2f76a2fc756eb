"""The SDK's typed configs (loraplex/configs.py) cannot drift from the server's: same fields, types, defaults and
JSON-schema constraints as FinetuneConfig and the deployment config (minus what the SDK passes beside the config),
and the same answer, accepted or refused naming the same field, for values at and past each bound."""

from typing import Any, get_args

import pytest
from pydantic import BaseModel, Field, ValidationError

from functions.deployments.config import DeploymentConfig as ServerDeploymentConfig
from functions.finetune_config import METHOD_FIELDS, FinetuneConfig
from loraplex import DeploymentConfig, DPOConfig, GRPOConfig, SFTConfig
from loraplex.configs import CONFIGS

# Passed beside the config by the SDK's calls: adapters.create(config, dataset=, repo=, description=),
# deployments.create(name=)
SFT_SEPARATE = {"dataset", "repo", "description"}
DEPLOYMENT_SEPARATE = {"name"}
# Words only, never constraints: descriptions are shorter in the SDK
WORDS = {"title", "description"}


def drift(sdk: type[BaseModel], server: type[BaseModel], separate: set[str]) -> list[str]:
    """Every difference between the SDK's config and the server's, one line naming the field."""
    ours, theirs = _schema(sdk), _schema(server)
    props, server_props = ours["properties"], {k: v for k, v in theirs["properties"].items() if k not in separate}
    problems = [f"{name}: the server's field is missing from {sdk.__name__}" for name in server_props.keys() - props]
    problems += [f"{name}: {sdk.__name__} has it, the server does not" for name in props.keys() - server_props]
    for name in sorted(props.keys() & server_props.keys()):
        if props[name] != server_props[name]:
            problems.append(f"{name}: SDK schema {props[name]} != server schema {server_props[name]}")
        sdk_default = sdk.model_fields[name].get_default(call_default_factory=True)
        server_default = server.model_fields[name].get_default(call_default_factory=True)
        if sdk_default != server_default:
            problems.append(f"{name}: SDK default {sdk_default!r} != server default {server_default!r}")
        if (name in ours.get("required", [])) != (name in theirs.get("required", [])):
            problems.append(f"{name}: required in one, optional in the other")
    their_defs = _referenced(server_props, theirs.get("$defs", {}))  # of the fields compared
    if ours.get("$defs", {}) != their_defs:
        problems.append(f"$defs: {ours.get('$defs')} != {their_defs}")
    if sdk.model_config.get("extra") != "forbid":
        problems.append(f"{sdk.__name__}: unknown fields must be refused (extra='forbid')")
    return problems


def _referenced(node: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The $defs that `node` refers to, and those they refer to."""
    found: dict[str, Any] = {}
    todo = [node]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] not in found:
                found[ref[8:]] = defs[ref[8:]]
                todo.append(defs[ref[8:]])
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return _without_words(model.model_json_schema())


def _without_words(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_words(v) for k, v in node.items() if k not in WORDS or not isinstance(v, str)}
    if isinstance(node, list):
        return [_without_words(v) for v in node]
    return node


def method_separate(method: str) -> set[str]:
    """What a method's SDK config leaves out of the server's: what the SDK passes beside it, `method` (the class
    itself), and the fields of the other methods."""
    others = {name for name, methods in METHOD_FIELDS.items() if method not in methods}
    return SFT_SEPARATE | {"method"} | others


def test_sft_config_is_the_servers_finetune_config() -> None:
    assert drift(SFTConfig, FinetuneConfig, method_separate("sft")) == []


def test_dpo_config_is_the_servers_finetune_config_for_dpo() -> None:
    assert drift(DPOConfig, FinetuneConfig, method_separate("dpo")) == []


def test_grpo_config_is_the_servers_finetune_config_for_grpo() -> None:
    assert drift(GRPOConfig, FinetuneConfig, method_separate("grpo")) == []


def test_every_server_method_has_its_sdk_config() -> None:
    methods = get_args(FinetuneConfig.model_fields["method"].annotation)
    assert {name: config.method for name, config in CONFIGS.items()} == {m: m for m in methods}
    assert FinetuneConfig.model_fields["method"].default == "sft" == SFTConfig.method


def test_deployment_config_is_the_servers() -> None:
    assert drift(DeploymentConfig, ServerDeploymentConfig, DEPLOYMENT_SEPARATE) == []


def test_a_drift_is_named() -> None:
    class Drifted(BaseModel):
        model_config = {"extra": "forbid"}
        base_model: str
        rank: int = Field(default=8, ge=1, le=256)  # the server's default is 16
        epochs: int = Field(default=3, ge=1, le=50)  # the server's is 'auto' or 1..100

    problems = "\n".join(drift(Drifted, FinetuneConfig, method_separate("sft")))
    assert "rank: SDK default 8 != server default 16" in problems
    assert "epochs: SDK schema" in problems
    assert "learning_rate: the server's field is missing from Drifted" in problems


# Values at and past the bounds, and of the wrong type: the SDK and the server agree, naming the same field.
CASES = [
    ("epochs", 100), ("epochs", 101), ("epochs", 0), ("epochs", "auto"), ("epochs", "many"),
    ("rank", 256), ("rank", 257), ("rank", 0), ("learning_rate", 0), ("learning_rate", 1.0), ("learning_rate", 1.5),
    ("warmup_ratio", 1.0), ("lora_dropout", 0.99), ("seed", 2**32), ("seed", -1), ("effective_batch_size", 1025),
    ("max_seq_length", 15), ("eval_steps", None), ("eval_steps", 0), ("train_steps", 1_000_001),
    ("checkpoint_every", 0), ("checkpoint_every", "epoch"), ("checkpoint_every", 1_000_000), ("checkpoint_every", True),
    ("lr_scheduler", "step"), ("task", "classification"), ("early_stopping_patience", 101), ("bogus_field", 1),
]  # fmt: skip


def _refused_field(model: type[BaseModel], body: dict[str, Any]) -> str | None:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else exc.errors()[0]["msg"]
    return None


@pytest.mark.parametrize(("field", "value"), CASES)
def test_sdk_and_server_agree_on_values(field: str, value: object) -> None:
    body = {"base_model": "smollm2-135m", field: value}
    server = _refused_field(FinetuneConfig, body | {"dataset": "d", "repo": "r"})
    assert _refused_field(SFTConfig, body) == server, f"{field}={value!r}: the server answers {server}"


DPO_CASES = [
    ("beta", 0), ("beta", 10), ("beta", 10.5), ("beta", "auto"), ("adapter", "none"), ("task", "classification"),
    ("prompt_template", "Say {word}"), ("epochs", 101),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), DPO_CASES)
def test_dpo_sdk_and_server_agree_on_values(field: str, value: object) -> None:
    body = {"base_model": "smollm2-135m", field: value}
    server = _refused_field(FinetuneConfig, body | {"dataset": "d", "repo": "r", "method": "dpo"})
    sdk = _refused_field(DPOConfig, body)
    assert _named(sdk) == _named(server), f"{field}={value!r}: the server answers {server}, the SDK {sdk}"


def _named(refusal: str | None) -> str | None:
    """The field a refusal names: its location, or the field a whole-config error's message starts with."""
    return refusal.removeprefix("Value error, ").split(":")[0] if refusal else None


def test_a_dpo_field_is_refused_in_sft_config() -> None:
    assert _refused_field(SFTConfig, {"base_model": "smollm2-135m", "beta": 0.1}) == "beta"
    assert _refused_field(FinetuneConfig, {"base_model": "smollm2-135m", "dataset": "d", "repo": "r", "beta": 0.1})


@pytest.mark.parametrize(
    "body",
    [{"min_replicas": 2, "max_replicas": 1}, {"scale_up_threshold": 10_001}, {"cooldown_time": -1},
     {"description": "x" * 1001}, {"max_replicas": 0}, {"min_replicas": 1, "max_replicas": 3}, {"replicas": 2}],
)  # fmt: skip
def test_deployment_configs_agree(body: dict[str, Any]) -> None:
    ours = body | {"base_model": "smollm2-135m"}
    sdk_refused, server_refused = (
        _refused_field(DeploymentConfig, ours),
        _refused_field(ServerDeploymentConfig, ours | {"name": "d"}),
    )
    assert (sdk_refused is None) == (server_refused is None), (sdk_refused, server_refused)
