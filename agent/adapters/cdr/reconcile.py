"""Reconciliation: the PBX's own billed seconds against the seconds we charged, call by call.

The PBX's view is the billsec of the leg billing ran from (Asterisk ``CDR(billsec)``, FreeSWITCH
``billsec``): whole seconds, truncated by some PBXs, so one second of difference is normal. The
check rounds the PBX's seconds with the same rate's rules (minimum, initial increment, increment,
grace; DESIGN §4) and flags a call when what we charged differs from that by more than one
increment. A rate that no longer exists (a replaced deck) is checked with 1-second increments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, Engine, select

from agent.adapters.cdr.query import CdrFilter, CdrView, iter_cdr_chunks
from agent.adapters.sql.models import Rate
from agent.core.rating import RateRow, billed_seconds

STATUSES = ("ok", "overcharged", "undercharged", "no_pbx_leg", "unrated")


@dataclass(frozen=True, slots=True)
class ReconcileLine:
    call_id: str
    account_id: str
    started_at: datetime
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


def check_call(view: CdrView, rule: RateRow | None) -> ReconcileLine:
    """Pure: compare one call's charged seconds with its PBX billsec rounded by ``rule``."""
    leg = view.billed_leg
    rule = rule or RateRow(prefix="", destination="", rate_micros=0)
    pbx = leg.billsec if leg else None
    charged = view.rating.billed_seconds if view.rating else None
    expected = billed_seconds(rule, pbx) if pbx is not None else None
    if charged is None:
        status = "unrated"
    elif expected is None:
        status = "ok" if charged == 0 else "no_pbx_leg"
    elif abs(charged - expected) <= rule.increment:
        status = "ok"
    else:
        status = "overcharged" if charged > expected else "undercharged"
    return ReconcileLine(call_id=view.call_id, account_id=view.account_id, started_at=view.started_at,
                         disposition=view.disposition, pbx_billsec=pbx, charged_seconds=charged,
                         expected_seconds=expected, increment=rule.increment, status=status)


def _load_rules(conn: Connection, rate_ids: set[int], cache: dict[int, RateRow | None]) -> None:
    """Rate rows by id (only the rounding fields matter here), read once each."""
    wanted = sorted(rate_ids - cache.keys())
    if not wanted:
        return
    rows = conn.execute(select(Rate.id, Rate.initial_increment, Rate.increment, Rate.minimum_seconds,
                               Rate.grace_seconds).where(Rate.id.in_(wanted)))
    for rate_id, initial, increment, minimum, grace in rows:
        cache[rate_id] = RateRow(prefix="", destination="", rate_micros=0, initial_increment=initial,
                                 increment=increment, minimum_seconds=minimum, grace_seconds=grace)
    for rate_id in wanted:
        cache.setdefault(rate_id, None)


def reconcile(engine: Engine, where: CdrFilter) -> Iterator[ReconcileLine]:
    """One line per call matching ``where``, in start order (streamed)."""
    rules: dict[int, RateRow | None] = {}
    for conn, views in iter_cdr_chunks(engine, where):
        _load_rules(conn, {v.rating.rate_id for v in views if v.rating and v.rating.rate_id is not None}, rules)
        for view in views:
            rate_id = view.rating.rate_id if view.rating else None
            yield check_call(view, rules.get(rate_id) if rate_id is not None else None)
