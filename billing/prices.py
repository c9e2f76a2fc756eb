"""The price table. Amounts are integers in micro-dollars (1 USD = 1_000_000 micro-USD).

Rounding: a charge is rounded UP to the next whole micro-dollar, once per usage record.
"""

from typing import Literal

MICRO_USD_PER_USD = 1_000_000
MILLION = 1_000_000
B = 1_000_000_000

Tier = Literal["up_to_16b", "16b_to_80b"]
Technique = Literal["lora", "turbo", "turbo_lora"]

# Fine-tuning, micro-USD per 1M tokens processed (dataset tokens x epochs), by technique and size tier.
FINETUNE_PER_MILLION: dict[Technique, dict[Tier, int]] = {
    "lora": {"up_to_16b": 500_000, "16b_to_80b": 3_000_000},  # $0.50 / $3.00
    "turbo": {"up_to_16b": 500_000, "16b_to_80b": 3_000_000},  # $0.50 / $3.00
    "turbo_lora": {"up_to_16b": 1_000_000, "16b_to_80b": 6_000_000},  # $1.00 / $6.00
}

# Shared-endpoint inference, micro-USD per 1M tokens (prompt + generated). Our own rates: the product
# documents give none beyond the free tier. $0.20 up to 16B, $0.90 up to 80B.
INFERENCE_PER_MILLION: dict[Tier, int] = {"up_to_16b": 200_000, "16b_to_80b": 900_000}


class PriceError(ValueError):
    pass


def tier(params: int) -> Tier:
    if params <= 0:
        raise PriceError(f"parameter count must be positive, got {params}")
    if params <= 16 * B:
        return "up_to_16b"
    if params <= 80 * B:
        return "16b_to_80b"
    raise PriceError(f"no price for models over 80B parameters ({params / B:.1f}B)")


def _charge(tokens: int, per_million: int) -> int:
    if tokens < 0:
        raise PriceError(f"token count must not be negative, got {tokens}")
    return -(-tokens * per_million // MILLION)  # ceiling division


def finetune_micro_usd(params: int, technique: str, tokens: int) -> int:
    """Price of fine-tuning on `tokens` tokens processed (dataset tokens x epochs)."""
    if technique not in FINETUNE_PER_MILLION:
        raise PriceError(f"unknown technique {technique!r}; one of {sorted(FINETUNE_PER_MILLION)}")
    return _charge(tokens, FINETUNE_PER_MILLION[technique][tier(params)])  # type: ignore[index]


def inference_micro_usd(params: int, tokens: int) -> int:
    return _charge(tokens, INFERENCE_PER_MILLION[tier(params)])


def usd(micro_usd: int) -> str:
    """Format for people: $0.000123 below a cent, $1.23 above."""
    dollars = micro_usd / MICRO_USD_PER_USD
    return f"${dollars:.6f}" if dollars < 0.01 else f"${dollars:,.2f}"
