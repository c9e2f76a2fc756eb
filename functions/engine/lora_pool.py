"""Resident LoRA adapters in preallocated slots, and their deltas computed per segment of a mixed batch.

Layout (per layer, per fused group of projections, allocated the first time an adapter targets the group):

    A  [slots, n_modules * R, in]   the group's lora_A matrices stacked (rows of a missing module stay 0)
    B  [slots, out_j, R]            one per module j of the group

R is the engine's max rank; a smaller rank is zero-padded, which adds exact zeros and changes no sum.
A step's tokens are grouped into segments that share an adapter (Segments). Long segments (prefill chunks)
are computed from views of their slot, with no copy; single tokens of many adapters (decode) are computed in
one batched matmul over the distinct adapters of the step: read in place when their slots are consecutive,
else gathered once per step and layer (as Punica's and S-LoRA's kernels do), never per token. Adapters are never
merged into base weights.
"""

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from functions.adapter_check import LORA_KEY, WEIGHTS_FILE, Unservable, served_config
from functions.engine.heads import ClassifierHead
from functions.engine.protocol import EngineError

GROUPS = {  # fused group -> its projections, in the order llama.LlamaModel lays out their outputs
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {module: group for group, modules in GROUPS.items() for module in modules}  # what this engine serves
SHORT = 4  # segments up to this many tokens take the batched path
MAX_BANDS = 4  # more runs of consecutive slots than this: gather the matrices instead


@dataclass
class AdapterWeights:
    """One adapter read from disk: per (layer, module) its A [r, in] and B [out, r], and its scaling; for DoRA also
    each module's magnitude vector m [out]; for a classification adapter its head (heads.py)."""

    rank: int
    scale: float
    groups: set[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[tuple[int, str], torch.Tensor]
    head: ClassifierHead | None = None


@dataclass
class Band:
    """Short segments computed in one batched matmul: [n segments, m tokens each]."""

    slots: slice | torch.Tensor  # consecutive pool slots (read in place), or the slots to gather
    tokens: slice | torch.Tensor  # their token rows: consecutive (m == 1), or [n * m] indices (pads repeat one)
    count: int  # n
    width: int  # m
    mask: torch.Tensor | None  # [n, m, 1]: 1 for real tokens, 0 for pads (None when m == 1)


@dataclass
class Segments:
    """Which tokens of this step use which adapter slot."""

    long: list[tuple[int, int, int]]  # (slot, flat start, flat end): prefill chunks, big runs of one adapter
    bands: list[Band]

    @staticmethod
    def build(runs: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device) -> "Segments":
        """runs: (slot, start, length) for every run of tokens with an adapter, decode runs in slot order."""
        long = [(slot, start, start + n) for slot, start, n in runs if n > SHORT]
        short = [(slot, start, n) for slot, start, n in runs if n <= SHORT]
        if not short:
            return Segments(long, [])
        # Runs of consecutive slots (with one token each, side by side) are read straight from the pool.
        groups: list[list[tuple[int, int, int]]] = [[short[0]]]
        for run in short[1:]:
            slot, start, n = groups[-1][-1]
            if run[0] == slot + 1 and run[2] == n == 1 and run[1] == start + 1:
                groups[-1].append(run)
            else:
                groups.append([run])
        if len(groups) <= MAX_BANDS and all(g[0][2] == 1 for g in groups):
            bands = [Band(slice(g[0][0], g[-1][0] + 1), slice(g[0][1], g[-1][1] + 1), len(g), 1, None) for g in groups]
            return Segments(long, bands)
        width = max(n for _, _, n in short)
        tokens = [start + min(j, n - 1) for _, start, n in short for j in range(width)]
        mask = None
        if width > 1:
            mask = torch.tensor(
                [[[float(j < n)] for j in range(width)] for _, _, n in short], dtype=dtype, device=device
            )
        slots = torch.tensor([slot for slot, _, _ in short], device=device)
        return Segments(long, [Band(slots, torch.tensor(tokens, device=device), len(short), width, mask)])


def read_adapter(path: Path, base_model: str, ref_base_model: str, max_rank: int) -> dict:
    """Check an adapter's config against this engine before anything is loaded (functions/adapter_check.py).
    Returns the config."""
    try:
        return served_config(path, ref_base_model, base_model, max_rank, MODULE_GROUP)
    except Unservable as exc:
        raise EngineError(str(exc), "model") from None


def load_adapter(path: Path, config: dict, layer_count: int) -> AdapterWeights:
    from safetensors.torch import load_file

    files = [path / WEIGHTS_FILE]
    if not files[0].exists():
        raise EngineError("the adapter has no adapter_model.safetensors", "model")
    tensors = load_file(str(files[0]))
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None or match["module"] not in MODULE_GROUP or int(match["layer"]) >= layer_count:
            raise EngineError(f"this adapter cannot be served: unexpected weight {key!r}", "model")
        if not bool(torch.isfinite(tensor).all()):  # import refuses these too; files on the volume can still change
            raise EngineError(f"this adapter cannot be served: weight {key!r} is not finite (NaN or Inf)", "model")
        pairs.setdefault((int(match["layer"]), match["module"]), {})[match["half"][0]] = tensor  # "A", "B" or "m"
    weights = {where: (ab["A"], ab["B"]) for where, ab in pairs.items() if "A" in ab and "B" in ab}
    magnitudes = {where: ab["m"] for where, ab in pairs.items() if "m" in ab}
    return AdapterWeights(rank, scale, {MODULE_GROUP[m] for _, m in weights}, weights, magnitudes)


class LoraPool:
    def __init__(
        self,
        group_shapes: dict[str, tuple[int, list[tuple[str, int]]]],  # group -> (in, [(module, out)])
        layers: int,
        slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        base_weight: Callable[[int, str], torch.Tensor],  # (layer, module) -> its base weight [out, in]
    ) -> None:
        self.group_shapes, self.layers, self.slots, self.max_rank = group_shapes, layers, slots, max_rank
        self.base_weight = base_weight
        # DoRA: per group and layer, g = m / ||W + scaling * B A|| per output row [slots, out]; 1 elsewhere
        self.g: dict[str, list[torch.Tensor]] = {}
        self.dora = [False] * slots
        self.dtype, self.device = dtype, device
        self.a: dict[str, list[torch.Tensor]] = {}
        self.b: dict[str, list[list[torch.Tensor]]] = {}  # group -> layer -> per module
        self.columns: dict[str, list[tuple[int, int]]] = {}
        self.scale = torch.zeros(slots, 1, 1, dtype=dtype, device=device)
        self.scales = [0.0] * slots
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recently used first
        self.pins = [0] * slots
        self.heads: list[ClassifierHead | None] = [None] * slots  # each slot's classification head, if any

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
                for b_pool in self.b[group][layer]:
                    b_pool[slot].zero_()
        r = self.max_rank
        for (layer, module), (a, b) in adapter.weights.items():
            group = MODULE_GROUP[module]
            j = GROUPS[group].index(module)
            self.a[group][layer][slot, j * r : j * r + a.shape[0]] = a
            self.b[group][layer][j][slot, :, : b.shape[1]] = b
        self.scale[slot] = adapter.scale
        self.scales[slot] = adapter.scale
        self._install_magnitudes(slot, adapter)
        self.heads[slot] = adapter.head.to(self.device) if adapter.head is not None else None
        self.resident[key] = slot

    def _install_magnitudes(self, slot: int, adapter: AdapterWeights) -> None:
        for gs in self.g.values():
            for g in gs:
                g[slot] = 1.0
        self.dora[slot] = bool(adapter.magnitudes)
        for (layer, module), m in adapter.magnitudes.items():
            group = MODULE_GROUP[module]
            if group not in self.g:
                total = sum(out for _, out in self.group_shapes[group][1])
                self.g[group] = [
                    torch.ones(self.slots, total, dtype=self.dtype, device=self.device) for _ in range(self.layers)
                ]
            a, b = adapter.weights[(layer, module)]
            weight = self.base_weight(layer, module).float()
            norm = torch.linalg.norm(weight + adapter.scale * (b.float() @ a.float()), dim=1)  # as PEFT's DoRA
            lo, hi = self.columns[group][GROUPS[group].index(module)]
            self.g[group][layer][slot, lo:hi] = (m.float() / norm).to(self.dtype)

    def _allocate(self, group: str) -> None:
        if group in self.a:
            return
        inp, outs = self.group_shapes[group]
        width = len(outs) * self.max_rank

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        self.a[group] = [zeros(self.slots, width, inp) for _ in range(self.layers)]
        bounds = [0]
        for _, out in outs:
            bounds.append(bounds[-1] + out)
        self.columns[group] = list(itertools.pairwise(bounds))  # where each module's output sits in y
        self.b[group] = [[zeros(self.slots, out, self.max_rank) for _, out in outs] for _ in range(self.layers)]

    # ---- compute --------------------------------------------------------------------------------------

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, segments: Segments) -> None:
        """y[tokens of each segment] += B(A(x)) * scaling of the segment's adapter, in place.

        x: [T, in], y: [T, out] (the base projections' output for the whole batch, modules side by side)."""
        if group not in self.a:
            return
        a_pool, b_pools, r = self.a[group][layer], self.b[group][layer], self.max_rank
        x = x.to(self.dtype)  # the pools' dtype (fp32 on CPU): a no-op for fp32 engines
        columns = self.columns[group]
        g_pool = self.g[group][layer] if group in self.g else None
        for slot, start, end in segments.long:
            h = x[start:end] @ a_pool[slot].T  # [n, W]
            for j, (b_pool, (lo, hi)) in enumerate(zip(b_pools, columns, strict=True)):
                lora = h[:, j * r : (j + 1) * r] @ b_pool[slot].T
                if self.dora[slot] and g_pool is not None:  # PEFT's DoRA: (g - 1) * base + g * lora * scaling
                    mag = g_pool[slot, lo:hi]
                    base = y[start:end, lo:hi].to(self.dtype)
                    y[start:end, lo:hi] += ((mag - 1) * base + mag * lora * self.scales[slot]).to(y.dtype)
                else:
                    y[start:end, lo:hi] += (lora * self.scales[slot]).to(y.dtype)
        for band in segments.bands:
            n, m = band.count, band.width
            if isinstance(band.slots, slice):
                a, scale = a_pool[band.slots], self.scale[band.slots]  # in place: no copy
            else:
                a, scale = a_pool.index_select(0, band.slots), self.scale.index_select(0, band.slots)
            if isinstance(band.tokens, slice):
                xs = x[band.tokens].unsqueeze(1)  # [n, 1, in]
            else:
                xs = x.index_select(0, band.tokens).view(n, m, -1)
            h = torch.bmm(xs, a.transpose(1, 2))  # [n, m, W]
            if band.mask is not None:
                h = h * band.mask
            g = None
            if g_pool is not None and any(self.dora[s] for s in _slot_list(band.slots)):
                g = g_pool[band.slots] if isinstance(band.slots, slice) else g_pool.index_select(0, band.slots)
            for j, (b_pool, (lo, hi)) in enumerate(zip(b_pools, columns, strict=True)):
                b = b_pool[band.slots] if isinstance(band.slots, slice) else b_pool.index_select(0, band.slots)
                lora = torch.bmm(h[:, :, j * r : (j + 1) * r], b.transpose(1, 2))  # [n, m, out_j]
                if g is None:
                    delta = lora * scale
                else:  # DoRA in the band; g is 1 for the others, which leaves their sums unchanged
                    gj = g[:, None, lo:hi]
                    rows = y[band.tokens, lo:hi].to(self.dtype)
                    delta = (gj - 1) * rows.view(n, m, hi - lo) + gj * lora * scale
                    if band.mask is not None:
                        delta = delta * band.mask  # pads repeat a real token: they must add nothing to it
                delta = delta.to(y.dtype)
                if isinstance(band.tokens, slice):
                    y[band.tokens, lo:hi] += delta.view(n, hi - lo)
                else:
                    y[:, lo:hi].index_add_(0, band.tokens, delta.view(n * m, hi - lo))


def _slot_list(slots: slice | torch.Tensor) -> list[int]:
    return list(range(slots.start, slots.stop)) if isinstance(slots, slice) else slots.tolist()
