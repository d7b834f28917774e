"""Free-minute bundles (DESIGN §9): periods, the split of a call between bundle and money.

Pure: no I/O, no clock (timezones come from the system's zone database, as for rate windows).

**The money of a call** that bundles may cover. ``b`` is the billed seconds of the whole call
by §4 (grace, minimum, initial increment and increments of the rate row); ``R`` is what the
bundles hold for the call; ``covered = min(b, R)``::

    cost = (0 if covered > 0 else connect_fee) + ceil(rate * (b - covered) / 60)

With ``R = 0`` this is the §4 cost exactly. The same function gives the authorization limit
(:meth:`BundleTariff.max_seconds`), every nibble's slice and the settle, so a call that starts
in its bundle and runs past it pays money only for the billed seconds beyond the bundle,
increments continuing across the boundary, and no connect fee.

**How a call draws on bundles** (the session and the store, agent/core/session.py):

* At authorize the store takes up to the first slice's billed seconds from the account's
  bundles that apply (``BundleSlot``, earliest expiry first). If it gets them all, the call is
  *in its bundle* (open); if it gets some, ``R`` is fixed there and money pays the rest; if it
  gets none, the call is rated on money alone (connect fee included) and never draws later.
* Each nibble of an open call asks for the next slice's seconds; a partial answer fixes ``R``
  for the rest of the call. ``R`` only grows while no money has been charged, so the money
  already debited never changes afterwards (the debits telescope to the final cost, as in §4).
* The settle commits ``covered`` seconds to the bundles (in draw order) and gives back
  ``R - covered``.

**Periods** (``month`` from an anchor day, ``week`` from an anchor weekday, ``once``) are read
in the account's timezone; a period rolls by itself at its boundary, no job. A month anchor
past the end of a month (31 in February, 30 or 31 in a 30-day month) means the month's last
day. With ``rollover`` what was left of the previous period (at most one period's allowance) is
added when the next period is first used; later changes to the earlier period do not move it.
A call draws on the period in force at its start, even if it runs past the period's end.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.core.errors import InvalidInput
from agent.core.rating import (
    MAX_SECONDS_CAP,
    OPEN_END_MS,
    SECONDS_PER_MINUTE,
    RateRow,
    billed_seconds,
    whole_seconds,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_BUNDLE_SECONDS = 10**9
NAME_MAX_LEN = 64


class PeriodKind(StrEnum):
    MONTH = "month"  # from the anchor day (1-31) of each month
    WEEK = "week"  # from the anchor ISO weekday (1 = Monday ... 7 = Sunday)
    ONCE = "once"  # one period: the grant's validity


@dataclass(frozen=True, slots=True)
class BundleDef:
    """A bundle as sold: ``seconds`` per period to numbers starting with one of ``prefixes``."""

    name: str
    seconds: int
    prefixes: tuple[str, ...]
    period: PeriodKind = PeriodKind.MONTH
    anchor: int = 1  # month: day 1-31; week: ISO weekday 1-7; once: unused
    rollover: bool = False
    bundle_id: int | None = None

    def matches(self, number: str) -> bool:
        return any(number.startswith(prefix) for prefix in self.prefixes)


def check_bundle(bundle: BundleDef) -> BundleDef:
    """Return ``bundle`` if it can be sold, else raise :class:`InvalidInput` naming the field."""
    where = f"bundle {bundle.name!r}"
    if not bundle.name or len(bundle.name) > NAME_MAX_LEN or not bundle.name.isprintable() or " " in bundle.name:
        raise InvalidInput(f"{where}: a name is 1-{NAME_MAX_LEN} printable characters without spaces")
    if isinstance(bundle.seconds, bool) or not isinstance(bundle.seconds, int) \
            or not 1 <= bundle.seconds <= MAX_BUNDLE_SECONDS:
        raise InvalidInput(f"{where}: seconds {bundle.seconds!r} must be a whole number from 1 to {MAX_BUNDLE_SECONDS}")
    if not bundle.prefixes:
        raise InvalidInput(f"{where}: no prefix (a bundle covers numbers starting with one of its prefixes)")
    for position, prefix in enumerate(bundle.prefixes, start=1):
        if not (prefix.isascii() and prefix.isdigit()):
            raise InvalidInput(f"{where}: prefix {position} {prefix!r} must be digits only")
    if bundle.period is PeriodKind.MONTH and not 1 <= bundle.anchor <= 31:
        raise InvalidInput(f"{where}: a monthly anchor is a day of the month, 1-31 (31 means the month's "
                           f"last day in shorter months), not {bundle.anchor}")
    if bundle.period is PeriodKind.WEEK and not 1 <= bundle.anchor <= 7:
        raise InvalidInput(f"{where}: a weekly anchor is an ISO weekday, 1 (Monday) to 7 (Sunday), "
                           f"not {bundle.anchor}")
    if bundle.period is PeriodKind.ONCE and bundle.rollover:
        raise InvalidInput(f"{where}: a bundle of one period cannot roll over")
    return bundle


def parse_prefixes(text: str, where: str) -> tuple[str, ...]:
    """Prefixes from a comma/space/line separated list (``#`` starts a comment); a leading ``+``
    is dropped. Errors name ``where`` and the line."""
    found: list[str] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        for item in line.split("#", 1)[0].replace(",", " ").split():
            prefix = item[1:] if item.startswith("+") else item
            if not (prefix.isascii() and prefix.isdigit()):
                raise InvalidInput(f"{where}:{line_no}: prefix {item!r} must be digits (an optional leading +)")
            found.append(prefix)
    if not found:
        raise InvalidInput(f"{where}: no prefix")
    return tuple(dict.fromkeys(found))


# ------------------------------------------------------------------------------------ periods


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"unknown timezone {name!r}") from exc


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _local_midnight_ms(day: date, tz: ZoneInfo) -> int:
    return _ms(datetime(day.year, day.month, day.day, tzinfo=tz))


def _month_anchor(year: int, month: int, anchor: int) -> date:
    return date(year, month, min(anchor, calendar.monthrange(year, month)[1]))


def _add_months(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


# The last periods found per (kind, anchor, timezone): every call of the period has the same
# bounds, and working them out (a timezone conversion or two) was most of a call's bundle cost.
# Two per key: the current period and the one before (a rollover's carry). Bounded, no I/O.
_BOUNDS: dict[tuple[PeriodKind, int, str], tuple[tuple[int, int], ...]] = {}
_BOUNDS_MAX = 4096


def period_bounds(bundle: BundleDef, timezone: str, at_ms: int, *, valid_from_ms: int = 0,
                  valid_until_ms: int = OPEN_END_MS) -> tuple[int, int]:
    """The half-open period ``[start, end)`` (epoch ms) of ``bundle`` in force at ``at_ms``, read
    in ``timezone``. A ``once`` bundle has one period: the grant's validity."""
    if bundle.period is PeriodKind.ONCE:
        return valid_from_ms, valid_until_ms
    key = (bundle.period, bundle.anchor, timezone)
    known = _BOUNDS.get(key, ())
    for start, end in known:
        if start <= at_ms < end:
            return start, end
    found = _period_bounds(bundle, timezone, at_ms)
    if len(_BOUNDS) >= _BOUNDS_MAX:
        _BOUNDS.clear()
    _BOUNDS[key] = (found, *known[:1])
    return found


def _period_bounds(bundle: BundleDef, timezone: str, at_ms: int) -> tuple[int, int]:
    tz = zone(timezone)
    local = (_EPOCH + timedelta(milliseconds=at_ms)).astimezone(tz)
    if bundle.period is PeriodKind.WEEK:
        start_day = local.date() - timedelta(days=(local.isoweekday() - bundle.anchor) % 7)
        return _local_midnight_ms(start_day, tz), _local_midnight_ms(start_day + timedelta(days=7), tz)
    year, month = local.year, local.month
    start_day = _month_anchor(year, month, bundle.anchor)
    if local.date() < start_day:
        year, month = _add_months(year, month, -1)
        start_day = _month_anchor(year, month, bundle.anchor)
    next_year, next_month = _add_months(year, month, 1)
    end_day = _month_anchor(next_year, next_month, bundle.anchor)
    return _local_midnight_ms(start_day, tz), _local_midnight_ms(end_day, tz)


@dataclass(frozen=True, slots=True)
class BundleGrant:
    """One bundle granted to one account, valid over ``[valid_from, valid_until)``."""

    grant_id: int
    account_id: str
    bundle: BundleDef
    valid_from_ms: int
    valid_until_ms: int = OPEN_END_MS
    reference: str = ""

    def in_force(self, at_ms: int) -> bool:
        return self.valid_from_ms <= at_ms < self.valid_until_ms


@dataclass(frozen=True, slots=True)
class BundleSlot:
    """One grant's period a call may draw on, as the store needs it (no prefixes, no timezone).

    ``seconds`` is the period's allowance; ``carry_from_ms`` the previous period's start when
    what it left rolls over (None otherwise); ``expires_ms`` orders the slots (earliest first)."""

    grant_id: int
    period_start_ms: int
    seconds: int
    expires_ms: int
    carry_from_ms: int | None = None

    @property
    def key(self) -> tuple[int, int]:
        return self.grant_id, self.period_start_ms


def slots_for(grants: Iterable[BundleGrant], number: str, at_ms: int, timezone: str) -> tuple[BundleSlot, ...]:
    """The bundle periods a call to ``number`` starting at ``at_ms`` may draw on, in draw order:
    the earliest to expire first (the period's end, or the grant's end when sooner), then the
    older grant."""
    slots: list[BundleSlot] = []
    for grant in grants:
        if not grant.in_force(at_ms) or not grant.bundle.matches(number):
            continue
        start, end = period_bounds(grant.bundle, timezone, at_ms, valid_from_ms=grant.valid_from_ms,
                                   valid_until_ms=grant.valid_until_ms)
        carry: int | None = None
        if grant.bundle.rollover and start > grant.valid_from_ms:  # the grant ran in the period before
            carry, _ = period_bounds(grant.bundle, timezone, start - 1)
        slots.append(BundleSlot(grant.grant_id, start, grant.bundle.seconds, min(end, grant.valid_until_ms), carry))
    slots.sort(key=lambda slot: (slot.expires_ms, slot.grant_id))
    return tuple(slots)


def rollover_carry(*, allowance_s: int, previous_left_s: int) -> int:
    """What a new period inherits from the one before: what it left, at most one allowance."""
    return max(0, min(previous_left_s, allowance_s))


# -------------------------------------------------------------------------------- the money


def covered_seconds(row: RateRow, seconds: int, held_s: int) -> int:
    """Of ``seconds`` answered whole seconds, the billed seconds the bundles cover (``min(b, R)``)."""
    return min(billed_seconds(row, seconds), max(held_s, 0))


def money_micros_for_seconds(row: RateRow, seconds: int, held_s: int) -> int:
    """The §9 money of ``seconds`` answered whole seconds when the bundles hold ``held_s``."""
    billed = billed_seconds(row, seconds)
    if billed == 0:
        return 0
    covered = min(billed, max(held_s, 0))
    fee = 0 if covered > 0 else row.connect_fee_micros
    return fee + -(-(row.rate_micros * (billed - covered)) // SECONDS_PER_MINUTE)


def max_seconds_with_bundle(row: RateRow, budget_micros: int, held_s: int, *,
                            cap_seconds: int = MAX_SECONDS_CAP) -> int:
    """The largest whole duration ``d`` with ``money(d) <= budget`` (§9); 0 means deny.

    Closed form as in :func:`agent.core.rating.max_seconds`: with ``R > 0`` the money pays
    ``ceil(rate * (b - R) / 60)`` for ``b > R`` and nothing up to ``R``, so ``b`` is affordable
    iff ``b <= R + floor(60 * budget / rate)`` =: B; the answer is the largest block boundary
    ``G <= B`` when ``minimum <= G``. The grace period alone never makes a call affordable."""
    if held_s <= 0:
        return row.max_seconds(budget_micros) if cap_seconds == MAX_SECONDS_CAP else \
            min(row.max_seconds(budget_micros), cap_seconds)
    if cap_seconds < 1:
        raise InvalidInput(f"cap {cap_seconds} s must be at least 1 second")
    budget = max(budget_micros, 0)
    if row.rate_micros == 0:
        exact = cap_seconds
    else:
        affordable_billed = held_s + SECONDS_PER_MINUTE * budget // row.rate_micros
        first = row.initial_increment
        if affordable_billed < first:
            return 0
        exact = first + (affordable_billed - first) // row.increment * row.increment
        if row.minimum_seconds > exact:
            return 0
    if exact <= row.grace_seconds:
        return 0
    return min(exact, cap_seconds)


@dataclass(frozen=True, slots=True)
class BundleTariff:
    """A rate row seen through the bundle seconds a call holds (implements the session's
    ``Tariff``). ``slots`` are the periods the call may draw on, in draw order."""

    row: RateRow
    held_s: int
    slots: tuple[BundleSlot, ...]

    def cost_micros(self, duration_ms: int) -> int:
        return money_micros_for_seconds(self.row, whole_seconds(duration_ms), self.held_s)

    def max_seconds(self, budget_micros: int) -> int:
        return max_seconds_with_bundle(self.row, budget_micros, self.held_s)

    def billed_seconds_at(self, duration_ms: int) -> int:
        return billed_seconds(self.row, whole_seconds(duration_ms))

    def covered_at(self, duration_ms: int) -> int:
        return covered_seconds(self.row, whole_seconds(duration_ms), self.held_s)

    def holding(self, held_s: int) -> BundleTariff:
        return BundleTariff(self.row, held_s, self.slots)


# ------------------------------------------------------------------------ drawing on periods


@dataclass(frozen=True, slots=True)
class PeriodState:
    """A grant's period as the store keeps it: ``left = granted - used - reserved``."""

    granted_s: int
    used_s: int = 0
    reserved_s: int = 0

    @property
    def left_s(self) -> int:
        return self.granted_s - self.used_s - self.reserved_s


def draw(lefts: Sequence[int], want_s: int) -> list[int]:
    """Take up to ``want_s`` seconds from periods with ``lefts`` seconds left, in order; the
    seconds taken from each (the stores apply this rule; the Redis script mirrors it)."""
    taken: list[int] = []
    need = max(want_s, 0)
    for left in lefts:
        take = min(need, max(left, 0))
        taken.append(take)
        need -= take
    return taken


def commit(held: Sequence[int], covered_s: int) -> list[int]:
    """Split a call's ``covered_s`` seconds over the periods it held seconds from, in draw
    order: each period's used seconds (the rest of each hold goes back)."""
    used: list[int] = []
    need = max(covered_s, 0)
    for hold in held:
        take = min(need, max(hold, 0))
        used.append(take)
        need -= take
    if need and used:  # more covered than held (a store that lost the holds): the first absorbs it
        used[0] += need
    return used
