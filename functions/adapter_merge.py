"""Per-request adapter merging (LoRAX's `merged_adapters`): several LoRA adapters of one base model combined, with a
weight each, into one LoRA adapter, computed once per recipe, kept on the volume and served like any other adapter
(an AdapterRef to it, in the engine's mixed batch).

A request names the adapters as `model` names one ("repo/3", "repo/3@2", "repo": functions/model_targets.py), with
weights (default 1 each) and a method. Per layer and module, each half of the LoRA (every adapter's lora_A, then
every adapter's lora_B) is combined on its own, entry by entry, from the matrices X_i with weights v_i:

    linear       Σ v_i·X_i
    ties         each X_i keeps its `density` largest entries by magnitude (the rest are 0); each entry's sign is
                 elected ("total": the sign of Σ X_i; "frequency": the sign of Σ sign(X_i); 0 counts as +); the
                 weighted entries v_i·X_i of that sign are averaged (divided by how many there are, at least 1)
    dare_linear  each entry of X_i is kept with probability `density` and the kept ones are divided by `density`
                 (random pruning, DARE); then Σ v_i·X_i
    dare_ties    that random pruning, then ties' sign election and average

where, with w_i the request's weight and s_i the adapter's scale (alpha / r; alpha / sqrt(r) for rsLoRA), the weight
w_i·s_i is split between the halves: v_i = sign(w_i·s_i)·sqrt(|w_i·s_i|) on lora_A and sqrt(|w_i·s_i|) on lora_B.
The merged adapter has the adapters' rank r and alpha = r (scale 1), and targets the union of their modules; where
only some adapters target a module, only those are combined there. These are the definitions of PEFT's
`LoraModel.add_weighted_adapter` for the combination types of the same names, and the merge equals its result
(tests/functions/test_adapter_merge.py), with one difference: PEFT copies the first adapter's `use_rslora` into the
merged config while setting alpha = r, which for rsLoRA adapters scales the merge by sqrt(r); here the scale is
always 1, as the split above intends. Merging the halves is not merging the deltas (B·A of a linear merge is not
Σ w_i·s_i·B_i·A_i); PEFT's and LoRAX's methods are these, and they need one rank, so adapters of different ranks are
refused. DoRA adapters (whose magnitude vectors these methods do not define) and classification heads are refused.

DARE draws its random masks from a generator seeded by the recipe (Recipe.seed), in PEFT's order (layer by layer,
modules in the order a decoder layer runs them, lora_A of each adapter then lora_B of each), so a recipe has exactly
one result and the cache is well defined.

The cache: `volume.merged_adapter_dir(tenant, recipe hash)`, the hash over the adapters' stable keys (their rows,
AdapterRef.key), weights, method, density and sign method. A merge is written to a temporary directory beside it and
renamed into place; a rename never replaces a directory that exists, so concurrent requests for one recipe (in any
process) all serve the first complete copy and never a half-written one; within a process they also wait for one
computation rather than each computing it.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app import volume
from app.errors import Invalid, NotFound
from app.settings import get_settings
from functions.adapter_check import (
    CONFIG_FILE,
    HEAD_FILE,
    LORA_KEY,
    WEIGHTS_FILE,
    Unservable,
    served_config,
)
from functions.catalog import ATTENTION_MODULES, linear_modules
from functions.engine.protocol import AdapterRef
from functions.model_targets import resolve_model

if TYPE_CHECKING:
    import torch

log = logging.getLogger("loraplex.adapter_merge")

METHODS = ("linear", "ties", "dare_linear", "dare_ties")
TIES_METHODS = ("ties", "dare_ties")  # elect a sign per entry (majority_sign_method)
DARE_METHODS = ("dare_linear", "dare_ties")  # prune at random (density)
SIGN_METHODS = ("total", "frequency")
MAX_ADAPTERS = 8  # adapters in one merge: each is read whole into memory while it is computed
RECIPE_FILE = "merge_recipe.json"  # beside the PEFT files: what the merge was made of (never shown to users)
FORMAT = 1  # part of the recipe's hash: a change to the definitions above takes a new number
REQUEST_KEYS = ("ids", "weights", "merge_strategy", "density", "majority_sign_method")  # LoRAX's MergedAdapters


class MergeRefused(Invalid):
    """A merge the request cannot have; `field` names the request's field at fault ("merged_adapters.ids.1").
    The inference APIs answer it with a 400."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field=field, code="invalid_merge")


@dataclass(frozen=True)
class MergeSpec:
    """What a request asks to merge, checked (MergeSpec.from_request). `field` is where it sits in the request, for
    refusals: "merged_adapters" on the OpenAI routes, "parameters.merged_adapters" on LoRAX's."""

    ids: tuple[str, ...]  # adapters as `model` names them: "repo/3", "repo/3@2", "repo"
    weights: tuple[float, ...]  # one per id, finite; negative subtracts
    method: str = "linear"  # one of METHODS
    density: float | None = None  # (0, 1]: the fraction of entries kept; ties and DARE only (None: linear)
    majority_sign_method: str | None = None  # "total" | "frequency": ties methods only (None otherwise)
    field: str = "merged_adapters"

    @classmethod
    def from_request(cls, fields: Mapping[str, Any], field: str = "merged_adapters") -> "MergeSpec":
        """LoRAX's `merged_adapters` object ({"ids", "weights", "merge_strategy", "density",
        "majority_sign_method"}; a key set to None counts as absent), checked; MergeRefused names the key at fault.
        Defaults as LoRAX's: weights 1 each, merge_strategy "linear", majority_sign_method "total". A density is
        required by ties and DARE; linear prunes nothing, so it takes none, or 1 (which lorax-client always sends)."""
        unknown = sorted(set(fields) - set(REQUEST_KEYS))
        if unknown:
            raise MergeRefused(f"{field}.{unknown[0]}: not a field of {field}; its fields are {REQUEST_KEYS}", field)
        ids = _ids(fields.get("ids"), f"{field}.ids")
        weights = _weights(fields.get("weights"), len(ids), f"{field}.weights")
        method = fields.get("merge_strategy") or "linear"
        if method not in METHODS:
            raise MergeRefused(f"{field}.merge_strategy: one of {METHODS}, got {method!r}", f"{field}.merge_strategy")
        density = _density(fields.get("density"), method, f"{field}.density")
        sign = _sign_method(fields.get("majority_sign_method"), method, f"{field}.majority_sign_method")
        return cls(ids, weights, method, density, sign, field)

    @property
    def name(self) -> str:
        """What usage records and metrics call the merge: its adapters' names joined ("repo/1+other/2")."""
        return "+".join(self.ids)[:200]


@dataclass(frozen=True)
class Recipe:
    """What a merged adapter is made of, in stable terms: its hash names its directory and seeds DARE."""

    keys: tuple[str, ...]  # the adapters' stable keys (AdapterRef.key), in the request's order
    weights: tuple[float, ...]
    method: str
    density: float | None
    majority_sign_method: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "keys": list(self.keys),
            "weights": list(self.weights),
            "method": self.method,
            "density": self.density,
            "majority_sign_method": self.majority_sign_method,
        }

    @property
    def digest(self) -> str:
        """sha256 of the recipe's canonical JSON, hex (floats as Python's repr: exact)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def seed(self) -> int:
        """DARE's random masks' seed: the digest's first 8 bytes, within torch's signed 64-bit seeds."""
        return int(self.digest[:16], 16) & (2**63 - 1)


@dataclass
class MergeCounts:
    """This process's merges: `computed` counts the ones worked out (a cache hit computes nothing)."""

    computed: int = 0


counts = MergeCounts()
_LOCKS = [threading.Lock() for _ in range(64)]  # one per recipe hash bucket: requests for one recipe wait for one


def merged_ref(session: Session, tenant_id: str, spec: MergeSpec, base_model: str | None = None) -> AdapterRef:
    """The tenant's merge of `spec`'s adapters, computed on first use and cached on the volume by its recipe, as an
    AdapterRef that any engine of the adapters' base model serves. `base_model`: the base model the request is for
    (the OpenAI routes' `model`); None takes the adapters' own. Raises MergeRefused (naming the field) for an
    unknown adapter, one that is not LoRA, of another base model, or of another rank. Blocking (reads, and may
    compute and write, the adapters' files): call it from a worker thread in async code."""
    sources = _resolve(session, tenant_id, spec, base_model)
    _check_compatible(sources, spec)
    keys = tuple(source.ref.key for source in sources)
    recipe = Recipe(keys, spec.weights, spec.method, spec.density, spec.majority_sign_method)
    final = volume.merged_adapter_dir(tenant_id, recipe.digest)
    if not final.is_dir():
        with _LOCKS[int(recipe.digest[:8], 16) % len(_LOCKS)]:
            if not final.is_dir():  # another request of this process may have written it while this one waited
                _write(final, sources, spec, recipe)
    return AdapterRef(f"merge-{recipe.digest}", final, sources[0].ref.base_model)


# ---- checking a request --------------------------------------------------------------------------------------


def _ids(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(i, str) and i for i in value):
        raise MergeRefused(f"{field}: a list of adapter names ('repo/1', 'repo/1@2', 'repo')", field)
    if not 2 <= len(value) <= MAX_ADAPTERS:
        raise MergeRefused(f"{field}: from 2 to {MAX_ADAPTERS} adapters to merge, got {len(value)}", field)
    for i, name in enumerate(value):
        if name in value[:i]:
            raise MergeRefused(f"{field}.{i}: {name!r} is named twice; give it one weight", f"{field}.{i}")
    return tuple(value)


def _weights(value: Any, count: int, field: str) -> tuple[float, ...]:
    if value is None:
        return (1.0,) * count
    if not isinstance(value, list | tuple) or len(value) != count:
        got = len(value) if isinstance(value, list | tuple) else type(value).__name__
        raise MergeRefused(f"{field}: one weight per adapter in ids ({count}), got {got}", field)
    for i, weight in enumerate(value):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise MergeRefused(f"{field}.{i}: a finite number, got {weight!r}", f"{field}.{i}")
    return tuple(float(w) for w in value)


def _density(value: Any, method: str, field: str) -> float | None:
    if method == "linear":
        if value is not None and value != 1:
            raise MergeRefused(f"{field}: linear merging prunes nothing; density applies to {METHODS[1:]}", field)
        return None
    if value is None:
        raise MergeRefused(f"{field}: {method} needs a density, the fraction of weights kept, in (0, 1]", field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise MergeRefused(f"{field}: the fraction of weights kept, above 0 and at most 1, got {value!r}", field)
    return float(value)


def _sign_method(value: Any, method: str, field: str) -> str | None:
    if method not in TIES_METHODS:
        if value is not None:
            raise MergeRefused(f"{field}: only {TIES_METHODS} elect a sign; {method} takes none", field)
        return None
    if value is None:
        return "total"
    if value not in SIGN_METHODS:
        raise MergeRefused(f"{field}: one of {SIGN_METHODS}, got {value!r}", field)
    return str(value)


# ---- the adapters ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One adapter of a merge, read and checked."""

    ref: AdapterRef
    config: dict[str, Any]  # its adapter_config.json
    field: str  # its place in the request: "merged_adapters.ids.1"

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        """The LoRA scale PEFT applies: alpha / r, or alpha / sqrt(r) for rsLoRA (a Python float, as PEFT's)."""
        alpha = self.config.get("lora_alpha", self.rank)
        return alpha / math.sqrt(self.rank) if self.config.get("use_rslora") else alpha / self.rank


def _resolve(session: Session, tenant_id: str, spec: MergeSpec, base_model: str | None) -> list[_Source]:
    """Each id as `model` resolves it; each must be a LoRA adapter an engine of the base model serves."""
    sources: list[_Source] = []
    for i, name in enumerate(spec.ids):
        field = f"{spec.field}.ids.{i}"
        try:
            target = resolve_model(session, tenant_id, name)
        except NotFound:  # another tenant's reads the same
            raise MergeRefused(f"{field}: the model {name!r} does not exist", field) from None
        if target.adapter is None:
            raise MergeRefused(f"{field}: {name!r} is not a LoRA adapter; only LoRA adapters are merged", field)
        want = base_model or (sources[0].ref.base_model if sources else target.base_model)
        if target.base_model != want:
            raise MergeRefused(
                f"{field}: {name!r} is an adapter of {target.base_model!r}; the merge is of {want!r} "
                "(adapters of one base model only)",
                field,
            )
        sources.append(_Source(target.adapter, _servable_config(target.adapter, field), field))
    return sources


def _servable_config(ref: AdapterRef, field: str) -> dict[str, Any]:
    """The adapter's config when an engine could serve it as it is and it is plain LoRA; MergeRefused otherwise."""
    try:
        config = served_config(
            ref.path,
            ref.base_model,
            ref.base_model,
            get_settings().engine.max_lora_rank,
            linear_modules(ref.base_model),
        )
    except Unservable as exc:
        raise MergeRefused(f"{field}: {exc}", field) from None
    if config.get("use_dora"):
        raise MergeRefused(f"{field}: a DoRA adapter; these methods merge plain LoRA only", field)
    if (ref.path / HEAD_FILE).exists():
        raise MergeRefused(f"{field}: it has a classification head, which cannot be merged", field)
    if isinstance(config.get("target_modules"), str):
        raise MergeRefused(f"{field}: its target_modules is a pattern; only listed modules are merged", field)
    return config


def _check_compatible(sources: list[_Source], spec: MergeSpec) -> None:
    """linear, ties and DARE combine the matrices entry by entry: one rank for all (PEFT's rule too)."""
    first = sources[0]
    for source in sources[1:]:
        if source.rank != first.rank:
            raise MergeRefused(
                f"{source.field}: rank {source.rank}, but {spec.ids[0]!r} has rank {first.rank}; {spec.method} "
                "merges the LoRA matrices entry by entry, so every adapter must have the same rank",
                source.field,
            )


# ---- computing and caching -------------------------------------------------------------------------------------


def _write(final: Path, sources: list[_Source], spec: MergeSpec, recipe: Recipe) -> None:
    """Compute the merge into a temporary directory beside `final` and rename it there, unless another writer's
    complete copy got there first (a rename onto an existing directory fails: theirs stays, ours is removed)."""
    from safetensors.torch import save_file

    started = time.monotonic()
    tensors = merge_tensors(sources, spec, recipe.seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(_merged_config(sources), indent=2), encoding="utf-8")
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe.as_dict() | {"seed": recipe.seed}, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    volume.durable_write_done()
    counts.computed += 1
    log.info("merged %d adapters (%s) in %.0f ms", len(sources), spec.method, (time.monotonic() - started) * 1000)


def merge_tensors(sources: list[_Source], spec: MergeSpec, seed: int) -> dict[str, "torch.Tensor"]:
    """The merged adapter's lora_A and lora_B of every (layer, module) any source has, by the definitions in the
    module's docstring, in fp32, keyed as PEFT saves them."""
    import torch
    from safetensors.torch import load_file

    halves: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = {}  # (layer, module) -> source -> A, B
    for i, source in enumerate(sources):
        for key, tensor in load_file(str(source.ref.path / WEIGHTS_FILE)).items():
            match = LORA_KEY.match(key)
            if match is not None and match["half"] in ("A.weight", "B.weight"):
                where = (int(match["layer"]), match["module"])
                halves.setdefault(where, {}).setdefault(i, {})[match["half"][0]] = tensor.float()
    order = linear_modules(sources[0].ref.base_model)
    generator = torch.Generator().manual_seed(seed)  # DARE's masks, drawn in PEFT's order: layers, modules, A, B
    merged: dict[str, torch.Tensor] = {}
    for layer, module in sorted(halves, key=lambda where: (where[0], order.index(where[1]))):
        present = sorted(i for i, ab in halves[(layer, module)].items() if set(ab) == {"A", "B"})
        if not present:
            continue
        scaled = [spec.weights[i] * sources[i].scale for i in present]  # w_i·s_i, split between A and B
        roots = [math.sqrt(abs(x)) for x in scaled]
        a_weights = torch.tensor([r if x >= 0 else -r for r, x in zip(roots, scaled, strict=True)])
        b_weights = torch.tensor(roots)
        prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}"
        for half, weights in (("A", a_weights), ("B", b_weights)):
            combined = _combine([halves[(layer, module)][i][half] for i in present], weights, spec, generator)
            if not bool(torch.isfinite(combined).all()):
                field = f"{spec.field}.weights"
                raise MergeRefused(f"{field}: the merge overflows (its layer {layer} {module} is not finite)", field)
            merged[f"{prefix}.{module}.lora_{half}.weight"] = combined.contiguous()
    return merged


def _combine(
    matrices: list["torch.Tensor"], weights: "torch.Tensor", spec: MergeSpec, generator: "torch.Generator"
) -> "torch.Tensor":
    """One half ([r, in] lora_A or [out, r] lora_B) of one module, from each present adapter's, with weights [n]."""
    import torch

    density = spec.density
    if density is not None and density < 1:  # density 1 keeps everything (and draws nothing)
        if spec.method in DARE_METHODS:
            matrices = [
                m * torch.bernoulli(torch.full_like(m, density), generator=generator) / density for m in matrices
            ]
        else:
            matrices = [_keep_largest(m, density) for m in matrices]
    stacked = torch.stack(matrices)  # [n, *shape]
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if spec.method not in TIES_METHODS:
        return weighted.sum(dim=0)
    # The sign of each entry's majority (0 counts as +), and the weighted entries that share it, averaged.
    votes = stacked.sum(dim=0) if spec.majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)  # [n, *shape]; a pruned 0 agrees with nothing
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _keep_largest(matrix: "torch.Tensor", density: float) -> "torch.Tensor":
    """The matrix with all but its int(density · size) largest entries by magnitude set to 0."""
    import torch

    keep = torch.zeros(matrix.numel(), dtype=matrix.dtype)
    keep[torch.topk(matrix.abs().reshape(-1), k=int(density * matrix.numel())).indices] = 1
    return matrix * keep.reshape(matrix.shape)


def _merged_config(sources: list[_Source]) -> dict[str, Any]:
    """The first adapter's config with the merge's rank, alpha = rank (scale 1) and the union of target modules."""
    order = linear_modules(sources[0].ref.base_model)
    modules = {module for source in sources for module in source.config["target_modules"]}
    rank = sources[0].rank
    return sources[0].config | {
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": sorted(modules, key=order.index),
        "rank_pattern": {},
        "alpha_pattern": {},
    }
