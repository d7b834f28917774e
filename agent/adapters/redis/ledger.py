"""Between the Redis cache and the SQL ledger (the truth): posting closed calls, loading accounts.

Ordering that keeps them equal:

* A closed call is first committed in Redis (balance adjusted, call marked ``posted=0`` in the
  account's unposted set), then its ledger entries are written in SQL (idempotent per
  reference), then Redis is told (``mark_posted``, guarded by the call's version). A crash in
  between leaves the call in the unposted set and in the sweeper's index: it is posted later.
* An account is (re)loaded under its SQL row lock, so no ledger entry of that account commits
  meanwhile; the script adds back what live and unposted calls took in Redis and the ledger
  does not hold yet (see rebuild.lua).

Bundle periods (DESIGN §9) follow the same path. A period is opened in Redis (its allowance and
rollover fixed there, atomically with the call that first draws on it) and listed as an opening
SQL does not have yet; the opening reaches ``bundle_periods``/``bundle_usage`` (rows ``grant`` and
``rollover``, the references the SQL store uses) with the posting of any call of the account
that drew on bundles, or by the sweeper (the index entry ``periods_member``). A closed call's
``use`` rows (``bundle:{call}:{grant}:{start}``, ``bundle-late:...``) are written in the same
transaction as its money entries, after the openings they need, idempotently per reference; the
account's row lock is taken first, as the rebuild does.

Spend caps (DESIGN §8): Redis keeps each day's and month's counters (spent, held) on the account's
slot; SQL's ``spend_periods.spent_micros`` is their truth for what is spent. A call that counts on
a day and month (its call hash has ``sd``/``sm``: the account had a cap at its authorize) adds
each ledger entry the posting creates (the settle's charge, the close's debits, a late settle's
adjustment) to the spent of both rows, in the same transaction as the entries and under the
account's row lock, so a row's spent is exactly the charges of its calls in the ledger, once
each. ``held_micros`` stays 0 in SQL with this store: what open calls hold lives in Redis only
(after losing Redis no call is open there). The rebuild sets a counter to SQL's spent plus what
tracked calls charged in Redis and the ledger does not have yet, and held to what open calls hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.redis.connect import RedisClient
from agent.adapters.redis.keys import KeySpace
from agent.adapters.redis.scripts import Scripts
from agent.adapters.sql.accounts import lock_account, post_entries
from agent.adapters.sql.bundle_periods import post_usage, post_use, use_reference
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import BundlePeriod, BundleUsage, LedgerEntry, RatePlan, SpendPeriod
from agent.core.balance import (
    MAX_STORE_MICROS,
    LedgerPosting,
    charge_reference,
    is_settle_entry,
    late_charge_reference,
    ledger_postings,
)
from agent.core.bundles import BundleSlot
from agent.core.errors import BillingError, Conflict, InvalidInput, NotFound
from agent.core.money import format_amount

log = logging.getLogger(__name__)

SQL_IN_CHUNK = 500
SPEND_ROWS_LOADED = {"day": 3, "month": 2}  # the newest spend_periods rows of each kind a rebuild loads


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call hash as a script returned it."""

    fields: dict[str, str]

    def number(self, name: str) -> int:
        value = self.fields.get(name)
        return int(value) if value not in (None, "") else 0

    def optional_int(self, name: str) -> int | None:
        value = self.fields.get(name)
        return int(value) if value not in (None, "") else None

    @property
    def state(self) -> str:
        return self.fields.get("state", "")

    @property
    def posted(self) -> bool:
        return self.fields.get("posted", "1") == "1"

    @property
    def spend_periods(self) -> tuple[int, int] | None:
        """The day and month (start ms) the call counts on for the spend caps; None: it does not."""
        if not self.fields.get("sd"):
            return None
        return self.number("sd"), self.number("sm")

    def bundle_uses(self) -> list[BundleUse]:
        """What the call used of each bundle period (``bu<i>``) and, settled after its holds
        closed, beyond that (``bl<i>``), in draw order."""
        uses: list[BundleUse] = []
        for i in range(1, self.number("b_n") + 1):
            grant_id, start = parse_period_id(":".join(self.fields.get(f"bs{i}", "").split(",")[:2]))
            for field, late in ((f"bu{i}", False), (f"bl{i}", True)):
                if (seconds := self.number(field)) > 0:
                    uses.append(BundleUse(grant_id, start, seconds, late))
        return uses


@dataclass(frozen=True, slots=True)
class BundleUse:
    grant_id: int
    period_start_ms: int
    seconds: int
    late: bool  # used by a settle after the call's holds closed (reference bundle-late:...)

    @property
    def period_id(self) -> str:
        return f"{self.grant_id}:{self.period_start_ms}"


@dataclass(frozen=True, slots=True)
class PeriodOpening:
    """A bundle period as Redis opened it: what SQL must record (grant and rollover rows)."""

    grant_id: int
    period_start_ms: int
    allowance_s: int
    carry_s: int
    end_ms: int

    @property
    def period_id(self) -> str:
        return f"{self.grant_id}:{self.period_start_ms}"


def parse_period_id(value: str) -> tuple[int, int]:
    grant_id, _, start = value.partition(":")
    try:
        return int(grant_id), int(start)
    except ValueError:
        raise InvalidInput(f"bad bundle period id {value!r} in Redis") from None


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_from(reply: list[object], start: int) -> CallRecord:
    items = [text(v) for v in reply[start:]]
    return CallRecord(dict(zip(items[0::2], items[1::2], strict=True)))


def post_call(client: RedisClient, scripts: Scripts, keys: KeySpace, sessions: sessionmaker[Session],
              account_id: str, call_id: str, record: CallRecord, retention_ms: int) -> bool:
    """Write a closed call's ledger entries (and bundle use rows, after the openings they need),
    then mark it posted. False: SQL (or Redis, for the openings) refused, retry later.

    When the ledger already holds this call's charge with another amount, Redis lost a step the
    ledger has (``lost_step_postings``): the ledger stands, and the account is rebuilt from it."""
    postings = ledger_postings(call_id, closed_charge_micros=record.optional_int("closed_charge"),
                               cost_micros=record.optional_int("cost"))
    uses = record.bundle_uses()
    openings: list[PeriodOpening] = []
    ak = keys.of(account_id)
    if record.number("b_n") > 0:
        try:
            openings = read_openings(client, scripts, keys, account_id, [u.period_id for u in uses])
        except redis.RedisError as exc:
            log.error("bundle periods of call=%s account=%s unreadable, kept for the sweeper: %s", call_id,
                      account_id, exc)
            return False
    spend = record.spend_periods

    def write(reconcile: bool) -> list[LedgerPosting] | None:
        with transaction(sessions) as session:
            entries, call_uses, lost = postings, uses, None
            if reconcile:  # under the account's lock: the ledger cannot move meanwhile
                lock_account(session, account_id)
                lost = lost_step_postings(session, call_id, postings, record.optional_int("cost"))
                if lost is not None:
                    entries, call_uses = lost, []  # the bundle rows written with the ledger's charge stand too
            _write_closed(session, account_id, call_id, openings, call_uses, entries, spend)
        return lost

    try:
        try:
            # Redis may have lost a step the ledger has: only a call with no charge of its own to
            # write, or one whose references hold other amounts (Conflict), can show it.
            lost = write(reconcile=not postings)
        except Conflict:
            lost = write(reconcile=True)
    except (SQLAlchemyError, BillingError) as exc:
        log.error("ledger write of call=%s account=%s failed, kept for the sweeper: %s", call_id, account_id, exc)
        return False
    try:
        scripts.run(client, "mark_posted", [ak.call(call_id), ak.unposted, ak.periods_unposted],
                    [call_id, record.fields.get("ver", "1"), retention_ms, *[o.period_id for o in openings]])
    except redis.RedisError as exc:  # the ledger has it; a later sweep marks it (posting is idempotent)
        log.warning("call=%s is in the ledger but Redis was not told: %s", call_id, exc)
        return True
    if lost is not None:
        log.warning("call=%s account=%s: Redis closed the call from a state the ledger had already moved past "
                    "(a step lost with a Redis master or restart); the ledger stands (%s), the account is rebuilt "
                    "from it", call_id, account_id,
                    ", ".join(f"{p.reference} {p.amount_micros}" for p in lost) or "nothing more to write")
        try:
            rebuild_account(client, scripts, keys, sessions, account_id, "if_present", retention_ms)
        except (redis.RedisError, SQLAlchemyError, BillingError) as exc:
            log.error("account=%s not rebuilt after a lost step (run `billing-agent accounts rebuild-cache %s`): %s",
                      account_id, account_id, exc)
    return True


def _write_closed(session: Session, account_id: str, call_id: str, openings: Sequence[PeriodOpening],
                  uses: Sequence[BundleUse], postings: Sequence[LedgerPosting], spend: tuple[int, int] | None) -> None:
    """A closed call's rows in one transaction: period openings and use rows (after the account's
    row lock), ledger entries (idempotent per reference), and the spend of what was new."""
    if openings or uses:
        lock_account(session, account_id)
        write_openings(session, account_id, openings)
        write_uses(session, account_id, call_id, uses)
    created = post_entries(session, account_id, postings, call_id=call_id)
    spent = -sum(p.amount_micros for p, new in zip(postings, created, strict=True) if new)
    if spend is not None and spent:
        add_spent(session, account_id, spend, spent)


def lost_step_postings(session: Session, call_id: str, postings: Sequence[LedgerPosting],
                       cost_micros: int | None) -> list[LedgerPosting] | None:
    """None when the ledger agrees with the entries Redis asks for (or has none of them yet).

    Otherwise Redis closed the call from a state that had lost a step which already reached the
    ledger: a Redis master died (replication is asynchronous) or restarted from an older dump
    after a settle or an expiry was posted. The call's ``charge`` in the ledger then stands, and:

    * the ledger's charge came from an expiry, and Redis now settles the call (its record has a
      cost): it is a late settle, so the ``charge-late`` adjustment is what is left to write;
    * otherwise (the ledger has the settle, or the late adjustment already): nothing to write.

    Without this, ``post_entries`` refuses the differing amount, and the call stayed in the
    sweeper's index with a Conflict logged at every sweep, its Redis balance off by the difference.
    """
    charge_ref = charge_reference(call_id)
    existing = {str(ref): int(amount) for ref, amount in session.execute(
        select(LedgerEntry.reference, LedgerEntry.amount_micros).where(LedgerEntry.call_id == call_id))}
    if charge_ref not in existing:
        return None
    wanted = {p.reference: p.amount_micros for p in postings}
    if all(existing.get(ref, amount) == amount for ref, amount in wanted.items()) and charge_ref in wanted:
        return None
    charged = -existing[charge_ref]
    if (wanted.get(charge_ref) != existing[charge_ref] and cost_micros is not None and charged > 0
            and late_charge_reference(call_id) not in existing):
        return ledger_postings(call_id, closed_charge_micros=charged, cost_micros=cost_micros)
    return []


def add_spent(session: Session, account_id: str, spend: tuple[int, int], amount_micros: int) -> None:
    """Add a call's newly posted charges to the spent of its day and month: one UPDATE of both
    rows, and the rows missing created. The caller holds the account's row lock (post_entries took
    it), so no two writers change or create the same rows at once."""
    wanted = {("day", spend[0]), ("month", spend[1])}
    which = or_(*[and_(SpendPeriod.kind == kind, SpendPeriod.start_ms == start) for kind, start in wanted])
    changed = session.execute(
        update(SpendPeriod).where(SpendPeriod.account_id == account_id, which)
        .values(spent_micros=SpendPeriod.spent_micros + amount_micros)
        .execution_options(synchronize_session=False))
    if getattr(changed, "rowcount", 0) == len(wanted):
        return
    found = {(str(k), int(st)) for k, st in session.execute(
        select(SpendPeriod.kind, SpendPeriod.start_ms).where(SpendPeriod.account_id == account_id, which))}
    for kind, start in sorted(wanted - found):
        session.add(SpendPeriod(account_id=account_id, kind=kind, start_ms=start, spent_micros=amount_micros,
                                held_micros=0))
    session.flush()


def read_openings(client: RedisClient, scripts: Scripts, keys: KeySpace, account_id: str,
                  period_ids: Iterable[str] = ()) -> list[PeriodOpening]:
    """The account's period openings SQL may not have: those not written yet, and ``period_ids``."""
    ak = keys.of(account_id)
    reply = [text(v) for v in scripts.run(client, "openings", [ak.periods_unposted],
                                          [ak.period_prefix, *sorted(set(period_ids))])]
    openings = []
    for at in range(0, len(reply), 4):
        grant_id, start = parse_period_id(reply[at])
        openings.append(PeriodOpening(grant_id, start, int(reply[at + 1]), int(reply[at + 2]), int(reply[at + 3])))
    return openings


def write_openings(session: Session, account_id: str, openings: Iterable[PeriodOpening]) -> None:
    """Record periods Redis opened, once: the ``bundle_periods`` row and its ``grant`` (and
    ``rollover``) rows, with the SQL store's references. The caller holds the account's lock."""
    for o in openings:
        if session.get(BundlePeriod, (o.grant_id, o.period_start_ms)) is not None:
            continue
        session.add(BundlePeriod(grant_id=o.grant_id, period_start_ms=o.period_start_ms, account_id=account_id,
                                 period_end_ms=o.end_ms, granted_s=o.allowance_s + o.carry_s, used_s=0,
                                 reserved_s=0))
        post_usage(session, account_id, o.grant_id, o.period_start_ms, "grant", o.allowance_s,
                   f"bundle-grant:{o.period_id}", None)
        if o.carry_s:
            post_usage(session, account_id, o.grant_id, o.period_start_ms, "rollover", o.carry_s,
                       f"bundle-rollover:{o.period_id}", None)
    session.flush()


def write_uses(session: Session, account_id: str, call_id: str, uses: Iterable[BundleUse]) -> None:
    """A closed call's ``use`` rows (and the periods' ``used_s``), once per reference."""
    for u in uses:
        slot = BundleSlot(u.grant_id, u.period_start_ms, 0, 0)
        reference = use_reference(call_id, slot, late=u.late)
        existing = session.scalar(select(BundleUsage.seconds).where(BundleUsage.reference == reference))
        if existing is not None:
            if int(existing) != -u.seconds:
                raise Conflict(f"bundle usage {reference!r} was already written with {-int(existing)} s, "
                               f"not {u.seconds} s")
            continue
        period = session.get(BundlePeriod, (u.grant_id, u.period_start_ms), with_for_update=True)
        if period is None:
            raise NotFound(f"bundle period {u.period_id} of call {call_id!r} is not opened in SQL "
                           "(its opening is not readable from Redis)")
        post_use(session, account_id, call_id, period, slot, u.seconds, late=u.late)
    session.flush()


def post_openings(client: RedisClient, scripts: Scripts, keys: KeySpace, sessions: sessionmaker[Session],
                  account_id: str) -> bool:
    """Write the account's period openings SQL does not have yet (the sweeper). False: retry."""
    openings = read_openings(client, scripts, keys, account_id)
    if not openings:
        return True
    try:
        with transaction(sessions) as session:
            lock_account(session, account_id)
            write_openings(session, account_id, openings)
    except NotFound:
        log.error("bundle periods of account=%s opened in Redis, but the account is gone from SQL: dropped",
                  account_id)
    except (SQLAlchemyError, BillingError) as exc:
        log.error("bundle period openings of account=%s not written, kept for the sweeper: %s", account_id, exc)
        return False
    client.srem(keys.of(account_id).periods_unposted, *[o.period_id for o in openings])
    return True


@dataclass(frozen=True, slots=True)
class LedgerOfCall:
    """What the ledger holds of one call the cache tracks."""

    sum_micros: int
    settled: bool  # the ledger has its settle (a settle's charge, or a late settle's adjustment)


def _ledger_of_calls(session: Session, account_id: str, call_ids: Iterable[str]) -> dict[str, LedgerOfCall]:
    ids = sorted(call_ids)
    sums: dict[str, int] = {}
    settled: set[str] = set()
    for start in range(0, len(ids), SQL_IN_CHUNK):
        chunk = ids[start:start + SQL_IN_CHUNK]
        rows = session.execute(
            select(LedgerEntry.call_id, LedgerEntry.reference, LedgerEntry.amount_micros, LedgerEntry.description)
            .where(LedgerEntry.account_id == account_id, LedgerEntry.call_id.in_(chunk)))
        for call_id, reference, amount, description in rows:
            cid = str(call_id)
            sums[cid] = sums.get(cid, 0) + int(amount)
            if is_settle_entry(cid, str(reference), str(description)):
                settled.add(cid)
    return {cid: LedgerOfCall(total, cid in settled) for cid, total in sums.items()}


def check_redis_range(account_id: str, balance_micros: int, credit_limit_micros: int) -> None:
    """Redis scripts compute in Lua numbers, doubles: integers are exact only up to 2**53
    micro-units (9,007,199,254.740991 units; a balance in VND or IDR can pass it). An account
    beyond that is refused by name rather than loaded rounded (SQL …980001 read back …980000)."""
    for what, value in (("balance", balance_micros), ("credit limit", credit_limit_micros)):
        if abs(value) > MAX_STORE_MICROS:
            raise InvalidInput(
                f"account {account_id!r}: {what} {format_amount(value)} exceeds what the Redis balance store holds "
                f"exactly ({format_amount(MAX_STORE_MICROS)}; Lua numbers are doubles): use the SQL balance "
                "store for this account's currency, or keep amounts below that")


def _bundle_args(session: Session, account_id: str, tracked: Iterable[str]) -> list[object]:
    """rebuild.lua's bundle part: the account's periods from the ``bundle_usage`` rows (granted =
    grant + rollover rows, used = -(use + adjust rows)), then each tracked call's use rows."""
    periods = session.execute(select(BundlePeriod.grant_id, BundlePeriod.period_start_ms, BundlePeriod.period_end_ms)
                              .where(BundlePeriod.account_id == account_id)).all()
    if not periods:
        return [0]
    sums: dict[tuple[int, int, str], int] = {}
    grant_ids = sorted({int(row[0]) for row in periods})
    for start in range(0, len(grant_ids), SQL_IN_CHUNK):
        rows = session.execute(
            select(BundleUsage.grant_id, BundleUsage.period_start_ms, BundleUsage.kind, func.sum(BundleUsage.seconds))
            .where(BundleUsage.grant_id.in_(grant_ids[start:start + SQL_IN_CHUNK]))
            .group_by(BundleUsage.grant_id, BundleUsage.period_start_ms, BundleUsage.kind))
        sums.update({(int(g), int(st), str(kind)): int(total) for g, st, kind, total in rows})
    args: list[object] = [len(periods)]
    for grant_id, start, end in periods:
        key = (int(grant_id), int(start))
        used = -(sums.get((*key, "use"), 0) + sums.get((*key, "adjust"), 0))
        args += [f"{key[0]}:{key[1]}", sums.get((*key, "grant"), 0), sums.get((*key, "rollover"), 0), int(end), used]
    ids = sorted(tracked)
    for start in range(0, len(ids), SQL_IN_CHUNK):
        rows = session.execute(
            select(BundleUsage.call_id, BundleUsage.grant_id, BundleUsage.period_start_ms,
                   func.sum(BundleUsage.seconds))
            .where(BundleUsage.call_id.in_(ids[start:start + SQL_IN_CHUNK]), BundleUsage.kind == "use",
                   BundleUsage.account_id == account_id)
            .group_by(BundleUsage.call_id, BundleUsage.grant_id, BundleUsage.period_start_ms))
        for call_id, grant_id, period_start, total in rows:
            args += [str(call_id), f"{int(grant_id)}:{int(period_start)}", -int(total)]
    return args


def _spend_args(session: Session, account_id: str) -> list[object]:
    """rebuild.lua's spend part: the newest ``spend_periods`` rows of each kind (the day and month
    new calls count on are among them; older counters matter only to calls still open there, and
    Redis keeps those), as 'd:start'/'m:start' and spent."""
    args: list[object] = []
    for kind, count in SPEND_ROWS_LOADED.items():
        rows = session.execute(select(SpendPeriod.start_ms, SpendPeriod.spent_micros)
                               .where(SpendPeriod.account_id == account_id, SpendPeriod.kind == kind)
                               .order_by(SpendPeriod.start_ms.desc()).limit(count)).all()
        for start, spent in rows:
            args += [f"{kind[0]}:{int(start)}", int(spent)]
    return [len(args) // 2, *args]


def _cap(value: int | None) -> str:
    return "" if value is None else str(value)


def rebuild_account(client: RedisClient, scripts: Scripts, keys: KeySpace, sessions: sessionmaker[Session],
                    account_id: str, mode: str, retention_ms: int) -> str:
    """Load (``if_absent``), refresh (``if_present``) or rebuild (``load``) one account from SQL,
    with its bundle periods, its spend caps and its plan's timezone, and its spend counters.

    Returns the script's status (loaded, kept, absent); raises NotFound for an unknown account.
    """
    ak = keys.of(account_id)
    with transaction(sessions) as session:
        account = lock_account(session, account_id)
        check_redis_range(account_id, account.balance_micros, account.credit_limit_micros)
        plan = session.get(RatePlan, account.rate_plan_id)
        pipe = client.pipeline(transaction=False)
        pipe.zrange(ak.live, 0, -1)
        pipe.smembers(ak.unposted)
        live, unposted = pipe.execute()
        tracked = {text(c) for c in live} | {text(c) for c in unposted}
        in_ledger = _ledger_of_calls(session, account_id, tracked)
        args: list[object] = [
            mode, account.balance_micros, account.credit_limit_micros, account.status,
            account.max_concurrent_calls or 0, plan.name if plan is not None else "", account.currency,
            time.time_ns() // 1_000_000, ak.call_prefix, ak.period_prefix,
            _cap(account.max_call_cost_micros), _cap(account.daily_spend_micros),
            _cap(account.monthly_spend_micros), (plan.timezone if plan is not None else "") or "UTC",
            ak.spend_prefix, retention_ms, *_spend_args(session, account_id), len(in_ledger),
        ]
        for call_id, of_call in in_ledger.items():
            args += [call_id, of_call.sum_micros, int(of_call.settled)]
        args += _bundle_args(session, account_id, tracked)
        reply = scripts.run(client, "rebuild", [ak.account, ak.live, ak.unposted, ak.periods, ak.periods_unposted],
                            args)
    status = text(reply[0])
    if status == "loaded":
        log.info("account=%s %s into Redis from the ledger: balance_micros=%s reserved_micros=%s", account_id,
                 "rebuilt" if mode == "load" else "loaded", text(reply[1]), text(reply[2]))
    return status
