"""The in-memory rate table of one plan: normalise a number, find its rate (DESIGN §4).

Pure (no I/O, no clock: the instant is an argument). The SQL adapter streams a plan's rows into
a :class:`RateTableBuilder`; the table it builds is immutable, so a reload builds a new one and
swaps the reference.

Lookup rules:

* **Normalisation** (plan settings): a leading ``+`` is removed, else a leading international
  prefix (``00`` by default; ``""`` for none). What is left must be 1-64 ASCII digits: spaces,
  dashes, letters, ``*`` or ``#`` are refused with the number and the character named.
* **Longest prefix** among the rows that apply at the call's start instant: effective
  (``effective_from <= start < effective_to``, UTC, half-open) and whose time window contains
  the start in the plan's timezone. A longer prefix whose rows do not apply at that instant
  falls through to a shorter one.
* **Time windows**: ``weekdays`` (ISO digits, ``""`` = every day) and ``[time_from,
  time_to)`` minutes of the local day. A window that wraps midnight (``22:00-06:00``) belongs
  to the day it *opens*: ``weekdays=5, 22:00-06:00`` is Friday 22:00 to Saturday 06:00, the
  way a week-minute range (A2Billing) reads. Local time is the start instant converted with
  the plan's IANA zone, so DST changes move the window with the wall clock.
* **Several rows for one prefix** apply at once (an all-day row and a weekend row): the most
  specific wins, the one covering the fewest minutes of the week; then the latest
  ``effective_from``; then the lowest rate id.
* **Blocked**: when the winning row is blocked the call is refused with the reason.

Speed and size (``bench/bench_rating.py``): the table is one ``dict`` keyed by the prefix as
an int (``int("1" + prefix)``, so that ``044`` and ``44`` stay apart; an int key is half the
size of a string and cheaper to hash). Its value is the row packed into one ``bytes`` record
(a ``tuple`` of records for the few prefixes with several rows): one object per row, read with
one ``struct`` call, so a million prefixes stay compact and a lookup touches few cache lines.
A lookup parses the number once and probes ``key // 10**k`` for candidate lengths ``k``,
longest first. In a big table a direct index on the number's first six digits (4 MB) says
which lengths can match at all (exactly below six digits, as a filter above), so a lookup
usually probes the dict once or twice instead of once per prefix length in the plan.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.core.errors import InvalidInput
from agent.core.events import DenyReason
from agent.core.rating import MINUTES_PER_DAY, OPEN_END_MS, RateRow, check_row

MAX_NUMBER_DIGITS = 64
MAX_PREFIX_DIGITS = 32  # the ``rates.prefix`` column (and a bit per length in the filter)
GROUP_DIGITS = 6  # the length filter indexes the first six digits of a number
FILTER_MIN_PREFIXES = 20_000  # below this a table is small enough to probe every length
_ALL_DAYS_MASK = 0b11111110  # bit d set for ISO weekday d (1 = Monday ... 7 = Sunday)
_ALWAYS = 0  # window id of "every day, all day"
_MS_PER_DAY = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_ID = -1
_MAX_WINDOW_ID = 0xFFFF  # the record's "H" field
_POWERS: tuple[int, ...] = tuple(10**k for k in range(MAX_NUMBER_DIGITS + 2))
_GROUPS: int = 10**GROUP_DIGITS

# One row: destination id, rate, connect fee, initial increment, increment, minimum, grace,
# effective from, effective to (ms), window id, blocked, rate id. 63 bytes: a 96-byte object.
_RECORD = struct.Struct("<IqqIIIIqqH?q")
_unpack: Callable[[bytes], tuple[Any, ...]] = _RECORD.unpack
_new_row = tuple.__new__  # skips RateRow's Python-level __new__ on the hot path

Entry = bytes | tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a number cannot be rated: ``bad_request`` (not a number), ``no_rate`` or ``blocked``."""

    reason: DenyReason
    detail: str
    number: str
    row: RateRow | None = None  # the blocked row


def epoch_ms(moment: datetime) -> int:
    """An aware datetime as integer milliseconds since the epoch (sub-millisecond truncated)."""
    if moment.tzinfo is None:
        raise InvalidInput(f"naive datetime {moment.isoformat()} has no timezone")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def epoch_ms_ceil(moment: datetime) -> int:
    """Milliseconds, rounded up: for a bound ``x``, ``t_ms >= ceil(x)`` iff ``t_ms >= x``, so a
    sub-millisecond effective bound keeps its half-open meaning at millisecond precision."""
    if moment.tzinfo is None:
        raise InvalidInput(f"naive datetime {moment.isoformat()} has no timezone")
    return -(-((moment - _EPOCH) // timedelta(microseconds=1)) // 1000)


def format_instant(at_ms: int) -> str:
    """``2026-01-31T12:00:00Z`` for an epoch-ms instant."""
    moment = _EPOCH + timedelta(milliseconds=at_ms)
    return moment.isoformat(timespec="milliseconds" if at_ms % 1000 else "seconds").replace("+00:00", "Z")


class RateTable:
    """The rates of one plan, ready for lookups. Immutable: build a new one to change it."""

    def __init__(self, builder: RateTableBuilder) -> None:
        self.plan_name = builder.plan_name
        self.currency = builder.currency
        self.timezone = builder.timezone
        self.international_prefix = builder.international_prefix
        self.version = builder.version
        self.row_count = builder.row_count
        self._intl = builder.international_prefix
        self._intl_length = len(builder.international_prefix)
        self._zone = builder.zone
        self._index = builder.index
        self._destinations = tuple(builder.destinations)
        self._windows = tuple(builder.windows)
        self._weekdays = tuple(builder.weekday_texts)
        lengths = sorted(builder.lengths, reverse=True)
        # Per number length n: (prefix length k, divisor 10**(n-k)) for each k <= n, longest first.
        self._probes = [tuple((k, _POWERS[n - k]) for k in lengths if k <= n)
                        for n in range(MAX_NUMBER_DIGITS + 1)]
        wanted = builder.length_filter
        if wanted is None:
            wanted = len(self._index) >= FILTER_MIN_PREFIXES
        self._filter = _LengthFilter(self._index) if wanted else None
        if self._filter is not None:  # shortcuts for the hot path
            self._long, self._short, self._probe_memo = self._filter.long, self._filter.short, self._filter.memo

    def __len__(self) -> int:
        """The number of rate rows."""
        return self.row_count

    @property
    def prefix_count(self) -> int:
        return len(self._index)

    def normalise(self, number: str) -> str:
        """The digits rated for ``number``; raises :class:`InvalidInput` naming it otherwise."""
        digits = self._digits(number)
        if isinstance(digits, Refusal):
            raise InvalidInput(digits.detail)
        return digits

    def lookup(self, number: str, at_ms: int) -> RateRow | Refusal:
        """The rate of a call to ``number`` starting at ``at_ms`` (epoch ms), or why not.

        Never raises for a business refusal: a bad number, no rate and a blocked destination
        come back as a :class:`Refusal` with a reason an operator can read.
        """
        # The hot path of every authorization: inlined on purpose (bench/bench_rating.py).
        if number[:1] == "+":
            digits = number[1:]
        elif self._intl and number.startswith(self._intl):
            digits = number[self._intl_length:]
        else:
            digits = number
        if not (digits.isdigit() and digits.isascii()) or len(digits) > MAX_NUMBER_DIGITS:
            refusal = self._digits(number)
            assert isinstance(refusal, Refusal)
            return refusal
        key = int("1" + digits)
        n = len(digits)
        if self._filter is None or n < GROUP_DIGITS:
            probes = self._probes[n]
        else:  # _LengthFilter.probes, inlined
            group = key // _POWERS[n - GROUP_DIGITS] - _GROUPS
            probes = (self._probe_memo.get((self._long[group] | self._short[group // 10]) << 7 | n)
                      or self._filter.probes(key, n))
        index = self._index
        for length, divisor in probes:
            entry = index.get(key // divisor)
            if entry is None:
                continue
            for record in (entry,) if isinstance(entry, bytes) else entry:
                (dest, rate, fee, first, increment, minimum, grace, start_ms, end_ms, window, blocked,
                 rate_id) = _unpack(record)
                if not start_ms <= at_ms < end_ms or (window and not self._in_window(window, at_ms)):  # 0: _ALWAYS
                    continue
                _, time_from, time_to = self._windows[window]
                row: RateRow = _new_row(RateRow, (
                    digits[:length], self._destinations[dest], rate, fee, first, increment, minimum, grace,
                    start_ms, end_ms, self._weekdays[window], time_from, time_to, blocked,
                    None if rate_id == _NO_ID else rate_id))
                return self._blocked(number, row) if blocked else row
        return Refusal(DenyReason.NO_RATE,
                       f"no rate for {digits} in plan {self.plan_name!r} at {format_instant(at_ms)}", number)

    # -------------------------------------------------------------------------- internals

    def _digits(self, number: str) -> str | Refusal:
        return normalise_number(number, self._intl)

    @staticmethod
    def _blocked(number: str, row: RateRow) -> Refusal:
        where = f" ({row.destination})" if row.destination else ""
        return Refusal(DenyReason.BLOCKED, f"destination {row.prefix}{where} is blocked", number, row)

    def _local_day_minute(self, at_ms: int) -> tuple[int, int]:
        """(ISO weekday, minute of the day) of the instant in the plan's timezone."""
        if self._zone is None:
            days, ms_of_day = divmod(at_ms, _MS_PER_DAY)
            return (days + 3) % 7 + 1, ms_of_day // 60_000  # 1970-01-01 was a Thursday
        local = datetime.fromtimestamp(at_ms // 1000, self._zone)
        return local.isoweekday(), local.hour * 60 + local.minute

    def _in_window(self, window: int, at_ms: int) -> bool:
        """Whether the instant falls in the window, read in the plan's timezone."""
        mask, start, end = self._windows[window]
        weekday, minute = self._local_day_minute(at_ms)
        if start < end:
            return start <= minute < end and bool(mask >> weekday & 1)
        if minute >= start:  # the evening part, on a day the window opens
            return bool(mask >> weekday & 1)
        if minute < end:  # the morning part belongs to the day before
            return bool(mask >> (weekday - 1 or 7) & 1)
        return False


class _LengthFilter:
    """Which prefix lengths can match a number, found from its first six digits.

    ``long[g]`` has bit ``L - 1`` set when some prefix of length ``L >= 6`` starts with the six
    digits ``g`` (a filter: the dict still decides). ``short[g // 10]`` has bit ``L - 1`` set
    when the first ``L < 6`` digits are a prefix (exact). The union, as lengths longest first,
    is memoised per distinct mask: real plans have a few thousand.
    """

    def __init__(self, index: dict[int, Entry]) -> None:
        self.long = array("I", bytes(4 * _GROUPS))
        self.short = array("I", bytes(4 * _GROUPS // 10))
        for key in index:
            length = _BIT_LENGTH_TO_DIGITS[key.bit_length()]
            if key < _POWERS[length]:
                length -= 1
            if length >= GROUP_DIGITS:
                self.long[key // _POWERS[length - GROUP_DIGITS] - _GROUPS] |= 1 << (length - 1)
            else:
                span = _POWERS[GROUP_DIGITS - 1 - length]
                start = (key - _POWERS[length]) * span
                bit = 1 << (length - 1)
                for group in range(start, start + span):
                    self.short[group] |= bit
        self.memo: dict[int, tuple[tuple[int, int], ...]] = {}

    def probes(self, key: int, n: int) -> tuple[tuple[int, int], ...]:
        """(length, divisor of ``key``) for each candidate prefix length of an n-digit number."""
        group = key // _POWERS[n - GROUP_DIGITS] - _GROUPS
        mask = (self.long[group] | self.short[group // 10]) << 7 | n  # n <= 64 fits in 7 bits
        probes = self.memo.get(mask)
        if probes is None:
            bits = mask >> 7
            probes = self.memo[mask] = tuple((length, _POWERS[n - length])
                                              for length in range(min(n, MAX_PREFIX_DIGITS), 0, -1)
                                              if bits >> (length - 1) & 1)
        return probes


# The number of decimal digits of an int with a given bit length, or one more (then corrected).
_BIT_LENGTH_TO_DIGITS = tuple(len(str(1 << bits)) - 1 if bits else 0 for bits in range(4 * MAX_NUMBER_DIGITS))


def normalise_number(number: str, international_prefix: str) -> str | Refusal:
    """The digits rated for a dialled number (module docstring), or a ``bad_request`` refusal."""
    if number[:1] == "+":
        rest, how = number[1:], "after the leading '+'"
    elif international_prefix and number.startswith(international_prefix):
        rest, how = number[len(international_prefix):], "after the international prefix"
    else:
        rest, how = number, ""
    if rest.isdigit() and rest.isascii() and len(rest) <= MAX_NUMBER_DIGITS:
        return rest
    return Refusal(DenyReason.BAD_REQUEST, _bad_number_detail(number, rest, how), number)


def candidate_prefixes(number: str, international_prefix: str, *, longest: int = 32) -> list[str]:
    """Every prefix a number could be rated on (none for a bad number): a one-off quote loads
    only these rows instead of the whole plan."""
    digits = normalise_number(number, international_prefix)
    if isinstance(digits, Refusal):
        return []
    return [digits[:k] for k in range(1, min(len(digits), longest) + 1)]


def _bad_number_detail(number: str, rest: str, how: str) -> str:
    shown = number if len(number) <= 40 else number[:37] + "..."
    if not rest:
        return f"number {shown!r} has no digits" + (f" {how}" if how else "")
    bad = next((ch for ch in rest if not (ch.isascii() and ch.isdigit())), None)
    if bad is not None:
        return f"number {shown!r} has {bad!r}, which is not a digit (only 0-9 after an optional '+')"
    return f"number {shown!r} is longer than {MAX_NUMBER_DIGITS} digits"


def _weekday_mask(weekdays: str) -> int:
    mask = 0
    for day in weekdays:
        mask |= 1 << int(day)
    return mask or _ALL_DAYS_MASK


def _coverage(window: tuple[int, int, int]) -> int:
    """Minutes of the week a window covers (the smaller, the more specific)."""
    mask, start, end = window
    minutes = end - start if start < end else MINUTES_PER_DAY - start + end
    return minutes * bin(mask).count("1")


class RateTableBuilder:
    """Collects a plan's rows (checked one by one), then :meth:`build` makes the table."""

    def __init__(self, plan_name: str, *, currency: str = "EUR", timezone: str = "UTC",
                 international_prefix: str = "00", version: int = 1) -> None:
        if international_prefix and not (international_prefix.isascii() and international_prefix.isdigit()):
            raise InvalidInput(f"plan {plan_name!r}: international prefix {international_prefix!r} must be digits")
        self.plan_name = plan_name
        self.currency = currency
        self.timezone = timezone
        self.international_prefix = international_prefix
        self.version = version
        self.zone = None if timezone == "UTC" else _zone(plan_name, timezone)
        self.index: dict[int, Entry] = {}
        self.row_count = 0
        self.lengths: set[int] = set()
        self.destinations: list[str] = []
        self._destination_ids: dict[str, int] = {}
        # Window 0 is "always"; the others are numbered as they come.
        self.windows: list[tuple[int, int, int]] = [(_ALL_DAYS_MASK, 0, MINUTES_PER_DAY)]
        self.weekday_texts: list[str] = [""]
        self._window_ids: dict[tuple[str, int, int], int] = {("", 0, MINUTES_PER_DAY): _ALWAYS}
        self._built = False
        self.length_filter: bool | None = None

    def add(self, row: RateRow) -> None:
        """Add one row; raises :class:`InvalidInput` naming the prefix and field if it is unusable."""
        check_row(row)
        self.add_fields(*row)

    def add_fields(self, prefix: str, destination: str, rate_micros: int, connect_fee_micros: int,
                   initial_increment: int, increment: int, minimum_seconds: int, grace_seconds: int,
                   effective_from_ms: int, effective_to_ms: int | None, weekdays: str,
                   time_from_minute: int, time_to_minute: int, blocked: bool, rate_id: int | None) -> None:
        """Add one row given as fields (the loader's fast path: no intermediate object).

        The database's CHECK constraints already hold; this re-checks, cheaply, what would break
        a lookup or a division, and raises :class:`InvalidInput` naming the prefix.
        """
        if self._built:
            raise RuntimeError("the table was already built")
        to_ms = OPEN_END_MS if effective_to_ms is None else effective_to_ms
        if not (initial_increment >= 1 and increment >= 1 and to_ms > effective_from_ms and rate_micros >= 0
                and connect_fee_micros >= 0 and minimum_seconds >= 0 and grace_seconds >= 0
                and prefix.isdigit() and prefix.isascii() and len(prefix) <= MAX_PREFIX_DIGITS):
            check_row(RateRow(prefix, destination, rate_micros, connect_fee_micros, initial_increment,
                              increment, minimum_seconds, grace_seconds, effective_from_ms, to_ms))
            raise InvalidInput(f"rate {prefix!r}: prefix is longer than {MAX_PREFIX_DIGITS} digits")
        dest_id = self._destination_ids.get(destination)
        if dest_id is None:
            dest_id = self._destination_ids[destination] = len(self.destinations)
            self.destinations.append(destination)
        if weekdays or time_from_minute or time_to_minute != MINUTES_PER_DAY:
            window = self._window_id(prefix, weekdays, time_from_minute, time_to_minute)
        else:
            window = _ALWAYS
        record = _RECORD.pack(dest_id, rate_micros, connect_fee_micros, initial_increment, increment,
                              minimum_seconds, grace_seconds, effective_from_ms, to_ms, window, blocked,
                              _NO_ID if rate_id is None else rate_id)
        key = int("1" + prefix)
        known = self.index.setdefault(key, record)
        if known is record:
            self.lengths.add(len(prefix))
        else:
            self.index[key] = (known, record) if isinstance(known, bytes) else (*known, record)
        self.row_count += 1

    def _window_id(self, prefix: str, weekdays: str, time_from: int, time_to: int) -> int:
        key = (weekdays, time_from, time_to)
        window = self._window_ids.get(key)
        if window is None:
            check_row(RateRow(prefix, "", 0, weekdays=weekdays, time_from_minute=time_from,
                              time_to_minute=time_to))
            if len(self.windows) > _MAX_WINDOW_ID:
                raise InvalidInput(f"rate {prefix!r}: plan {self.plan_name!r} has more than {_MAX_WINDOW_ID} "
                                   "distinct time windows")
            window = self._window_ids[key] = len(self.windows)
            self.windows.append((_weekday_mask(weekdays), time_from, time_to))
            self.weekday_texts.append(weekdays)
        return window

    def build(self, *, length_filter: bool | None = None) -> RateTable:
        """Order the rows of prefixes that have several (most specific first) and freeze.

        ``length_filter``: index the first six digits (4.4 MB) to skip absent prefix lengths;
        by default only for tables of at least ``FILTER_MIN_PREFIXES`` prefixes.
        """
        self._built = True
        self.length_filter = length_filter
        coverage = [_coverage(window) for window in self.windows]

        def precedence(record: bytes) -> tuple[int, int, int]:
            fields = _unpack(record)
            return coverage[fields[9]], -fields[7], fields[11]

        for key, entry in self.index.items():
            if isinstance(entry, tuple):
                self.index[key] = tuple(sorted(entry, key=precedence))
        self._destination_ids.clear()
        self._window_ids.clear()
        return RateTable(self)


def _zone(plan_name: str, timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"plan {plan_name!r}: timezone {timezone!r} is not an IANA time zone") from None
