"""Small PEFT LoRAs built here (no training), for the engine, import and deployment tests."""

from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def build_lora(base: Any, dest: Path, seed: int = 7, b_scale: float = 0.5, **config: Any) -> Path:
    """A LoRA on `base` (a model directory, or a model) with seeded random lora_B times `b_scale` (zero at init), so
    that it really changes the output; a huge `b_scale` makes an adapter whose weights are finite but whose output
    overflows. `config`: LoraConfig fields over r=4, alpha 8, no dropout, TARGETS."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if isinstance(base, Path):
        base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS} | config
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    model.save_pretrained(dest)  # adapter_config.json, adapter_model.safetensors, README.md
    return dest
