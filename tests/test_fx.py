"""FX conversion (DESIGN §11, agent/core/fx.py): exact rates, a call converted once and rounded
toward the house, nibbles that add up to it, an exact max_seconds; the rater's choice of rate
and its refusals; a real call through the engine billed in the account's currency."""

from __future__ import annotations

from fractions import Fraction

import gevent
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.bundles import BundleTariff
from agent.core.errors import InvalidInput
from agent.core.events import AuthorizeRequest, DenyReason, Direction, LegAnswered, LegCreated, LegHungUp
from agent.core.fx import (
    RATE_SCALE,
    Conversion,
    ConvertedTariff,
    FxRate,
    check_currency,
    conversion_at,
    format_rate,
    parse_rate,
)
from agent.core.ratetable import RateTable, RateTableBuilder
from agent.core.rating import MAX_SECONDS_CAP, RateRow
from agent.core.session import RatingRefused
from agent.services.clock import SystemClock
from agent.services.engine import Engine, EngineSettings
from agent.services.rater import PlanRater
from agent.sim.memory_store import MemoryStore
from tests.engine_fakes import Cdrs, Switch
from tests.test_rating import rows

RATES_E10 = st.one_of(st.sampled_from([RATE_SCALE, 9_200_000_000, 10_850_000_000, 1_605_000_000_000, 1, 3]),
                      st.integers(1, 10**4 * RATE_SCALE))
CONVERSIONS = st.builds(lambda rate, inverse: Conversion("USD", "EUR", rate, inverse), RATES_E10, st.booleans())


def exact(conversion: Conversion) -> Fraction:
    rate = Fraction(conversion.rate_e10, RATE_SCALE)
    return 1 / rate if conversion.inverse else rate


# ------------------------------------------------------------------------------ rates as text


@pytest.mark.parametrize(("text", "rate_e10", "shown"), [
    ("0.92", 9_200_000_000, "0.92"), ("1", RATE_SCALE, "1"), ("160.5", 1_605_000_000_000, "160.5"),
    ("0.0000000001", 1, "0.0000000001"), (" 1.0850000000 ", 10_850_000_000, "1.085"),
])
def test_rates_are_exact_integers_both_ways(text: str, rate_e10: int, shown: str) -> None:
    assert parse_rate(text) == rate_e10
    assert format_rate(rate_e10) == shown
    assert parse_rate(format_rate(rate_e10)) == rate_e10


@pytest.mark.parametrize(("text", "reason"), [
    ("0", "greater than zero"), ("0.0000000000", "greater than zero"), ("-1.2", "greater than zero"),
    ("1.12345678901", "more than 10 decimals"), ("1.00000000000", "more than 10 decimals"),
    ("1e3", "not a decimal"), ("1,5", "not a decimal"), ("", "empty"), ("nan", "not a decimal"),
    ("1000000000", "too large"),
])
def test_bad_rates_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse_rate(text)


def test_currencies_are_active_iso_4217_codes() -> None:
    assert check_currency("eur") == "EUR" and check_currency("JPY") == "JPY"
    for bad in ("EURO", "XYZ", "HRK", "XXX", "XTS", "", "€"):
        with pytest.raises(InvalidInput, match="not an active ISO 4217"):
            check_currency(bad)


# ------------------------------------------------------------------------ the conversion


@given(CONVERSIONS, st.integers(0, 10**12))
def test_a_charge_is_rounded_up_once(conversion: Conversion, plan_micros: int) -> None:
    converted = conversion.charge(plan_micros)
    exact_value = plan_micros * exact(conversion)
    assert converted >= exact_value > converted - 1 or (plan_micros == 0 and converted == 0)


@given(CONVERSIONS, st.integers(-10**9, 10**12))
def test_the_plan_budget_is_the_exact_inverse_of_the_charge(conversion: Conversion, budget: int) -> None:
    p = conversion.plan_budget(budget)
    if p >= 0:
        assert conversion.charge(p) <= budget
    assert conversion.charge(p + 1) > budget


@given(rows(max_rate=10**7), CONVERSIONS, st.integers(0, 4_000), st.sampled_from([1, 6, 30]))
def test_the_converted_cost_is_ceil_of_the_plan_cost_and_nibbles_add_up_to_it(
        row: RateRow, conversion: Conversion, seconds: int, nibble_s: int) -> None:
    tariff = ConvertedTariff(row, conversion)
    plan_cost = row.cost_micros(seconds * 1000)
    expected = -(-plan_cost * exact(conversion).numerator // exact(conversion).denominator)
    assert tariff.cost_micros(seconds * 1000) == expected
    assert tariff.plan_cost_micros(seconds * 1000) == plan_cost
    boundaries = [*range(0, seconds * 1000, nibble_s * 1000), seconds * 1000]
    debits = [tariff.cost_micros(b) - tariff.cost_micros(a) for a, b in zip(boundaries, boundaries[1:], strict=False)]
    assert all(d >= 0 for d in debits)
    assert sum(debits) == expected


@given(rows(max_rate=10**7, min_rate=1), CONVERSIONS, st.integers(-1_000, 10**8))
def test_max_seconds_is_the_exact_inverse_of_the_converted_cost(row: RateRow, conversion: Conversion,
                                                                budget: int) -> None:
    tariff = ConvertedTariff(row, conversion)
    m = tariff.max_seconds(budget)
    if 0 < m < MAX_SECONDS_CAP:
        assert tariff.cost_micros(m * 1000) <= budget < tariff.cost_micros((m + 1) * 1000)
        assert m > row.grace_seconds
    elif m == 0:  # nothing beyond the grace seconds fits (the first charged second does not)
        assert tariff.cost_micros((row.grace_seconds + 1) * 1000) > budget or budget < 0


@given(rows(max_rate=10**7, min_rate=1), CONVERSIONS, st.integers(0, 600), st.integers(0, 10**7),
       st.integers(0, 2_000))
def test_a_bundle_call_is_converted_the_same_way(row: RateRow, conversion: Conversion, held_s: int, budget: int,
                                                 seconds: int) -> None:
    bundle = BundleTariff(row, held_s, ())
    tariff = ConvertedTariff(bundle, conversion)
    assert tariff.cost_micros(seconds * 1000) == conversion.charge(bundle.cost_micros(seconds * 1000))
    m = tariff.max_seconds(budget)
    if 0 < m < MAX_SECONDS_CAP:
        assert tariff.cost_micros(m * 1000) <= budget < tariff.cost_micros((m + 1) * 1000)


def test_worked_example_usd_plan_eur_account() -> None:
    """0.12 USD/min for 61 s on 1/1 increments is 0.122000 USD; at 0.92 EUR a dollar that is
    0.11224 EUR; at the reciprocal of EUR/USD 1.087 it is 0.1122355... rounded up to 0.112236."""
    row = RateRow("1", "USA", rate_micros=120_000)
    assert ConvertedTariff(row, Conversion("USD", "EUR", 9_200_000_000)).cost_micros(61_000) == 112_240
    inverse = ConvertedTariff(row, Conversion("USD", "EUR", 10_870_000_000, inverse=True))
    assert inverse.cost_micros(61_000) == 112_236
    assert inverse.max_seconds(112_236) == 61 and inverse.max_seconds(112_235) == 60


# --------------------------------------------------------------------------- which rate


def test_the_rate_in_force_is_the_direct_pairs_latest_else_the_inverse_reciprocal() -> None:
    direct = [FxRate("USD", "EUR", 9_000_000_000, 1_000), FxRate("USD", "EUR", 9_200_000_000, 5_000)]
    inverse = [FxRate("EUR", "USD", 10_870_000_000, 0)]
    assert conversion_at("USD", "EUR", direct, inverse, 4_999) == Conversion("USD", "EUR", 9_000_000_000, False, 1_000)
    assert conversion_at("USD", "EUR", direct, inverse, 5_000).rate_e10 == 9_200_000_000  # type: ignore[union-attr]
    assert conversion_at("USD", "EUR", direct, inverse, 999) == Conversion("USD", "EUR", 10_870_000_000, True, 0)
    assert conversion_at("USD", "EUR", direct, [], 999) is None


FRANCE = RateRow(prefix="33", destination="France", rate_micros=60_000, rate_id=7)


class Tables:
    def __init__(self) -> None:
        builder = RateTableBuilder("usd-retail")
        builder.add(FRANCE)
        self.table = builder.build()

    def table_for(self, plan_name: str) -> RateTable:
        return self.table


class Plan:
    def __init__(self, plan: str, plan_currency: str, currency: str) -> None:
        self.plan, self.plan_currency, self.currency = plan, plan_currency, currency


def test_the_rater_converts_at_the_rate_in_force_at_the_calls_start() -> None:
    rates = [FxRate("USD", "EUR", 9_000_000_000, 0), FxRate("USD", "EUR", 9_500_000_000, 10_000)]
    rater = PlanRater(lambda a: Plan("usd-retail", "USD", "EUR"), Tables(),
                      fx_of=lambda p, c, at: conversion_at(p, c, rates, [], at))
    early, late = rater.rate("alice", "33123", 9_999), rater.rate("alice", "33123", 10_000)
    assert early.tariff.cost_micros(60_000) == 54_000 and late.tariff.cost_micros(60_000) == 57_000
    info = early.info
    assert (info.plan_currency, info.currency, info.fx_rate_e10, info.fx_inverse) == ("USD", "EUR", 9_000_000_000,
                                                                                      False)
    same = PlanRater(lambda a: Plan("usd-retail", "USD", "USD"), Tables()).rate("bob", "33123", 0)
    assert same.tariff == FRANCE and same.info.fx_rate_e10 is None and same.info.currency == "USD"


def test_no_rate_refuses_the_call_with_its_own_reason_naming_the_pair() -> None:
    rater = PlanRater(lambda a: Plan("usd-retail", "USD", "EUR"), Tables(), fx_of=lambda p, c, at: None)
    with pytest.raises(RatingRefused, match=r"no FX rate USD->EUR \(nor EUR/USD\)") as refused:
        rater.rate("alice", "33123", 0)
    assert refused.value.reason is DenyReason.NO_FX_RATE

    def down(p: str, c: str, at: int) -> Conversion | None:
        raise ConnectionError("database unreachable")

    with pytest.raises(RatingRefused) as unavailable:
        PlanRater(lambda a: Plan("usd-retail", "USD", "EUR"), Tables(), fx_of=down).rate("alice", "33123", 0)
    assert unavailable.value.reason is DenyReason.STORE_UNAVAILABLE


# ------------------------------------------------------------------ a call through the engine



def _wait(predicate: object, timeout: float = 5.0) -> None:
    with gevent.Timeout(timeout):
        while not predicate():  # type: ignore[operator]
            gevent.sleep(0.01)


def test_a_usd_plan_bills_a_eur_account_in_eur_and_cuts_at_the_converted_limit() -> None:
    """1.00 USD a minute (1/1 s) at 1 USD = 0.9 EUR: an account with 0.0045 EUR talks 5 s (0.0045
    EUR), not 4 (what 0.0045 USD would buy); the CDR records the pair, the rate and both costs."""
    clock = SystemClock()
    store = MemoryStore()
    store.add_account("eve", 4_500)
    usd = RateRow(prefix="33", destination="France", rate_micros=60_000, rate_id=7)
    builder = RateTableBuilder("usd")
    builder.add(usd)
    table = builder.build()
    rater = PlanRater(lambda a: Plan("usd", "USD", "EUR"), type("T", (), {"table_for": lambda self, p: table})(),
                      fx_of=lambda p, c, at: Conversion(p, c, 9_000_000_000))
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                    rater=rater, clock=clock, cdr=cdrs)
    switch = Switch(engine, clock)
    engine.add_switch(switch)
    engine.start()
    try:
        decision = engine.authorize(AuthorizeRequest("asterisk", "A1", "eve", "33123", clock.now_ms()))
        assert decision.allowed and decision.limit_ms == 5_000
        engine.on_event(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
        engine.on_event(LegAnswered("B1", clock.now_ms()))
        _wait(lambda: cdrs.records, timeout=10)
    finally:
        engine.stop(1)
    (record,) = cdrs.records
    rating = record.rating
    assert rating.cost_micros == 4_500 and rating.plan_cost_micros == 5_000
    assert (rating.plan_currency, rating.currency, rating.fx_rate_e10, rating.fx_inverse) == ("USD", "EUR",
                                                                                              9_000_000_000, False)
    assert store.accounts["eve"].balance_micros == 0


def test_a_call_that_starts_in_its_bundle_and_runs_into_money_pays_the_converted_money_only() -> None:
    """The bundle (2 s) covers the first seconds; money pays the rest at 1.00 USD a minute, converted
    at 0.9: 3.5 s answered = 4 s billed, 2 s of money = 0.033334 USD, ceil(33_334 x 0.9) = 30_001."""
    from agent.core.bundles import BundleDef, BundleGrant

    clock = SystemClock()
    store = MemoryStore()
    store.add_account("eve", 1_000_000)
    usd = RateRow(prefix="33", destination="France", rate_micros=1_000_000, rate_id=7)
    builder = RateTableBuilder("usd")
    builder.add(usd)
    table = builder.build()
    grant = BundleGrant(1, "eve", BundleDef("fr2", 2, ("33",), bundle_id=1), 0)
    rater = PlanRater(lambda a: Plan("usd", "USD", "EUR"), type("T", (), {"table_for": lambda self, p: table})(),
                      lambda a: (grant,), fx_of=lambda p, c, at: Conversion(p, c, 9_000_000_000))
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                    rater=rater, clock=clock, cdr=cdrs)
    switch = Switch(engine, clock)
    engine.add_switch(switch)
    engine.start()
    try:
        assert engine.authorize(AuthorizeRequest("asterisk", "A1", "eve", "33123", clock.now_ms())).allowed
        engine.on_event(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
        answered = clock.now_ms()
        engine.on_event(LegAnswered("B1", answered))
        gevent.sleep(3.5)
        engine.on_event(LegHungUp("B1", answered + 3_500, cause="NORMAL_CLEARING"))
        _wait(lambda: cdrs.records, timeout=10)
    finally:
        engine.stop(1)
    (record,) = cdrs.records
    assert record.rating.bundle_seconds == 2
    assert record.rating.plan_cost_micros == 33_334  # ceil(1_000_000 x 2 / 60)
    assert record.rating.cost_micros == 30_001 and store.accounts["eve"].balance_micros == 1_000_000 - 30_001
