"""Spending caps beside the balance (DESIGN §8): ``max_call_cost``, daily and monthly spend.

Pure: no I/O, no clock. Every cap is drawn on exactly like the balance. The stores keep, per
account and calendar day / month (in the timezone of the account's rate plan), what settled
calls spent and what open calls hold (their reservation plus what their nibbles debited); the
money a step may reserve is the least of what the balance and every cap leave::

    room = min(balance + credit_limit - reserved,
               daily   - (day_spent + day_held),
               monthly - (month_spent + month_held),
               max_call_cost - (call_debited + call_reserved))

A call counts on the day and month it started (like bundle periods), so a call that runs past
midnight does not move into the next day's budget; the next day starts at zero without a job.
A cap reached mid-call gives a partial grant, and the session cuts the call at the exact
instant, as when the money runs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agent.core.bundles import zone
from agent.core.errors import InvalidInput

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_CAP_MICROS = 2**53 - 1


@dataclass(frozen=True, slots=True)
class SpendLimits:
    """An account's caps in micro-units; None: no cap."""

    max_call_cost_micros: int | None = None
    daily_micros: int | None = None
    monthly_micros: int | None = None

    @property
    def any(self) -> bool:
        return not (self.max_call_cost_micros is None and self.daily_micros is None and self.monthly_micros is None)


def check_limits(limits: SpendLimits) -> SpendLimits:
    for name in ("max_call_cost_micros", "daily_micros", "monthly_micros"):
        value = getattr(limits, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CAP_MICROS:
            raise InvalidInput(f"{name.removesuffix('_micros').replace('_', ' ')} cap {value!r} must be a "
                               "non-negative amount")
    return limits


@dataclass(frozen=True, slots=True)
class SpendPeriods:
    """The calendar day and month (their local midnight, epoch ms) a call counts on."""

    day_start_ms: int
    month_start_ms: int


def spend_periods(timezone: str, at_ms: int) -> SpendPeriods:
    tz = zone(timezone)
    local = (_EPOCH + timedelta(milliseconds=at_ms)).astimezone(tz)
    day = datetime(local.year, local.month, local.day, tzinfo=tz)
    month = datetime(local.year, local.month, 1, tzinfo=tz)
    return SpendPeriods((day - _EPOCH) // timedelta(milliseconds=1), (month - _EPOCH) // timedelta(milliseconds=1))


@dataclass(frozen=True, slots=True)
class SpendUse:
    """What counts against the caps now: the day's and month's spent + held, and the call's."""

    day_micros: int = 0
    month_micros: int = 0
    call_micros: int = 0


def cap_room(limits: SpendLimits, use: SpendUse) -> tuple[int | None, str]:
    """The least room the caps leave (None: no cap) and the name of the tightest cap."""
    room: int | None = None
    which = ""
    for name, cap, used in (("max_call_cost", limits.max_call_cost_micros, use.call_micros),
                            ("daily", limits.daily_micros, use.day_micros),
                            ("monthly", limits.monthly_micros, use.month_micros)):
        if cap is None:
            continue
        left = cap - used
        if room is None or left < room:
            room, which = left, name
    return room, which


def capped(available_micros: int, limits: SpendLimits, use: SpendUse) -> tuple[int, str]:
    """The money a step may draw on: the balance's available capped by every cap, and the name
    of the cap that binds ('' when the balance does)."""
    room, which = cap_room(limits, use)
    if room is None or room >= available_micros:
        return available_micros, ""
    return room, which
