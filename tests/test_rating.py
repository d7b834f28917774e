"""Rating arithmetic (DESIGN §4): invariants by hypothesis, and the README's worked examples."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.core.errors import InvalidInput
from agent.core.money import format_amount, parse_amount
from agent.core.rating import (
    MAX_SECONDS_CAP,
    RateRow,
    billed_seconds,
    cost_micros,
    cost_micros_for_seconds,
    max_seconds,
    quote,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def rows(*, max_rate: int = 10**9, min_rate: int = 0, max_fee: int = 10**7) -> st.SearchStrategy[RateRow]:
    return st.builds(
        lambda **fields: RateRow("33", "France", **fields),
        rate_micros=st.integers(min_rate, max_rate),
        connect_fee_micros=st.one_of(st.just(0), st.integers(0, max_fee)),
        initial_increment=st.one_of(st.sampled_from([1, 6, 30, 60]), st.integers(1, 120)),
        increment=st.one_of(st.sampled_from([1, 6, 60]), st.integers(1, 120)),
        minimum_seconds=st.one_of(st.just(0), st.integers(0, 300)),
        grace_seconds=st.one_of(st.just(0), st.integers(0, 30)),
    )


# ---------------------------------------------------------------------------- the forward rule


@given(rows(), st.integers(0, 20_000))
def test_cost_is_non_decreasing_in_duration(row: RateRow, seconds: int) -> None:
    assert cost_micros_for_seconds(row, seconds) <= cost_micros_for_seconds(row, seconds + 1)


@given(rows(), st.integers(0, 20_000_000))
def test_a_started_second_counts(row: RateRow, duration_ms: int) -> None:
    assert cost_micros(row, duration_ms) == cost_micros_for_seconds(row, -(-duration_ms // 1000))


@given(rows(), st.integers(1, 20_000))
def test_billed_seconds_respect_minimum_and_increments(row: RateRow, seconds: int) -> None:
    assume(seconds > row.grace_seconds)
    billed = billed_seconds(row, seconds)
    wanted = max(seconds, row.minimum_seconds)
    assert billed >= wanted
    if wanted <= row.initial_increment:
        assert billed == row.initial_increment
    else:
        # whole blocks after the first one, and never a block more than needed
        assert (billed - row.initial_increment) % row.increment == 0
        assert billed - wanted < row.increment


@given(rows(), st.integers(0, 20_000))
def test_cost_is_the_fee_plus_one_rounding_up(row: RateRow, seconds: int) -> None:
    assume(seconds > row.grace_seconds)
    billed = billed_seconds(row, seconds)
    exact = Decimal(row.rate_micros * billed) / 60
    usage = cost_micros_for_seconds(row, seconds) - row.connect_fee_micros
    assert exact <= usage < exact + 1


@given(rows(), st.data())
def test_grace_waives_everything_including_the_connect_fee(row: RateRow, data: st.DataObject) -> None:
    seconds = data.draw(st.integers(0, row.grace_seconds))
    q = quote(row, seconds * 1000)
    assert q.cost_micros == 0 and q.connect_fee_micros == 0 and q.blocks == () and q.waived
    after = cost_micros_for_seconds(row, row.grace_seconds + 1)
    assert after >= row.connect_fee_micros
    assert after > 0 or (row.rate_micros == 0 and row.connect_fee_micros == 0)


@given(rows(), st.integers(0, 20_000_000))
def test_quote_lines_add_up_to_the_total(row: RateRow, duration_ms: int) -> None:
    q = quote(row, duration_ms)
    assert q.cost_micros == cost_micros(row, duration_ms)
    assert q.cost_micros == q.connect_fee_micros + sum(block.cost_micros for block in q.blocks)
    assert all(block.cost_micros >= 0 for block in q.blocks)
    if q.blocks:
        assert q.blocks[0].from_second == 0 and q.blocks[-1].to_second == q.billed_seconds
        assert all(b.to_second - b.from_second == b.count * b.seconds_each for b in q.blocks)
        assert all(a.to_second == b.from_second for a, b in zip(q.blocks, q.blocks[1:], strict=False))


@given(rows(), st.integers(1, 120), st.integers(0, 5_000))
def test_nibble_debits_add_up_to_the_final_cost(row: RateRow, nibble_seconds: int, seconds: int) -> None:
    debits = []
    covered = 0
    while covered < seconds:
        nxt = min(covered + nibble_seconds, seconds)
        debits.append(cost_micros_for_seconds(row, nxt) - cost_micros_for_seconds(row, covered))
        covered = nxt
    assert all(debit >= 0 for debit in debits)
    assert sum(debits) == cost_micros_for_seconds(row, seconds)


def test_negative_durations_are_refused() -> None:
    row = RateRow("33", "France", 12_000)
    with pytest.raises(InvalidInput, match="-1 ms must not be negative"):
        cost_micros(row, -1)
    with pytest.raises(InvalidInput, match="must not be negative"):
        cost_micros_for_seconds(row, -5)


def test_rate_row_is_the_sessions_tariff() -> None:
    row = RateRow("33", "France", 12_000, connect_fee_micros=1_000, initial_increment=60, increment=60)
    assert row.cost_micros(61_000) == 1_000 + 24_000
    assert row.max_seconds(25_000) == 120


# ---------------------------------------------------------------------------- the inverse


def brute_force_max(row: RateRow, budget: int) -> int:
    """The literal definition plus the documented deny rule: the first charged second must fit."""
    if cost_micros_for_seconds(row, row.grace_seconds + 1) > budget:
        return 0
    d = row.grace_seconds + 1
    while cost_micros_for_seconds(row, d + 1) <= budget:
        d += 1
    return d


@given(rows(min_rate=6_000, max_rate=2_000_000, max_fee=50_000), st.integers(-1_000, 300_000))
def test_max_seconds_matches_brute_force(row: RateRow, budget: int) -> None:
    assert max_seconds(row, budget) == brute_force_max(row, budget)


@given(rows(min_rate=1), st.integers(0, 10**12))
def test_max_seconds_is_exact(row: RateRow, budget: int) -> None:
    best = max_seconds(row, budget)
    if best == 0:
        assert cost_micros_for_seconds(row, row.grace_seconds + 1) > budget
    else:
        assert best > row.grace_seconds
        assert cost_micros_for_seconds(row, best) <= budget
        if best < MAX_SECONDS_CAP:  # 10**9 s: only a rate of a few micro-units a minute gets there
            assert budget < cost_micros_for_seconds(row, best + 1)


@given(rows(), st.integers(0, 10**9), st.integers(1, 100_000))
def test_max_seconds_cap(row: RateRow, budget: int, cap: int) -> None:
    best = max_seconds(row, budget, cap_seconds=cap)
    assert 0 <= best <= cap
    if best:
        assert cost_micros_for_seconds(row, best) <= budget
    if 0 < best < cap:
        assert budget < cost_micros_for_seconds(row, best + 1)


def test_budget_that_only_covers_the_grace_period_is_denied() -> None:
    row = RateRow("33", "France", 12_000, connect_fee_micros=50_000, grace_seconds=5)
    # Five seconds would be free, but a call is only allowed when the first charged second fits.
    assert cost_micros_for_seconds(row, 5) == 0
    assert max_seconds(row, 0) == 0
    assert max_seconds(row, 50_199) == 0  # fee 50_000 + ceil(12_000 * 6 / 60) = 51_200 for 6 s
    assert max_seconds(row, 51_200) == 6


def test_connect_fee_plus_first_block_must_fit() -> None:
    row = RateRow("33", "France", 120_000, connect_fee_micros=50_000, initial_increment=30, increment=6)
    assert max_seconds(row, 109_999) == 0  # 0.05 + 30 s at 0.12/min = 0.11
    assert max_seconds(row, 110_000) == 30


def test_negative_budget_affords_nothing() -> None:
    assert max_seconds(RateRow("33", "France", 12_000), -1) == 0
    assert max_seconds(RateRow("33", "France", 0), -1) == 0


def test_free_destination_is_capped() -> None:
    free = RateRow("800", "Toll free", 0)
    assert max_seconds(free, 0) == MAX_SECONDS_CAP
    assert max_seconds(free, 0, cap_seconds=14_400) == 14_400
    assert max_seconds(RateRow("800", "Toll free", 0, connect_fee_micros=10), 9) == 0
    with pytest.raises(InvalidInput):
        max_seconds(free, 0, cap_seconds=0)


def test_minimum_longer_than_affordable_is_denied() -> None:
    row = RateRow("33", "France", 60_000, minimum_seconds=60)  # 1_000 micro-units a second, 60 s at least
    assert max_seconds(row, 59_999) == 0
    assert max_seconds(row, 60_000) == 60
    assert max_seconds(row, 60_500) == 60


# ------------------------------------------------------------------- README worked examples

ROW_SPEC = re.compile(
    r"^`(?P<prefix>\d+)`: (?P<rate>[\d.]+)/min, connect (?P<fee>[\d.]+), (?P<first>\d+)/(?P<inc>\d+), "
    r"minimum (?P<minimum>\d+) s, grace (?P<grace>\d+) s$"
)


def readme_table(title: str) -> list[list[str]]:
    """The cells of the first Markdown table after the heading ``title`` in README.md."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(title)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    assert len(table) > 2, f"no table under {title!r} in README.md"
    return table[2:]  # without the header and the --- line


def parse_row_spec(spec: str) -> RateRow:
    match = ROW_SPEC.match(spec)
    assert match, f"README rate row {spec!r} does not follow the documented form"
    return RateRow(match["prefix"], "", parse_amount(match["rate"]), parse_amount(match["fee"]), int(match["first"]),
                   int(match["inc"]), int(match["minimum"]), int(match["grace"]))


def test_readme_cost_examples() -> None:
    examples = readme_table("### Worked examples: cost")
    assert len(examples) >= 8
    for number, spec, seconds, billed, cost in examples:
        row = parse_row_spec(spec)
        digits = number.strip("`")
        digits = digits[1:] if digits.startswith("+") else digits.removeprefix("00")
        assert digits.startswith(row.prefix), number
        duration_ms = int(Decimal(seconds.removesuffix(" s")) * 1000)
        q = quote(row, duration_ms)
        assert (str(q.billed_seconds), format_amount(q.cost_micros)) == (billed, cost), (number, spec, seconds)


def test_readme_max_duration_examples() -> None:
    examples = readme_table("### Worked examples: max duration")
    assert len(examples) >= 4
    for spec, budget, best, cost_at_best, cost_after in examples:
        row = parse_row_spec(spec)
        found = max_seconds(row, parse_amount(budget))
        assert str(found) == best, (spec, budget)
        assert format_amount(cost_micros_for_seconds(row, found)) == cost_at_best, (spec, budget)
        if cost_after != "-":
            assert format_amount(cost_micros_for_seconds(row, found + 1)) == cost_after, (spec, budget)
