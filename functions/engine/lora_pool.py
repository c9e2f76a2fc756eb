"""Resident LoRA adapters in preallocated slots, and their deltas computed per segment of a mixed batch.

Layout (per layer, per fused group of projections, allocated the first time an adapter targets the group):

    A  [slots, n_modules * R, in]     the group's lora_A matrices stacked (rows of a missing module stay 0)
    B  [slots, out_total, n_modules * R]  block-diagonal: module j's lora_B in rows of its output, columns of its A

R is the engine's max rank; a smaller rank is zero-padded, which adds exact zeros and changes no sum.
A step's tokens are grouped into segments that share an adapter (Segments). Long segments (prefill chunks)
are computed from views of their slot, with no copy; single tokens of many adapters (decode) are computed in
one batched matmul over the distinct adapters of the step, gathering each adapter's matrices once per step and
layer (as Punica's and S-LoRA's kernels do), never per token. Adapters are never merged into base weights.
"""

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from functions.engine.protocol import EngineError

GROUPS = {  # fused group -> its projections, in the order llama.LlamaModel lays out their outputs
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {module: group for group, modules in GROUPS.items() for module in modules}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
SHORT = 4  # segments up to this many tokens take the batched path


@dataclass
class AdapterWeights:
    """One adapter read from disk: per (layer, module) its A [r, in] and B [out, r], and its scaling."""

    rank: int
    scale: float
    groups: set[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Segments:
    """Which tokens of this step use which adapter slot."""

    long: list[tuple[int, int, int]]  # (slot, flat start, flat end)
    short_tokens: torch.Tensor | None  # [n * m] flat token index of each (segment, position); pads repeat one
    short_slots: torch.Tensor | None  # [n] slot of each short segment
    short_mask: torch.Tensor | None  # [n, m, 1] 1 for real tokens, 0 for pads (None when m == 1)
    short_width: int = 1  # m

    @staticmethod
    def build(runs: list[tuple[int, int, int]], device: torch.device) -> "Segments":
        """runs: (slot, start, length) for every run of tokens with an adapter."""
        long = [(slot, start, start + n) for slot, start, n in runs if n > SHORT]
        short = [(slot, start, n) for slot, start, n in runs if n <= SHORT]
        if not short:
            return Segments(long, None, None, None)
        width = max(n for _, _, n in short)
        tokens = [start + min(j, n - 1) for _, start, n in short for j in range(width)]
        mask = None
        if width > 1:
            mask = torch.tensor([[[float(j < n)] for j in range(width)] for _, _, n in short], device=device)
        return Segments(
            long,
            torch.tensor(tokens, device=device),
            torch.tensor([slot for slot, _, _ in short], device=device),
            mask,
            width,
        )


def read_adapter(path: Path, base_model: str, ref_base_model: str, layer_count: int, max_rank: int) -> dict:
    """Check an adapter's config against this engine before anything is loaded. Returns the config."""
    config_file = path / "adapter_config.json"
    if ref_base_model != base_model:
        raise EngineError(f"the adapter was trained on {ref_base_model!r}; this engine serves {base_model!r}", "model")
    if not config_file.exists():
        raise EngineError("the adapter's files are missing on the volume", "model")
    config = json.loads(config_file.read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA is served)")
    if config.get("use_dora"):
        problems.append("DoRA (its magnitude vectors change the base weights' norms)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank or alpha patterns")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}")
    if int(config.get("r", 0)) > max_rank:
        problems.append(f"rank {config['r']} (this engine's max_lora_rank is {max_rank})")
    targets = config.get("target_modules") or []
    unknown = sorted(set([targets] if isinstance(targets, str) else targets) - set(MODULE_GROUP))
    if unknown and not isinstance(targets, str):
        problems.append(f"target modules {unknown} (served: {sorted(MODULE_GROUP)})")
    if problems:
        raise EngineError("this adapter cannot be served: " + "; ".join(problems), "model")
    return config


def load_adapter(path: Path, config: dict, layer_count: int) -> AdapterWeights:
    from safetensors.torch import load_file

    files = [path / "adapter_model.safetensors"]
    if not files[0].exists():
        raise EngineError("the adapter has no adapter_model.safetensors", "model")
    tensors = load_file(str(files[0]))
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match[2] not in MODULE_GROUP or int(match[1]) >= layer_count:
            raise EngineError(f"this adapter cannot be served: unexpected weight {key!r}", "model")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    weights = {where: (ab["A"], ab["B"]) for where, ab in pairs.items() if "A" in ab and "B" in ab}
    return AdapterWeights(rank, scale, {MODULE_GROUP[m] for _, m in weights}, weights)


class LoraPool:
    def __init__(
        self,
        group_shapes: dict[str, tuple[int, list[tuple[str, int]]]],  # group -> (in, [(module, out)])
        layers: int,
        slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.group_shapes, self.layers, self.slots, self.max_rank = group_shapes, layers, slots, max_rank
        self.dtype, self.device = dtype, device
        self.a: dict[str, list[torch.Tensor]] = {}
        self.b: dict[str, list[torch.Tensor]] = {}
        self.scale = torch.zeros(slots, 1, 1, dtype=dtype, device=device)
        self.scales = [0.0] * slots
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recently used first
        self.pins = [0] * slots

    # ---- residency ------------------------------------------------------------------------------------

    def slot_of(self, key: str) -> int | None:
        slot = self.resident.get(key)
        if slot is not None:
            self.resident.move_to_end(key)
        return slot

    def free_slot(self) -> int | None:
        """A slot never used, else the least recently used one that no running request holds."""
        used = set(self.resident.values())
        for slot in range(self.slots):
            if slot not in used:
                return slot
        for key, slot in self.resident.items():
            if self.pins[slot] == 0:
                del self.resident[key]
                return slot
        return None

    def install(self, key: str, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter's matrices into a slot (between steps; a few ms)."""
        for group in adapter.groups:
            self._allocate(group)
        for group in self.a:
            for layer in range(self.layers):
                self.a[group][layer][slot].zero_()
                self.b[group][layer][slot].zero_()
        r = self.max_rank
        for (layer, module), (a, b) in adapter.weights.items():
            group = MODULE_GROUP[module]
            j = GROUPS[group].index(module)
            row = sum(out for _, out in self.group_shapes[group][1][:j])
            out = b.shape[0]
            self.a[group][layer][slot, j * r : j * r + a.shape[0]] = a
            self.b[group][layer][slot, row : row + out, j * r : j * r + b.shape[1]] = b
        self.scale[slot] = adapter.scale
        self.scales[slot] = adapter.scale
        self.resident[key] = slot

    def _allocate(self, group: str) -> None:
        if group in self.a:
            return
        inp, outs = self.group_shapes[group]
        width = len(outs) * self.max_rank
        total = sum(out for _, out in outs)
        self.a[group] = [
            torch.zeros(self.slots, width, inp, dtype=self.dtype, device=self.device) for _ in range(self.layers)
        ]
        self.b[group] = [
            torch.zeros(self.slots, total, width, dtype=self.dtype, device=self.device) for _ in range(self.layers)
        ]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pools in (self.a, self.b) for ts in pools.values() for t in ts)

    # ---- compute --------------------------------------------------------------------------------------

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, segments: Segments) -> None:
        """y[tokens of each segment] += B(A(x)) * scaling of the segment's adapter, in place.

        x: [T, in], y: [T, out] (the base projection's output for the whole batch)."""
        if group not in self.a:
            return
        a_pool, b_pool = self.a[group][layer], self.b[group][layer]
        for slot, start, end in segments.long:
            y[start:end] += ((x[start:end] @ a_pool[slot].T) @ b_pool[slot].T) * self.scales[slot]
        if segments.short_tokens is None:
            return
        n, m = segments.short_slots.shape[0], segments.short_width  # type: ignore[union-attr]
        xs = x.index_select(0, segments.short_tokens).view(n, m, -1)  # [n, m, in]
        a = a_pool.index_select(0, segments.short_slots)  # [n, W, in]: once per segment, not per token
        b = b_pool.index_select(0, segments.short_slots)  # [n, out, W]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # [n, m, out]
        delta = delta * self.scale.index_select(0, segments.short_slots)
        if segments.short_mask is not None:
            delta = delta * segments.short_mask
        y.index_add_(0, segments.short_tokens, delta.view(n * m, -1))
