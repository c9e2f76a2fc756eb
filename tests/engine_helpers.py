"""Small PEFT LoRAs on the tiny model, built here (no training), for the engine tests."""

from pathlib import Path

import torch


def build_adapter(base_dir: Path, seed: int, dest: Path, b_scale: float = 0.5) -> Path:
    """A LoRA with seeded random B matrices times `b_scale` (non-zero, so that it changes the output; a huge scale
    makes an adapter whose weights are finite but whose output overflows)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    model.save_pretrained(dest)
    return dest
