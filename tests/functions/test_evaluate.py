import pytest

from functions.evaluate import char_error_rate


@pytest.mark.parametrize(
    ("predicted", "reference", "rate"),
    [
        ("kitten", "sitting", 3 / 7),  # two substitutions and one insertion
        ("same", "same", 0.0),
        ("", "abcd", 1.0),
        ("abcd", "", 1.0),
        ("", "", 0.0),
        ('{"category": "bug"}', '{"category": "bugs"}', 1 / 20),
    ],
)
def test_char_error_rate(predicted: str, reference: str, rate: float) -> None:
    assert char_error_rate(predicted, reference) == pytest.approx(rate)
