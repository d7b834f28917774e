"""Prove from SQL alone that the money adds up (``billing-agent ledger check``).

1. Every account's balance equals the sum of its ledger entries; no entry names an unknown account.
2. ``accounts.reserved_micros`` equals what the account's open reservations hold
   (``reserved + debited`` of the embedded SQL balance store; 0 when Redis holds reservations).
3. Every settled call (``calls.settled_at`` set) has exactly one ledger entry of kind ``charge``,
   whose reference is ``charge:{call_id}``; and every charge belongs to a settled call. A charge
   younger than the grace period may still be waiting for its call record (the CDR writer
   spools), so it is only counted as pending.
4. Every level of a reseller chain (DESIGN §11) is checked the same way on its own account: the
   charge of a level is ``charge:{call}^{level}`` (its own balance-store call), and it belongs
   to the settled call its rating decision names (``rating_decisions.of_call_id``); every
   level's decision of an answered call has its charge.

Each query is an aggregate or an anti-join, so the check scales with the tables, not with
Python memory; at most ``limit`` rows of each kind of problem are listed, all are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from agent.adapters.sql.accounts import ledger_sums
from agent.adapters.sql.models import Account, Call, LedgerEntry, RatingDecision, Reservation, SpendPeriod


@dataclass(frozen=True)
class Problem:
    problem: str
    account: str | None = None
    call: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    accounts: int = 0
    settled_calls: int = 0
    charges: int = 0
    pending_charges: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


def _listed(session: Session, report: Report, query: Any, make: Any, limit: int) -> None:
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    report.problem_count += count
    for row in session.execute(query.limit(limit)):
        report.problems.append(make(row))


def check_balances(session: Session, report: Report) -> None:
    sums = ledger_sums(session)
    rows = session.execute(select(Account.id, Account.balance_micros)).all()
    report.accounts = len(rows)
    balances = {account_id: balance for account_id, balance in rows}
    for account_id, balance in sorted(balances.items()):
        total = sums.get(account_id, 0)
        if total != balance:
            report.problem_count += 1
            report.problems.append(Problem("balance differs from ledger sum", account_id,
                                           detail={"balance_micros": balance, "ledger_sum_micros": total}))
    for account_id in sorted(set(sums) - set(balances)):
        report.problem_count += 1
        report.problems.append(Problem("ledger entries for an unknown account", account_id,
                                       detail={"ledger_sum_micros": sums[account_id]}))


def check_reserved(session: Session, report: Report, limit: int) -> None:
    held = (select(Reservation.account_id,
                   func.sum(Reservation.reserved_micros + Reservation.debited_micros).label("held"))
            .where(Reservation.state == "open").group_by(Reservation.account_id).subquery())
    held_micros = func.coalesce(held.c.held, 0)
    query = (select(Account.id, Account.reserved_micros, held_micros)
             .outerjoin(held, held.c.account_id == Account.id)
             .where(Account.reserved_micros != held_micros).order_by(Account.id))
    _listed(session, report, query, lambda r: Problem(
        "reserved differs from open reservations", r[0],
        detail={"reserved_micros": r[1], "open_reservations_micros": int(r[2])}), limit)


def check_charges(session: Session, report: Report, now: datetime, grace: timedelta, limit: int) -> None:
    is_charge = LedgerEntry.kind == "charge"
    report.settled_calls = session.scalar(select(func.count()).where(Call.settled_at.is_not(None))) or 0
    report.charges = session.scalar(select(func.count()).where(is_charge)) or 0
    charge = aliased(LedgerEntry)
    _listed(session, report, (
        select(Call.id, Call.account_id)
        .outerjoin(charge, and_(charge.call_id == Call.id, charge.kind == "charge"))
        # An unanswered call (busy, failed, no answer) is released, not charged: nothing to find.
        .where(Call.settled_at.is_not(None), Call.answered_at.is_not(None), charge.id.is_(None)).order_by(Call.id)
    ), lambda r: Problem("answered call without a charge", r[1], r[0]), limit)
    _listed(session, report, (
        select(LedgerEntry.call_id, func.min(LedgerEntry.account_id), func.count())
        .where(is_charge, LedgerEntry.call_id.is_not(None)).group_by(LedgerEntry.call_id)
        .having(func.count() > 1).order_by(LedgerEntry.call_id)
    ), lambda r: Problem("call charged more than once", r[1], r[0], {"charges": r[2]}), limit)
    _listed(session, report, (
        select(LedgerEntry.reference, LedgerEntry.account_id, LedgerEntry.call_id)
        .where(is_charge, or_(LedgerEntry.call_id.is_(None),
                              LedgerEntry.reference != literal("charge:") + LedgerEntry.call_id))
        .order_by(LedgerEntry.id)
    ), lambda r: Problem("charge reference does not name its call", r[1], r[2], {"reference": r[0]}), limit)
    # A level above a customer: its decision (seq 1) names the customer's call, which is settled.
    level = aliased(RatingDecision)
    customer = aliased(Call)
    _listed(session, report, (
        select(level.call_id, level.account_id)
        .join(customer, customer.id == level.of_call_id)
        .outerjoin(charge, and_(charge.call_id == level.call_id, charge.kind == "charge"))
        .where(level.level > 0, level.seq == 1, customer.settled_at.is_not(None), customer.answered_at.is_not(None),
               charge.id.is_(None)).order_by(level.call_id)
    ), lambda r: Problem("reseller level of an answered call without a charge", r[1], r[0]), limit)
    unsettled = (select(LedgerEntry.call_id, LedgerEntry.account_id, LedgerEntry.created_at,
                        func.coalesce(Call.id, customer.id))
                 .outerjoin(Call, Call.id == LedgerEntry.call_id)
                 .outerjoin(level, and_(level.call_id == LedgerEntry.call_id, level.seq == 1, level.level > 0))
                 .outerjoin(customer, customer.id == level.of_call_id)
                 .where(is_charge, LedgerEntry.call_id.is_not(None), Call.settled_at.is_(None),
                        customer.settled_at.is_(None)))
    report.pending_charges = session.scalar(
        select(func.count()).select_from(unsettled.where(LedgerEntry.created_at >= now - grace).subquery())) or 0
    _listed(session, report, unsettled.where(LedgerEntry.created_at < now - grace).order_by(LedgerEntry.id),
            lambda r: Problem("charge without a settled call", r[1], r[0],
                              {"call_record": "missing" if r[3] is None else "not settled",
                               "charged_at": r[2].isoformat()}), limit)


def check_spend(session: Session, report: Report, limit: int) -> int:
    """Spend caps on the embedded SQL store (DESIGN §8): each day's and month's ``held`` equals
    what its open reservations hold (reserved + debited), and ``spent`` what the ledger charged
    the calls that started in it (``charge:`` and ``charge-late:`` entries of its reservations).
    With Redis the live holds are in Redis and SQL has no call's day: not checked. Returns the
    number of counters checked."""
    counted = 0
    for kind, start in (("day", Reservation.spend_day_ms), ("month", Reservation.spend_month_ms)):
        held = {(a, int(t)): int(v) for a, t, v in session.execute(
            select(Reservation.account_id, start, func.sum(Reservation.reserved_micros + Reservation.debited_micros))
            .where(Reservation.state == "open", start != 0).group_by(Reservation.account_id, start))}
        spent = {(a, int(t)): -int(v) for a, t, v in session.execute(
            select(Reservation.account_id, start, func.sum(LedgerEntry.amount_micros))
            .join(LedgerEntry, LedgerEntry.call_id == Reservation.call_id)
            .where(start != 0, or_(LedgerEntry.kind == "charge", LedgerEntry.reference.like("charge-late:%")))
            .group_by(Reservation.account_id, start))}
        rows = {(a, int(t)): (int(sp), int(h)) for a, t, sp, h in session.execute(
            select(SpendPeriod.account_id, SpendPeriod.start_ms, SpendPeriod.spent_micros, SpendPeriod.held_micros)
            .where(SpendPeriod.kind == kind))}
        counted += len(rows)
        listed = 0
        for key in sorted(set(rows) | set(held) | set(spent)):
            want = (spent.get(key, 0), held.get(key, 0))
            have = rows.get(key, (0, 0))
            if have != want:
                report.problem_count += 1
                if listed < limit:
                    listed += 1
                    report.problems.append(Problem(
                        f"{kind} spend counter differs from its calls", key[0],
                        detail={"start_ms": key[1], "spent_micros": have[0], "held_micros": have[1],
                                "charged_micros": want[0], "open_reservations_micros": want[1]}))
    return counted


def check_ledger(session: Session, *, now: datetime, grace: timedelta, limit: int = 100) -> Report:
    report = Report()
    check_balances(session, report)
    check_reserved(session, report, limit)
    check_charges(session, report, now, grace, limit)
    return report
