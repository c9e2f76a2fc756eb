import pytest

from billing import prices
from billing.prices import B, PriceError


@pytest.mark.parametrize(
    ("params", "technique", "tokens", "micro_usd"),
    [
        (134_515_008, "lora", 1_000_000, 500_000),  # $0.50 per 1M
        (134_515_008, "lora", 13_329, 6_665),  # 6664.5 rounds up
        (134_515_008, "lora", 1, 1),  # 0.5 micro-USD rounds up to 1
        (134_515_008, "lora", 0, 0),
        (16 * B, "turbo", 2_000_000, 1_000_000),  # exactly 16B is the small tier
        (16 * B + 1, "lora", 1_000_000, 3_000_000),  # $3.00 above 16B
        (70 * B, "turbo_lora", 2_000_000, 12_000_000),  # $6.00 per 1M
        (8 * B, "turbo_lora", 1_000_000, 1_000_000),  # $1.00 per 1M
    ],
)
def test_finetune_prices(params: int, technique: str, tokens: int, micro_usd: int) -> None:
    assert prices.finetune_micro_usd(params, technique, tokens) == micro_usd


def test_inference_prices() -> None:
    assert prices.inference_micro_usd(134_515_008, 1_000_000) == 200_000
    assert prices.inference_micro_usd(134_515_008, 642) == 129  # 128.4 rounds up
    assert prices.inference_micro_usd(70 * B, 1_000_000) == 900_000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: prices.finetune_micro_usd(8 * B, "dora", 10), "unknown technique"),
        (lambda: prices.finetune_micro_usd(8 * B, "lora", -1), "must not be negative"),
        (lambda: prices.finetune_micro_usd(81 * B, "lora", 10), "over 80B"),
        (lambda: prices.inference_micro_usd(0, 10), "must be positive"),
    ],
)
def test_bad_price_inputs(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PriceError, match=message):
        call()


def test_usd_formatting() -> None:
    assert prices.usd(6_665) == "$0.006665"
    assert prices.usd(12_340_000) == "$12.34"
