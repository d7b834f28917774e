"""Low balance and balance exhausted (DESIGN §8): when an account's available money crosses its
threshold, one alert per crossing.

Pure (no I/O, no clock). The service (``agent/services/balance_alerts.py``) reads the account's
available money after each settled call and asks :class:`Crossings` whether this is a new
crossing; the threshold is the account's ``low_balance_micros`` or, when that is NULL, its rate
plan's (NULL on both: the account is not watched).

Levels, from the available money ``A`` (balance + credit limit - what live calls hold) and the
threshold ``T``:

* ``EXHAUSTED`` when ``A <= 0``, or when the call was cut by the agent (``Disposition.CUT``) and
  ``A`` would not pay one more nibble of it at its rate (the money ran out before zero: a cut for
  a spend cap, a fraud suspension or the maximum duration leaves more than that);
* ``LOW`` when ``A < T``;
* ``ABOVE`` otherwise.

An alert is raised when the level goes down (``ABOVE`` -> ``LOW`` or ``EXHAUSTED``, ``LOW`` ->
``EXHAUSTED``); none again until the account is seen ``ABOVE`` (a top-up, then its next settled
call), so an account that hovers below its threshold gives one alert, not one per call. A
threshold of 0 means "exhausted only".
"""

from __future__ import annotations

from enum import IntEnum

from agent.core.fraud import BALANCE_EXHAUSTED, LOW_BALANCE, AlertRecord
from agent.core.money import format_amount

MAX_TRACKED = 200_000  # accounts remembered below their threshold (beyond: the oldest are forgotten)


class Level(IntEnum):
    ABOVE = 0
    LOW = 1
    EXHAUSTED = 2


def nibble_cost(rate_micros_per_minute: int, nibble_seconds: int) -> int:
    """What one nibble of a call costs at its rate (rounded up, as a charge is)."""
    return -(-rate_micros_per_minute * nibble_seconds // 60)


def level_of(available_micros: int, threshold_micros: int, *, cut: bool = False, next_nibble_micros: int = 0) -> Level:
    if available_micros <= 0 or (cut and available_micros < next_nibble_micros):
        return Level.EXHAUSTED
    if available_micros < threshold_micros:
        return Level.LOW
    return Level.ABOVE


class Crossings:
    """The level each account was last seen at (only those below their threshold are kept)."""

    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self.max_tracked = max_tracked
        self._below: dict[str, Level] = {}

    def observe(self, account_id: str, level: Level) -> Level | None:
        """The level to alert for when this is a new crossing down, else None."""
        seen = self._below.get(account_id, Level.ABOVE)
        if level is Level.ABOVE:
            self._below.pop(account_id, None)
            return None
        if level <= seen:
            return None
        self._below.pop(account_id, None)  # re-inserted last: the dict stays oldest-first
        self._below[account_id] = level
        if len(self._below) > self.max_tracked:
            del self._below[next(iter(self._below))]
        return level

    def level(self, account_id: str) -> Level:
        return self._below.get(account_id, Level.ABOVE)

    def __len__(self) -> int:
        return len(self._below)


def balance_alert(level: Level, *, at_ms: int, node: str, account_id: str, available_micros: int,
                  threshold_micros: int, call_id: str = "", destination: str = "", cut: bool = False) -> AlertRecord:
    """The alert of a crossing: ``figure`` is the available money, ``threshold`` the threshold."""
    kind = BALANCE_EXHAUSTED if level is Level.EXHAUSTED else LOW_BALANCE
    if level is Level.EXHAUSTED:
        detail = f"available {format_amount(available_micros)}" + (
            ": the call was cut when the money ran out" if cut and available_micros > 0 else " <= 0")
    else:
        detail = f"available {format_amount(available_micros)} < {format_amount(threshold_micros)}"
    return AlertRecord(at_ms, node, account_id, kind, kind, available_micros, threshold_micros, 0, "alert", call_id,
                       destination, detail)
