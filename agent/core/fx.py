"""Currencies and FX conversion (DESIGN §11). Pure: no I/O, no clock.

**Rates.** An FX rate ``BASE/QUOTE = r`` says one unit of BASE is worth ``r`` units of QUOTE.
It is stored as an exact integer, ``rate_e10 = r × 10^10`` (at most 10 decimals, never a float;
:func:`parse_rate` and :func:`format_rate` are the only ways between text and that integer).
Rates are effective-dated: the rate in force at an instant is the one with the latest
``effective_from`` at or before it.

**Which rate converts a plan's money into an account's.** A plan priced in P rating an account
kept in A needs ``P -> A``: the direct pair ``P/A`` when it has a rate in force at the call's
start, else the inverse pair ``A/P``, used as its *exact* reciprocal (``× 10^10 / rate_e10``, a
fraction, never a rounded decimal). No rate at all: the call is refused (``no_fx_rate``).

**Converting a call** (:class:`ConvertedTariff`). The call's cost is computed in the plan's
currency by the plan's rules (DESIGN §4, bundles §9), then converted **once**, rounded toward the
house (up, as a charge)::

    cost_account(t) = ceil(cost_plan(t) × num / den)

Every nibble debits ``cost_account(t_k) - cost_account(t_k-1)``: differences of that one
function, so the debits of a call add up to its converted final cost exactly and none is
negative (the conversion is non-decreasing). ``max_seconds(budget)`` is the exact inverse: a
plan cost ``p`` converts within ``budget`` iff ``ceil(p × num / den) <= budget`` iff
``p <= floor(budget × den / num)``, so the plan's own exact inverse at that plan budget gives
the largest whole seconds whose converted cost fits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Protocol

from agent.core.errors import InvalidInput

RATE_DECIMALS = 10
RATE_SCALE = 10**RATE_DECIMALS
# rate_e10 is a BIGINT column (< 9.2e18): a rate up to 10^8 (one unit worth a hundred million
# of another) is far beyond any real pair and keeps every product exact and storable.
MAX_RATE_E10 = 10**8 * RATE_SCALE

# Active ISO 4217 currency codes (list one, 2025 amendments), the codes that name money: the
# precious metals (XAU, XAG, XPD, XPT), the bond-market units (XBA-XBD), the testing code (XTS)
# and "no currency" (XXX), and the unit of the ADB (XUA) and SUCRE (XSU) are left out. Codes
# withdrawn (HRK, CUC, SLL, ZWL...) are refused.
ISO_4217 = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP
BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR
FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES
KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR
MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF
SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS
UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XCG XDR XOF XPF YER ZAR ZMW ZWG
""".split())

_PLAIN_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


def check_currency(code: str, what: str = "currency") -> str:
    """``code`` upper-cased if it is an active ISO 4217 code, else :class:`InvalidInput` naming it."""
    cleaned = code.strip().upper() if isinstance(code, str) else ""
    if cleaned not in ISO_4217:
        raise InvalidInput(f"{what} {code!r} is not an active ISO 4217 currency code (e.g. EUR, USD, GBP)")
    return cleaned


def parse_rate(text: str, what: str = "rate") -> int:
    """An exact decimal FX rate as ``rate × 10^10``. Refuses 0, a negative rate, more than 10
    decimals (never rounded), an exponent, separators, and a rate above 10^8."""
    cleaned = text.strip() if isinstance(text, str) else ""
    if not cleaned:
        raise InvalidInput(f"{what} is empty")
    if cleaned.startswith("-"):
        raise InvalidInput(f"{what} {text!r} must be greater than zero (a negative rate means nothing)")
    if not _PLAIN_DECIMAL.fullmatch(cleaned):
        raise InvalidInput(f"{what} {text!r} is not a decimal number: digits 0-9 with one '.' at most "
                           "(no exponent, separator or sign)")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the pattern above admits only valid decimals
        raise InvalidInput(f"{what} {text!r} is not a decimal number") from None
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -RATE_DECIMALS:  # strict, as amounts are: "1.00000000000" too (nobody learns to rely on rounding)
        raise InvalidInput(f"{what} {text!r} has more than {RATE_DECIMALS} decimals (a rate is never rounded)")
    rate_e10 = int(value.scaleb(RATE_DECIMALS))
    if rate_e10 <= 0:
        raise InvalidInput(f"{what} {text!r} must be greater than zero")
    if rate_e10 > MAX_RATE_E10:
        raise InvalidInput(f"{what} {text!r} is too large (at most {MAX_RATE_E10 // RATE_SCALE})")
    return rate_e10


def format_rate(rate_e10: int) -> str:
    """``rate_e10`` as its exact decimal text, without trailing zeros: ``10850000000`` -> ``"1.085"``."""
    if isinstance(rate_e10, bool) or not isinstance(rate_e10, int):
        raise TypeError(f"format_rate takes an int rate_e10, got {type(rate_e10).__name__}")
    whole, frac = divmod(rate_e10, RATE_SCALE)
    text = f"{frac:0{RATE_DECIMALS}d}".rstrip("0")
    return f"{whole}.{text}" if text else str(whole)


@dataclass(frozen=True, slots=True)
class FxRate:
    """One row of ``fx_rates``: one unit of ``base`` is worth ``rate_e10 / 10^10`` of ``quote``
    from ``effective_from_ms`` on (epoch ms, UTC)."""

    base: str
    quote: str
    rate_e10: int
    effective_from_ms: int


def check_fx_rate(rate: FxRate, where: str = "fx rate") -> FxRate:
    """Return ``rate`` if it can be stored, else :class:`InvalidInput` naming the field."""
    check_currency(rate.base, f"{where}: base currency")
    check_currency(rate.quote, f"{where}: quote currency")
    if rate.base == rate.quote:
        raise InvalidInput(f"{where}: base and quote are both {rate.base} (a currency converts to itself at 1)")
    if not 0 < rate.rate_e10 <= MAX_RATE_E10:
        raise InvalidInput(f"{where}: rate {format_rate(max(rate.rate_e10, 0))} must be above 0 and at most "
                           f"{MAX_RATE_E10 // RATE_SCALE}")
    return rate


@dataclass(frozen=True, slots=True)
class Conversion:
    """How a plan's money becomes an account's: ``amount × num / den`` with ``num/den`` the rate
    ``rate_e10 / 10^10`` of the ``fx_rates`` row used, or its reciprocal when that row is the
    inverse pair (``inverse``: the row is ``currency/plan_currency``)."""

    plan_currency: str
    currency: str
    rate_e10: int
    inverse: bool = False
    effective_from_ms: int = 0

    @property
    def num(self) -> int:
        return RATE_SCALE if self.inverse else self.rate_e10

    @property
    def den(self) -> int:
        return self.rate_e10 if self.inverse else RATE_SCALE

    def charge(self, plan_micros: int) -> int:
        """A charge in the plan's currency, in the account's: rounded up (toward the house)."""
        return -(-(plan_micros * self.num) // self.den)

    def plan_budget(self, budget_micros: int) -> int:
        """The largest plan amount whose converted charge fits ``budget_micros`` (the exact
        inverse of :meth:`charge`: ``charge(p) <= budget`` iff ``p <= plan_budget(budget)``)."""
        return (budget_micros * self.den) // self.num

    def describe(self) -> str:
        """``USD->EUR 0.92`` (direct) or ``USD->EUR 1/1.087 (EUR/USD)`` (the inverse pair's reciprocal)."""
        if self.inverse:
            return f"{self.plan_currency}->{self.currency} 1/{format_rate(self.rate_e10)} " \
                   f"({self.currency}/{self.plan_currency})"
        return f"{self.plan_currency}->{self.currency} {format_rate(self.rate_e10)}"


def conversion_at(plan_currency: str, currency: str, direct: Sequence[FxRate], inverse: Sequence[FxRate],
                  at_ms: int) -> Conversion | None:
    """The conversion in force at ``at_ms``: the direct pair's latest rate effective at or before
    it, else the inverse pair's, as an exact reciprocal; None when neither has one."""
    found = _in_force(direct, at_ms)
    if found is not None:
        return Conversion(plan_currency, currency, found.rate_e10, False, found.effective_from_ms)
    found = _in_force(inverse, at_ms)
    if found is not None:
        return Conversion(plan_currency, currency, found.rate_e10, True, found.effective_from_ms)
    return None


def _in_force(rates: Sequence[FxRate], at_ms: int) -> FxRate | None:
    best: FxRate | None = None
    for rate in rates:
        if rate.effective_from_ms <= at_ms and (best is None or rate.effective_from_ms > best.effective_from_ms):
            best = rate
    return best


class _Tariff(Protocol):
    def cost_micros(self, duration_ms: int) -> int: ...

    def max_seconds(self, budget_micros: int) -> int: ...


@dataclass(frozen=True, slots=True)
class ConvertedTariff:
    """A tariff priced in a plan's currency seen in the account's (implements the session's
    ``Tariff``). ``inner`` is the plan's tariff (a rate row, or a ``BundleTariff``)."""

    inner: _Tariff
    conversion: Conversion

    def cost_micros(self, duration_ms: int) -> int:
        return self.conversion.charge(self.inner.cost_micros(duration_ms))

    def plan_cost_micros(self, duration_ms: int) -> int:
        return self.inner.cost_micros(duration_ms)

    def max_seconds(self, budget_micros: int) -> int:
        return self.inner.max_seconds(self.conversion.plan_budget(budget_micros))

    def wrapping(self, inner: _Tariff) -> ConvertedTariff:
        """The same conversion around another plan tariff (a bundle hold that changed)."""
        return ConvertedTariff(inner, self.conversion)


def plan_tariff(tariff: _Tariff) -> _Tariff:
    """The plan's own tariff under a conversion (``tariff`` itself when there is none)."""
    return tariff.inner if isinstance(tariff, ConvertedTariff) else tariff


def rewrap(original: _Tariff, inner: _Tariff) -> _Tariff:
    """``inner`` under ``original``'s conversion, if it had one."""
    return original.wrapping(inner) if isinstance(original, ConvertedTariff) else inner
