"""Free-minute bundles for the operator (DESIGN §9): define, grant, delete, show, check.

The daemon reads grants and counts seconds elsewhere (``bundle_book.py``, the balance stores,
``bundle_periods.py``); this module is what the ``billing-agent bundles`` commands, ``rates
quote --account`` and ``ledger check`` need:

* **Definitions** (``bundles``, ``bundle_prefixes``): a name, seconds per period, prefixes, the
  period kind and anchor, rollover. Deleting one sets ``deleted_at`` (its grants keep their
  history; no new grant or call draws on it) and is refused while a live call holds its seconds.
* **Grants** (``bundle_grants``): idempotent per reference like top-ups (the same reference and
  the same content is a no-op; other content is refused), never two grants of one bundle to one
  account over overlapping validity.
* **Figures**: each grant's period in force (read in the timezone of the account's rate plan),
  granted, used, reserved, left, and when it resets; a period no call opened yet shows its whole
  allowance plus the rollover it would get if opened now.
* **Proof** (``ledger check``): every opened period's counters equal the sums of its
  ``bundle_usage`` rows, none is below zero, its holds add up (embedded store), and every call's
  latest rating decision records the seconds its usage rows took.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from agent.adapters.sql.accounts import lock_account
from agent.adapters.sql.balance_store import datetime_to_ms
from agent.adapters.sql.bundle_periods import load_holds, periods_of
from agent.adapters.sql.models import (
    Account,
    Bundle,
    BundlePeriod,
    BundlePrefix,
    BundleUsage,
    RatePlan,
    RatingDecision,
    Reservation,
    utcnow,
)
from agent.adapters.sql.models import BundleGrant as GrantRow
from agent.adapters.sql.models import Rate as RateRowModel
from agent.adapters.sql.reconcile import Problem, Report
from agent.core.bundles import (
    BundleDef,
    BundleGrant,
    PeriodKind,
    PeriodState,
    check_bundle,
    period_bounds,
    rollover_carry,
)
from agent.core.errors import Conflict, InvalidInput, NotFound
from agent.core.rating import OPEN_END_MS

PREFIX_MAX_LEN = 32  # bundle_prefixes.prefix
REFERENCE_MAX_LEN = 128


# ----------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class BundleView:
    id: int
    name: str
    seconds: int
    period: PeriodKind
    anchor: int
    rollover: bool
    prefixes: tuple[str, ...]
    created_at: datetime
    deleted_at: datetime | None = None
    grants: int = 0  # grants of it, ever

    def definition(self) -> BundleDef:
        return BundleDef(self.name, self.seconds, self.prefixes, self.period, self.anchor, self.rollover, self.id)


def _prefixes_of(session: Session, bundle_ids: Iterable[int]) -> dict[int, tuple[str, ...]]:
    ids = sorted(set(bundle_ids))
    found: dict[int, list[str]] = {}
    if ids:
        for bundle_id, prefix in session.execute(select(BundlePrefix.bundle_id, BundlePrefix.prefix)
                                                 .where(BundlePrefix.bundle_id.in_(ids))):
            found.setdefault(bundle_id, []).append(prefix)
    return {bundle_id: tuple(sorted(prefixes)) for bundle_id, prefixes in found.items()}


def _view(row: Bundle, prefixes: tuple[str, ...], grants: int = 0) -> BundleView:
    return BundleView(row.id, row.name, int(row.seconds), PeriodKind(row.period), int(row.anchor), bool(row.rollover),
                      prefixes, row.created_at, row.deleted_at, grants)


def get_bundle(session: Session, name: str, *, lock: bool = False) -> Bundle:
    query = select(Bundle).where(Bundle.name == name)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise NotFound(f"unknown bundle {name!r}")
    return row


def view_bundle(session: Session, name: str) -> BundleView:
    row = get_bundle(session, name)
    count = session.scalar(select(func.count()).where(GrantRow.bundle_id == row.id)) or 0
    return _view(row, _prefixes_of(session, [row.id]).get(row.id, ()), int(count))


def create_bundle(session: Session, bundle: BundleDef) -> BundleView:
    """Store a new bundle; raises InvalidInput naming the field, Conflict for a name in use."""
    check_bundle(bundle)
    for prefix in bundle.prefixes:
        if len(prefix) > PREFIX_MAX_LEN:
            raise InvalidInput(f"bundle {bundle.name!r}: prefix {prefix!r} is longer than {PREFIX_MAX_LEN} digits")
    existing = session.scalar(select(Bundle).where(Bundle.name == bundle.name))
    if existing is not None:
        gone = "" if existing.deleted_at is None else \
            f" (deleted at {existing.deleted_at.isoformat(timespec='seconds')}; a deleted bundle keeps its name)"
        raise Conflict(f"bundle {bundle.name!r} already exists{gone}")
    row = Bundle(name=bundle.name, seconds=bundle.seconds, period=bundle.period.value,
                 anchor=bundle.anchor if bundle.period is not PeriodKind.ONCE else 1, rollover=bundle.rollover,
                 created_at=utcnow())
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"bundle {bundle.name!r} already exists") from None
    unique = tuple(dict.fromkeys(bundle.prefixes))
    session.add_all(BundlePrefix(bundle_id=row.id, prefix=prefix) for prefix in unique)
    session.flush()
    return _view(row, tuple(sorted(unique)))


def list_bundles(session: Session, *, include_deleted: bool = False) -> list[BundleView]:
    query = select(Bundle).order_by(Bundle.name)
    if not include_deleted:
        query = query.where(Bundle.deleted_at.is_(None))
    rows = list(session.scalars(query))
    prefixes = _prefixes_of(session, (r.id for r in rows))
    counts = {bundle_id: int(n) for bundle_id, n in session.execute(
        select(GrantRow.bundle_id, func.count()).group_by(GrantRow.bundle_id))}
    return [_view(r, prefixes.get(r.id, ()), counts.get(r.id, 0)) for r in rows]


# ----------------------------------------------------------------- prefixes against the rates


@dataclass(frozen=True)
class PrefixCoverage:
    """Where a bundle's prefixes meet the rate plans: a prefix *matches* a plan when some rate of
    the plan is a prefix of it (rates the numbers it covers) or starts with it (rates some of them)."""

    plans: tuple[str, ...]  # the plans looked at
    unmatched_prefixes: tuple[str, ...]  # match no rate of any plan
    plans_without_match: tuple[str, ...]  # plans where no prefix of the bundle matches a rate

    def warnings(self, bundle_name: str) -> list[str]:
        if not self.plans:
            return [f"bundle {bundle_name!r}: there is no rate plan yet to check its prefixes against"]
        if len(self.plans_without_match) == len(self.plans):
            return [f"bundle {bundle_name!r}: none of its prefixes matches a rate in any plan "
                    f"({', '.join(self.plans)}): no call can draw on it"]
        out = []
        if self.plans_without_match:
            out.append(f"bundle {bundle_name!r}: its prefixes match nothing in plan(s) "
                       f"{', '.join(self.plans_without_match)}")
        if self.unmatched_prefixes:
            shown = ", ".join(self.unmatched_prefixes[:10]) + (" ..." if len(self.unmatched_prefixes) > 10 else "")
            out.append(f"bundle {bundle_name!r}: {len(self.unmatched_prefixes)} prefix(es) match no rate in any "
                       f"plan: {shown}")
        return out


def _matches(prefix: str, sorted_rates: Sequence[str], rate_set: set[str]) -> bool:
    if any(prefix[:n] in rate_set for n in range(1, len(prefix) + 1)):
        return True
    at = bisect.bisect_left(sorted_rates, prefix)
    return at < len(sorted_rates) and sorted_rates[at].startswith(prefix)


def prefix_coverage(session: Session, prefixes: Sequence[str], *, plans: Sequence[str] | None = None
                    ) -> PrefixCoverage:
    """Which plans (all, or ``plans``) have a rate (not blocked) matching the prefixes."""
    query = (select(RatePlan.name, RateRowModel.prefix).join(RateRowModel, RateRowModel.plan_id == RatePlan.id)
             .where(RateRowModel.blocked.is_(False)).distinct())
    names_query = select(RatePlan.name).order_by(RatePlan.name)
    if plans is not None:
        query = query.where(RatePlan.name.in_(list(plans)))
        names_query = names_query.where(RatePlan.name.in_(list(plans)))
    names = tuple(session.scalars(names_query))
    by_plan: dict[str, list[str]] = {name: [] for name in names}
    for plan, rate_prefix in session.execute(query):
        by_plan[plan].append(rate_prefix)
    matched_any: set[str] = set()
    without: list[str] = []
    for plan in names:
        rates = sorted(by_plan[plan])
        rate_set = set(rates)
        hits = {p for p in prefixes if _matches(p, rates, rate_set)}
        matched_any |= hits
        if not hits:
            without.append(plan)
    return PrefixCoverage(names, tuple(p for p in prefixes if p not in matched_any), tuple(without))


# ------------------------------------------------------------------------------- deleting


@dataclass(frozen=True)
class LiveHold:
    call_id: str
    account_id: str
    grant_id: int
    held_s: int


def grants_by_account(session: Session, bundle_id: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for grant_id, account_id in session.execute(select(GrantRow.id, GrantRow.account_id)
                                                .where(GrantRow.bundle_id == bundle_id).order_by(GrantRow.id)):
        out.setdefault(account_id, []).append(int(grant_id))
    return out


def live_holds(session: Session, grant_ids: Iterable[int], account_ids: Iterable[str]) -> list[LiveHold]:
    """Open reservations of the embedded store drawing on one of ``grant_ids``
    (``reservations.bundle_slots``: ``[grant_id, period_start_ms, seconds, expires_ms, carry_from_ms, held_s]``)."""
    wanted = set(grant_ids)
    accounts = sorted(set(account_ids))
    if not wanted or not accounts:
        return []
    found = []
    for call_id, account_id, slots in session.execute(
            select(Reservation.call_id, Reservation.account_id, Reservation.bundle_slots)
            .where(Reservation.state == "open", Reservation.bundle_held_s > 0, Reservation.account_id.in_(accounts))
            .order_by(Reservation.call_id)):
        for slot, held in load_holds(slots):
            if slot.grant_id in wanted:
                found.append(LiveHold(call_id, account_id, slot.grant_id, held))
    return found


def delete_bundle(session: Session, name: str, *, now: datetime | None = None,
                  other_holds: Sequence[str] = ()) -> BundleView:
    """Retire a bundle (``deleted_at``). Refused while an open reservation holds its seconds
    (``other_holds``: what the shared store reported, one line each, checked by the caller)."""
    row = get_bundle(session, name, lock=True)
    if row.deleted_at is not None:
        raise Conflict(f"bundle {name!r} was already deleted at {row.deleted_at.isoformat(timespec='seconds')}")
    by_account = grants_by_account(session, row.id)
    holds = live_holds(session, (g for gs in by_account.values() for g in gs), by_account)
    lines = [f"call {h.call_id} of account {h.account_id} holds seconds of grant {h.grant_id}" for h in holds]
    lines += list(other_holds)
    if lines:
        shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
        raise Conflict(f"bundle {name!r} has live reservations: {shown}. Delete it once these calls end")
    row.deleted_at = now or utcnow()
    session.flush()
    return view_bundle(session, name)


# --------------------------------------------------------------------------------- granting


@dataclass(frozen=True)
class GrantView:
    id: int
    account_id: str
    bundle: str
    valid_from: datetime
    valid_until: datetime | None
    reference: str
    created_at: datetime


@dataclass(frozen=True)
class GrantOutcome:
    grant: GrantView
    created: bool
    warnings: tuple[str, ...] = ()


def _grant_view(row: GrantRow, bundle_name: str) -> GrantView:
    return GrantView(int(row.id), row.account_id, bundle_name, row.valid_from, row.valid_until, row.reference,
                     row.created_at)


def _span(start: datetime, end: datetime | None) -> str:
    until = "open-ended" if end is None else end.isoformat(timespec="seconds")
    return f"[{start.isoformat(timespec='seconds')}, {until})"


def grant_bundle(session: Session, account_id: str, bundle_name: str, *, valid_from: datetime | None = None,
                 valid_until: datetime | None = None, reference: str | None = None,
                 now: datetime | None = None) -> GrantOutcome:
    """Grant a bundle to an account over ``[valid_from (default now), valid_until)``.

    Idempotent per ``reference``: a reference already used for the same account, bundle and
    the same dates that were given returns the stored grant (``created=False``); any other
    content is a Conflict. A grant of the same bundle to the same account over an overlapping
    validity is a Conflict naming the other grant."""
    if reference is not None and (not reference.strip() or len(reference) > REFERENCE_MAX_LEN):
        raise InvalidInput(f"reference {reference!r} must be 1-{REFERENCE_MAX_LEN} characters")
    lock_account(session, account_id)  # unknown account: NotFound; serialises this account's grants
    bundle = get_bundle(session, bundle_name)
    if reference is not None:
        existing = session.scalar(select(GrantRow).where(GrantRow.reference == reference))
        if existing is not None:
            same = (existing.account_id == account_id and existing.bundle_id == bundle.id
                    and (valid_from is None or existing.valid_from == valid_from)
                    and (valid_until is None or existing.valid_until == valid_until))
            if not same:
                other = session.get(Bundle, existing.bundle_id)
                raise Conflict(f"reference {reference!r} was already used for grant {existing.id} of bundle "
                               f"{other.name if other else existing.bundle_id!r} to account {existing.account_id!r} "
                               f"valid {_span(existing.valid_from, existing.valid_until)}")
            return GrantOutcome(_grant_view(existing, bundle.name), created=False)
    if bundle.deleted_at is not None:
        raise Conflict(f"bundle {bundle_name!r} was deleted at {bundle.deleted_at.isoformat(timespec='seconds')}: "
                       "it cannot be granted")
    start = valid_from if valid_from is not None else (now or utcnow()).replace(microsecond=0)
    if valid_until is not None and valid_until <= start:
        raise InvalidInput(f"--until {valid_until.isoformat()} is not after --from {start.isoformat()}: "
                           "the grant would never be valid")
    clash = session.scalar(
        select(GrantRow).where(GrantRow.account_id == account_id, GrantRow.bundle_id == bundle.id,
                               GrantRow.valid_from < valid_until if valid_until is not None else true(),
                               or_(GrantRow.valid_until.is_(None), GrantRow.valid_until > start))
        .order_by(GrantRow.id).limit(1))
    if clash is not None:
        raise Conflict(f"bundle {bundle_name!r} is already granted to account {account_id!r} by grant {clash.id} "
                       f"(reference {clash.reference!r}) valid {_span(clash.valid_from, clash.valid_until)}, which "
                       f"overlaps {_span(start, valid_until)}")
    row = GrantRow(account_id=account_id, bundle_id=bundle.id, valid_from=start, valid_until=valid_until,
                   reference=reference if reference is not None else uuid.uuid4().hex, created_at=utcnow())
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"reference {reference!r} was just used by another grant; run the command again "
                       "to see which") from None
    plan = session.scalar(select(RatePlan.name).join(Account, Account.rate_plan_id == RatePlan.id)
                          .where(Account.id == account_id))
    prefixes = _prefixes_of(session, [bundle.id]).get(bundle.id, ())
    coverage = prefix_coverage(session, prefixes, plans=[plan] if plan else [])
    warnings: tuple[str, ...] = ()
    if plan and coverage.plans_without_match:
        warnings = (f"bundle {bundle_name!r}: none of its prefixes matches a rate of plan {plan!r}, the plan of "
                    f"account {account_id!r}: no call of it can draw on this grant",)
    return GrantOutcome(_grant_view(row, bundle.name), created=True, warnings=warnings)


# --------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class AccountGrant:
    grant: BundleGrant
    deleted_at: datetime | None = None


def account_timezone(session: Session, account_id: str) -> tuple[str, str]:
    """The account's rate plan and its timezone (the periods are read in it)."""
    row = session.execute(select(RatePlan.name, RatePlan.timezone).join(Account, Account.rate_plan_id == RatePlan.id)
                          .where(Account.id == account_id)).first()
    if row is None:
        raise NotFound(f"unknown account {account_id!r}")
    return row[0], row[1]


def account_grants(session: Session, account_id: str, *, at: datetime | None = None, include_ended: bool = False,
                   include_deleted: bool = False) -> list[AccountGrant]:
    """The account's grants, oldest first: by default those not ended at ``at`` (default now), of
    bundles not deleted (the ones calls may draw on now or later)."""
    moment = at or utcnow()
    query = (select(GrantRow, Bundle).join(Bundle, Bundle.id == GrantRow.bundle_id)
             .where(GrantRow.account_id == account_id).order_by(GrantRow.id))
    if not include_ended:
        query = query.where(or_(GrantRow.valid_until.is_(None), GrantRow.valid_until > moment))
    if not include_deleted:
        query = query.where(Bundle.deleted_at.is_(None))
    rows = session.execute(query).all()
    prefixes = _prefixes_of(session, (b.id for _, b in rows))
    out = []
    for grant, bundle in rows:
        definition = _view(bundle, prefixes.get(bundle.id, ())).definition()
        out.append(AccountGrant(BundleGrant(int(grant.id), account_id, definition, datetime_to_ms(grant.valid_from),
                                            OPEN_END_MS if grant.valid_until is None
                                            else datetime_to_ms(grant.valid_until), grant.reference),
                                bundle.deleted_at))
    return out


@dataclass(frozen=True)
class GrantFigures:
    """One grant's period in force at ``at_ms`` (or its first period, for a grant not started)."""

    grant: BundleGrant
    status: str  # active | not started | ended | bundle deleted
    period_start_ms: int
    period_end_ms: int  # the period's end, or the grant's when sooner
    resets_at_ms: int | None  # the next period's start (None: the grant ends with this period)
    granted_s: int
    used_s: int
    reserved_s: int
    rollover_s: int  # of granted_s, carried from the period before
    opened: bool  # a call drew on the period (else the figures are what it would open with now)

    @property
    def left_s(self) -> int:
        """What a new call can still draw: granted - used - reserved."""
        return self.granted_s - self.used_s - self.reserved_s


def grant_figures(grant: BundleGrant, timezone: str, at_ms: int, periods: Mapping[tuple[int, int], PeriodState],
                  *, deleted: bool = False) -> GrantFigures:
    bundle = grant.bundle
    when = min(max(at_ms, grant.valid_from_ms), grant.valid_until_ms - 1)
    start, end = period_bounds(bundle, timezone, when, valid_from_ms=grant.valid_from_ms,
                               valid_until_ms=grant.valid_until_ms)
    expires = min(end, grant.valid_until_ms)
    resets = end if bundle.period is not PeriodKind.ONCE and end < grant.valid_until_ms else None
    status = ("bundle deleted" if deleted else "not started" if at_ms < grant.valid_from_ms
              else "ended" if at_ms >= grant.valid_until_ms else "active")
    state = periods.get((grant.grant_id, start))
    if state is not None:
        return GrantFigures(grant, status, start, expires, resets, state.granted_s, state.used_s, state.reserved_s,
                            max(state.granted_s - bundle.seconds, 0), True)
    carry = 0
    if bundle.rollover and start > grant.valid_from_ms:  # as open_period will count it (bundle_periods.py)
        previous_start, _ = period_bounds(bundle, timezone, start - 1)
        previous = periods.get((grant.grant_id, previous_start))
        left = bundle.seconds if previous is None else previous.left_s
        carry = rollover_carry(allowance_s=bundle.seconds, previous_left_s=left)
    return GrantFigures(grant, status, start, expires, resets, bundle.seconds + carry, 0, 0, carry, False)


def sql_periods(session: Session, account_id: str) -> dict[tuple[int, int], PeriodState]:
    return periods_of(session, account_id)


# ------------------------------------------------------------------------------ ledger check


@dataclass
class BundleCheck:
    periods: int = 0
    usage_rows: int = 0
    calls: int = 0  # calls whose latest decision or usage rows name bundle seconds


def _listed(session: Session, report: Report, query: Any, make: Callable[[Any], Problem], limit: int) -> None:
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    report.problem_count += count
    for row in session.execute(query.limit(limit)):
        report.problems.append(make(row))


def check_bundles(session: Session, report: Report, *, limit: int = 100, embedded: bool = True) -> BundleCheck:
    """Add to ``report`` every bundle figure that does not add up (see the module docstring).

    ``embedded``: the embedded SQL store keeps the live holds in ``bundle_periods.reserved_s``
    and ``reservations.bundle_slots``, so they must agree; with Redis the holds live there."""
    counts = BundleCheck()
    counts.periods = session.scalar(select(func.count()).select_from(BundlePeriod)) or 0
    counts.usage_rows = session.scalar(select(func.count()).select_from(BundleUsage)) or 0
    u = BundleUsage
    sums = (select(u.grant_id, u.period_start_ms,
                   func.sum(_seconds_of(("grant", "rollover"))).label("granted"),
                   func.sum(_seconds_of(("use", "adjust"))).label("net_use"))
            .group_by(u.grant_id, u.period_start_ms).subquery())
    p = BundlePeriod
    granted = func.coalesce(sums.c.granted, 0)
    used = -func.coalesce(sums.c.net_use, 0)
    _listed(session, report, (
        select(p.account_id, p.grant_id, p.period_start_ms, p.granted_s, granted, p.used_s, used)
        .outerjoin(sums, and_(sums.c.grant_id == p.grant_id, sums.c.period_start_ms == p.period_start_ms))
        .where(or_(p.granted_s != granted, p.used_s != used)).order_by(p.account_id, p.grant_id, p.period_start_ms)
    ), lambda r: Problem("bundle period differs from its usage rows", r[0], detail={
        "grant": int(r[1]), "period_start_ms": int(r[2]), "granted_s": int(r[3]), "usage_granted_s": int(r[4]),
        "used_s": int(r[5]), "usage_used_s": int(r[6])}), limit)
    _listed(session, report, (
        select(p.account_id, p.grant_id, p.period_start_ms, p.granted_s, p.used_s)
        .where(p.granted_s - p.used_s < 0).order_by(p.account_id, p.grant_id, p.period_start_ms)
    ), lambda r: Problem("bundle period below zero", r[0], detail={
        "grant": int(r[1]), "period_start_ms": int(r[2]), "granted_s": int(r[3]), "used_s": int(r[4]),
        "left_s": int(r[3]) - int(r[4])}), limit)
    _listed(session, report, (
        select(u.account_id, u.grant_id, u.period_start_ms, func.count())
        .outerjoin(p, and_(p.grant_id == u.grant_id, p.period_start_ms == u.period_start_ms))
        .where(p.grant_id.is_(None)).group_by(u.account_id, u.grant_id, u.period_start_ms)
        .order_by(u.account_id, u.grant_id, u.period_start_ms)
    ), lambda r: Problem("bundle usage for a period never opened", r[0], detail={
        "grant": int(r[1]), "period_start_ms": int(r[2]), "rows": int(r[3])}), limit)
    if embedded:
        _check_holds(session, report, limit)
    counts.calls = _check_calls(session, report, limit)
    return counts


def _seconds_of(kinds: tuple[str, ...]) -> Any:
    return case((BundleUsage.kind.in_(kinds), BundleUsage.seconds), else_=0)


def _check_holds(session: Session, report: Report, limit: int) -> None:
    """``bundle_periods.reserved_s`` = the holds of the open reservations on it (embedded store)."""
    holds: dict[tuple[int, int], int] = {}
    for (slots,) in session.execute(select(Reservation.bundle_slots)
                                    .where(Reservation.state == "open", Reservation.bundle_slots != "")):
        for slot, held in load_holds(slots):
            holds[slot.key] = holds.get(slot.key, 0) + held
    rows = session.execute(select(BundlePeriod.account_id, BundlePeriod.grant_id, BundlePeriod.period_start_ms,
                                  BundlePeriod.reserved_s)
                           .order_by(BundlePeriod.account_id, BundlePeriod.grant_id, BundlePeriod.period_start_ms))
    known: set[tuple[int, int]] = set()
    listed = 0
    for account_id, grant_id, start, reserved in rows:
        key = (int(grant_id), int(start))
        known.add(key)
        if int(reserved) != holds.get(key, 0):
            report.problem_count += 1
            if listed < limit:
                listed += 1
                report.problems.append(Problem("bundle reserved differs from open reservations", account_id, detail={
                    "grant": key[0], "period_start_ms": key[1], "reserved_s": int(reserved),
                    "open_reservations_s": holds.get(key, 0)}))
    for key in sorted(set(holds) - known):
        if holds[key]:
            report.problem_count += 1
            report.problems.append(Problem("open reservations hold seconds of a period never opened", None,
                                           detail={"grant": key[0], "period_start_ms": key[1],
                                                   "open_reservations_s": holds[key]}))


def _check_calls(session: Session, report: Report, limit: int) -> int:
    """The latest rating decision of a call records the bundle seconds its usage rows took
    (``-sum(use + adjust)``); a call whose record is not written yet is not looked at."""
    u = BundleUsage
    usage = (select(u.call_id, func.min(u.account_id).label("account_id"),
                    (-func.sum(u.seconds)).label("used"))
             .where(u.call_id.is_not(None), u.kind.in_(("use", "adjust"))).group_by(u.call_id).subquery())
    newer = aliased(RatingDecision)
    d = RatingDecision
    latest = ~select(newer.id).where(newer.call_id == d.call_id, newer.seq > d.seq).exists()
    count = session.scalar(select(func.count()).select_from(usage)) or 0
    _listed(session, report, (
        select(usage.c.call_id, usage.c.account_id, d.bundle_seconds, usage.c.used, d.seq)
        .join(d, d.call_id == usage.c.call_id).where(latest, d.bundle_seconds != usage.c.used)
        .order_by(usage.c.call_id)
    ), lambda r: Problem("call's bundle seconds differ from its bundle usage", r[1], r[0], {
        "decision": int(r[4]), "bundle_seconds": int(r[2]), "usage_s": int(r[3])}), limit)
    _listed(session, report, (
        select(d.call_id, d.bundle_seconds, d.seq)
        .outerjoin(usage, usage.c.call_id == d.call_id)
        .where(latest, d.bundle_seconds > 0, usage.c.call_id.is_(None)).order_by(d.call_id)
    ), lambda r: Problem("call's bundle seconds have no bundle usage", None, r[0], {
        "decision": int(r[2]), "bundle_seconds": int(r[1])}), limit)
    return int(count)
