"""Bundle periods in SQL (DESIGN §9): open a grant's period on first use, post its usage.

Shared by the embedded balance store (which also keeps the live holds here, ``reserved_s``)
and the tools (``bundles show``, ``ledger check``). Every change to a period's ``granted_s``
or ``used_s`` is a ``bundle_usage`` row with a unique reference, in the same transaction, so
``left = granted - used`` is always the sum of the period's rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.adapters.sql.models import BundlePeriod, BundleUsage
from agent.core.balance import slot_from_json, slot_to_json
from agent.core.bundles import BundleSlot, PeriodState, rollover_carry


def lock_period(session: Session, grant_id: int, period_start_ms: int) -> BundlePeriod | None:
    return session.scalar(select(BundlePeriod).where(
        BundlePeriod.grant_id == grant_id, BundlePeriod.period_start_ms == period_start_ms).with_for_update())


def open_period(session: Session, account_id: str, slot: BundleSlot) -> BundlePeriod:
    """The slot's period, locked; created with its allowance (and the rollover of the period
    before, when the bundle rolls over) the first time a call draws on it."""
    period = lock_period(session, slot.grant_id, slot.period_start_ms)
    if period is not None:
        return period
    carry = 0
    if slot.carry_from_ms is not None:
        previous = lock_period(session, slot.grant_id, slot.carry_from_ms)
        # A previous period no call ever drew on left its whole allowance.
        left = slot.seconds if previous is None else previous.granted_s - previous.used_s - previous.reserved_s
        carry = rollover_carry(allowance_s=slot.seconds, previous_left_s=left)
    period = BundlePeriod(grant_id=slot.grant_id, period_start_ms=slot.period_start_ms, account_id=account_id,
                          period_end_ms=slot.expires_ms, granted_s=slot.seconds + carry, used_s=0, reserved_s=0)
    session.add(period)
    base = f"{slot.grant_id}:{slot.period_start_ms}"
    post_usage(session, account_id, slot.grant_id, slot.period_start_ms, "grant", slot.seconds,
               f"bundle-grant:{base}", None)
    if carry:
        post_usage(session, account_id, slot.grant_id, slot.period_start_ms, "rollover", carry,
                   f"bundle-rollover:{base}", None)
    session.flush()
    return period


def post_usage(session: Session, account_id: str, grant_id: int, period_start_ms: int, kind: str, seconds: int,
               reference: str, call_id: str | None) -> None:
    session.add(BundleUsage(account_id=account_id, grant_id=grant_id, period_start_ms=period_start_ms, kind=kind,
                            seconds=seconds, reference=reference, call_id=call_id))


def use_reference(call_id: str, slot: BundleSlot, *, late: bool = False) -> str:
    return f"{'bundle-late' if late else 'bundle'}:{call_id}:{slot.grant_id}:{slot.period_start_ms}"


def post_use(session: Session, account_id: str, call_id: str, period: BundlePeriod, slot: BundleSlot,
             seconds: int, *, late: bool = False) -> None:
    """A call used ``seconds`` of the period: ``used_s`` and its ``use`` row move together."""
    if seconds <= 0:
        return
    period.used_s += seconds
    post_usage(session, account_id, slot.grant_id, slot.period_start_ms, "use", -seconds,
               use_reference(call_id, slot, late=late), call_id)


def periods_of(session: Session, account_id: str) -> dict[tuple[int, int], PeriodState]:
    rows = session.scalars(select(BundlePeriod).where(BundlePeriod.account_id == account_id))
    return {(row.grant_id, row.period_start_ms): PeriodState(row.granted_s, row.used_s, row.reserved_s)
            for row in rows}


# ------------------------------------------------------------------ a reservation's holds


def dump_holds(holds: Sequence[tuple[BundleSlot, int]]) -> str:
    """``reservations.bundle_slots``: each period the call may draw on, with its hold."""
    return json.dumps([[*slot_to_json(slot), held] for slot, held in holds], separators=(",", ":"))


def load_holds(text: str) -> list[tuple[BundleSlot, int]]:
    if not text:
        return []
    return [(slot_from_json(item[:5]), int(item[5])) for item in json.loads(text)]
