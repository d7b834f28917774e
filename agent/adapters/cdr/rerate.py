"""Re-rating stored calls with a plan's current rates (``billing-agent rerate``).

For every call in the time range whose current rating decision (highest seq) was made with the
plan, the plan's current table rates the call again: same destination, same start instant, same
billed duration (``calls.duration_ms``), the rules of DESIGN §4. A call whose cost or billed
seconds change gets, in one transaction,

* a new ``rating_decisions`` row with ``seq + 1`` (history is never updated), and
* a ledger ``adjustment`` of the difference (old cost - new cost: a higher cost debits the
  account) with the reference ``rerate:{call_id}:{seq}``.

**Calls converted from another currency** (DESIGN §11; the decision has an ``fx_rate_e10``)
are converted again at the same rate, the one in force at the call's start that the decision
recorded, rounded up once: a corrected rate deck changes the plan's price, never the FX rate.

**Calls that used bundles** (DESIGN §9; ``rating_decisions.bundle_seconds`` > 0) keep the bundle
seconds they were given: the money is ``money_micros_for_seconds(row, seconds, held_s=covered)``
with ``covered`` the latest decision's bundle seconds, so a corrected rate only changes the money
of the billed seconds beyond them. When the corrected rate bills fewer seconds than were covered
(a larger grace, a shorter first block), the bundles cover only those: the difference goes back
to the grant and period it came from (the call's ``bundle_usage`` rows give the split; the last
period drawn on gets back first, as the settle fills them in draw order) as an ``adjust`` row of
+seconds with the reference ``bundle-rerate:{call_id}:{seq}:{grant_id}:{period_start_ms}``, and
``bundle_periods.used_s`` moves with it, in the same transaction. The new decision records the
bundle seconds the call now has. Seconds are never taken from a bundle by a re-rating.

**The buy side** (DESIGN §10): a new decision keeps the carrier that carried the call, its buy
row, seconds and cost, and its margin becomes the new sell price minus that cost. A corrected
carrier deck re-rates the cost side (``rerate_buy``, ``billing-agent rerate --carrier NAME``):
every call whose current decision names the carrier is priced again with the carrier's current
buy deck (same start instant, same duration, the carrier's increments); a call whose buy row,
seconds or cost change gets a new decision with the same sell side, the new buy side and margin,
and no ledger entry (the customer paid what it paid). The buy side may sit on a reseller's
decision (the level the operator sells to, DESIGN §11): that decision gets the new row.

Running it again finds every call already at its current price and changes nothing; two runs at
once collide on the unique keys ``(call_id, seq)`` and the ledger reference, so a call is
re-rated once. Calls are read a page at a time (keyset on ``(started_at, id)``), each page's
changes committed before the next page is read: bounded memory, short transactions (SQLite
takes its write lock per transaction), and an interrupted run can simply be run again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from agent.adapters.sql.accounts import lock_account, post_entry
from agent.adapters.sql.bundle_periods import lock_period, post_usage
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.models import BundleUsage, Call, RatingDecision, utcnow
from agent.adapters.sql.rate_repository import load_table
from agent.core.bundles import covered_seconds, money_micros_for_seconds
from agent.core.errors import BillingError, Conflict
from agent.core.fx import Conversion
from agent.core.money import format_amount
from agent.core.ratetable import RateTable, Refusal, epoch_ms
from agent.core.rating import billed_seconds, cost_micros, whole_seconds

log = logging.getLogger(__name__)

PAGE_SIZE = 500
SAMPLE_SIZE = 20


@dataclass(frozen=True, slots=True)
class StoredCall:
    call_id: str
    account_id: str
    destination: str
    started_at: datetime
    duration_ms: int
    seq: int  # of the current decision
    rate_id: int | None
    prefix: str
    rate_micros: int
    billed_seconds: int
    cost_micros: int
    bundle_seconds: int = 0  # of the current decision: billed seconds covered by bundles
    # DESIGN §11: the current decision's currencies and FX rate (the rate in force at the call's
    # start): a re-rating converts with the same rate, whatever the rate is today.
    plan_currency: str = ""
    currency: str = ""
    fx_rate_e10: int | None = None
    fx_inverse: bool = False
    plan_cost_micros: int | None = None
    plan_name: str = ""
    # The decision's own call id (``call^L`` for a level above the customer), level, seller and payer.
    decision_call_id: str = ""
    level: int = 0
    tenant: str = ""
    payer: str = ""
    # The buy side (DESIGN §10): "" / None when the call was not routed.
    carrier: str = ""
    buy_rate_id: int | None = None
    buy_prefix: str = ""
    buy_rate_micros: int = 0
    buy_billed_seconds: int = 0
    buy_cost_micros: int | None = None

    @property
    def buy(self) -> BuySide | None:
        if not self.carrier or self.buy_cost_micros is None:
            return None
        return BuySide(self.carrier, self.buy_rate_id, self.buy_prefix, self.buy_rate_micros,
                       self.buy_billed_seconds, self.buy_cost_micros)

    @property
    def conversion(self) -> Conversion | None:
        if self.fx_rate_e10 is None:
            return None
        return Conversion(self.plan_currency, self.currency, self.fx_rate_e10, self.fx_inverse)


@dataclass(frozen=True, slots=True)
class BuySide:
    carrier: str
    rate_id: int | None
    prefix: str
    rate_micros: int
    billed_seconds: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class Change:
    call: StoredCall
    rate_id: int | None
    prefix: str
    rate_micros: int
    billed_seconds: int
    cost_micros: int
    bundle_seconds: int = 0  # covered by bundles with the corrected rate (never more than before)
    plan_cost_micros: int | None = None  # in the plan's currency (the same as cost_micros without a conversion)
    buy: BuySide | None = None  # the buy side the new decision records (the call's own unless re-rated)

    @property
    def margin_micros(self) -> int | None:
        if self.buy is None:
            return None
        sold = self.plan_cost_micros if self.plan_cost_micros is not None else self.cost_micros
        return sold - self.buy.cost_micros

    @property
    def seq(self) -> int:
        return self.call.seq + 1

    @property
    def bundle_seconds_returned(self) -> int:
        """Bundle seconds the call no longer uses, given back to its grants."""
        return self.call.bundle_seconds - self.bundle_seconds

    @property
    def adjustment_micros(self) -> int:
        """What the ledger entry moves: positive gives money back, negative takes more."""
        return self.call.cost_micros - self.cost_micros


@dataclass
class RerateReport:
    plan: str
    dry_run: bool
    side: str = "sell"  # "buy": a carrier's calls (the totals are then buy costs)
    checked: int = 0
    changed: int = 0
    applied: int = 0  # changes committed by this run (0 on a dry run)
    already_done: int = 0  # re-rated meanwhile by another run
    unratable: int = 0  # the plan has no rate (or blocks the destination) at the call's start now
    old_total_micros: int = 0  # of the changed calls
    new_total_micros: int = 0
    bundle_seconds_returned: int = 0  # given back to bundle grants by the changed calls
    sample: list[Change] = field(default_factory=list)
    unratable_sample: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    accounts: set[str] = field(default_factory=set)  # whose ledger this run moved (a shared cache to refresh)

    @property
    def difference_micros(self) -> int:
        return self.new_total_micros - self.old_total_micros


def reprice(call: StoredCall, table: RateTable) -> Change | Refusal | None:
    """Pure: the call's price with ``table``; None when it does not change."""
    found = table.lookup(call.destination, epoch_ms(call.started_at))
    if isinstance(found, Refusal):
        return found
    seconds = whole_seconds(call.duration_ms)  # as the session engine records it
    if call.bundle_seconds > 0:  # DESIGN §9: the same bundle seconds, money for the billed rest
        plan_cost = money_micros_for_seconds(found, seconds, held_s=call.bundle_seconds)
        covered = covered_seconds(found, seconds, call.bundle_seconds)
    else:
        plan_cost, covered = cost_micros(found, call.duration_ms), 0
    conversion = call.conversion  # DESIGN §11: the rate of the call's start, converted once, up
    cost = conversion.charge(plan_cost) if conversion is not None else plan_cost
    if (cost, seconds, covered) == (call.cost_micros, call.billed_seconds, call.bundle_seconds):
        return None
    return Change(call, found.rate_id, found.prefix, found.rate_micros, seconds, cost, covered, plan_cost, call.buy)


def reprice_buy(call: StoredCall, table: RateTable) -> Change | Refusal | None:
    """Pure: the call's buy side with its carrier's ``table``; None when it does not change."""
    found = table.lookup(call.destination, epoch_ms(call.started_at))
    if isinstance(found, Refusal):
        return found
    seconds = whole_seconds(call.duration_ms)
    buy = BuySide(call.carrier, found.rate_id, found.prefix, found.rate_micros,
                  billed_seconds(found, seconds) if seconds else 0, cost_micros(found, call.duration_ms))
    if (buy.cost_micros, buy.billed_seconds) == (call.buy_cost_micros, call.buy_billed_seconds):
        return None  # as for the sell side: the same money and seconds (a re-import's new row ids change nothing)
    return Change(call, call.rate_id, call.prefix, call.rate_micros, call.billed_seconds, call.cost_micros,
                  call.bundle_seconds, call.plan_cost_micros, buy)


def _pages(engine: Engine, plan: str, since: datetime, until: datetime | None,
           account_id: str | None, *, carrier: str | None = None) -> Iterator[list[StoredCall]]:
    newer = aliased(RatingDecision)
    d = RatingDecision
    current = ~select(newer.id).where(newer.call_id == d.call_id, newer.seq > d.seq).exists()
    # A carrier's calls: the decision that records it may be a reseller's (of_call_id); a plan's:
    # the customer's own decision.
    joined = or_(d.call_id == Call.id, d.of_call_id == Call.id) if carrier is not None else d.call_id == Call.id
    chosen = d.carrier == carrier if carrier is not None else d.plan_name == plan
    base: Any = (select(Call.id, Call.account_id, Call.destination, Call.started_at, Call.duration_ms, d.seq,
                        d.rate_id, d.prefix, d.rate_micros, d.billed_seconds, d.cost_micros, d.bundle_seconds,
                        d.plan_currency, d.currency, d.fx_rate_e10, d.fx_inverse, d.plan_cost_micros, d.plan_name,
                        d.call_id, d.level, d.tenant, d.account_id, d.carrier, d.buy_rate_id, d.buy_prefix,
                        d.buy_rate_micros, d.buy_billed_seconds, d.buy_cost_micros)
                 .join(d, joined)
                 .where(current, chosen, Call.started_at >= since))
    if until is not None:
        base = base.where(Call.started_at < until)
    if account_id is not None:
        base = base.where(Call.account_id == account_id)
    after: tuple[datetime, str] | None = None
    while True:
        query = base
        if after is not None:
            query = query.where(or_(Call.started_at > after[0], and_(Call.started_at == after[0], Call.id > after[1])))
        with engine.connect() as conn:
            rows = conn.execute(query.order_by(Call.started_at, Call.id).limit(PAGE_SIZE)).all()
        if not rows:
            return
        yield [StoredCall(*row) for row in rows]
        after = (rows[-1][3], rows[-1][0])


def _reason(change: Change) -> str:
    call, buy = change.call, change.buy
    if change.cost_micros == call.cost_micros and buy is not None and buy != call.buy:
        before = format_amount(call.buy_cost_micros) if call.buy_cost_micros is not None else "-"
        return f"rerate buy side ({buy.carrier}): cost {before} -> {format_amount(buy.cost_micros)}"
    return (f"rerate: cost {format_amount(call.cost_micros)} -> {format_amount(change.cost_micros)}"
            + (f", bundle seconds {call.bundle_seconds} -> {change.bundle_seconds}"
               if change.bundle_seconds_returned else ""))


def _apply(session: Session, change: Change, now: datetime, plan: str) -> None:
    call, buy = change.call, change.buy
    session.add(RatingDecision(
        call_id=call.decision_call_id or call.call_id, seq=change.seq, plan_name=call.plan_name or plan,
        rate_id=change.rate_id, prefix=change.prefix,
        rate_micros=change.rate_micros, billed_seconds=change.billed_seconds, cost_micros=change.cost_micros,
        bundle_seconds=change.bundle_seconds, decided_at=now, plan_currency=call.plan_currency,
        currency=call.currency, fx_rate_e10=call.fx_rate_e10, fx_inverse=call.fx_inverse,
        plan_cost_micros=change.plan_cost_micros, level=call.level, tenant=call.tenant, account_id=call.payer,
        of_call_id=call.call_id if call.level else None,
        carrier=buy.carrier if buy is not None else "", buy_rate_id=buy.rate_id if buy is not None else None,
        buy_prefix=buy.prefix if buy is not None else "", buy_rate_micros=buy.rate_micros if buy is not None else 0,
        buy_billed_seconds=buy.billed_seconds if buy is not None else 0,
        buy_cost_micros=buy.cost_micros if buy is not None else None, margin_micros=change.margin_micros,
        reason=_reason(change)))
    session.flush()  # the (call_id, seq) key refuses a second re-rating of the same decision
    if change.adjustment_micros:
        post_entry(session, call.account_id, kind="adjustment", amount_micros=change.adjustment_micros,
                   reference=f"rerate:{call.call_id}:{change.seq}", call_id=call.call_id,
                   description=f"re-rating of call {call.call_id} (decision {change.seq})")
    if change.bundle_seconds_returned > 0:
        _give_back(session, change)


def _give_back(session: Session, change: Change) -> None:
    """Return the bundle seconds the call no longer uses to the periods it took them from, the
    last drawn on first: one ``adjust`` row each, ``bundle_periods.used_s`` with it."""
    call = change.call
    u = BundleUsage
    rows = session.execute(
        select(u.grant_id, u.period_start_ms, func.sum(u.seconds), func.min(u.id))
        .where(u.call_id == call.call_id, u.kind.in_(("use", "adjust")))
        .group_by(u.grant_id, u.period_start_ms).order_by(func.min(u.id))).all()
    lock_account(session, call.account_id)  # the stores' lock order: the account, then its periods
    need = change.bundle_seconds_returned
    for grant_id, start, net, _ in reversed(rows):
        used = -int(net)
        back = min(need, used)
        if back <= 0:
            continue
        period = lock_period(session, int(grant_id), int(start))
        if period is None:
            raise BillingError(f"call {call.call_id}: bundle period of grant {grant_id} from {start} ms is missing "
                               "(bundle_periods): nothing re-rated")
        period.used_s -= back
        post_usage(session, call.account_id, int(grant_id), int(start), "adjust", back,
                   f"bundle-rerate:{call.call_id}:{change.seq}:{grant_id}:{start}", call.call_id)
        need -= back
        if need == 0:
            break
    if need:
        raise BillingError(f"call {call.call_id}: its bundle usage holds {change.bundle_seconds_returned - need} s, "
                           f"the re-rating gives back {change.bundle_seconds_returned} s: nothing re-rated")
    session.flush()


def _commit_page(engine: Engine, changes: list[Change], plan: str, report: RerateReport) -> None:
    """One transaction for the page; if any call collides, each call on its own."""
    if not changes:
        return
    factory = session_factory(engine)
    now = utcnow()
    try:
        with transaction(factory) as session:
            for change in changes:
                _apply(session, change, now, plan)
        report.applied += len(changes)
        report.accounts.update(c.call.account_id for c in changes
                               if c.adjustment_micros or c.bundle_seconds_returned)
        return
    except (IntegrityError, BillingError):
        log.info("a page of re-ratings collided; applying its %d calls one by one", len(changes))
    for change in changes:
        try:
            with transaction(factory) as session:
                _apply(session, change, now, plan)
            report.applied += 1
            if change.adjustment_micros or change.bundle_seconds_returned:
                report.accounts.add(change.call.account_id)
        except (IntegrityError, Conflict):
            report.already_done += 1  # another run re-rated this decision first
        except BillingError as exc:  # e.g. the account no longer exists
            report.failures.append((change.call.call_id, str(exc)))


def rerate_buy(engine: Engine, carrier: str, since: datetime, *, until: datetime | None = None,
               account_id: str | None = None, dry_run: bool = False, table: RateTable | None = None) -> RerateReport:
    """Re-rate the buy side of the carrier's calls started in [since, until) with its current buy
    deck; raises NotFound for an unknown carrier (or one without a buy deck)."""
    from agent.adapters.sql.carriers import buy_plan_name

    buy_table = table or load_table(engine, buy_plan_name(carrier))
    report = RerateReport(plan=carrier, dry_run=dry_run, side="buy")
    return _run(engine, report, _pages(engine, "", since, until, account_id, carrier=carrier),
                lambda call: reprice_buy(call, buy_table), _buy_costs, "")


def rerate(engine: Engine, plan: str, since: datetime, *, until: datetime | None = None,
           account_id: str | None = None, dry_run: bool = False, table: RateTable | None = None) -> RerateReport:
    """Re-rate the plan's calls started in [since, until); raises NotFound for an unknown plan."""
    sell_table = table or load_table(engine, plan)
    report = RerateReport(plan=plan, dry_run=dry_run)
    return _run(engine, report, _pages(engine, plan, since, until, account_id),
                lambda call: reprice(call, sell_table), _sell_costs, plan)


def _sell_costs(change: Change) -> tuple[int, int]:
    return change.call.cost_micros, change.cost_micros


def _buy_costs(change: Change) -> tuple[int, int]:
    return change.call.buy_cost_micros or 0, change.buy.cost_micros if change.buy is not None else 0


def _run(engine: Engine, report: RerateReport, pages: Iterator[list[StoredCall]],
         price: Callable[[StoredCall], Change | Refusal | None], costs: Callable[[Change], tuple[int, int]],
         plan: str) -> RerateReport:
    """Price each page's calls, add up the changes (``costs``: a change's old and new money, of
    the side re-rated) and, unless a dry run, commit each page before the next is read."""
    for page in pages:
        changes: list[Change] = []
        for call in page:
            report.checked += 1
            outcome = price(call)
            if isinstance(outcome, Refusal):
                report.unratable += 1
                if len(report.unratable_sample) < SAMPLE_SIZE:
                    report.unratable_sample.append((call.call_id, outcome.detail))
            elif outcome is not None:
                changes.append(outcome)
        report.changed += len(changes)
        for change in changes:
            old, new = costs(change)
            report.old_total_micros += old
            report.new_total_micros += new
        report.bundle_seconds_returned += sum(c.bundle_seconds_returned for c in changes)
        report.sample.extend(changes[:SAMPLE_SIZE - len(report.sample)])
        if not report.dry_run:
            _commit_page(engine, changes, plan, report)
    return report
