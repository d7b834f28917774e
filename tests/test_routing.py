"""Wholesale route selection and margin (DESIGN §10, agent/core/routing.py): which carriers a call
may go to, in which order, and what each call earns; examples and properties by hypothesis."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.buy_index import BuyIndex, prepare_offers, select_offers
from agent.core.errors import InvalidInput
from agent.core.events import DenyReason
from agent.core.ratetable import RateTableBuilder, Refusal
from agent.core.rating import OPEN_END_MS, RateRow, cost_micros_for_seconds
from agent.core.routing import (
    CarrierState,
    LossVerdicts,
    Margin,
    MarginFloor,
    RoutePolicy,
    SkipReason,
    _cost,
    _loses,
    _never_dearer,
    below_floor,
    loss_at,
    loss_points,
    margin_of,
    parse_policy,
    select_routes,
)

SELL = RateRow("44", "UK", 20_000, initial_increment=60, increment=60)  # 0.02/min, 60/60


def buy(rate: float | int, **kw: int) -> RateRow:
    return RateRow("44", "UK", int(rate), **kw)  # type: ignore[arg-type]


def carrier(name: str, **kw: object) -> CarrierState:
    return CarrierState(name, f"PJSIP/{name}", **kw)  # type: ignore[arg-type]


def names(choice: object) -> list[str]:
    return [r.carrier for r in choice.routes]  # type: ignore[attr-defined]


def test_lcr_orders_by_the_buy_cost_of_the_same_minute_then_priority() -> None:
    offers = [(carrier("a", priority=2), buy(12_000)), (carrier("b", priority=1), buy(10_000)),
              (carrier("c", priority=0), buy(12_000)),
              # cheaper per minute but a connect fee: 0.004 + 0.006 = 0.010 for 60 s, ties with b
              (carrier("d", priority=5), buy(6_000, connect_fee_micros=4_000))]
    choice = select_routes(SELL, offers, RoutePolicy.LCR)
    assert names(choice) == ["b", "d", "c", "a"]
    assert [r.buy_cost_micros for r in choice.routes] == [10_000, 10_000, 12_000, 12_000]
    assert choice.reason is None and choice.skipped == ()


def test_priority_policy_orders_by_priority_then_cost() -> None:
    offers = [(carrier("a", priority=2), buy(1_000)), (carrier("b", priority=1), buy(15_000)),
              (carrier("c", priority=1), buy(12_000))]
    assert names(select_routes(SELL, offers, RoutePolicy.PRIORITY)) == ["c", "b", "a"]


def test_disabled_full_unrated_blocked_and_loss_making_carriers_are_dropped_with_the_reason() -> None:
    blocked_row = RateRow("44", "UK", 1_000, blocked=True)
    offers: list[tuple[CarrierState, RateRow | Refusal]] = [
        (carrier("off", enabled=False), buy(1_000)),
        (carrier("full", max_channels=30, live_channels=30), buy(1_000)),
        (carrier("none"), Refusal(DenyReason.NO_RATE, "no rate for 447 in plan 'carrier:none'", "447")),
        (carrier("blk"), Refusal(DenyReason.BLOCKED, "destination 44 (UK) is blocked", "447", blocked_row)),
        (carrier("dear"), buy(25_000)),  # 0.025/min bought, 0.02 sold
        (carrier("ok", max_channels=30, live_channels=29), buy(15_000)),
    ]
    choice = select_routes(SELL, offers, RoutePolicy.LCR)
    assert names(choice) == ["ok"]
    assert [(s.carrier, s.reason) for s in choice.skipped] == [
        ("off", SkipReason.DISABLED), ("full", SkipReason.AT_LIMIT), ("none", SkipReason.NO_RATE),
        ("blk", SkipReason.BLOCKED), ("dear", SkipReason.LOSS)]
    assert "30 of 30 channels in use" in choice.detail()
    assert "dear: buys 44 at 0.025000 for 60 s, sold at 0.020000" in choice.detail()
    # allow_loss keeps the dear carrier, last by cost
    assert names(select_routes(SELL, offers, RoutePolicy.LCR, allow_loss=True)) == ["ok", "dear"]


def test_no_carrier_left_is_a_no_route_refusal() -> None:
    choice = select_routes(SELL, [(carrier("dear"), buy(30_000))], RoutePolicy.LCR)
    assert choice.refused and choice.reason is DenyReason.NO_ROUTE
    assert choice.detail().startswith("no route: dear: buys 44")
    empty = select_routes(SELL, [], RoutePolicy.PRIORITY)
    assert empty.reason is DenyReason.NO_ROUTE and empty.detail() == "no route: no carrier"


def test_revenue_assurance_compares_each_sides_own_increments() -> None:
    sell = RateRow("33", "FR", 12_000, initial_increment=1, increment=1)  # 0.012/min per second
    # the same rate per minute but billed 60/60: a 1 s call costs 0.012 bought, 0.0002 sold
    assert loss_at(sell, RateRow("33", "FR", 12_000, initial_increment=60, increment=60)) == 1
    # a connect fee the sell side does not have
    assert loss_at(sell, RateRow("33", "FR", 6_000, connect_fee_micros=1_000)) == 1
    # a minimum of 30 s bought, none sold
    assert loss_at(sell, RateRow("33", "FR", 11_000, minimum_seconds=30)) == 1
    # cheaper per second, no fee: never dearer
    assert loss_at(sell, RateRow("33", "FR", 11_999)) is None
    # 1/60 bought against 60/1 sold: loses from 62 s (the first second of the third buy block)
    sell_60_1 = RateRow("1", "US", 10_000, initial_increment=60, increment=1)
    buy_1_60 = RateRow("1", "US", 9_000, initial_increment=1, increment=60)
    assert loss_at(sell_60_1, buy_1_60) == 62 and 62 in loss_points(sell_60_1, buy_1_60)
    assert cost_micros_for_seconds(buy_1_60, 62) > cost_micros_for_seconds(sell_60_1, 62)
    # a grace the buy side does not give
    assert loss_at(RateRow("1", "US", 10_000, grace_seconds=3), RateRow("1", "US", 1_000)) == 1


def test_weight_policy_is_deterministic_per_seed_and_follows_the_weights() -> None:
    offers = [(carrier("heavy", weight=3), buy(1_000)), (carrier("light", weight=1), buy(1_000)),
              (carrier("backup", priority=1, weight=100), buy(1_000))]
    first: Counter[str] = Counter()
    for seed in range(4_000):
        order = names(select_routes(SELL, offers, RoutePolicy.WEIGHT, seed=seed))
        assert order == names(select_routes(SELL, offers, RoutePolicy.WEIGHT, seed=seed))
        assert sorted(order[:2]) == ["heavy", "light"] and order[2] == "backup"  # priority groups first
        first[order[0]] += 1
    assert 2_850 <= first["heavy"] <= 3_150  # 3 / 4 of 4,000


def test_policies_are_parsed_with_the_known_ones_named() -> None:
    assert parse_policy("LCR") is RoutePolicy.LCR
    with pytest.raises(InvalidInput, match=r"route policy 'cheapest' does not exist \(known: lcr, priority, weight\)"):
        parse_policy("cheapest")


def test_margin_of_a_call_uses_each_sides_increments() -> None:
    sell = RateRow("447", "UK mobile", 120_000, connect_fee_micros=50_000, initial_increment=30, increment=6)
    carrier_row = RateRow("44", "UK", 60_000, initial_increment=60, increment=60)
    m = margin_of(sell, carrier_row, 61_000)
    assert m == Margin(61, 66, 182_000, 120, 120_000) and m.margin_micros == 62_000
    assert below_floor(m, MarginFloor()) is None
    assert below_floor(m, MarginFloor(per_minute_micros=60_000)) is None  # 62000*60 >= 60000*61
    assert "below the floor of 0.070000/min" in (below_floor(m, MarginFloor(per_minute_micros=70_000)) or "")
    assert below_floor(m, MarginFloor(percent_bp=3_400)) is None  # 34.07 %
    assert "below the floor of 35.00%" in (below_floor(m, MarginFloor(percent_bp=3_500)) or "")
    loss = margin_of(RateRow("1", "", 1_000), RateRow("1", "", 2_000), 10_000)
    assert (below_floor(loss, MarginFloor()) or "") == "negative margin -0.000167 (sold 0.000167, bought 0.000334)"
    with pytest.raises(InvalidInput, match="not both"):
        MarginFloor(per_minute_micros=1, percent_bp=1)
    with pytest.raises(InvalidInput, match="between 0% and 100%"):
        MarginFloor(percent_bp=10_001)


rows = st.builds(
    RateRow, st.just("1"), st.just(""), st.integers(0, 200_000), st.integers(0, 50_000),
    st.sampled_from([1, 6, 30, 60]), st.sampled_from([1, 6, 30, 60]), st.sampled_from([0, 0, 30, 60]),
    st.sampled_from([0, 0, 3, 6]))
states = st.builds(CarrierState, st.sampled_from("abcdefgh"), st.just("PJSIP/x"), st.integers(0, 3),
                   st.integers(1, 5), st.booleans(), st.one_of(st.none(), st.integers(1, 3)), st.integers(0, 4))


@given(rows, rows)
def test_a_carrier_kept_by_revenue_assurance_costs_no_more_at_any_point(sell: RateRow, bought: RateRow) -> None:
    at = loss_at(sell, bought)
    assert _loses(sell, bought) == (at is not None)
    if at is None:
        assert bought.rate_micros <= sell.rate_micros
        for seconds in loss_points(sell, bought):
            assert cost_micros_for_seconds(bought, seconds) <= cost_micros_for_seconds(sell, seconds)
    else:
        assert at == 3_600 or cost_micros_for_seconds(bought, at) > cost_micros_for_seconds(sell, at)


@given(rows, rows)
def test_the_per_second_fast_path_is_exact_for_every_duration(sell: RateRow, bought: RateRow) -> None:
    if _never_dearer(sell, bought):  # the general grid condition, whatever the rows
        for seconds in range(0, 400):
            assert cost_micros_for_seconds(bought, seconds) <= cost_micros_for_seconds(sell, seconds)
    per_second = bought._replace(initial_increment=1, increment=1, minimum_seconds=0,
                                 grace_seconds=max(bought.grace_seconds, sell.grace_seconds),
                                 connect_fee_micros=min(bought.connect_fee_micros, sell.connect_fee_micros),
                                 rate_micros=min(bought.rate_micros, sell.rate_micros))
    assert loss_at(sell, per_second) is None
    for seconds in range(0, 400):
        assert cost_micros_for_seconds(per_second, seconds) <= cost_micros_for_seconds(sell, seconds)


@given(rows, st.lists(st.tuples(states, rows), max_size=8), st.sampled_from(list(RoutePolicy)), st.booleans(),
       st.integers(0, 2**32))
def test_selection_keeps_exactly_the_eligible_carriers_in_policy_order(
        sell: RateRow, offers: list[tuple[CarrierState, RateRow]], policy: RoutePolicy, allow_loss: bool,
        seed: int) -> None:
    choice = select_routes(sell, offers, policy, allow_loss=allow_loss, seed=seed)
    assert len(choice.routes) + len(choice.skipped) == len(offers)
    eligible = [(c, r) for c, r in offers
                if c.enabled and not c.at_limit and (allow_loss or loss_at(sell, r) is None)]
    assert sorted(r.carrier for r in choice.routes) == sorted(c.name for c, _ in eligible)
    keys = [(r.buy_cost_micros, r.priority) if policy is RoutePolicy.LCR else (r.priority,) for r in choice.routes]
    assert keys == sorted(keys)
    assert choice == select_routes(sell, offers, policy, allow_loss=allow_loss, seed=seed)
    assert (choice.reason is DenyReason.NO_ROUTE) == (not eligible)


@given(rows, st.integers(0, 7_200))
def test_the_inlined_cost_is_the_rating_cost(row: RateRow, seconds: int) -> None:
    assert _cost(row, seconds) == cost_micros_for_seconds(row, seconds)


# ------------------------------------------------- the shared buy index (agent/core/buy_index.py)

DAY_MS = 86_400_000
T0 = 1_764_763_200_000  # 2025-12-03T12:00:00Z, a Wednesday


def test_loss_verdicts_kept_per_pair_of_shapes_are_the_rule() -> None:
    verdicts = LossVerdicts(limit=3)
    sell = RateRow("33", "FR", 12_000, initial_increment=1, increment=1)
    loses = verdicts.for_sell(sell)
    assert loses(RateRow("33", "FR", 12_000, initial_increment=60, increment=60))  # a 1 s call: 0.012 vs 0.0002
    assert not loses(RateRow("33", "FR", 11_999))
    assert loses(RateRow("33", "FR", 12_001))  # a dearer rate: long calls
    for fee in range(10):  # more shapes than the limit: the cache is dropped, never wrong
        buy = RateRow("33", "FR", 6_000, connect_fee_micros=fee)
        assert loses(buy) == _loses(sell, buy)
    assert verdicts.size <= 3


@given(st.lists(rows, min_size=1, max_size=4), st.lists(rows, min_size=1, max_size=12), st.integers(1, 6))
def test_loss_verdicts_equal_the_rule_for_every_pair(sells: list[RateRow], buys: list[RateRow], limit: int) -> None:
    verdicts = LossVerdicts(limit=limit)  # one cache across calls, as the route book keeps it
    for sell in sells:
        loses = verdicts.for_sell(sell)
        for bought in buys:
            assert loses(bought) == _loses(sell, bought)


def _deck_rows(draw: st.DrawFn) -> list[RateRow]:
    found = []
    for _ in range(draw(st.integers(1, 14))):
        start = draw(st.sampled_from([0, T0 - DAY_MS, T0 + 3_600_000]))
        end = draw(st.sampled_from([OPEN_END_MS, T0, T0 + DAY_MS]))
        if end <= start:
            start, end = 0, OPEN_END_MS
        window = draw(st.sampled_from([("", 0, 1440), ("3", 0, 1440), ("67", 0, 1440), ("", 720, 780),
                                       ("12345", 1320, 360)]))
        found.append(RateRow(draw(st.text("12", min_size=1, max_size=3)), draw(st.sampled_from(["", "A", "B"])),
                             draw(st.integers(0, 30_000)), draw(st.sampled_from([0, 0, 500])),
                             draw(st.sampled_from([1, 6, 60])), draw(st.sampled_from([1, 6, 60])),
                             draw(st.sampled_from([0, 0, 30, 90])), draw(st.sampled_from([0, 0, 3, 61])),
                             start, end, *window, draw(st.booleans()) and draw(st.booleans()),
                             draw(st.one_of(st.none(), st.integers(1, 10**6)))))
    return found


@st.composite
def decks(draw: st.DrawFn) -> list[tuple[str, str, str, list[RateRow]]]:
    """(plan, timezone, international prefix, rows) of 1-4 carriers' decks on a few digits."""
    return [(f"carrier:c{k}", draw(st.sampled_from(["UTC", "Europe/Paris"])), draw(st.sampled_from(["00", "00", ""])),
             _deck_rows(draw)) for k in range(draw(st.integers(1, 4)))]


def _builder(plan: str, timezone: str, intl: str, deck_rows: list[RateRow], version: int = 1) -> RateTableBuilder:
    builder = RateTableBuilder(plan, timezone=timezone, international_prefix=intl, version=version)
    for row in deck_rows:
        builder.add(row)
    return builder


numbers = (st.builds(lambda lead, digits: lead + digits, st.sampled_from(["+", "00", "", "+0"]),
                     st.text("12", min_size=1, max_size=6))
           | st.builds(lambda digits: "+" + digits, st.text("120", min_size=1, max_size=6))
           | st.sampled_from(["+44 20", "12a", "+"]))
instants = st.sampled_from([T0, T0 + 3_600_000, T0 + 30 * 60_000, T0 + DAY_MS // 2 + 40 * 60_000, T0 + 3 * DAY_MS,
                            T0 - DAY_MS // 2])


@given(decks(), st.lists(st.tuples(numbers, instants), min_size=1, max_size=20), st.booleans())
def test_the_shared_index_answers_as_each_decks_own_table(
        given_decks: list[tuple[str, str, str, list[RateRow]]], calls: list[tuple[str, int]], filtered: bool) -> None:
    tables = {plan: _builder(plan, tz, intl, deck_rows).build() for plan, tz, intl, deck_rows in given_decks}
    index = BuyIndex().with_decks((_builder(*deck) for deck in given_decks), length_filter=filtered)
    for number, at_ms in calls:
        for plan, table in tables.items():
            assert index.lookup(plan, number, at_ms) == table.lookup(number, at_ms), (plan, number, at_ms)


@given(decks(), rows, st.lists(st.tuples(numbers, instants), min_size=1, max_size=10),
       st.lists(states, min_size=4, max_size=4), st.sampled_from(list(RoutePolicy)), st.booleans(),
       st.integers(0, 2**32))
def test_selection_on_the_shared_index_is_select_routes_on_each_decks_lookup(
        given_decks: list[tuple[str, str, str, list[RateRow]]], sell: RateRow, calls: list[tuple[str, int]],
        carriers: list[CarrierState], policy: RoutePolicy, allow_loss: bool, seed: int) -> None:
    tables = {plan: _builder(plan, tz, intl, deck_rows).build() for plan, tz, intl, deck_rows in given_decks}
    index = BuyIndex().with_decks(_builder(*deck) for deck in given_decks[1:])  # the first one still loading
    plans = list(tables)
    wired = [(CarrierState(f"{c.name}{k}", c.trunk, c.priority, c.weight, c.enabled, c.max_channels, c.live_channels),
              plans[k] if k < len(plans) else None) for k, c in enumerate(carriers)]
    offers = prepare_offers(index, [(state, plan, None if k < 3 else "buys in USD") for k, (state, plan)
                                    in enumerate(wired)])
    live = {state.name: state.live_channels for state, _ in wired}
    verdicts = LossVerdicts()
    for number, at_ms in calls:
        expected_offers: list[tuple[CarrierState, RateRow | Refusal]] = []
        for k, (state, plan) in enumerate(wired):
            if k >= 3:
                expected_offers.append((state, Refusal(DenyReason.NO_RATE, "buys in USD", number)))
            elif plan is None:
                expected_offers.append((state, Refusal(DenyReason.NO_RATE, "no buy deck imported", number)))
            elif index.deck(plan) is None:
                expected_offers.append((state, Refusal(DenyReason.NO_RATE, "buy deck still loading", number)))
            else:
                expected_offers.append((state, tables[plan].lookup(number, at_ms)))
        expected = select_routes(sell, expected_offers, policy, allow_loss=allow_loss, seed=seed)
        choice = select_offers(sell, number, at_ms, index, offers, policy, live_channels=live, allow_loss=allow_loss,
                               seed=seed, verdicts=verdicts)
        assert choice.routes == expected.routes
        assert choice.detail() == expected.detail()
        assert choice == expected
        # what the call keeps (IndexedRoutes: positions, the rows found again when read) gives the same routes
        kept = choice.call_routes(sell, 1)
        assert kept.routes == expected.routes and kept.level == 1 and kept.sell == sell
        assert kept.trunks == tuple(r.trunk for r in expected.routes)
        assert kept.carriers == tuple(r.carrier for r in expected.routes)
        for n, route in enumerate(expected.routes):
            assert kept.carrier_of("", n) == route


def test_a_reloaded_deck_replaces_its_own_rows_only_and_the_old_index_stays_whole() -> None:
    a = [RateRow("44", "UK", 10_000), RateRow("447", "UK mobile", 30_000, blocked=True)]
    b = [RateRow("4", "Europe", 15_000), RateRow("44", "UK", 12_000, effective_from_ms=T0 + DAY_MS)]
    old = BuyIndex().with_decks([_builder("carrier:a", "UTC", "00", a), _builder("carrier:b", "UTC", "00", b)])
    new = old.with_decks([_builder("carrier:a", "UTC", "00", [RateRow("4479", "UK x", 9_000)], version=2)])
    assert new.deck("carrier:b") is old.deck("carrier:b")  # the other deck is shared, not copied
    assert new.deck("carrier:a").version == 2 and old.deck("carrier:a").version == 1  # type: ignore[union-attr]
    # the old index answers as before the reload (a call holding it is never half-reloaded)
    assert old.lookup("carrier:a", "+442071", T0) == RateRow("44", "UK", 10_000)
    blocked = old.lookup("carrier:a", "+447700", T0)
    assert isinstance(blocked, Refusal) and blocked.reason is DenyReason.BLOCKED
    assert blocked.detail == "destination 447 (UK mobile) is blocked"
    missing = new.lookup("carrier:a", "+442071", T0)
    assert isinstance(missing, Refusal) and missing.detail.startswith("no rate for 442071 in plan 'carrier:a' at ")
    assert new.lookup("carrier:a", "+447912", T0) == RateRow("4479", "UK x", 9_000)
    # effective dates: b's 44 row starts tomorrow; today 4 rates the UK
    assert new.lookup("carrier:b", "+442071", T0).prefix == "4"  # type: ignore[union-attr]
    assert new.lookup("carrier:b", "+442071", T0 + DAY_MS).prefix == "44"  # type: ignore[union-attr]
    assert new.lookup("carrier:b", "+447912", T0).prefix == "4"  # type: ignore[union-attr]  # a slot b never had


def test_a_routed_call_makes_the_left_out_carriers_only_when_read() -> None:
    index = BuyIndex().with_decks([_builder("carrier:cheap", "UTC", "00", [RateRow("44", "UK", 10_000)]),
                                   _builder("carrier:dear", "UTC", "00", [RateRow("44", "UK", 30_000)])])
    offers = prepare_offers(index, [(carrier("cheap"), "carrier:cheap", None), (carrier("dear"), "carrier:dear", None),
                                    (carrier("new"), "carrier:new", None)])
    assert offers.loading == ("carrier:new",)
    choice = select_offers(SELL, "+442071", T0, index, offers, RoutePolicy.LCR)
    assert names(choice) == ["cheap"]
    assert choice._later is not None  # nothing made yet
    assert [(s.carrier, s.reason) for s in choice.skipped] == [("dear", SkipReason.LOSS),
                                                               ("new", SkipReason.NO_RATE)]
    assert choice.detail() == ("left out: dear: buys 44 at 0.030000 for 60 s, sold at 0.020000 (revenue assurance); "
                               "new: buy deck still loading")


def test_one_loss_cache_serves_two_indexes_whose_shapes_differ_at_the_same_position() -> None:
    """The selection keys the loss rule by a shape's position in its index (an int, not a
    tuple): the same position in another index is another shape, so a cache shared by both
    (the route book keeps one) must not answer for the other's."""
    sell = RateRow("44", "UK", 20_000, initial_increment=1, increment=1)  # 0.02/min, per second
    per_second = BuyIndex().with_decks([_builder("carrier:a", "UTC", "00", [RateRow("44", "UK", 10_000)])])
    per_minute = BuyIndex().with_decks([_builder("carrier:a", "UTC", "00", [  # 60/60: a 1 s call costs 0.01
        RateRow("44", "UK", 10_000, initial_increment=60, increment=60)])])
    verdicts = LossVerdicts()
    for index, kept in ((per_second, ["a"]), (per_minute, []), (per_second, ["a"])):
        offers = prepare_offers(index, [(carrier("a"), "carrier:a", None)])
        choice = select_offers(sell, "+442071", T0, index, offers, RoutePolicy.LCR, verdicts=verdicts)
        assert names(choice) == kept
        expected = select_routes(sell, [(carrier("a"), index.lookup("carrier:a", "+442071", T0))], RoutePolicy.LCR)
        assert choice == expected
    # a reload adds its new shape after the others: the older index's positions keep their shapes
    reloaded = per_second.with_decks([_builder("carrier:b", "UTC", "00", [
        RateRow("44", "UK", 9_000, connect_fee_micros=500, minimum_seconds=30)])])
    offers = prepare_offers(reloaded, [(carrier("a"), "carrier:a", None), (carrier("b"), "carrier:b", None)])
    choice = select_offers(sell, "+442071", T0, reloaded, offers, RoutePolicy.LCR, verdicts=verdicts)
    assert names(choice) == ["a"] and choice.skipped[0].reason is SkipReason.LOSS  # b: 0.0095 for a 1 s call
    assert per_second.lookup("carrier:a", "+442071", T0) == RateRow("44", "UK", 10_000)


def test_a_live_calls_routes_cost_the_garbage_collector_nothing() -> None:
    """A routed call keeps its routes until it ends, and every young collection walks what a
    live call holds: routes of any origin as one flat tuple of atomic values (two containers
    made per call, not one per route and per row), which a collection stops tracking; routes
    chosen on the buy index as one object holding the carriers' positions (nothing per route
    for a collection to walk)."""
    import gc

    from agent.core.routing import FlatRoutes, Route

    sell = RateRow("44", "UK", 12_000)
    routes = [Route(f"c{i}", f"PJSIP/c{i}", RateRow("44", "UK", 6_000 + i, rate_id=i), 6_000 + i, i, 1)
              for i in range(10)]
    gc.disable()
    try:
        before = gc.get_count()[0]
        kept = FlatRoutes(routes, sell)
        made = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert made <= 2  # the object and its one tuple (the list it is built from is freed)
    gc.collect()
    assert not gc.is_tracked(kept._flat)
    assert kept.routes == tuple(routes) and kept.trunks == tuple(r.trunk for r in routes)
    assert kept.carrier_of("c3", -1) == routes[3] and kept.carrier_of("", 1) == routes[1]
    assert kept.carrier_of("other", 12) is None and kept.first_carrier == "c0"

    index = BuyIndex().with_decks([_builder(f"carrier:c{i}", "UTC", "00", [RateRow("44", "UK", 6_000 + i)])
                                   for i in range(10)])
    offers = prepare_offers(index, [(carrier(f"c{i}"), f"carrier:c{i}", None)
                                    for i in range(10)])
    choice = select_offers(sell, "+442071", T0, index, offers, RoutePolicy.LCR)
    gc.disable()
    try:
        before = gc.get_count()[0]
        indexed = choice.call_routes(sell)
        made = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert made <= 1 and len(gc.get_referents(indexed)) <= 7  # the object: its six slots (order: bytes), its class
    assert indexed.routes == choice.routes and len(choice.routes) == 10
    assert indexed.first_carrier == "c0" and indexed.carriers == tuple(f"c{i}" for i in range(10))
    assert indexed.carrier_of("c3", -1) == choice.routes[3] and indexed.carrier_of("", 1) == choice.routes[1]
    assert indexed.carrier_of("other", 12) is None

    # two carriers of one name (no position says which): the call keeps the flat tuple instead
    twice = prepare_offers(index, [(carrier("c0"), "carrier:c0", None), (carrier("c0"), "carrier:c1", None)])
    doubled = select_offers(sell, "+442071", T0, index, twice, RoutePolicy.LCR)
    kept_flat = doubled.call_routes(sell)
    assert isinstance(kept_flat, FlatRoutes) and kept_flat.routes == doubled.routes and len(doubled.routes) == 2
