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
    assert prices.DEFAULT.finetune(params, technique, tokens) == micro_usd


def test_inference_prices() -> None:
    assert prices.DEFAULT.inference(134_515_008, 1_000_000) == 200_000
    assert prices.DEFAULT.inference(134_515_008, 642) == 129  # 128.4 rounds up
    assert prices.DEFAULT.inference(70 * B, 1_000_000) == 900_000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: prices.DEFAULT.finetune(8 * B, "dora", 10), "unknown technique"),
        (lambda: prices.DEFAULT.finetune(8 * B, "lora", -1), "must not be negative"),
        (lambda: prices.DEFAULT.finetune(81 * B, "lora", 10), "over 80B"),
        (lambda: prices.DEFAULT.inference(0, 10), "must be positive"),
    ],
)
def test_bad_price_inputs(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PriceError, match=message):
        call()


def test_usd_formatting() -> None:
    assert prices.usd(6_665) == "$0.006665"
    assert prices.usd(12_340_000) == "$12.34"


@pytest.mark.parametrize(
    ("params", "tokens", "micro_usd"),
    [(8 * B, 1_000_000, 10_000_000), (16 * B, 1, 10), (32 * B, 500_000, 10_000_000)],  # $10 / $20 per 1M
)
def test_rft_prices(params: int, tokens: int, micro_usd: int) -> None:
    assert prices.DEFAULT.finetune(params, "rft", tokens) == micro_usd


def test_rft_over_32b_is_not_offered() -> None:
    with pytest.raises(PriceError, match="up to 32B"):
        prices.DEFAULT.finetune(70 * B, "rft", 10)


@pytest.mark.parametrize(
    ("accelerator", "milliseconds", "micro_usd"),
    [
        ("a10g", 3_600_000, 2_600_000),  # one hour: $2.60
        ("l40s", 1_000, 889),  # one second: 3.2e6 / 3600 = 888.9, rounded up
        ("a100-80gb", 90_000, 120_000),  # 90 s of $4.80/h
        ("cpu", 3_600_000, 100_000),
    ],
)
def test_deployment_prices_per_second(accelerator: str, milliseconds: int, micro_usd: int) -> None:
    assert prices.DEFAULT.deployment(accelerator, milliseconds) == micro_usd


def test_enterprise_accelerators_need_a_contract() -> None:
    with pytest.raises(PriceError, match="enterprise terms"):
        prices.DEFAULT.deployment("h100", 1000)
    contract = prices.DEFAULT.with_overrides({"accelerator_per_hour": {"h100": 7_000_000}})
    assert contract.deployment("h100", 3_600_000) == 7_000_000
    assert contract.deployment("a10g", 3_600_000) == 2_600_000  # the rest of the table stays


def test_enterprise_overrides_discount_and_volume_tiers() -> None:
    book = prices.DEFAULT.with_overrides(
        {
            "finetune_per_million": {"lora": {"up_to_16b": 400_000}},
            "discount_percent": 10,
            "volume_discounts": [[1_000_000_000, 5], [100_000_000, 2]],
        }
    )
    assert book.finetune(8 * B, "lora", 1_000_000) == 360_000  # $0.40 less 10%
    assert book.finetune(8 * B, "turbo_lora", 1_000_000) == 900_000  # default $1.00 less 10%
    assert book.inference(8 * B, 1) == 1  # 0.2 rounds up to 1; 10% of 1 rounds down to 0
    assert [book.volume_discount_percent(x) for x in (50_000_000, 200_000_000, 2_000_000_000)] == [0, 2, 5]
    with pytest.raises(PriceError, match="unknown price overrides"):
        prices.DEFAULT.with_overrides({"free_lunch": 1})
    with pytest.raises(PriceError, match="0..100"):
        prices.DEFAULT.with_overrides({"discount_percent": 150})
