"""The GPUs a job or a deployment may run on: how much memory each has, how much a model needs on one, and which
one a fine-tuning job trains on.

Names are the deployments' (a10g, l40s, a100-80gb, h100); the Modal app turns them into Modal's GPU types. Memory is
counted in GiB (2**30 bytes), the unit the cards are sold in (an "80 GB" A100 has 80 GiB). The estimates are
deliberately simple: the weights' bytes from the catalog's parameter count and the dtype they are held in, plus a
stated margin; they exist to refuse a request that cannot work before anything is created or billed, not to pack a
GPU to its last byte.

Everything here runs on one GPU: the trainer and the engines do not split a model across GPUs, so a model whose
weights outgrow the largest card (a 70B model in bf16 is 131 GiB) is refused rather than started to fail.
"""

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.models import Event, FinetuneJob
from app.settings import get_settings
from billing.prices import PriceError, Tier, tier
from functions.catalog import get_model

GIB = 2**30
# GPU memory per accelerator, GiB, cheapest first where two hold the same (billing/prices.py prices a100-80gb below
# h100, which is on enterprise terms).
GPU_MEMORY_GIB: dict[str, int] = {"a10g": 24, "l40s": 48, "a100-80gb": 80, "h100": 80}
GPUS = tuple(GPU_MEMORY_GIB)

# Serving: the KV cache and activations of a batch of requests take 20% of the weights' size on top of them, and
# the CUDA context, the kernels' workspace and the adapters' LoRA slots a fixed 2 GiB.
SERVING_MARGIN = 0.20
SERVING_FIXED_GIB = 2.0
# Training a LoRA: the frozen weights, plus 30% of their size for a micro-batch's activations at max_seq_length and
# the LoRA weights with their fp32 AdamW state, plus 4 GiB for the CUDA context and the trainer's workspace. Full
# fine-tuning keeps fp32 weights, their gradients and AdamW's two moments: 16 bytes a parameter, plus the same 4 GiB
# (activations are checkpointed on a GPU, functions/trainer.py).
TRAINING_MARGIN = 0.30
TRAINING_FIXED_GIB = 4.0
FULL_FINETUNE_BYTES_PER_PARAM = 16
# The first GPU a training job of each price tier (billing/prices.py) is given; a job that needs more memory gets
# the next larger GPU that holds it.
TRAINING_GPU_BY_TIER: dict[Tier, str] = {"up_to_16b": "a10g", "16b_to_80b": "a100-80gb"}


@dataclass(frozen=True)
class Need:
    """What a model needs on one GPU, GiB, and what the figure is made of (said in refusals)."""

    gib: float
    what: str  # "llama-3-1-8b-instruct served in bf16 (15.0 GiB of weights + 20% + 2 GiB)"


def serving_need(base_model: str) -> Need:
    """Memory to serve `base_model` on one GPU, in the dtype the engines serve in (LORAPLEX_ENGINE_DTYPE: auto is
    bf16 on every GPU offered, as all of them compute in bf16)."""
    dtype = "fp32" if get_settings().engine.engine_dtype == "fp32" else "bf16"
    weights = get_model(base_model).params * (4 if dtype == "fp32" else 2) / GIB
    gib = weights * (1 + SERVING_MARGIN) + SERVING_FIXED_GIB
    return Need(
        gib,
        f"{base_model} served in {dtype} ({weights:.1f} GiB of weights + {SERVING_MARGIN:.0%} for the KV cache and "
        f"activations + {SERVING_FIXED_GIB:g} GiB)",
    )


def training_need(base_model: str, kind: str) -> Need:
    """Memory to fine-tune `base_model` on one GPU; `kind` is 'lora' or 'full' (FinetuneConfig.kind)."""
    params = get_model(base_model).params
    if kind == "full":
        state = params * FULL_FINETUNE_BYTES_PER_PARAM / GIB
        return Need(
            state + TRAINING_FIXED_GIB,
            f"full fine-tuning of {base_model} ({state:.1f} GiB of fp32 weights, gradients and AdamW state + "
            f"{TRAINING_FIXED_GIB:g} GiB)",
        )
    dtype = "fp32" if get_settings().training.train_precision == "fp32" else "bf16"
    weights = params * (4 if dtype == "fp32" else 2) / GIB
    return Need(
        weights * (1 + TRAINING_MARGIN) + TRAINING_FIXED_GIB,
        f"LoRA training of {base_model} on {dtype} weights ({weights:.1f} GiB + {TRAINING_MARGIN:.0%} for "
        f"activations and the adapter's optimizer state + {TRAINING_FIXED_GIB:g} GiB)",
    )


def fits(need: Need, gpu: str) -> bool:
    return need.gib <= GPU_MEMORY_GIB[gpu]


def smallest_fitting(need: Need, starting_at: str = GPUS[0]) -> str | None:
    """The first GPU from `starting_at` on (by memory) that holds `need`; None when not even the largest does."""
    candidates = GPUS[GPUS.index(starting_at) :]
    return next((gpu for gpu in candidates if fits(need, gpu)), None)


def misfit(need: Need, gpu: str | None = None) -> str:
    """Why `gpu` (without one: every GPU) cannot hold `need`, and what would, for a refusal's message."""
    larger = smallest_fitting(need)
    advice = (
        f"choose {larger} ({GPU_MEMORY_GIB[larger]} GiB)"
        if larger
        else f"no single GPU offered holds it (the largest has {max(GPU_MEMORY_GIB.values())} GiB, and a model is "
        "not split across GPUs)"
    )
    where = f"; {gpu} has {GPU_MEMORY_GIB[gpu]} GiB" if gpu else ""
    return f"{need.what} needs about {need.gib:.1f} GiB{where}: {advice}"


def training_gpu(base_model: str, kind: str, accelerator: str | None) -> str | None:
    """The GPU a job trains on: the one it names, else the first of its size tier's that holds it (None: none does)."""
    if accelerator is not None:
        return accelerator
    try:
        first = TRAINING_GPU_BY_TIER[tier(get_model(base_model).params)]
    except PriceError:  # beyond the price table (over 80B): start at the largest, which refuses it
        first = GPUS[-1]
    return smallest_fitting(training_need(base_model, kind), first)


def training_gpu_of_event(session: Session, event_id: str) -> str | None:
    """The GPU for a 'finetune.requested' event's job, as the job was accepted; None when the event or its job is
    not there (the caller's default GPU then runs it, and the handler finds nothing to do)."""
    event = session.get(Event, event_id)
    job = session.get(FinetuneJob, event.subject_id) if event is not None else None
    if job is None:
        return None
    kind = "full" if job.config.get("adapter") == "none" else "lora"
    return training_gpu(job.base_model, kind, job.config.get("accelerator"))
