"""Whether to compute in bf16: one decision for training (functions/trainer.py) and serving
(functions/engine/native.py). It imports nothing from the trainer or the engines."""


def use_bf16(precision: str) -> bool:
    """bf16 when asked, or on "auto" where the hardware runs it natively (elsewhere it is slower than fp32)."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
