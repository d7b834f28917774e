"""Rate decks: validating one CSV header or row, and finding duplicate or overlapping rows.

Pure (no I/O, no clock): the importer in ``agent/adapters/sql/rate_import.py`` reads the file
and feeds this module one row at a time. Errors are values (:class:`DeckError`), never raised,
so that one pass over a file reports every bad cell with its line, column, value and reason.

Invariants of a :class:`RateRow` (what the rating engine may rely on, DESIGN §4):

* ``prefix`` is 1-32 ASCII digits (a leading ``+`` in the file is dropped);
* money is int micro-units through :func:`agent.core.money.parse_amount` (never negative,
  never more than six decimals);
* ``initial_increment`` and ``increment`` are 1..86400 s, ``minimum`` and ``grace`` 0..86400 s;
* ``effective_from`` is an aware UTC datetime (the epoch when the cell is empty),
  ``effective_to`` is ``None`` (open-ended) or strictly after it: the range is half-open;
* ``weekdays`` is "" (every day) or sorted distinct ISO weekday digits, never all seven;
  ``[time_from_minute, time_to_minute)`` are minutes of the day, 0..1439 and 1..1440, never
  equal; ``time_to_minute < time_from_minute`` means the window wraps past midnight.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.core.clock import parse_iso8601
from agent.core.money import MoneyError, parse_amount

REQUIRED_COLUMNS = ("prefix", "rate")
OPTIONAL_COLUMNS = (
    "destination", "connect_fee", "initial_increment", "increment", "minimum", "grace",
    "effective_from", "effective_to", "blocked", "weekdays", "time_from", "time_to",
)
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_PREFIX_DIGITS = 32
MAX_DESTINATION_CHARS = 128
MAX_SECONDS = 86_400  # a billing block longer than a day is a typo, and it keeps INT columns safe
MINUTES_PER_DAY = 1440
ALL_WEEKDAYS = "1234567"

_TRUE = frozenset(("1", "true", "yes"))
_FALSE = frozenset(("0", "false", "no"))


@dataclass(frozen=True, slots=True)
class DeckError:
    """One problem in a deck. ``line`` 0 means the file as a whole; ``column`` "" the whole line."""

    line: int
    column: str
    value: str
    reason: str

    def describe(self, source: str) -> str:
        """``FILE:LINE: column COL: value 'V': reason`` (the parts that apply)."""
        parts = [f"{source}:{self.line}" if self.line else source]
        if self.column:
            parts.append(f"column {self.column}")
            value = self.value if len(self.value) <= 60 else self.value[:57] + "..."
            parts.append(f"value {value!r}")
        parts.append(self.reason)
        return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class RateRow:
    """A validated rate row (see the module docstring for its invariants)."""

    line: int
    prefix: str
    destination: str
    rate_micros: int
    connect_fee_micros: int
    initial_increment: int
    increment: int
    minimum_seconds: int
    grace_seconds: int
    effective_from: datetime
    effective_to: datetime | None
    weekdays: str
    time_from_minute: int
    time_to_minute: int
    blocked: bool


@dataclass(frozen=True, slots=True)
class DeckHeader:
    """The columns of a deck, normalised to lower case, in file order."""

    columns: tuple[str, ...]
    # For each entry of _FIELDS, the index of its column in a row (None: column absent).
    positions: tuple[int | None, ...]

    @property
    def width(self) -> int:
        return len(self.columns)

    def cell(self, cells: Sequence[str], column: str) -> str:
        return cells[self.columns.index(column)].strip() if column in self.columns else ""


def parse_header(cells: Sequence[str], line: int = 1) -> DeckHeader | list[DeckError]:
    """Check the header row: every column known, none twice, ``prefix`` and ``rate`` present."""
    names = tuple(cell.strip().lower() for cell in cells)
    if not any(names):
        return [DeckError(line, "", "", "missing header row: the first line must name the columns, "
                                        "e.g. prefix,rate,destination")]
    if not any(name in KNOWN_COLUMNS for name in names):
        return [DeckError(line, "", "", f"missing header row: found {', '.join(map(repr, names))} "
                                        f"where column names such as prefix,rate were expected")]
    errors: list[DeckError] = []
    for index, name in enumerate(names):
        if name not in KNOWN_COLUMNS:
            errors.append(DeckError(line, f"#{index + 1}", cells[index],
                                    f"unknown column (known: {', '.join(KNOWN_COLUMNS)})"))
        elif name in names[:index]:
            errors.append(DeckError(line, f"#{index + 1}", cells[index], "column appears twice"))
    for name in REQUIRED_COLUMNS:
        if name not in names:
            errors.append(DeckError(line, "", "", f"missing required column {name!r}"))
    if errors:
        return errors
    return DeckHeader(names, tuple(names.index(column) if column in names else None for column, *_ in _FIELDS))


def parse_row(header: DeckHeader, cells: Sequence[str], line: int) -> RateRow | list[DeckError]:
    """Validate one data row; return the row, or every problem found in it."""
    if len(cells) != header.width:
        return [DeckError(line, "", "", f"line has {len(cells)} fields where the header has {header.width} "
                                        "(check the delimiter and the quoting)")]
    values: list[object] = [line]
    errors: list[DeckError] = []
    # A loop over a static table, not one call per column: this runs twice per row of decks
    # with millions of rows.
    for (column, parse, default, required), position in zip(_FIELDS, header.positions, strict=True):
        raw = cells[position].strip() if position is not None else ""
        if not raw and not required:
            values.append(default)
            continue
        try:
            values.append(parse(raw))
        except ValueError as exc:
            errors.append(DeckError(line, column, raw, str(exc)))
            values.append(default)
    row = RateRow(*values)  # type: ignore[arg-type]
    _check_ranges(row, header, cells, errors)
    return errors or row


def _check_ranges(row: RateRow, header: DeckHeader, cells: Sequence[str], errors: list[DeckError]) -> None:
    """Checks that involve two cells; skipped when either cell is already wrong."""
    wrong = {error.column for error in errors} if errors else set()
    if (row.effective_to is not None and row.effective_to <= row.effective_from
            and not wrong & {"effective_from", "effective_to"}):
        errors.append(DeckError(row.line, "effective_to", header.cell(cells, "effective_to"),
                                f"must be after effective_from ({row.effective_from.isoformat()}): "
                                "the range [effective_from, effective_to) would be empty"))
    if row.time_from_minute == row.time_to_minute and not wrong & {"time_from", "time_to"}:
        errors.append(DeckError(row.line, "time_to", header.cell(cells, "time_to"),
                                "equals time_from: an empty window (use 00:00-24:00 for the whole day)"))


def _parse_prefix(raw: str) -> str:
    digits = raw[1:] if raw.startswith("+") else raw
    if not digits:
        raise ValueError("prefix is empty")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError("prefix must be digits only (an optional leading '+' is dropped)")
    if len(digits) > MAX_PREFIX_DIGITS:
        raise ValueError(f"prefix is longer than {MAX_PREFIX_DIGITS} digits")
    return digits


def _parse_destination(raw: str) -> str:
    if len(raw) > MAX_DESTINATION_CHARS:
        raise ValueError(f"longer than {MAX_DESTINATION_CHARS} characters")
    control = next((ch for ch in raw if ord(ch) < 32 or ord(ch) == 127), None)
    if control is not None:  # a NUL or a line break would be refused by the database, or worse, stored
        raise ValueError(f"contains the control character {control!r} at position {raw.index(control) + 1}")
    return raw


def _amount_parser(column: str) -> Callable[[str], int]:
    # Decks repeat the same few prices a lot; remembering them halves the cost of a big import.
    @functools.lru_cache(maxsize=4096)
    def parse(raw: str) -> int:
        if not raw:
            raise ValueError(f"{column} is required")
        try:
            return parse_amount(raw, what=column)
        except MoneyError as exc:
            # parse_amount names the value; the error line already does, so keep the reason only.
            message = str(exc)
            named = f"{column} {raw!r} "
            raise ValueError(message[len(named):] if message.startswith(named) else message) from None

    return parse


def _seconds_parser(least: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not (raw.isascii() and raw.isdigit()):
            if raw.startswith("-") and raw[1:].isascii() and raw[1:].isdigit():
                raise ValueError(f"must be at least {least}")
            raise ValueError("must be a whole number of seconds")
        value = int(raw)
        if value < least:
            raise ValueError(f"must be at least {least}")
        if value > MAX_SECONDS:
            raise ValueError(f"must be at most {MAX_SECONDS} seconds (one day)")
        return value

    return parse


_SECONDS_AT_LEAST_1 = _seconds_parser(1)
_SECONDS_AT_LEAST_0 = _seconds_parser(0)


def _parse_moment(raw: str) -> datetime:
    try:
        moment = parse_iso8601(raw)
    except ValueError:
        raise ValueError("is not an ISO 8601 date or timestamp "
                         "(e.g. 2026-01-31 or 2026-01-31T08:00:00Z; naive means UTC)") from None
    if moment < EPOCH:
        raise ValueError("is before 1970-01-01")
    return moment


def _parse_flag(raw: str) -> bool:
    word = raw.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be one of 1, 0, true, false, yes, no (or empty)")


def _parse_weekdays(raw: str) -> str:
    if not all(ch in ALL_WEEKDAYS for ch in raw):
        raise ValueError("must be ISO weekday digits 1 (Monday) to 7 (Sunday), e.g. 12345")
    if len(set(raw)) != len(raw):
        raise ValueError("names a weekday twice")
    days = "".join(sorted(raw))
    # One spelling per window, so the unique key and the overlap check see "1234567" as "".
    return "" if days == ALL_WEEKDAYS else days


def _time_parser(*, last: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        hours, sep, minutes = raw.partition(":")
        if (not sep or not (hours.isascii() and hours.isdigit()) or len(hours) > 2
                or not (minutes.isascii() and minutes.isdigit()) or len(minutes) != 2):
            raise ValueError("must be a time of day HH:MM")
        minute = int(hours) * 60 + int(minutes)
        if int(minutes) > 59 or minute > last:
            latest = "24:00" if last == MINUTES_PER_DAY else "23:59"
            raise ValueError(f"must be between 00:00 and {latest}")
        # A window that ends at midnight may say 00:00 or 24:00: store one spelling.
        return MINUTES_PER_DAY if last == MINUTES_PER_DAY and minute == 0 else minute

    return parse


# RateRow's fields after ``line``, in order: (CSV column, parser, default when empty, required).
_FIELDS: tuple[tuple[str, Callable[[str], Any], Any, bool], ...] = (
    ("prefix", _parse_prefix, "", True),
    ("destination", _parse_destination, "", False),
    ("rate", _amount_parser("rate"), 0, True),
    ("connect_fee", _amount_parser("connect_fee"), 0, False),
    ("initial_increment", _SECONDS_AT_LEAST_1, 1, False),
    ("increment", _SECONDS_AT_LEAST_1, 1, False),
    ("minimum", _SECONDS_AT_LEAST_0, 0, False),
    ("grace", _SECONDS_AT_LEAST_0, 0, False),
    ("effective_from", _parse_moment, EPOCH, False),
    ("effective_to", _parse_moment, None, False),
    ("weekdays", _parse_weekdays, "", False),
    ("time_from", _time_parser(last=MINUTES_PER_DAY - 1), 0, False),
    ("time_to", _time_parser(last=MINUTES_PER_DAY), MINUTES_PER_DAY, False),
    ("blocked", _parse_flag, False, False),
)


# --- duplicates and overlaps --------------------------------------------------------------

_TIME_BITS = 58  # microseconds since the epoch up to 9999-12-31 (+1) fit in 58 bits
_LINE_BITS = 40
_LINE_MASK = (1 << _LINE_BITS) - 1
_TIME_MASK = (1 << _TIME_BITS) - 1
STORED_LINE = 0  # the "line" of a rate already in the database


@dataclass(frozen=True, slots=True)
class Clash:
    """A new range that collides with one seen before (``other_line`` 0: a stored rate)."""

    duplicate: bool
    other_line: int
    other_from: datetime
    other_to: datetime | None

    def reason(self) -> str:
        stored = self.other_line == STORED_LINE
        where = "a rate already stored in the plan" if stored else f"line {self.other_line}"
        hint = " (--replace replaces the plan's rates)" if stored else ""
        until = self.other_to.isoformat() if self.other_to is not None else "open-ended"
        if self.duplicate:
            return f"duplicate of {where}: same prefix, effective_from and time window{hint}"
        return (f"overlaps {where} (effective {self.other_from.isoformat()} to {until}) "
                f"for the same prefix and time window{hint}")


class RangeIndex:
    """Effective ranges per (prefix, weekdays, time_from) seen so far, kept small for big decks.

    A million-row deck must not become a million Python objects of ~500 bytes: each key is
    packed into one int (prefix digits, weekday bits, minute) and each range into one int
    (from, to, line), sorted by ``from`` so that a new range only meets its two neighbours. A
    key with one range (nearly all of them) holds the bare int, not a list, and the usual range
    (from the epoch, open-ended) packs to the bare line number. About 110 bytes per key.
    """

    def __init__(self) -> None:
        self._ranges: dict[int, int | list[int]] = {}

    def __len__(self) -> int:
        return len(self._ranges)

    def add(self, prefix: str, weekdays: str, time_from_minute: int,
            effective_from: datetime, effective_to: datetime | None, line: int) -> Clash | None:
        """Record the range, or return the clash (and record nothing) if it meets a known one."""
        key = _pack_key(prefix, weekdays, time_from_minute)
        packed = _pack_range(effective_from, effective_to, line)
        known = self._ranges.get(key)
        if known is None:
            self._ranges[key] = packed
            return None
        ranges = [known] if isinstance(known, int) else known
        at = bisect.bisect_left(ranges, packed)
        for neighbour in ranges[max(0, at - 1):at + 1]:
            clash = _clash(packed, neighbour)
            if clash is not None:
                return clash
        ranges.insert(at, packed)
        if isinstance(known, int):
            self._ranges[key] = ranges
        return None


def _pack_key(prefix: str, weekdays: str, time_from_minute: int) -> int:
    mask = 0
    for day in weekdays:
        mask |= 1 << (ord(day) - ord("1"))
    # The leading 1 keeps leading zeros of the prefix apart ("044" vs "44").
    return (int("1" + prefix) << 18) | (mask << 11) | time_from_minute


def _micros(moment: datetime) -> int:
    if moment is EPOCH:  # the default of an empty cell: skip the arithmetic for most rows
        return 0
    return (moment - EPOCH) // timedelta(microseconds=1)


def _moment(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def _pack_range(start: datetime, end: datetime | None, line: int) -> int:
    # An open end is 0 and a closed one micros + 1, so [epoch, open) packs to the line alone.
    end_code = 0 if end is None else _micros(end) + 1
    return (_micros(start) << (_TIME_BITS + _LINE_BITS)) | (end_code << _LINE_BITS) | (line & _LINE_MASK)


def _unpack_range(packed: int) -> tuple[int, int | None, int]:
    end_code = (packed >> _LINE_BITS) & _TIME_MASK
    return packed >> (_TIME_BITS + _LINE_BITS), end_code - 1 if end_code else None, packed & _LINE_MASK


def _clash(new: int, old: int) -> Clash | None:
    new_start, new_end, _ = _unpack_range(new)
    old_start, old_end, old_line = _unpack_range(old)
    overlap = (old_end is None or new_start < old_end) and (new_end is None or old_start < new_end)
    if new_start == old_start or overlap:
        return Clash(new_start == old_start, old_line, _moment(old_start),
                     None if old_end is None else _moment(old_end))
    return None
