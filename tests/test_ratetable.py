"""The in-memory rate table: normalisation, longest prefix, effective ranges, windows, blocked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.errors import InvalidInput
from agent.core.events import DenyReason
from agent.core.ratetable import (
    RateTable,
    RateTableBuilder,
    Refusal,
    candidate_prefixes,
    epoch_ms,
    epoch_ms_ceil,
)
from agent.core.rating import RateRow

WEDNESDAY_10H = epoch_ms(datetime(2026, 3, 4, 10, 0, tzinfo=UTC))


def at(text: str) -> int:
    return epoch_ms(datetime.fromisoformat(text))


def table(*rows: RateRow, timezone: str = "UTC", international_prefix: str = "00",
          length_filter: bool | None = None) -> RateTable:
    builder = RateTableBuilder("retail", timezone=timezone, international_prefix=international_prefix)
    for row in rows:
        builder.add(row)
    return builder.build(length_filter=length_filter)


def rate(prefix: str, micros: int = 10_000, **fields: object) -> RateRow:
    return RateRow(prefix, fields.pop("destination", f"dest {prefix}"), micros, **fields)  # type: ignore[arg-type]


def found(result: RateRow | Refusal) -> RateRow:
    assert isinstance(result, RateRow), result
    return result


def refused(result: RateRow | Refusal, reason: DenyReason) -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.reason is reason, result
    return result


# ------------------------------------------------------------------------------ longest prefix


@pytest.mark.parametrize("length_filter", [False, True])
def test_longest_prefix_wins(length_filter: bool) -> None:
    t = table(rate("33", 1), rate("336", 2), rate("3361", 3), rate("4", 4), length_filter=length_filter)
    assert found(t.lookup("+33612345678", WEDNESDAY_10H)).rate_micros == 3
    assert found(t.lookup("+33623456789", WEDNESDAY_10H)).rate_micros == 2
    assert found(t.lookup("+33145678901", WEDNESDAY_10H)).prefix == "33"
    assert found(t.lookup("33", WEDNESDAY_10H)).prefix == "33"
    assert found(t.lookup("4", WEDNESDAY_10H)).prefix == "4"


def test_the_answer_is_the_whole_row() -> None:
    row = rate("336", 45_000, destination="France Mobile", connect_fee_micros=50_000, initial_increment=30,
               increment=6, minimum_seconds=10, grace_seconds=3, rate_id=17)
    assert t_lookup(table(row), "+33612345678") == row


def t_lookup(t: RateTable, number: str) -> RateRow:
    return found(t.lookup(number, WEDNESDAY_10H))


def test_leading_zeros_are_part_of_a_prefix() -> None:
    t = table(rate("44", 1), rate("044", 2), international_prefix="")
    assert t_lookup(t, "0441234").rate_micros == 2
    assert t_lookup(t, "441234").rate_micros == 1


def test_no_rate_is_a_refusal_never_a_zero_cost() -> None:
    t = table(rate("33"))
    refusal = refused(t.lookup("+999123456", WEDNESDAY_10H), DenyReason.NO_RATE)
    assert "no rate for 999123456" in refusal.detail and "'retail'" in refusal.detail
    refused(table().lookup("+33123", WEDNESDAY_10H), DenyReason.NO_RATE)


def test_number_longer_than_every_prefix_and_shorter_than_some() -> None:
    t = table(rate("33123456789012"), rate("3"))
    assert t_lookup(t, "331234567890123456789").prefix == "33123456789012"
    assert t_lookup(t, "33").prefix == "3"


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(("number", "prefix"), [
    ("+33612345678", "336"),
    ("0033612345678", "336"),
    ("33612345678", "336"),
    ("+0033612345678", None),  # '+' removed, then "0033..." is not an international number
])
def test_normalisation_with_the_default_international_prefix(number: str, prefix: str | None) -> None:
    t = table(rate("336"))
    result = t.lookup(number, WEDNESDAY_10H)
    if prefix is None:
        refused(result, DenyReason.NO_RATE)
    else:
        assert found(result).prefix == prefix


def test_international_prefix_is_a_plan_setting() -> None:
    nanp = table(rate("33"), rate("1212"), international_prefix="011")
    assert t_lookup(nanp, "01133612345678").prefix == "33"
    assert t_lookup(nanp, "12125550100").prefix == "1212"
    assert nanp.normalise("01133612345678") == "33612345678"
    plain = table(rate("0033"), international_prefix="")
    assert t_lookup(plain, "0033612345678").prefix == "0033"


@pytest.mark.parametrize(("number", "why"), [
    ("", "has no digits"),
    ("+", "has no digits after the leading '+'"),
    ("00", "has no digits after the international prefix"),
    ("33abc", "has 'a', which is not a digit"),
    ("+33 6 12", "has ' ', which is not a digit"),
    ("33-612", "has '-', which is not a digit"),
    ("*33#", "has '*', which is not a digit"),
    ("\uff13\uff13612", "which is not a digit"),  # full-width digits are digits to Python, not to us
    ("3" * 65, "is longer than 64 digits"),
])
def test_bad_numbers_are_refused_with_the_number_named(number: str, why: str) -> None:
    t = table(rate("33"))
    refusal = refused(t.lookup(number, WEDNESDAY_10H), DenyReason.BAD_REQUEST)
    assert why in refusal.detail
    assert repr(number[:37]).rstrip("'") in refusal.detail
    with pytest.raises(InvalidInput, match="not a digit|no digits|longer than"):
        t.normalise(number)
    assert candidate_prefixes(number, "00") == []


def test_candidate_prefixes() -> None:
    assert candidate_prefixes("+3361", "00") == ["3", "33", "336", "3361"]
    assert len(candidate_prefixes("1" * 40, "00")) == 32


# ------------------------------------------------------------------------------ effective ranges


def test_effective_range_is_half_open() -> None:
    change = at("2026-07-01T00:00:00+00:00")
    t = table(rate("33", 1, effective_to_ms=change), rate("33", 2, effective_from_ms=change))
    assert found(t.lookup("331", change - 1)).rate_micros == 1
    assert found(t.lookup("331", change)).rate_micros == 2


def test_row_not_yet_effective_falls_back_to_a_shorter_prefix() -> None:
    start = at("2026-07-01T00:00:00+00:00")
    t = table(rate("33", 1), rate("336", 2, effective_from_ms=start))
    assert found(t.lookup("3361", start - 1)).prefix == "33"
    assert found(t.lookup("3361", start)).prefix == "336"


def test_expired_rate_is_no_rate() -> None:
    end = at("2026-01-01T00:00:00+00:00")
    t = table(rate("33", 1, effective_to_ms=end))
    refused(t.lookup("331", end), DenyReason.NO_RATE)


def test_sub_millisecond_bounds_keep_their_meaning() -> None:
    bound = datetime(2026, 7, 1, 0, 0, 0, 500, tzinfo=UTC)  # 0.5 ms past midnight
    t = table(rate("33", 1, effective_from_ms=epoch_ms_ceil(bound)))
    refused(t.lookup("331", epoch_ms(bound)), DenyReason.NO_RATE)  # 00:00:00.000 is before the bound
    assert found(t.lookup("331", epoch_ms(bound) + 1)).rate_micros == 1


# ------------------------------------------------------------------------------ time windows


def peak_offpeak(timezone: str = "UTC") -> RateTable:
    return table(
        rate("33", 100, weekdays="12345", time_from_minute=8 * 60, time_to_minute=20 * 60, destination="peak"),
        rate("33", 10, destination="off-peak"),
        timezone=timezone,
    )


@pytest.mark.parametrize(("moment", "expected"), [
    ("2026-03-04T08:00:00+00:00", "peak"),  # Wednesday, the window opens
    ("2026-03-04T19:59:59+00:00", "peak"),
    ("2026-03-04T20:00:00+00:00", "off-peak"),  # half-open: 20:00 is outside
    ("2026-03-04T07:59:00+00:00", "off-peak"),
    ("2026-03-07T10:00:00+00:00", "off-peak"),  # Saturday
])
def test_peak_window_beats_the_all_day_row(moment: str, expected: str) -> None:
    assert found(peak_offpeak().lookup("331", at(moment))).destination == expected


@pytest.mark.parametrize(("moment", "expected"), [
    ("2026-01-14T07:30:00+00:00", "peak"),  # 08:30 in Paris (UTC+1)
    ("2026-01-14T19:30:00+00:00", "off-peak"),  # 20:30 in Paris
    ("2026-07-15T06:30:00+00:00", "peak"),  # 08:30 in Paris (UTC+2, summer time)
    ("2026-07-15T18:30:00+00:00", "off-peak"),  # 20:30 in Paris
])
def test_windows_are_read_in_the_plans_timezone(moment: str, expected: str) -> None:
    assert found(peak_offpeak("Europe/Paris").lookup("331", at(moment))).destination == expected


def test_weekdays_are_read_in_the_plans_timezone() -> None:
    rows = (rate("33", 1, weekdays="67", destination="weekend"), rate("33", 2, destination="week"))
    friday_2330_utc = at("2026-03-06T23:30:00+00:00")  # Saturday 00:30 in Paris
    assert found(table(*rows, timezone="Europe/Paris").lookup("331", friday_2330_utc)).destination == "weekend"
    assert found(table(*rows).lookup("331", friday_2330_utc)).destination == "week"


def night_window() -> RateTable:
    """Weeknights open Monday-Friday at 22:00 and close at 06:00 the next morning."""
    return table(
        rate("44", 5, weekdays="12345", time_from_minute=22 * 60, time_to_minute=6 * 60, destination="night"),
        rate("44", 50, destination="day"),
    )


@pytest.mark.parametrize(("moment", "expected"), [
    ("2026-03-06T23:00:00+00:00", "night"),  # Friday 23:00: Friday's window
    ("2026-03-07T02:00:00+00:00", "night"),  # Saturday 02:00: still Friday's window
    ("2026-03-07T06:00:00+00:00", "day"),  # Saturday 06:00: closed
    ("2026-03-07T23:00:00+00:00", "day"),  # Saturday 23:00: no window opens on Saturday
    ("2026-03-09T02:00:00+00:00", "day"),  # Monday 02:00: Sunday opened nothing
    ("2026-03-10T02:00:00+00:00", "night"),  # Tuesday 02:00: Monday's window
    ("2026-03-10T21:59:59+00:00", "day"),
])
def test_a_window_that_wraps_midnight_belongs_to_the_day_it_opens(moment: str, expected: str) -> None:
    assert found(night_window().lookup("441", at(moment))).destination == expected


def test_window_with_no_fallback_falls_back_to_a_shorter_prefix() -> None:
    t = table(rate("3", 1), rate("33", 2, weekdays="67"))
    assert found(t.lookup("331", at("2026-03-07T10:00:00+00:00"))).prefix == "33"  # Saturday
    assert found(t.lookup("331", at("2026-03-04T10:00:00+00:00"))).prefix == "3"  # Wednesday


def test_most_specific_window_wins_then_the_latest_effective_from() -> None:
    t = table(
        rate("33", 1, destination="all day"),
        rate("33", 2, weekdays="3", destination="wednesdays"),
        rate("33", 3, weekdays="3", time_from_minute=9 * 60, time_to_minute=11 * 60, destination="wed 9-11"),
        rate("33", 4, weekdays="12345", time_from_minute=9 * 60, time_to_minute=11 * 60, destination="weekdays 9-11"),
    )
    assert found(t.lookup("331", WEDNESDAY_10H)).destination == "wed 9-11"
    assert found(t.lookup("331", at("2026-03-04T12:00:00+00:00"))).destination == "wednesdays"
    assert found(t.lookup("331", at("2026-03-05T10:00:00+00:00"))).destination == "weekdays 9-11"
    assert found(t.lookup("331", at("2026-03-05T12:00:00+00:00"))).destination == "all day"
    # Tuesday is in both windows, which cover as many minutes: the row effective last wins.
    newer = table(rate("33", 1, weekdays="12", destination="old"),
                  rate("33", 2, weekdays="23", effective_from_ms=WEDNESDAY_10H - 10**9, destination="new"))
    assert found(newer.lookup("331", at("2026-03-03T10:00:00+00:00"))).destination == "new"


# ------------------------------------------------------------------------------ blocked


def test_blocked_destination_is_refused_with_its_name() -> None:
    t = table(rate("1", 1), rate("1900", 0, blocked=True, destination="Premium"), rate("19005", 2))
    refusal = refused(t.lookup("+19001234567", WEDNESDAY_10H), DenyReason.BLOCKED)
    assert refusal.detail == "destination 1900 (Premium) is blocked"
    assert refusal.row is not None and refusal.row.prefix == "1900"
    assert found(t.lookup("+19005123456", WEDNESDAY_10H)).prefix == "19005"  # a longer prefix is open
    assert found(t.lookup("+12125550100", WEDNESDAY_10H)).prefix == "1"


def test_block_can_be_time_limited() -> None:
    start = at("2026-07-01T00:00:00+00:00")
    t = table(rate("88", 1), rate("882", 0, blocked=True, effective_from_ms=start))
    assert found(t.lookup("8821", start - 1)).prefix == "88"
    refused(t.lookup("8821", start), DenyReason.BLOCKED)


# ------------------------------------------------------------------------------ building


@pytest.mark.parametrize(("fields", "message"), [
    ({"increment": 0}, "increment 0 must be at least 1 second"),
    ({"initial_increment": 0}, "initial_increment 0 must be at least 1 second"),
    ({"rate_micros": -1}, "rate_micros -1 must not be negative"),
    ({"grace_seconds": -1}, "grace_seconds -1 must not be negative"),
    ({"effective_from_ms": 10, "effective_to_ms": 10}, "is empty"),
    ({"weekdays": "18"}, "weekdays '18'"),
    ({"time_from_minute": 60, "time_to_minute": 60}, "not empty"),
    ({"time_to_minute": 1441}, "minutes of the day"),
])
def test_unusable_rows_are_refused_naming_the_prefix(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match="rate '33'") as caught:
        table(RateRow("33", "x", 1)._replace(**fields))
    assert message in str(caught.value)


@pytest.mark.parametrize("prefix", ["", "3a", "+33", "1" * 33])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    builder = RateTableBuilder("retail")
    with pytest.raises(InvalidInput, match="prefix"):
        builder.add_fields(prefix, "", 1, 0, 1, 1, 0, 0, 0, None, "", 0, 1440, False, None)


def test_bad_plan_settings_are_refused() -> None:
    with pytest.raises(InvalidInput, match="'Mars/Olympus' is not an IANA time zone"):
        RateTableBuilder("retail", timezone="Mars/Olympus")
    with pytest.raises(InvalidInput, match="international prefix '\\+'"):
        RateTableBuilder("retail", international_prefix="+")


def test_table_counts_rows_and_prefixes() -> None:
    t = peak_offpeak()
    assert (len(t), t.prefix_count) == (2, 1)


# ------------------------------------------------------------------------------ against brute force

prefix_sets = st.lists(st.text("0123", min_size=1, max_size=8), min_size=1, max_size=40, unique=True)


@settings(max_examples=60, deadline=None)
@given(prefix_sets, st.lists(st.text("0123", min_size=1, max_size=12), min_size=1, max_size=30))
def test_lookup_is_the_longest_matching_prefix(prefixes: list[str], numbers: list[str]) -> None:
    rows = [rate(p, i) for i, p in enumerate(prefixes)]
    plain = table(*rows, international_prefix="")
    filtered = table(*rows, international_prefix="", length_filter=True)
    for number in numbers:
        matching = [p for p in prefixes if number.startswith(p)]
        for t in (plain, filtered):
            result = t.lookup(number, WEDNESDAY_10H)
            if matching:
                assert found(result).prefix == max(matching, key=len)
            else:
                refused(result, DenyReason.NO_RATE)
