from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.money import MoneyError, format_amount, parse_amount


@pytest.mark.parametrize(
    ("text", "micros"),
    [("0", 0), ("1", 1_000_000), ("1.5", 1_500_000), ("0.000001", 1), ("12.345678", 12_345_678),
     (" 3.10 ", 3_100_000), ("100.000000", 100_000_000)],
)
def test_parse_amount_accepts_up_to_six_decimals(text: str, micros: int) -> None:
    assert parse_amount(text) == micros


@pytest.mark.parametrize(
    ("text", "reason"),
    [("1.0000001", "more than 6 decimals"), ("0.1234560", "more than 6 decimals"),
     ("abc", "not a number"), ("", "empty"), ("NaN", "not a number"),
     ("inf", "not a number"), ("-1", "must not be negative"), ("1,5", "not a number"),
     ("0.0000001", "more than 6 decimals"), ("1" + "0" * 30, "too large"),
     # Decimal() would take these; an amount is plain ASCII decimal text
     ("1e2", "not a number"), ("1e-7", "not a number"), ("1_000", "not a number"),
     ("\u0661\u0660", "not a number"), ("\uff10.5", "not a number"), ("+-1", "not a number")],
)
def test_parse_amount_refuses_bad_values_naming_them(text: str, reason: str) -> None:
    with pytest.raises(MoneyError, match=reason) as info:
        parse_amount(text, what="rate")
    assert info.value.args[0].startswith("rate")


def test_negative_allowed_only_when_asked() -> None:
    assert parse_amount("-2.5", allow_negative=True) == -2_500_000


def test_bool_and_float_are_not_money() -> None:
    with pytest.raises(MoneyError):
        parse_amount(True)  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        parse_amount(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_amount(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("micros", "text"), [(0, "0.000000"), (1, "0.000001"), (-1, "-0.000001"),
                                              (1_234_500, "1.234500"), (-12_000_000, "-12.000000")])
def test_format_amount(micros: int, text: str) -> None:
    assert format_amount(micros) == text


@given(st.integers(min_value=-(10**17), max_value=10**17))
def test_format_then_parse_is_identity(micros: int) -> None:
    assert parse_amount(format_amount(micros), allow_negative=True) == micros
    assert Decimal(format_amount(micros)) * 1_000_000 == micros
