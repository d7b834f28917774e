"""Reconciliation: the PBX's own billed seconds against the seconds we charged, call by call.

The PBX's view is the billsec of the leg billing ran from (Asterisk ``CDR(billsec)``, FreeSWITCH
``billsec``): whole seconds, truncated by some PBXs, so one second of difference is normal. The
check rounds the PBX's seconds with the same rate's rules (minimum, initial increment, increment,
grace; DESIGN §4), does the same to the decision's billed seconds, and flags a call when the
two differ by more than one increment. A rate that no longer exists (a replaced deck) is
checked with 1-second increments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select

from agent.adapters.cdr.export import FlatCdr, open_stream
from agent.adapters.cdr.query import CdrFilter
from agent.adapters.sql.models import Rate
from agent.core.rating import RateRow, billed_seconds

STATUSES = ("ok", "overcharged", "undercharged", "no_pbx_leg", "unrated")


@dataclass(frozen=True, slots=True)
class ReconcileLine:
    call_id: str
    account_id: str
    started_at: str  # ISO 8601
    disposition: str
    pbx_billsec: int | None
    charged_seconds: int | None
    expected_seconds: int | None  # the PBX's seconds rounded by the rate's rules
    increment: int
    status: str

    @property
    def difference(self) -> int | None:
        if self.charged_seconds is None or self.expected_seconds is None:
            return None
        return self.charged_seconds - self.expected_seconds

    @property
    def flagged(self) -> bool:
        return self.status != "ok"


@dataclass
class ReconcileSummary:
    checked: int = 0
    pbx_seconds: int = 0
    charged_seconds: int = 0
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def flagged(self) -> int:
        return self.checked - self.statuses["ok"]

    def add(self, line: ReconcileLine) -> None:
        self.checked += 1
        self.pbx_seconds += line.pbx_billsec or 0
        self.charged_seconds += line.charged_seconds or 0
        self.statuses[line.status] += 1


def check_call(cdr: FlatCdr, rule: RateRow | None) -> ReconcileLine:
    """Pure: compare one call's charged seconds with its PBX billsec rounded by ``rule``."""
    leg = cdr.billed_leg()
    rule = rule or RateRow(prefix="", destination="", rate_micros=0)
    pbx: int | None = leg[11] if leg else None
    # Rounded by the same rule as the PBX's seconds, so that the check holds whether a decision
    # records the answered seconds or the billed blocks (rounding twice changes nothing).
    charged = billed_seconds(rule, cdr.decision[5]) if cdr.decision else None
    expected = billed_seconds(rule, pbx) if pbx is not None else None
    if charged is None:
        status = "unrated"
    elif expected is None:
        status = "ok" if charged == 0 else "no_pbx_leg"
    elif abs(charged - expected) <= rule.increment:
        status = "ok"
    else:
        status = "overcharged" if charged > expected else "undercharged"
    return ReconcileLine(call_id=cdr.call_id, account_id=cdr.call[3], started_at=cdr.call[6],
                         disposition=cdr.call[10], pbx_billsec=pbx, charged_seconds=charged,
                         expected_seconds=expected, increment=rule.increment, status=status)


class _Rules:
    """Rate rows by id (only the rounding fields matter here), each read once."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.cache: dict[int, RateRow | None] = {}

    def get(self, rate_id: int | None) -> RateRow | None:
        if rate_id is None:
            return None
        if rate_id not in self.cache:
            row: Any = self.conn.execute(select(Rate.initial_increment, Rate.increment, Rate.minimum_seconds,
                                                Rate.grace_seconds).where(Rate.id == rate_id)).first()
            self.cache[rate_id] = None if row is None else RateRow(
                prefix="", destination="", rate_micros=0, initial_increment=row[0], increment=row[1],
                minimum_seconds=row[2], grace_seconds=row[3])
        return self.cache[rate_id]


def reconcile(engine: Engine, where: CdrFilter) -> Iterator[ReconcileLine]:
    """One line per call matching ``where``, in start order (streamed)."""
    with open_stream(engine, where) as (cdrs, side):
        rules = _Rules(side)
        for cdr in cdrs:
            yield check_call(cdr, rules.get(cdr.decision[2] if cdr.decision else None))
