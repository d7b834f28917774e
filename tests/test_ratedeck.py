"""Validation of one rate-deck header or row, and duplicate/overlap detection (pure, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.ratedeck import (
    EPOCH,
    STORED_LINE,
    DeckError,
    DeckHeader,
    RangeIndex,
    RateRow,
    parse_header,
    parse_row,
)

FULL = ("prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace,"
        "effective_from,effective_to,weekdays,time_from,time_to,blocked").split(",")


def header(*columns: str) -> DeckHeader:
    parsed = parse_header(list(columns or FULL))
    assert isinstance(parsed, DeckHeader), parsed
    return parsed


def row(line: int = 2, **cells: str) -> RateRow | list[DeckError]:
    """Parse a row of the full header with the given cells (others empty)."""
    values = {"prefix": "33", "rate": "0.01"} | cells
    return parse_row(header(), [values.get(column, "") for column in FULL], line)


def good(**cells: str) -> RateRow:
    parsed = row(**cells)
    assert isinstance(parsed, RateRow), parsed
    return parsed


def errors(**cells: str) -> list[DeckError]:
    parsed = row(**cells)
    assert isinstance(parsed, list), f"expected errors, got {parsed}"
    return parsed


def only_error(column: str, **cells: str) -> str:
    """The reason of the single error, which must be about ``column``."""
    found = errors(**cells)
    assert [e.column for e in found] == [column], found
    return found[0].reason


# --- header ---------------------------------------------------------------------------------

def test_header_is_case_insensitive_and_trimmed() -> None:
    parsed = parse_header([" Prefix", "RATE ", "Destination"])
    assert isinstance(parsed, DeckHeader)
    assert parsed.columns == ("prefix", "rate", "destination")


def test_missing_header_row_is_named() -> None:
    found = parse_header(["33", "0.01", "France"])
    assert isinstance(found, list)
    assert "missing header row" in found[0].reason and found[0].line == 1


def test_empty_header_row() -> None:
    found = parse_header(["", ""])
    assert isinstance(found, list) and "missing header row" in found[0].reason


@pytest.mark.parametrize("missing", ["prefix", "rate"])
def test_missing_required_column(missing: str) -> None:
    columns = [c for c in ("prefix", "rate", "destination") if c != missing]
    found = parse_header(columns)
    assert isinstance(found, list)
    assert [e.reason for e in found] == [f"missing required column {missing!r}"]


def test_unknown_and_repeated_columns_are_all_reported() -> None:
    found = parse_header(["prefix", "rate", "colour", "Rate"])
    assert isinstance(found, list)
    assert [(e.column, e.value) for e in found] == [("#3", "colour"), ("#4", "Rate")]
    assert "unknown column" in found[0].reason and "appears twice" in found[1].reason


def test_minimal_header_uses_defaults() -> None:
    parsed = parse_row(header("prefix", "rate"), ["+4420", "0.5"], 7)
    assert parsed == RateRow(
        line=7, prefix="4420", destination="", rate_micros=500_000, connect_fee_micros=0,
        initial_increment=1, increment=1, minimum_seconds=0, grace_seconds=0,
        effective_from=EPOCH, effective_to=None, weekdays="", time_from_minute=0, time_to_minute=1440,
        blocked=False,
    )


# --- one row --------------------------------------------------------------------------------

def test_full_row_is_parsed() -> None:
    parsed = good(prefix="447", destination=" UK Mobile ", rate="0.0385", connect_fee="0.05",
                  initial_increment="30", increment="6", minimum="60", grace="3",
                  effective_from="2026-01-01", effective_to="2026-07-01T02:00:00+02:00",
                  weekdays="54321", time_from="08:00", time_to="20:00", blocked="No")
    assert (parsed.prefix, parsed.destination, parsed.rate_micros, parsed.connect_fee_micros) == (
        "447", "UK Mobile", 38_500, 50_000)
    assert (parsed.initial_increment, parsed.increment, parsed.minimum_seconds, parsed.grace_seconds) == (30, 6, 60, 3)
    assert parsed.effective_from == datetime(2026, 1, 1, tzinfo=UTC)
    assert parsed.effective_to == datetime(2026, 7, 1, tzinfo=UTC)  # the offset is converted to UTC
    assert (parsed.weekdays, parsed.time_from_minute, parsed.time_to_minute) == ("12345", 480, 1200)
    assert parsed.blocked is False


@pytest.mark.parametrize(("value", "reason"), [
    ("", "prefix is empty"),
    ("+", "prefix is empty"),
    ("44a", "digits only"),
    ("44 20", "digits only"),
    ("-44", "digits only"),
    ("٤٤", "digits only"),  # Arabic-Indic digits are digits to str.isdigit, not to a switch
    ("1" * 33, "longer than 32 digits"),
])
def test_bad_prefix(value: str, reason: str) -> None:
    assert reason in only_error("prefix", prefix=value)


def test_prefix_of_32_digits_is_accepted() -> None:
    assert good(prefix="+" + "9" * 32).prefix == "9" * 32


@pytest.mark.parametrize(("value", "reason"), [
    ("-0.01", "must not be negative"),
    ("abc", "is not a number"),
    ("0.0000001", "more than 6 decimals"),
    ("0.1234560", "more than 6 decimals"),  # no silent rounding, even of a zero
    ("NaN", "not a number"),
    ("", "rate is required"),
])
def test_bad_rate(value: str, reason: str) -> None:
    assert reason in only_error("rate", rate=value)


def test_six_decimals_are_exact() -> None:
    assert good(rate="0.123456").rate_micros == 123_456


def test_bad_connect_fee() -> None:
    assert "must not be negative" in only_error("connect_fee", connect_fee="-1")


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("initial_increment", "0", "at least 1"),
    ("increment", "0", "at least 1"),
    ("increment", "-6", "at least 1"),
    ("increment", "1.5", "whole number"),
    ("increment", "six", "whole number"),
    ("minimum", "-1", "at least 0"),
    ("grace", "x", "whole number"),
    ("initial_increment", "86401", "at most 86400"),
])
def test_bad_seconds(column: str, value: str, reason: str) -> None:
    assert reason in only_error(column, **{column: value})


def test_zero_minimum_and_grace_are_fine() -> None:
    parsed = good(minimum="0", grace="0")
    assert (parsed.minimum_seconds, parsed.grace_seconds) == (0, 0)


@pytest.mark.parametrize(("value", "blocked"), [
    ("1", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False), ("False", False), ("", False),
])
def test_blocked_flag(value: str, blocked: bool) -> None:
    assert good(blocked=value).blocked is blocked


def test_bad_blocked_flag() -> None:
    assert "one of 1, 0, true" in only_error("blocked", blocked="maybe")


def test_naive_timestamps_are_utc() -> None:
    assert good(effective_from="2026-03-01T08:30:00").effective_from == datetime(2026, 3, 1, 8, 30, tzinfo=UTC)


@pytest.mark.parametrize("value", ["2026-13-01", "tomorrow", "01/02/2026"])
def test_bad_dates(value: str) -> None:
    assert "ISO 8601" in only_error("effective_from", effective_from=value)


def test_dates_before_1970_are_refused() -> None:
    assert "before 1970" in only_error("effective_from", effective_from="1969-12-31")


@pytest.mark.parametrize("end", ["2025-12-31", "2026-01-01"])
def test_effective_to_not_after_effective_from(end: str) -> None:
    assert "must be after effective_from" in only_error("effective_to", effective_from="2026-01-01",
                                                         effective_to=end)


def test_effective_to_alone_is_fine() -> None:
    parsed = good(effective_to="2026-01-01")
    assert (parsed.effective_from, parsed.effective_to) == (EPOCH, datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(("value", "stored"), [("12345", "12345"), ("76", "67"), ("1234567", ""), ("", "")])
def test_weekdays_have_one_spelling(value: str, stored: str) -> None:
    assert good(weekdays=value).weekdays == stored


@pytest.mark.parametrize(("value", "reason"), [("8", "weekday digits"), ("Mon", "weekday digits"),
                                                ("112", "twice"), ("1-5", "weekday digits")])
def test_bad_weekdays(value: str, reason: str) -> None:
    assert reason in only_error("weekdays", weekdays=value)


def test_window_may_wrap_midnight_and_end_at_24() -> None:
    parsed = good(time_from="20:00", time_to="08:00")
    assert (parsed.time_from_minute, parsed.time_to_minute) == (1200, 480)
    assert good(time_from="22:00", time_to="24:00").time_to_minute == 1440
    assert good(time_from="22:00", time_to="00:00").time_to_minute == 1440


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("time_from", "24:00", "between 00:00 and 23:59"),
    ("time_to", "24:01", "between 00:00 and 24:00"),
    ("time_from", "12:60", "between"),
    ("time_from", "8h", "HH:MM"),
    ("time_to", "800", "HH:MM"),
])
def test_bad_times(column: str, value: str, reason: str) -> None:
    assert reason in only_error(column, **{column: value})


def test_empty_window_is_refused() -> None:
    assert "empty window" in only_error("time_to", time_from="08:00", time_to="08:00")


def test_every_problem_of_a_row_is_reported() -> None:
    found = errors(prefix="x1", rate="-1", increment="0", blocked="maybe", effective_to="never")
    assert [e.column for e in found] == ["prefix", "rate", "increment", "effective_to", "blocked"]
    assert {e.line for e in found} == {2}


def test_wrong_number_of_fields() -> None:
    found = parse_row(header("prefix", "rate"), ["33", "0.01", "extra"], 9)
    assert isinstance(found, list)
    assert found[0].line == 9 and "3 fields where the header has 2" in found[0].reason


def test_error_text_names_file_line_column_value_and_reason() -> None:
    error = DeckError(12, "rate", "-1", "must not be negative")
    assert error.describe("deck.csv") == "deck.csv:12: column rate: value '-1': must not be negative"
    assert DeckError(3, "", "", "line has 2 fields").describe("d.csv") == "d.csv:3: line has 2 fields"
    assert DeckError(0, "", "", "the file is empty").describe("d.csv") == "d.csv: the file is empty"


# --- duplicates and overlaps ----------------------------------------------------------------

def at(day: int) -> datetime:
    return EPOCH + timedelta(days=day)


def test_duplicate_prefix_with_same_effective_from() -> None:
    index = RangeIndex()
    assert index.add("33", "", 0, EPOCH, None, 2) is None
    clash = index.add("33", "", 0, EPOCH, None, 5)
    assert clash is not None and clash.duplicate and clash.other_line == 2
    assert clash.reason() == "duplicate of line 2: same prefix, effective_from and time window"


def test_overlapping_ranges_are_refused_in_any_order() -> None:
    index = RangeIndex()
    assert index.add("33", "", 0, at(10), at(20), 2) is None
    clash = index.add("33", "", 0, at(5), at(11), 3)  # arrives before the known range
    assert clash is not None and not clash.duplicate and clash.other_line == 2
    assert "overlaps line 2 (effective 1970-01-11T00:00:00+00:00 to 1970-01-21T00:00:00+00:00)" in clash.reason()
    open_ended = index.add("33", "", 0, at(19), None, 4)
    assert open_ended is not None and open_ended.other_line == 2


def test_adjacent_ranges_and_other_windows_are_fine() -> None:
    index = RangeIndex()
    assert index.add("39", "", 0, EPOCH, at(100), 2) is None
    assert index.add("39", "", 0, at(100), None, 3) is None  # half-open: [.., 100) then [100, ..)
    assert index.add("39", "12345", 480, EPOCH, None, 4) is None  # same prefix, another window
    assert index.add("39", "12345", 1200, EPOCH, None, 5) is None
    assert index.add("039", "", 0, EPOCH, None, 6) is None  # a leading zero makes another prefix
    assert index.add("39", "12345", 480, at(3), None, 7) is not None


def test_clash_with_a_stored_rate_says_so() -> None:
    index = RangeIndex()
    index.add("33", "", 0, EPOCH, None, STORED_LINE)
    clash = index.add("33", "", 0, at(1), None, 8)
    assert clash is not None and "a rate already stored in the plan" in clash.reason()
    assert "--replace" in clash.reason()


ranges = st.lists(st.tuples(st.integers(0, 50), st.one_of(st.none(), st.integers(1, 20))), max_size=25)


@given(ranges)
def test_index_agrees_with_brute_force(spans: list[tuple[int, int | None]]) -> None:
    index = RangeIndex()
    accepted: list[tuple[int, float]] = []
    for line, (start, length) in enumerate(spans, start=2):
        end = None if length is None else start + length
        clash = index.add("44", "", 0, at(start), None if end is None else at(end), line)
        stop = float("inf") if end is None else end
        expected = any(s == start or (start < e and s < stop) for s, e in accepted)
        assert (clash is not None) == expected
        if clash is None:
            accepted.append((start, stop))


@pytest.mark.parametrize("control", ["\x00", "\x01", "\n", "\x7f"])
def test_a_control_character_in_a_destination_is_named_with_its_line(control: str) -> None:
    """Issue 14.13: a NUL reached the database as a raw driver traceback; now the deck's own
    error names the line, the column and the character."""
    errors = row(7, destination=f"Fra{control}nce")
    assert isinstance(errors, list) and len(errors) == 1
    assert (errors[0].line, errors[0].column) == (7, "destination")
    assert f"control character {control!r} at position 4" in errors[0].reason
