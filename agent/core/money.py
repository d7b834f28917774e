"""Money as integer micro-units (DESIGN §3).

The only two functions that cross between decimal text and micro-units live here: every CSV
cell, CLI argument and YAML value goes through :func:`parse_amount`, every printed amount through
:func:`format_amount`. Nothing else in the agent touches ``Decimal`` for money.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MICROS_PER_UNIT = 1_000_000
DECIMALS = 6

# An int64 column holds at most 9.2e18 micro-units; refuse anything near that before the
# database does, so the error names the value instead of an overflow deep in a driver.
MAX_ABS_MICROS = 10**17


_PLAIN_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


class MoneyError(ValueError):
    """A value that is not a valid amount of money. The message names the value."""


def parse_amount(text: str | int | Decimal, *, allow_negative: bool = False, what: str = "amount") -> int:
    """Parse a decimal amount of currency into micro-units.

    ``"1.5"`` -> ``1_500_000``. More than six decimals is an error, never a silent rounding;
    so are NaN, infinities, exponents that hide digits, empty text and (unless allowed)
    negative values.
    """
    if isinstance(text, bool):  # bool is an int; True is not "1 currency unit"
        raise MoneyError(f"{what} {text!r} is not a number")
    if isinstance(text, int):
        value = Decimal(text)
    elif isinstance(text, Decimal):
        value = text
    elif isinstance(text, str):
        cleaned = text.strip()
        if not cleaned:
            raise MoneyError(f"{what} is empty")
        # Decimal() also takes 1e3, 1_000, NaN and digits of any script (١٠, ０.5): an amount is
        # plain ASCII decimal text, nothing a spreadsheet or a keyboard layout slipped in.
        if not _PLAIN_DECIMAL.fullmatch(cleaned):
            raise MoneyError(f"{what} {text!r} is not a number: plain decimal digits 0-9 with one '.' at most "
                             "(no exponent, separator or other script)")
        try:
            value = Decimal(cleaned)
        except InvalidOperation:
            raise MoneyError(f"{what} {text!r} is not a number") from None
    else:
        raise MoneyError(f"{what} {text!r} is not a number (got {type(text).__name__})")
    if not value.is_finite():
        raise MoneyError(f"{what} {text!r} is not a finite number")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite decimals have an int exponent
    # Strict on purpose: "0.1234560" is refused too, so that nobody learns to rely on a rounding.
    if exponent < -DECIMALS:
        raise MoneyError(f"{what} {text!r} has more than {DECIMALS} decimals")
    if value < 0 and not allow_negative:
        raise MoneyError(f"{what} {text!r} must not be negative")
    micros = int(value.scaleb(DECIMALS))
    if abs(micros) > MAX_ABS_MICROS:
        raise MoneyError(f"{what} {text!r} is too large")
    return micros


def format_amount(micros: int) -> str:
    """Format micro-units as a decimal string with exactly six decimals: ``1500000`` -> ``"1.500000"``."""
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise TypeError(f"format_amount takes int micro-units, got {type(micros).__name__}")
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    return f"{sign}{whole}.{frac:06d}"
