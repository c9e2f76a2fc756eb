"""Deterministic random LoRA adapters for the serving benchmarks, the same in every environment.

`make_adapters(dir, n)` writes n PEFT LoRA adapters (rank 8 on q/k/v/o by default) for SmolLM2 into
`dir/adapter-000`, `dir/adapter-001`, ...; adapter i's weights depend only on (seed, i, rank), so the vLLM
benchmark (.venv-vllm) and the native engine's benchmark (.venv) serve the same adapters. Adapters already on
disk are kept. Needs only torch, transformers and peft, given `base_model_dir`.
"""

from pathlib import Path

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(
    directory: Path, n: int, rank: int = 8, seed: int = 0, *, base_model_dir: Path | None = None
) -> list[Path]:
    """Paths of n adapters under `directory`, created if missing. base_model_dir: the base model (SmolLM2 from
    the volume when None, which needs Loraplex itself importable)."""
    directory = Path(directory)
    paths = [directory / f"adapter-{i:03d}" for i in range(n)]
    missing = [(i, p) for i, p in enumerate(paths) if not (p / "adapter_model.safetensors").exists()]
    if not missing:
        return paths

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if base_model_dir is None:
        from functions.base_models import ensure_local

        base_model_dir = ensure_local("smollm2-135m")
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES), lora_dropout=0.0)
    model = get_peft_model(base, config)
    for i, path in missing:
        randomize_lora(model, seed * 1_000_003 + i)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
    return paths


def randomize_lora(model: object, seed: int, scale: float = 0.05) -> None:
    """Give every LoRA A and B matrix random values (PEFT starts B at zero, which would leave the base unchanged).

    With lora_alpha = 2 * rank the update is 2 · B @ A; B ~ N(0, scale), A ~ N(0, 1/sqrt(in_features)) changes the
    outputs visibly without wrecking the model's text."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # type: ignore[attr-defined]
            if "lora_A" in name:  # [rank, in_features]
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:  # [out_features, rank]
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
