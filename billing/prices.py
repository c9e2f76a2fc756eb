"""The price table, as data. Amounts are integers in micro-dollars (1 USD = 1_000_000 micro-USD).

Rounding: each usage record is priced once and rounded UP to the next whole micro-dollar (never down, so the
sum of records is never below the sum of exact prices by more than one micro-dollar per record).
Enterprise tenants get a PriceBook built from their overrides (BillingAccount.prices).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

MICRO_USD_PER_USD = 1_000_000
MILLION = 1_000_000
B = 1_000_000_000
SECONDS_PER_HOUR = 3600

Tier = Literal["up_to_16b", "16b_to_80b"]
RftTier = Literal["up_to_16b", "16b_to_32b"]


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


def rft_tier(params: int) -> RftTier:
    if 0 < params <= 16 * B:
        return "up_to_16b"
    if 16 * B < params <= 32 * B:
        return "16b_to_32b"
    raise PriceError(f"reinforcement fine-tuning is offered up to 32B parameters ({params / B:.1f}B)")


def _charge(quantity: int, rate: int, per: int) -> int:
    """ceil(quantity x rate / per), in integers."""
    if quantity < 0:
        raise PriceError(f"quantity must not be negative, got {quantity}")
    return -(-quantity * rate // per)


@dataclass(frozen=True)
class PriceBook:
    # Fine-tuning (SFT and continued pretraining), micro-USD per 1M tokens processed (dataset tokens x epochs).
    finetune_per_million: Mapping[str, Mapping[Tier, int]] = field(
        default_factory=lambda: {
            "lora": {"up_to_16b": 500_000, "16b_to_80b": 3_000_000},  # $0.50 / $3.00
            "turbo": {"up_to_16b": 500_000, "16b_to_80b": 3_000_000},  # $0.50 / $3.00
            "turbo_lora": {"up_to_16b": 1_000_000, "16b_to_80b": 6_000_000},  # $1.00 / $6.00
            # Full fine-tuning (adapter "none"): our rate, that of Turbo LoRA; the product documents give none.
            "full": {"up_to_16b": 1_000_000, "16b_to_80b": 6_000_000},  # $1.00 / $6.00
        }
    )
    # Reinforcement fine-tuning (GRPO, LoRA), micro-USD per 1M tokens: $10 up to 16B, $20 up to 32B.
    rft_per_million: Mapping[RftTier, int] = field(
        default_factory=lambda: {"up_to_16b": 10_000_000, "16b_to_32b": 20_000_000}
    )
    # Shared-endpoint inference beyond the free tier, micro-USD per 1M tokens (prompt + generated). Our own
    # rates (the product documents give none): $0.20 up to 16B, $0.90 up to 80B.
    inference_per_million: Mapping[Tier, int] = field(
        default_factory=lambda: {"up_to_16b": 200_000, "16b_to_80b": 900_000}
    )
    # Private deployments, micro-USD per accelerator-hour, billed per second while replicas are up. H100, H200
    # and MI300X are on enterprise terms (an enterprise PriceBook adds them). "cpu" is the local replica.
    accelerator_per_hour: Mapping[str, int] = field(
        default_factory=lambda: {
            "cpu": 100_000,  # $0.10 (our rate for a CPU replica)
            "a10g": 2_600_000,  # $2.60
            "l40s": 3_200_000,  # $3.20
            "a100-80gb": 4_800_000,  # $4.80
        }
    )
    discount_percent: int = 0  # enterprise: off every charge
    # Enterprise volume discounts on a month's pay-as-you-go total: ((above_micro_usd, percent), ...).
    volume_discounts: tuple[tuple[int, int], ...] = ()

    def finetune(self, params: int, technique: str, tokens: int) -> int:
        """Price of fine-tuning on `tokens` tokens processed (dataset tokens x epochs)."""
        if technique == "rft":
            return self._discounted(_charge(tokens, self.rft_per_million[rft_tier(params)], MILLION))
        if technique not in self.finetune_per_million:
            raise PriceError(f"unknown technique {technique!r}; one of {sorted(self.finetune_per_million) + ['rft']}")
        return self._discounted(_charge(tokens, self.finetune_per_million[technique][tier(params)], MILLION))

    def inference(self, params: int, tokens: int) -> int:
        return self._discounted(_charge(tokens, self.inference_per_million[tier(params)], MILLION))

    def deployment(self, accelerator: str, milliseconds: int) -> int:
        """Price of one replica up for `milliseconds` on `accelerator`."""
        rate = self.accelerator_per_hour.get(accelerator)
        if rate is None:
            raise PriceError(
                f"no price for accelerator {accelerator!r} on this plan; available: "
                f"{sorted(self.accelerator_per_hour)} (H100, H200 and MI300X are on enterprise terms)"
            )
        return self._discounted(_charge(milliseconds, rate, SECONDS_PER_HOUR * 1000))

    def volume_discount_percent(self, month_total_micro_usd: int) -> int:
        reached = [pct for above, pct in self.volume_discounts if month_total_micro_usd > above]
        return max(reached, default=0)

    def _discounted(self, amount: int) -> int:
        return amount - amount * self.discount_percent // 100  # the discount rounds down: the charge rounds up

    def with_overrides(self, overrides: Mapping[str, Any]) -> "PriceBook":
        """An enterprise PriceBook: any table given replaces entries of the default one."""
        unknown = set(overrides) - {
            "finetune_per_million",
            "rft_per_million",
            "inference_per_million",
            "accelerator_per_hour",
            "discount_percent",
            "volume_discounts",
        }
        if unknown:
            raise PriceError(f"unknown price overrides {sorted(unknown)}")
        changes: dict[str, Any] = {}
        for name in ("rft_per_million", "inference_per_million", "accelerator_per_hour"):
            if name in overrides:
                changes[name] = {**getattr(self, name), **overrides[name]}
        if "finetune_per_million" in overrides:
            changes["finetune_per_million"] = {
                technique: {**self.finetune_per_million.get(technique, {}), **rates}
                for technique, rates in {**self.finetune_per_million, **overrides["finetune_per_million"]}.items()
            }
        if "discount_percent" in overrides:
            pct = int(overrides["discount_percent"])
            if not 0 <= pct <= 100:
                raise PriceError(f"discount_percent must be 0..100, got {pct}")
            changes["discount_percent"] = pct
        if "volume_discounts" in overrides:
            changes["volume_discounts"] = tuple(sorted((int(a), int(p)) for a, p in overrides["volume_discounts"]))
        return replace(self, **changes)


DEFAULT = PriceBook()


def usd(micro_usd: int) -> str:
    """Format for people: $0.000123 below a cent, $1.23 above."""
    dollars = micro_usd / MICRO_USD_PER_USD
    return f"${dollars:.6f}" if abs(dollars) < 0.01 else f"${dollars:,.2f}"
