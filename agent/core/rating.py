"""Rating: the price of an answered duration, and its exact inverse (DESIGN §4).

Pure: no I/O, no clock. Every authorization, nibble and settlement goes through here.

For an answered duration ``ms`` on a rate row:

1. ``d = ceil(ms / 1000)`` whole seconds (a started second counts);
2. ``d == 0`` or ``d <= grace``: the call is free (the connect fee is waived too);
3. ``b = max(d, minimum)``, then rounded up to the block structure: ``initial_increment`` if
   ``b <= initial_increment``, else ``initial_increment + ceil((b - initial_increment) /
   increment) * increment``;
4. ``cost = connect_fee + ceil(rate_per_minute * b / 60)``: the only rounding, once per call,
   up to a whole micro-unit (toward the house).

Invariants (property-tested in ``tests/test_rating.py``):

* ``cost`` is non-decreasing in the duration, so a nibble debit ``cost(t_k) - cost(t_k-1)`` is
  never negative and the nibble debits of a call add up to its final cost exactly;
* ``max_seconds(budget)`` is exact: when it returns ``m > 0`` (and below the cap),
  ``cost(m) <= budget < cost(m + 1)``; ``0`` means "deny" (see :func:`max_seconds` for the
  grace period).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from agent.core.errors import InvalidInput

SECONDS_PER_MINUTE = 60
MINUTES_PER_DAY = 1440
OPEN_END_MS = 2**62  # ``effective_to_ms`` of an open-ended row: later than any real instant
# A free destination (rate 0) has no finite inverse; any real call limit is far below this.
MAX_SECONDS_CAP = 10**9


class RateRow(NamedTuple):
    """One rate of a plan, as the rating engine uses it (a mirror of the ``rates`` columns).

    A NamedTuple rather than a frozen dataclass on purpose: the rate table builds one per
    lookup, and a tuple is built six times faster (the lookup budget is a few microseconds).
    Instants are epoch milliseconds (UTC); the effective range is half-open.
    Implements the session's ``Tariff`` protocol (:meth:`cost_micros`, :meth:`max_seconds`).
    """

    prefix: str
    destination: str
    rate_micros: int  # per minute
    connect_fee_micros: int = 0
    initial_increment: int = 1
    increment: int = 1
    minimum_seconds: int = 0
    grace_seconds: int = 0
    effective_from_ms: int = 0
    effective_to_ms: int = OPEN_END_MS
    weekdays: str = ""  # ISO weekday digits of the plan's timezone; "" = every day
    time_from_minute: int = 0  # [from, to) minute of the day; to < from wraps past midnight
    time_to_minute: int = MINUTES_PER_DAY
    blocked: bool = False
    rate_id: int | None = None

    def cost_micros(self, duration_ms: int) -> int:
        """Cost of an answered duration in milliseconds (DESIGN §4), in micro-units."""
        return cost_micros(self, duration_ms)

    def max_seconds(self, budget_micros: int) -> int:
        """The longest affordable duration in whole seconds; 0 = deny (see :func:`max_seconds`)."""
        return max_seconds(self, budget_micros)


def check_row(row: RateRow) -> RateRow:
    """Return ``row`` if it can be rated on, else raise :class:`InvalidInput` naming the field."""
    where = f"rate {row.prefix!r}"
    if not (row.prefix.isascii() and row.prefix.isdigit()):
        raise InvalidInput(f"{where}: prefix must be digits")
    for name in ("rate_micros", "connect_fee_micros", "minimum_seconds", "grace_seconds"):
        if getattr(row, name) < 0:
            raise InvalidInput(f"{where}: {name} {getattr(row, name)} must not be negative")
    for name in ("initial_increment", "increment"):
        if getattr(row, name) < 1:
            raise InvalidInput(f"{where}: {name} {getattr(row, name)} must be at least 1 second")
    if row.effective_to_ms <= row.effective_from_ms:
        raise InvalidInput(f"{where}: effective range [{row.effective_from_ms}, {row.effective_to_ms}) ms is empty")
    if not (0 <= row.time_from_minute < MINUTES_PER_DAY and 0 < row.time_to_minute <= MINUTES_PER_DAY
            and row.time_from_minute != row.time_to_minute):
        raise InvalidInput(f"{where}: time window {row.time_from_minute}-{row.time_to_minute} "
                           "must be minutes of the day, not empty")
    if any(day not in "1234567" for day in row.weekdays):
        raise InvalidInput(f"{where}: weekdays {row.weekdays!r} must be ISO weekday digits 1-7")
    return row


# ---------------------------------------------------------------------------- the forward rule


def whole_seconds(duration_ms: int) -> int:
    """Step 1: a started second counts. Negative durations are a caller's bug."""
    if duration_ms < 0:
        raise InvalidInput(f"duration {duration_ms} ms must not be negative")
    return -(-duration_ms // 1000)


def is_waived(row: RateRow, seconds: int) -> bool:
    """Step 2: nothing to pay for a call of no second, or one within the grace period."""
    return seconds == 0 or seconds <= row.grace_seconds


def billed_seconds(row: RateRow, seconds: int) -> int:
    """Step 3: the seconds billed for ``seconds`` answered seconds (0 when waived)."""
    if is_waived(row, seconds):
        return 0
    wanted = max(seconds, row.minimum_seconds)
    first = row.initial_increment
    if wanted <= first:
        return first
    return first + -(-(wanted - first) // row.increment) * row.increment


def _usage_micros(row: RateRow, billed: int) -> int:
    """ceil(rate * billed / 60): the single rounding of step 4 (also used for cumulative block costs)."""
    return -(-(row.rate_micros * billed) // SECONDS_PER_MINUTE)


def cost_micros_for_seconds(row: RateRow, seconds: int) -> int:
    """Steps 2-4 for a whole number of answered seconds.

    This is also the nibble charger's function: the debit of the slice ``(t1, t2]`` is
    ``cost_micros_for_seconds(row, t2) - cost_micros_for_seconds(row, t1)``, never negative, and the
    debits of all slices add up to the final cost exactly (a telescoping sum, one rounding).
    """
    if seconds < 0:
        raise InvalidInput(f"duration {seconds} s must not be negative")
    billed = billed_seconds(row, seconds)
    if billed == 0:
        return 0
    return row.connect_fee_micros + _usage_micros(row, billed)


def cost_micros(row: RateRow, duration_ms: int) -> int:
    """Steps 1-4: the cost of an answered duration in milliseconds, in micro-units."""
    return cost_micros_for_seconds(row, whole_seconds(duration_ms))


# ------------------------------------------------------------------------- quotes (explained)


@dataclass(frozen=True, slots=True)
class Block:
    """``count`` consecutive billing blocks of ``seconds_each`` seconds, billed seconds
    ``[from_second, to_second)``. ``cost_micros`` is this line's share of the single rounding:
    ``ceil(rate * to / 60) - ceil(rate * from / 60)``, so the lines add up to the total exactly."""

    kind: str  # "initial" | "increment"
    count: int
    seconds_each: int
    from_second: int
    to_second: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class Quote:
    """The cost of one duration on one rate row, explained line by line."""

    row: RateRow
    duration_ms: int
    seconds: int  # d: whole answered seconds
    billed_seconds: int  # b: 0 when waived
    waived: bool  # no second, or within the grace period: nothing is charged
    minimum_applied: bool  # d was raised to the row's minimum
    connect_fee_micros: int  # 0 when waived
    blocks: tuple[Block, ...]
    cost_micros: int


def quote(row: RateRow, duration_ms: int) -> Quote:
    """Rate ``duration_ms`` on ``row`` and explain it (connect fee, each block, total)."""
    seconds = whole_seconds(duration_ms)
    billed = billed_seconds(row, seconds)
    if billed == 0:
        return Quote(row, duration_ms, seconds, 0, True, False, 0, (), 0)
    first = row.initial_increment
    blocks = [Block("initial", 1, first, 0, first, _usage_micros(row, first))]
    if billed > first:
        count = (billed - first) // row.increment
        blocks.append(Block("increment", count, row.increment, first, billed,
                            _usage_micros(row, billed) - _usage_micros(row, first)))
    total = row.connect_fee_micros + _usage_micros(row, billed)
    return Quote(row, duration_ms, seconds, billed, False, row.minimum_seconds > seconds,
                 row.connect_fee_micros, tuple(blocks), total)


# ----------------------------------------------------------------------------- the inverse


def max_seconds(row: RateRow, budget_micros: int, *, cap_seconds: int = MAX_SECONDS_CAP) -> int:
    """The largest whole duration ``d`` (seconds) with ``cost(d) <= budget``; 0 means deny.

    Exact, in closed form: with ``left = budget - connect_fee``, a billed length ``b`` is
    affordable iff ``ceil(rate * b / 60) <= left`` iff ``b <= floor(60 * left / rate)`` =: B
    (``left`` is whole). The largest block boundary within B is ``G = initial + floor((B -
    initial) / increment) * increment`` (none when ``B < initial``); ``d`` bills at most ``G``
    iff ``max(d, minimum) <= G``, so the answer is ``G`` when ``minimum <= G``.

    Choices (tested):

    * The grace period alone does not make a call affordable: a budget that cannot pay the
      first charged second (``cost(grace + 1)``: connect fee, minimum, first block) gets 0
      (deny), even though the first ``grace`` seconds would be free. Allowing them would let an
      empty account place unlimited free short calls, and such a call would be cut at the end
      of its grace anyway. So a non-zero answer is always ``> grace``.
    * A negative budget (an overdrawn account) is not an error: it affords nothing, 0.
    * A free destination (rate 0) affords any duration once the connect fee fits: the answer is
      ``cap_seconds``. In general the result is ``min(exact, cap_seconds)``, and exactness
      (``cost(m) <= budget < cost(m + 1)``) holds whenever ``0 < m < cap_seconds``.

    The PBX limit for a result ``m`` is ``m * 1000`` ms: a call of exactly ``m`` s costs
    ``cost(m)``, one more millisecond starts a second that does not fit.
    """
    if cap_seconds < 1:
        raise InvalidInput(f"cap {cap_seconds} s must be at least 1 second")
    left = budget_micros - row.connect_fee_micros
    if left < 0:
        return 0
    if row.rate_micros == 0:
        exact = cap_seconds
    else:
        affordable_billed = SECONDS_PER_MINUTE * left // row.rate_micros
        first = row.initial_increment
        if affordable_billed < first:
            return 0
        exact = first + (affordable_billed - first) // row.increment * row.increment
        if row.minimum_seconds > exact:
            return 0
    if exact <= row.grace_seconds:
        return 0
    return min(exact, cap_seconds)
