"""PEFT adapter checks: what an import accepts, and what an engine can serve from the files on the volume.

An adapter is served as plain LoRA on the base model's linear layers, by the native engine
(functions/engine/native.py) or by vLLM (functions/engine/vllm_engine.py). So an import is checked against exactly
what serving needs, from the files alone (nothing is loaded into a model): `adapter_config.json` says LORA without
variants that change the forward pass, holds only keys PEFT's LoraConfig knows, each of the type PEFT declares, with
a rank the engines serve and an alpha and dropout in range; every tensor in `adapter_model.safetensors` is a
lora_A/lora_B pair of a linear layer the base model has, with the shapes the base model's config implies, and finite
values. Pickled weights are refused outright.

The engines check again when an adapter is first requested (`served_config`), since what is on the volume was not
necessarily imported (training writes it) and a replica's limits may be lower than the import's: the same rule for
both engines, each passing its max rank and the linear layers it serves. A version trained here with a classification
head (task "classification") is the same LoRA plus the head's files (HEAD_FILE, HEAD_LABELS_FILE): the native engine
applies the head, vLLM refuses the adapter; imports carry no head.
"""

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import Invalid
from app.settings import get_settings
from functions.base_models import BaseModelUnavailable, ensure_local
from functions.catalog import ATTENTION_MODULES, get_model, linear_modules
from functions.finetune_config import FinetuneConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# A version trained with a classification head (task "classification", functions/classifier_head.py) holds these
# beside its LoRA: the head (`weight` [labels, hidden], `token_ids` [labels], each label's first token) and its
# labels in row order. Engines that apply the head read them (functions/engine/heads.py); others refuse the adapter.
HEAD_FILE = "classifier_head.safetensors"
HEAD_LABELS_FILE = "classifier_head.json"
HEAD_FILES = (HEAD_FILE, HEAD_LABELS_FILE)
# Formats whose loading unpickles, so merely loading one can run code of the uploader's choosing.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
FLOAT_DTYPES = ("F32", "F16", "BF16")
# The key PEFT writes for the LoRA of one linear layer, e.g.
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
# (and for DoRA, base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector)
LORA_KEY = re.compile(  # \Z, not $: "$" also matches before a final newline
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<module>\w+)"
    r"\.lora_(?P<half>A\.weight|B\.weight|magnitude_vector)\Z"
)
# LoraConfig fields that turn plain LoRA into something else; a served adapter must leave them unset.
VARIANT_FIELDS = {
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "activated LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters rather than linear layers (target_parameters)",
    "layer_replication": "layer replication",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "megatron_config": "Megatron parallel layers",
    "fan_in_fan_out": "transposed (Conv1D) weights",
}
# Fine-tuning's own bound on lora_alpha, so that whatever training made imports again after an export. With r >= 1
# it caps the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA) there; an alpha of 1e30 makes every output inf.
MAX_LORA_ALPHA = next(m.le for m in FinetuneConfig.model_fields["lora_alpha"].metadata if hasattr(m, "le"))
# PEFT annotates lora_alpha as int but uses it as a float scale, and adapters in the wild carry 16.0.
JSON_TYPE_OVERRIDES: dict[str, set[type]] = {"lora_alpha": {int, float}}
JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


class AdapterRejected(Invalid):
    """An upload that cannot become an adapter version. `field` names the form field, file or key at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field=field, code="invalid_adapter")


class Unservable(ValueError):
    """An adapter on the volume an engine cannot serve; the message says why (the engine reports it as its own
    refusal of the request)."""


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: list[str]
    adapter_type: str  # "lora"


def stored_config(path: Path) -> dict[str, Any]:
    """The adapter_config.json of an adapter on the volume (a version's or a checkpoint's directory)."""
    return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))


def stored_rank(path: Path) -> int:
    """The rank of an adapter on the volume (a version's or a checkpoint's directory), as the engines read it."""
    return int(stored_config(path)["r"])


# ---- serving ---------------------------------------------------------------------------------------------


def served_config(
    path: Path, adapter_base_model: str, base_model: str, max_rank: int, modules: Collection[str]
) -> dict[str, Any]:
    """The config of the adapter at `path` (trained on `adapter_base_model`) when an engine of `base_model` that
    serves ranks up to `max_rank` on the linear layers `modules` can serve it; raises Unservable otherwise."""
    if adapter_base_model != base_model:
        raise Unservable(f"the adapter was trained on {adapter_base_model!r}; this engine serves {base_model!r}")
    if not (path / CONFIG_FILE).exists():
        raise Unservable("the adapter's files are missing on the volume")
    config = stored_config(path)
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA is served)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank or alpha patterns")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}")
    if int(config.get("r", 0)) > max_rank:
        problems.append(f"rank {config['r']} (this engine's max_lora_rank is {max_rank})")
    targets = config.get("target_modules") or []
    if not isinstance(targets, str):  # a pattern over module paths: what it selects is the engine's to find out
        unknown = sorted(set(targets) - set(modules))
        if unknown:
            problems.append(f"target modules {unknown} (served: {sorted(modules)})")
    if problems:
        raise Unservable("this adapter cannot be served: " + "; ".join(problems))
    return config


# ---- importing -------------------------------------------------------------------------------------------


def check_peft_dir(path: Path, base_model: str) -> AdapterInfo:
    """Check that `path` holds a LoRA adapter the platform can serve on `base_model`; raise AdapterRejected
    naming the file and key at fault otherwise."""
    for found in sorted(p for p in path.rglob("*") if p.is_file()):
        if found.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterRejected(
                f"{found.name}: pickle-based files (.bin, .pt, .pth, .pkl, .ckpt) are refused, because loading one "
                f"can run arbitrary code; upload only {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(PEFT's save_pretrained writes safetensors by default)",
                found.name,
            )
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise AdapterRejected(
                f"{required.name}: missing; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}",
                required.name,
            )
    config = _uploaded_config(config_path)
    modules = _check_lora_config(config, base_model)
    rank, alpha = config["r"], config["lora_alpha"]
    base = _base_config(base_model)
    _check_tensors(weights_path, base, base_model, modules, rank, dora=bool(config.get("use_dora")))
    order = linear_modules(base_model)
    return AdapterInfo(
        rank=rank, alpha=float(alpha), target_modules=sorted(modules, key=order.index), adapter_type="lora"
    )


def _uploaded_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{CONFIG_FILE}: not valid JSON ({exc})", CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG_FILE}: expected a JSON object", CONFIG_FILE)
    return config


@functools.cache
def _lora_config_fields() -> dict[str, set[type] | None]:
    """Every key the installed PEFT's LoraConfig has, with the JSON types (as json.loads gives them) its annotation
    allows at the top level; None: any. Derived from PEFT rather than listed, so that an adapter this PEFT saved
    always passes. VARIANT_FIELDS of newer PEFT versions are known too: left unset (falsy), they are plain LoRA."""
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    fields: dict[str, set[type] | None] = dict.fromkeys(VARIANT_FIELDS)
    for field in dataclasses.fields(LoraConfig):
        fields[field.name] = JSON_TYPE_OVERRIDES.get(field.name) or _json_types(hints[field.name])
    return fields


def _json_types(annotation: Any) -> set[type]:
    """Optional[list[str]] -> {list, NoneType}; a str enum (PeftType) -> {str}; a nested config dataclass -> {dict}."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_json_types, typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(value) for value in typing.get_args(annotation)}
    kind = origin or annotation
    if kind is float:
        return {float, int}
    if kind in (list, tuple, set):
        return {list}
    if kind is dict or dataclasses.is_dataclass(kind):
        return {dict}
    if isinstance(kind, type) and issubclass(kind, str):
        return {str}
    return {kind}  # bool, int, NoneType


def _check_lora_config(config: dict[str, Any], base_model: str) -> set[str]:
    """The config's own checks; returns the target modules."""

    def reject(key: str, problem: str) -> AdapterRejected:
        return AdapterRejected(f"{CONFIG_FILE}: {key}: {problem}", CONFIG_FILE)

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise reject(
            "peft_type",
            f"{peft_type!r} is not accepted; the serving engine serves LoRA adapters only (peft_type 'LORA')",
        )
    # PEFT itself ignores keys it does not know; here one is refused, since what it was meant to change would
    # silently not happen in serving.
    known = _lora_config_fields()
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise reject(", ".join(unknown), f"not a LoraConfig field; the known fields are {sorted(known)}")
    for key, value in config.items():
        json_types = known[key]
        if json_types is not None and type(value) not in json_types:  # type(): True is no integer here
            expected = " or ".join(sorted({JSON_TYPE_NAMES[t] for t in json_types}))
            raise reject(key, f"expected {expected}, got {value!r}")
    for key, what in VARIANT_FIELDS.items():
        if config.get(key):  # unset, null, false, {} and [] all mean plain LoRA
            raise reject(key, f"{what} is not supported; the serving engine serves plain LoRA only")
    if config.get("bias", "none") != "none":
        raise reject("bias", f"{config['bias']!r} trains the base model's biases; only 'none' can be served")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise reject("task_type", f"{config['task_type']!r}; adapters are served for text generation (CAUSAL_LM)")
    # Types are checked above; these are the ranges (written so that NaN and infinity, which json.loads reads from
    # NaN and Infinity, fail them too) and the keys PEFT would default but an adapter must state.
    rank, max_rank = config.get("r"), get_settings().engine.max_lora_rank
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise reject(
            "r",
            f"the rank must be an integer from 1 to {max_rank} (the largest served, LORAPLEX_MAX_LORA_RANK), "
            f"got {rank!r}",
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise reject("lora_alpha", f"must be a number above 0 and at most {MAX_LORA_ALPHA}, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not 0 <= dropout < 1:
        raise reject("lora_dropout", f"must be at least 0 and below 1, got {dropout!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # PEFT reads a string as a regular expression over module paths
        raise reject("target_modules", f"a pattern ({targets!r}) is not accepted; list the module names")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise reject("target_modules", "expected a non-empty list of module names")
    allowed = linear_modules(base_model)
    unknown = sorted(set(targets) - set(allowed))
    if unknown:
        raise reject("target_modules", f"{unknown} not in {base_model}; its linear layers are {list(allowed)}")
    return set(targets)


def _base_config(base_model: str) -> Any:
    from transformers import AutoConfig

    try:
        get_model(base_model)
    except KeyError:
        raise AdapterRejected(f"base_model: unknown base model {base_model!r}", "base_model") from None
    try:
        config = AutoConfig.from_pretrained(ensure_local(base_model))
    except BaseModelUnavailable as exc:
        raise AdapterRejected(f"base_model: {exc}", "base_model") from None
    return config.get_text_config()


def _linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer a LoRA may wrap, from the base model's config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads  # Gemma's head_dim is not hidden / heads
    inter = config.intermediate_size
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "qkv_proj": (hidden, q + 2 * kv),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "gate_up_proj": (hidden, 2 * inter),
        "down_proj": (inter, hidden),
    }


def _check_tensors(path: Path, base: Any, base_model: str, modules: set[str], rank: int, dora: bool) -> None:
    import torch
    from safetensors import SafetensorError, safe_open

    shapes = _linear_shapes(base)
    layers = int(base.num_hidden_layers)
    halves: dict[tuple[int, str], set[str]] = {}

    def reject(key: str, problem: str) -> AdapterRejected:
        return AdapterRejected(f"{WEIGHTS_FILE}: tensor {key!r}: {problem}", WEIGHTS_FILE)

    try:
        # safe_open reads the JSON header and maps the file; a tensor's data is read once its name, dtype and shape
        # passed.
        with safe_open(path, framework="pt") as weights:
            keys = list(weights.keys())
            if not keys:
                raise AdapterRejected(f"{WEIGHTS_FILE}: holds no tensors", WEIGHTS_FILE)
            for key in keys:
                match = LORA_KEY.match(key)
                if match is None:
                    raise reject(
                        key,
                        "not the LoRA weight of a linear layer (expected "
                        "'base_model.model.model.layers.<n>.<self_attn|mlp>.<module>.lora_A|lora_B.weight')",
                    )
                layer, parent, module = int(match["layer"]), match["parent"], match["module"]
                half = match["half"][0]  # "A", "B" or "m"
                if half == "m" and not dora:
                    raise reject(key, "a DoRA magnitude vector, but adapter_config.json does not set use_dora")
                if module not in modules:
                    raise reject(key, f"module {module!r} is not among target_modules {sorted(modules)}")
                if parent != ("self_attn" if module in ATTENTION_MODULES else "mlp"):
                    raise reject(key, f"{base_model} has no {parent}.{module}")
                if layer >= layers:
                    raise reject(key, f"layer {layer} does not exist; {base_model} has {layers} layers")
                tensor = weights.get_slice(key)
                dtype, shape = tensor.get_dtype(), tuple(tensor.get_shape())
                if dtype not in FLOAT_DTYPES:
                    raise reject(key, f"dtype {dtype}; expected one of {list(FLOAT_DTYPES)}")
                in_features, out_features = shapes[module]
                want = {"A": (rank, in_features), "B": (out_features, rank), "m": (out_features,)}[half]
                if shape != want:
                    raise reject(
                        key,
                        f"shape {list(shape)}, expected {list(want)} for rank {rank} on {base_model} "
                        f"({module}: {in_features} -> {out_features}); was the adapter made for another model?",
                    )
                # One NaN or infinity makes the logits of every request in the engine's batch NaN, not only the
                # requests that use this adapter. The shapes are checked first, so this reads only bounded tensors.
                if not torch.isfinite(weights.get_tensor(key)).all():
                    raise reject(key, "holds NaN or infinite values; every weight must be finite")
                halves.setdefault((layer, module), set()).add(half)
    except SafetensorError as exc:
        raise AdapterRejected(f"{WEIGHTS_FILE}: not a readable safetensors file ({exc})", WEIGHTS_FILE) from None
    required = {"A", "B", "m"} if dora else {"A", "B"}
    names = {"A": "lora_A", "B": "lora_B", "m": "DoRA magnitude"}
    for (layer, module), found in sorted(halves.items()):
        if found != required:
            missing = " or ".join(names[h] for h in sorted(required - found))
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: layer {layer} {module} has no {missing} weight; LoRA needs both halves "
                "(and DoRA a magnitude vector)",
                WEIGHTS_FILE,
            )
