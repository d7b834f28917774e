"""The embedded balance store: reservations in the SQL database itself (single node, no Redis).

Same semantics as the Redis store (agent/core/balance.py; one contract suite runs on both),
done with row locks: every step is one transaction that locks the account row first
(``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` write lock), then the call's
reservation row, so two steps of one account are serialised and no lock order can deadlock.

Choice made here: nibble debits are not ledger entries. They accumulate on the reservation
(``debited_micros``) and stay counted in ``accounts.reserved_micros`` (which is the sum of
``reserved_micros + debited_micros`` over the account's open reservations), so the balance
keeps equal to the sum of the ledger at every instant, and the settle writes exactly one
``charge:{call_id}`` entry for the whole call in the same transaction that closes it.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeAlias, TypeVar

from sqlalchemy import Engine, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

from agent.adapters.sql.accounts import HOLD_ON_ACCOUNT, LOCK_BALANCE, post_entries, post_entry
from agent.adapters.sql.bundle_periods import dump_holds, load_holds, open_period, periods_of, post_use
from agent.adapters.sql.driver_statements import DriverStatements
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import Account, RatePlan, Reservation, SpendPeriod
from agent.core.balance import (
    AccountState,
    AuthorizeOutcome,
    AuthorizeStep,
    BundleSettle,
    DenyReason,
    ExpireReport,
    LiveCall,
    NibbleOutcome,
    NibbleRequest,
    NibbleStatus,
    ReleaseOutcome,
    ReleaseStatus,
    SettleOutcome,
    SettleStatus,
    StoreUnavailable,
    UnknownCall,
    authorize_with_bundles,
    check_authorize,
    check_bundle_request,
    check_call_id,
    check_micros,
    check_nibble,
    ledger_postings,
    nibble_bundle_draw,
    nibble_step,
)
from agent.core.budgets import SpendLimits, SpendPeriods, SpendUse, capped, spend_periods
from agent.core.bundles import BundleSlot, PeriodState, commit
from agent.core.errors import Conflict, NotFound
from agent.ports import StoreRider

log = logging.getLogger(__name__)

T = TypeVar("T")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ATTEMPTS = 4  # deadlock victims and concurrent first inserts of one call id are retried
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock
RETRYABLE_MYSQL_CODES = {1213, 1205}  # deadlock, lock wait timeout


def ms_to_datetime(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


class _CapColumns(Protocol):
    """An account's caps: its entity, or a row of its columns (the Core statements)."""

    @property
    def max_call_cost_micros(self) -> int | None: ...

    @property
    def daily_spend_micros(self) -> int | None: ...

    @property
    def monthly_spend_micros(self) -> int | None: ...


def _limits(account: _CapColumns) -> SpendLimits:
    return SpendLimits(account.max_call_cost_micros, account.daily_spend_micros, account.monthly_spend_micros)


def _use(rows: Sequence[SpendPeriod], *, call_micros: int = 0) -> SpendUse:
    """What counts against the caps: the day's and the month's spent + held, and the call's."""
    day = next((row for row in rows if row.kind == "day"), None)
    month = next((row for row in rows if row.kind == "month"), None)
    return SpendUse(day.spent_micros + day.held_micros if day is not None else 0,
                    month.spent_micros + month.held_micros if month is not None else 0, call_micros)


def _move(rows: Sequence[SpendPeriod], *, held: int = 0, spent: int = 0) -> None:
    for row in rows:
        row.held_micros += held
        row.spent_micros += spent


def _retryable(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
        return True
    args: tuple[object, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in RETRYABLE_MYSQL_CODES


_ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]
_RESERVATIONS: Table = Reservation.__table__  # type: ignore[assignment]
# The authorization's statements (SqlBalanceStore._authorize): built once, Core, on the tables.
_LOCK_ACCOUNT_FOR_AUTHORIZE = (
    select(_ACCOUNTS.c.rate_plan_id, _ACCOUNTS.c.currency, _ACCOUNTS.c.status, _ACCOUNTS.c.balance_micros,
           _ACCOUNTS.c.credit_limit_micros, _ACCOUNTS.c.reserved_micros, _ACCOUNTS.c.max_concurrent_calls,
           _ACCOUNTS.c.max_call_cost_micros, _ACCOUNTS.c.daily_spend_micros, _ACCOUNTS.c.monthly_spend_micros)
    .where(_ACCOUNTS.c.id == bindparam("account_id")).with_for_update())
_PLAN_OF = select(RatePlan.__table__.c.name, RatePlan.__table__.c.timezone).where(
    RatePlan.__table__.c.id == bindparam("plan_id"))
_LOCK_CALL_FOR_AUTHORIZE = (
    select(_RESERVATIONS.c.account_id, _RESERVATIONS.c.auth_granted_micros, _RESERVATIONS.c.auth_available_micros,
           _RESERVATIONS.c.bundle_held_s)
    .where(_RESERVATIONS.c.call_id == bindparam("call_id")).with_for_update())
_INSERT_RESERVATION = insert(_RESERVATIONS)
_COUNT_LIVE = select(func.count().label("live")).select_from(_RESERVATIONS).where(
    _RESERVATIONS.c.account_id == bindparam("account_id"), _RESERVATIONS.c.state == "open",
    _RESERVATIONS.c.expires_at > bindparam("now"))
# A nibble's (SqlBalanceStore._nibble): the call's account, then the account and the call locked
# in the one order every step uses, and the two updates (the first, accounts.HOLD_ON_ACCOUNT, the
# authorization's too).
_ACCOUNT_OF_CALL = select(_RESERVATIONS.c.account_id).where(_RESERVATIONS.c.call_id == bindparam("call_id"))
_LOCK_ACCOUNT_FOR_NIBBLE = (
    select(_ACCOUNTS.c.balance_micros, _ACCOUNTS.c.credit_limit_micros, _ACCOUNTS.c.reserved_micros,
           _ACCOUNTS.c.max_call_cost_micros, _ACCOUNTS.c.daily_spend_micros, _ACCOUNTS.c.monthly_spend_micros)
    .where(_ACCOUNTS.c.id == bindparam("account_id")).with_for_update())
_LOCK_CALL_FOR_NIBBLE = (
    select(_RESERVATIONS.c.state, _RESERVATIONS.c.seq, _RESERVATIONS.c.granted_micros,
           _RESERVATIONS.c.last_debit_micros, _RESERVATIONS.c.reserved_micros, _RESERVATIONS.c.debited_micros,
           _RESERVATIONS.c.overrun_micros, _RESERVATIONS.c.expires_at, _RESERVATIONS.c.bundle_slots,
           _RESERVATIONS.c.bundle_held_s, _RESERVATIONS.c.bundle_last_granted_s, _RESERVATIONS.c.spend_day_ms,
           _RESERVATIONS.c.spend_month_ms)
    .where(_RESERVATIONS.c.call_id == bindparam("call_id")).with_for_update())
_NIBBLE_ON_CALL = (update(_RESERVATIONS).where(_RESERVATIONS.c.call_id == bindparam("call"))
                   .values(seq=bindparam("seq"), reserved_micros=bindparam("granted"),
                           granted_micros=bindparam("granted"), last_debit_micros=bindparam("debit"),
                           debited_micros=bindparam("debited"), overrun_micros=bindparam("overrun"),
                           expires_at=bindparam("expires_at")))


# The close of a plain call (SqlBalanceStore._close_plain: settle, release, expiry): its account's
# balance and the call's closing columns locked, then its ledger entries (accounts.post_entries:
# the account moved in the same update) and the call closed.
_LOCK_CALL_FOR_CLOSE = (
    select(_RESERVATIONS.c.state, _RESERVATIONS.c.seq, _RESERVATIONS.c.reserved_micros,
           _RESERVATIONS.c.debited_micros, _RESERVATIONS.c.overrun_micros, _RESERVATIONS.c.expires_at,
           _RESERVATIONS.c.bundle_slots, _RESERVATIONS.c.bundle_used_s, _RESERVATIONS.c.spend_day_ms,
           _RESERVATIONS.c.spend_month_ms)
    .where(_RESERVATIONS.c.call_id == bindparam("call_id")).with_for_update())
_CLOSE_CALL = (update(_RESERVATIONS).where(_RESERVATIONS.c.call_id == bindparam("call"))
               .values(state=bindparam("state"), reserved_micros=0, seq=bindparam("seq"),
                       closed_at=bindparam("closed_at"), overrun_micros=bindparam("overrun"),
                       cost_micros=bindparam("cost"), closed_charge_micros=bindparam("closed_charge")))


class _RawTransaction:
    """A SQLite transaction on a pooled connection's own ``sqlite3.Connection``, without an ORM
    session (see ``SqlBalanceStore._in_raw``)."""

    __slots__ = ("dbapi",)

    def __init__(self, dbapi: sqlite3.Connection) -> None:
        self.dbapi = dbapi


class _NeedsSession(Exception):
    """A step on a raw transaction met what only the ORM path handles (bundle periods, spend
    counters, several ledger postings): rolled back, and run again in a session."""


Tx: TypeAlias = "Session | _RawTransaction"


def _roll_back(dbapi: sqlite3.Connection) -> None:
    """Quietly: the error that led here is the one to report (a connection left in a
    transaction is rolled back again by the pool when it is returned)."""
    if dbapi.in_transaction:
        try:
            dbapi.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class SqlBalanceStore:
    """Implements the ``BalanceStore`` port (agent/ports.py) on any supported SQL backend."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        self._single_writer = getattr(getattr(bind, "dialect", None), "name", "") == "sqlite"
        # SQLite: the hot statements straight on the driver's cursor (agent/adapters/sql/driver_statements.py),
        # and the plain steps' transactions without a session (_in_raw).
        self._driver = DriverStatements(bind.dialect) if self._single_writer and bind is not None else None
        self._raw_bind: Engine | None = bind if self._driver is not None and isinstance(bind, Engine) else None

    def _exec(self, session: Tx, statement: Executable, params: dict[str, Any]) -> Any:
        """One of this module's Core statements: ``first()`` and ``scalar()`` of its result."""
        if isinstance(session, _RawTransaction):
            assert self._driver is not None
            return self._driver.run_on(session.dbapi, statement, params)
        if self._driver is None:
            return session.execute(statement, params)
        if session.identity_map:  # an entity an earlier step of a batch loaded may be changed
            session.flush()
        return self._driver.run(session, statement, params)

    @staticmethod
    def _orm(session: Tx) -> Session:
        """The session for an entity path; on a raw transaction, the step starts again in one."""
        if isinstance(session, _RawTransaction):
            raise _NeedsSession
        return session

    # ------------------------------------------------------------------ plumbing

    def _run(self, work: Callable[[Session], T]) -> T:
        return self._attempts(lambda: self._in_session(work))

    def _run_plain(self, work: Callable[[Tx], T]) -> T:
        """``work`` for a step whose usual case is Core statements only (an authorization, a
        nibble batch, a close): on SQLite in a raw transaction (``_in_raw``), else as ``_run``."""
        if self._raw_bind is None:
            return self._run(work)
        return self._attempts(lambda: self._in_raw(work))

    def _in_session(self, work: Callable[[Session], T]) -> T:
        with transaction(self._sessions) as session:
            return work(session)

    def _in_raw(self, work: Callable[[Tx], T]) -> T:
        """One transaction on a pooled connection's ``sqlite3.Connection`` itself: the same
        BEGIN IMMEDIATE as the engine's begin hook, the driver statements, COMMIT; ROLLBACK on
        any error, a driver error raised as SQLAlchemy's (``_attempts`` classifies it). The
        session's machinery (made, begun, its connection checked out through the pool's events,
        committed, closed) cost 70 us a transaction against 13 without it, measured in process:
        about half of an authorization's time on SQLite, in the daemon's one loop. A step that
        needs the ORM (``_orm``) is rolled back and run again in a session."""
        assert self._raw_bind is not None
        pooled = self._raw_bind.raw_connection()
        try:
            dbapi = pooled.driver_connection
            assert isinstance(dbapi, sqlite3.Connection)
            try:
                dbapi.execute("BEGIN IMMEDIATE")
                result = work(_RawTransaction(dbapi))
                dbapi.execute("COMMIT")
                return result
            except _NeedsSession:
                _roll_back(dbapi)
            except BaseException as exc:
                _roll_back(dbapi)
                if isinstance(exc, sqlite3.Error):
                    raise DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
                raise
        finally:
            pooled.close()
        return self._in_session(work)

    def _attempts(self, attempt: Callable[[], T]) -> T:
        for attempt_number in range(1, ATTEMPTS + 1):
            try:
                return attempt()
            except IntegrityError:
                if attempt_number == ATTEMPTS:
                    raise
                log.info("concurrent insert of one reservation; retrying (attempt %d)", attempt_number)
            except DBAPIError as exc:
                if isinstance(exc, OperationalError) and _retryable(exc) and attempt_number < ATTEMPTS:
                    log.info("transaction lost a lock race; retrying (attempt %d)", attempt_number)
                    continue
                if isinstance(exc, OperationalError) or exc.connection_invalidated:
                    raise StoreUnavailable(f"balance store database unavailable: {exc.orig}") from exc
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _lock_account(session: Session, account_id: str) -> Account | None:
        # populate_existing: the row as locked now, should the session still hold the entity from
        # an earlier step of a batch that a Core statement updated since (SQLite's nibble batch)
        return session.scalar(select(Account).where(Account.id == account_id).with_for_update()
                              .execution_options(populate_existing=True))

    @staticmethod
    def _lock_call(session: Session, call_id: str) -> Reservation | None:
        return session.scalar(select(Reservation).where(Reservation.call_id == call_id).with_for_update()
                              .execution_options(populate_existing=True))

    def _lock_call_and_account(self, session: Session, call_id: str) -> tuple[Reservation | None, Account | None]:
        """Lock in the one order every step uses: the account row, then the reservation."""
        account_id = session.scalar(select(Reservation.account_id).where(Reservation.call_id == call_id))
        if account_id is None:
            return None, None
        account = self._lock_account(session, account_id)
        return self._lock_call(session, call_id), account

    @staticmethod
    def _post(session: Session, reservation: Reservation) -> None:
        for posting in ledger_postings(reservation.call_id, closed_charge_micros=reservation.closed_charge_micros,
                                       cost_micros=reservation.cost_micros):
            post_entry(session, reservation.account_id, kind=posting.kind, amount_micros=posting.amount_micros,
                       reference=posting.reference, call_id=reservation.call_id, description=posting.description)

    # ------------------------------------------------------------------ authorize

    def authorize(self, account_id: str, call_id: str, node: str, want_micros: int, min_micros: int,
                  now_ms: int, ttl_ms: int, *, bundle_slots: Sequence[BundleSlot] = (),
                  bundle_want_s: int = 0, rider: StoreRider | None = None) -> AuthorizeOutcome:
        # ``rider`` is never taken: SQL shares no round trip with the fraud counters (agent/ports.py)
        check_authorize(call_id, want_micros, min_micros, ttl_ms)
        check_bundle_request(bundle_slots, bundle_want_s)
        return self._run_plain(lambda s: self._authorize(s, account_id, call_id, node, want_micros, min_micros,
                                                   now_ms, ttl_ms, tuple(bundle_slots), bundle_want_s))

    def authorize_many(self, steps: Sequence[AuthorizeStep], *,
                       rider: StoreRider | None = None) -> list[AuthorizeOutcome]:
        """One transaction each (their accounts' row locks are not held together); no rider taken."""
        return [self.authorize(st.account_id, st.call_id, st.node, st.want_micros, st.min_micros, st.now_ms,
                               st.ttl_ms, bundle_slots=st.bundle_slots, bundle_want_s=st.bundle_want_s)
                for st in steps]

    def _authorize(self, session: Tx, account_id: str, call_id: str, node: str, want: int,
                   minimum: int, now_ms: int, ttl_ms: int, slots: tuple[BundleSlot, ...] = (),
                   want_s: int = 0) -> AuthorizeOutcome:
        # Core statements on the tables, not ORM entities: the authorization is in every call's
        # post-dial delay, and loading and flushing entities was most of its time on SQLite (an
        # ORM select, insert and update cost several times the statement). Bundle periods and
        # spend counters, where an account has them, stay ORM rows (flushed at commit).
        account = self._exec(session, _LOCK_ACCOUNT_FOR_AUTHORIZE, {"account_id": account_id}).first()
        if account is None:
            return AuthorizeOutcome(call_id, False, DenyReason.UNKNOWN_ACCOUNT, 0, 0)
        plan = self._exec(session, _PLAN_OF, {"plan_id": account.rate_plan_id}).first()
        plan_name, timezone = (plan.name, plan.timezone) if plan is not None else ("", "UTC")
        existing = self._exec(session, _LOCK_CALL_FOR_AUTHORIZE, {"call_id": call_id}).first()
        if existing is not None:
            if existing.account_id != account_id:
                raise Conflict(f"call {call_id!r} is already authorized on account {existing.account_id!r}")
            return AuthorizeOutcome(call_id, True, None, existing.auth_granted_micros,
                                    existing.auth_available_micros, plan_name, account.currency, replayed=True,
                                    bundle_granted_s=existing.bundle_held_s)
        now = ms_to_datetime(now_ms)
        live = 0  # counted only where a limit reads it: one statement less per authorization
        if account.max_concurrent_calls:
            live = self._exec(session, _COUNT_LIVE, {"account_id": account_id, "now": now}).scalar() or 0
        available = account.balance_micros + account.credit_limit_micros - account.reserved_micros
        limits = _limits(account)
        spend = spend_periods(timezone, now_ms) if limits.any else None
        spend_rows = self._spend_rows(self._orm(session), account_id, spend) if spend is not None else []
        binding = ""
        if limits.any:
            available, binding = capped(available, limits, _use(spend_rows))
        periods = ([open_period(self._orm(session), account_id, slot) for slot in slots]
                   if slots and account.status == "active" else [])
        lefts = [period.granted_s - period.used_s - period.reserved_s for period in periods]
        reason, granted, taken = authorize_with_bundles(
            status=account.status, live_calls=live, max_calls=account.max_concurrent_calls,
            available_micros=available, want_micros=want, min_micros=minimum, bundle_lefts=lefts,
            bundle_want_s=want_s)
        bundle_available = sum(max(left, 0) for left in lefts)
        if reason is DenyReason.INSUFFICIENT_FUNDS and binding:
            reason = DenyReason.SPEND_LIMIT  # the money is there; a cap is reached
        if reason is not None:
            return AuthorizeOutcome(call_id, False, reason, 0, available, plan_name, account.currency,
                                    bundle_available_s=bundle_available)
        for period, seconds in zip(periods, taken, strict=True):
            period.reserved_s += seconds
        self._exec(session, _INSERT_RESERVATION, {
            "call_id": call_id, "account_id": account_id, "node": node, "state": "open", "seq": 0,
            "granted_micros": granted, "last_debit_micros": 0, "auth_granted_micros": granted,
            "auth_available_micros": available, "reserved_micros": granted, "debited_micros": 0,
            "overrun_micros": 0, "created_at": now, "expires_at": ms_to_datetime(now_ms + ttl_ms),
            "bundle_held_s": sum(taken), "bundle_used_s": 0, "bundle_last_granted_s": sum(taken),
            "bundle_slots": dump_holds(list(zip(slots, taken, strict=True))),
            "spend_day_ms": spend.day_start_ms if spend else 0, "spend_month_ms": spend.month_start_ms if spend else 0})
        if granted:
            self._exec(session, HOLD_ON_ACCOUNT, {"account_id": account_id, "delta": granted})
        _move(spend_rows, held=granted)
        if isinstance(session, Session):
            session.flush()
        return AuthorizeOutcome(call_id, True, None, granted, available, plan_name, account.currency,
                                bundle_granted_s=sum(taken), bundle_available_s=bundle_available)

    # ------------------------------------------------------------------ nibbles

    def debit_and_reserve(self, call_id: str, seq: int, debit_micros: int, reserve_micros: int,
                          now_ms: int, ttl_ms: int, *, account_id: str | None = None) -> NibbleOutcome:
        return self.debit_and_reserve_many(
            [NibbleRequest(call_id, seq, debit_micros, reserve_micros, now_ms, ttl_ms, account_id)])[0]

    def debit_and_reserve_many(self, requests: Sequence[NibbleRequest]) -> list[NibbleOutcome]:
        for request in requests:
            check_nibble(request)
        if self._single_writer:
            # SQLite locks the whole database per transaction anyway: one transaction for the
            # batch saves a commit (and its WAL sync) per nibble, which was the embedded node's
            # ceiling (about 500 calls on 1 s nibbles). No lock ordering to fear with one writer.
            return self._run_plain(lambda s: [self._nibble(s, r) for r in requests])
        # One transaction per nibble: a batch never holds many accounts' locks at once.
        return [self._run(lambda s, r=request: self._nibble(s, r)) for request in requests]  # type: ignore[misc]

    def _nibble(self, session: Tx, req: NibbleRequest) -> NibbleOutcome:
        """One nibble. A call without bundle holds or spend counters, on an account without caps
        (most calls), as Core statements on the tables (its account's money, its reservation):
        every live call nibbles, and loading and flushing entities cost several times the
        statements (on SQLite the whole batch runs in the daemon's loop). Anything else: the
        entity path (``_nibble_entities``), the same rows locked in the same order."""
        account_id = self._exec(session, _ACCOUNT_OF_CALL, {"call_id": req.call_id}).scalar()
        if account_id is None:
            return NibbleOutcome(req.call_id, req.seq, NibbleStatus.UNKNOWN_CALL, 0, 0)
        account = self._exec(session, _LOCK_ACCOUNT_FOR_NIBBLE, {"account_id": account_id}).first()
        r = self._exec(session, _LOCK_CALL_FOR_NIBBLE, {"call_id": req.call_id}).first()
        if r is None or account is None:
            return NibbleOutcome(req.call_id, req.seq, NibbleStatus.UNKNOWN_CALL, 0, 0)
        totals = {"total_debited_micros": r.debited_micros, "overrun_micros": r.overrun_micros}
        if r.state != "open":
            return NibbleOutcome(req.call_id, req.seq, NibbleStatus.CLOSED, 0, 0, **totals)
        if req.seq == r.seq:
            return NibbleOutcome(req.call_id, req.seq, NibbleStatus.REPLAYED, r.granted_micros,
                                 r.last_debit_micros, **totals, bundle_granted_s=r.bundle_last_granted_s,
                                 bundle_held_s=r.bundle_held_s)
        if req.seq < r.seq:
            return NibbleOutcome(req.call_id, req.seq, NibbleStatus.STALE, 0, 0, **totals)
        if datetime_to_ms(r.expires_at) <= req.now_ms:
            return NibbleOutcome(req.call_id, req.seq, NibbleStatus.EXPIRED, 0, 0, **totals)
        if (r.bundle_slots not in ("", "[]") or r.spend_day_ms or r.spend_month_ms
                or _limits(account).any):
            return self._nibble_entities(self._orm(session), req, account_id)
        beyond = req.debit_micros - min(req.debit_micros, r.reserved_micros)  # an overrun adds to what is held
        effect = nibble_step(
            call_reserved_micros=r.reserved_micros, debit_micros=req.debit_micros,
            reserve_micros=req.reserve_micros, available_after_debit_micros=(
                account.balance_micros + account.credit_limit_micros - account.reserved_micros - beyond))
        remaining = r.reserved_micros - effect.taken_micros
        if effect.overrun_micros:
            log.warning("nibble overrun call=%s seq=%d overrun_micros=%d", req.call_id, req.seq,
                        effect.overrun_micros)
        held_delta = effect.overrun_micros + effect.granted_micros - remaining
        if held_delta:
            self._exec(session, HOLD_ON_ACCOUNT, {"account_id": account_id, "delta": held_delta})
        debited, overrun = r.debited_micros + req.debit_micros, r.overrun_micros + effect.overrun_micros
        self._exec(session, _NIBBLE_ON_CALL, {
            "call": req.call_id, "seq": req.seq, "granted": effect.granted_micros, "debit": req.debit_micros,
            "debited": debited, "overrun": overrun, "expires_at": ms_to_datetime(req.now_ms + req.ttl_ms)})
        return NibbleOutcome(req.call_id, req.seq, NibbleStatus.GRANTED, effect.granted_micros, req.debit_micros,
                             debited, overrun, bundle_granted_s=0, bundle_held_s=r.bundle_held_s)

    def _nibble_entities(self, session: Session, req: NibbleRequest, account_id: str) -> NibbleOutcome:
        """``_nibble``'s path for a call with bundle holds or spend counters, or an account with
        caps: ``_nibble`` locked both rows and found the call open, at this step, not expired;
        their entities are read here (as locked: ``populate_existing``)."""
        account = self._lock_account(session, account_id)
        r = self._lock_call(session, req.call_id)
        assert account is not None and r is not None  # locked by _nibble in this transaction
        reserve_micros, bundle_granted = self._nibble_bundles(session, r, req)
        beyond = req.debit_micros - min(req.debit_micros, r.reserved_micros)  # an overrun adds to what is held
        available_after = (account.balance_micros + account.credit_limit_micros - account.reserved_micros - beyond)
        limits = _limits(account)
        spend_rows = self._call_spend_rows(session, r)
        if limits.any:
            # The caps, as the balance: what the call and its day and month hold counts as used.
            use = _use(spend_rows, call_micros=r.debited_micros + r.reserved_micros)
            available_after, _ = capped(available_after, limits, SpendUse(
                use.day_micros + beyond, use.month_micros + beyond, use.call_micros + beyond))
        effect = nibble_step(
            call_reserved_micros=r.reserved_micros, debit_micros=req.debit_micros,
            reserve_micros=reserve_micros, available_after_debit_micros=available_after)
        remaining = r.reserved_micros - effect.taken_micros
        # Held = reserved + debited: the debit moves inside it, an overrun and the top-up add to it.
        account.reserved_micros += effect.overrun_micros + effect.granted_micros - remaining
        _move(spend_rows, held=effect.overrun_micros + effect.granted_micros - remaining)
        if effect.overrun_micros:
            log.warning("nibble overrun call=%s seq=%d overrun_micros=%d", req.call_id, req.seq,
                        effect.overrun_micros)
        r.seq = req.seq
        r.reserved_micros = effect.granted_micros
        r.granted_micros = effect.granted_micros
        r.last_debit_micros = req.debit_micros
        r.debited_micros += req.debit_micros
        r.overrun_micros += effect.overrun_micros
        r.expires_at = ms_to_datetime(req.now_ms + req.ttl_ms)
        session.flush()
        return NibbleOutcome(req.call_id, req.seq, NibbleStatus.GRANTED, effect.granted_micros, req.debit_micros,
                             r.debited_micros, r.overrun_micros, bundle_granted_s=bundle_granted,
                             bundle_held_s=r.bundle_held_s)

    @staticmethod
    def _nibble_bundles(session: Session, r: Reservation, req: NibbleRequest) -> tuple[int, int]:
        """The nibble's bundle part (DESIGN §9): record what the call used, take the next
        slice's seconds; returns the money to reserve and the seconds granted."""
        r.bundle_used_s = max(r.bundle_used_s, min(req.bundle_used_s, r.bundle_held_s))
        r.bundle_last_granted_s = 0
        holds = load_holds(r.bundle_slots)
        if req.bundle_want_s <= 0 or not holds:
            return req.reserve_micros, 0
        with session.no_autoflush:  # the reservation's changes go in its one UPDATE at the end
            periods = [open_period(session, r.account_id, slot) for slot, _ in holds]
        taken, reserve = nibble_bundle_draw([p.granted_s - p.used_s - p.reserved_s for p in periods],
                                            req.bundle_want_s, req.reserve_micros)
        for period, seconds in zip(periods, taken, strict=True):
            period.reserved_s += seconds
        r.bundle_slots = dump_holds([(slot, held + seconds)
                                     for (slot, held), seconds in zip(holds, taken, strict=True)])
        r.bundle_held_s += sum(taken)
        r.bundle_last_granted_s = sum(taken)
        return reserve, sum(taken)

    # ------------------------------------------------------------------ settle, release, expire

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, *,
               account_id: str | None = None, bundle: BundleSettle | None = None) -> SettleOutcome:
        check_call_id(call_id)
        check_micros("cost", cost_micros)
        if bundle is not None:
            check_bundle_request(bundle.slots, bundle.covered_s)
        return self._run_plain(lambda s: self._settle(s, call_id, seq, cost_micros, now_ms, account_id, bundle))

    def _settle(self, session: Tx, call_id: str, seq: int, cost: int, now_ms: int,
                account_hint: str | None, bundle: BundleSettle | None = None) -> SettleOutcome:
        if bundle is None or not bundle.slots or bundle.covered_s <= 0:  # no seconds to commit without holds
            plain = self._close_plain(session, call_id, seq, now_ms, "settled", cost)
            if isinstance(plain, SettleOutcome):
                return plain
        session = self._orm(session)  # the entity path
        r, account = self._lock_call_and_account(session, call_id)
        if r is None:
            return self._settle_without_reservation(session, call_id, seq, cost, now_ms, account_hint, bundle)
        assert account is not None  # the foreign key guarantees the reservation's account
        if r.state == "settled":
            status = SettleStatus.REPLAYED if r.cost_micros == cost else SettleStatus.CONFLICT
            if status is SettleStatus.CONFLICT:
                log.error("settle conflict call=%s stored_cost=%s new_cost=%d: nothing changed", call_id,
                          r.cost_micros, cost)
            return SettleOutcome(call_id, r.account_id, status, r.cost_micros or 0, r.debited_micros, 0,
                                 r.overrun_micros, bundle_used_s=r.bundle_used_s)
        released = 0
        covered = r.bundle_used_s if bundle is None else bundle.covered_s
        if r.state == "open":
            held = r.reserved_micros + r.debited_micros
            overrun = max(0, cost - held)
            released = r.reserved_micros
            account.reserved_micros -= held
            _move(self._call_spend_rows(session, r), held=-held, spent=cost)
            status = SettleStatus.SETTLED
            if load_holds(r.bundle_slots) or bundle is None:  # an authorize without slots holds "[]"
                self._commit_bundles(session, r, covered)
            else:  # reserved again after a cache lost the call: its holds went with it
                self._commit_without_holds(session, r, bundle)
        else:  # expired or released: its debits were charged when it closed; charge the rest now
            overrun = max(0, cost - (r.closed_charge_micros or 0))
            _move(self._call_spend_rows(session, r), spent=cost - (r.closed_charge_micros or 0))
            status = SettleStatus.AFTER_EXPIRY
            self._commit_bundles_late(session, r, covered)
        if overrun:
            log.warning("settle overrun call=%s cost_micros=%d overrun_micros=%d", call_id, cost, overrun)
        r.state, r.cost_micros, r.reserved_micros = "settled", cost, 0
        r.overrun_micros += overrun
        r.seq = max(r.seq, seq)
        r.closed_at = ms_to_datetime(now_ms)
        session.flush()
        self._post(session, r)
        return SettleOutcome(call_id, r.account_id, status, cost, r.debited_micros, released, r.overrun_micros,
                             bundle_used_s=r.bundle_used_s)

    def _close_plain(self, session: Tx, call_id: str, seq: int, now_ms: int, state: str,
                     cost: int | None = None) -> SettleOutcome | ReleaseOutcome | None:
        """Settle (``state`` "settled", with ``cost``), release or expire an open call without
        bundle holds or spend counters (most calls) as Core statements: every call closes once,
        on SQLite in the daemon's loop, and the entity path cost about five times an
        authorization there. None: not such a call (closed, with bundle holds or spend
        counters, unknown); the entity path (``_settle``, ``_close``) then decides on the same
        rows, locked in the same order (it reads them as locked: ``populate_existing``). A
        ledger reference the call's entry needs, held by another movement, is refused
        (Conflict) as the entity path refuses it."""
        account_id = self._exec(session, _ACCOUNT_OF_CALL, {"call_id": call_id}).scalar()
        if account_id is None:
            return None
        balance = self._exec(session, LOCK_BALANCE, {"account_id": account_id}).scalar()
        r = self._exec(session, _LOCK_CALL_FOR_CLOSE, {"call_id": call_id}).first()
        if (balance is None or r is None or r.state != "open" or r.bundle_slots not in ("", "[]")
                or r.spend_day_ms or r.spend_month_ms):
            return None
        if state == "expired" and datetime_to_ms(r.expires_at) > now_ms:
            return ReleaseOutcome(call_id, ReleaseStatus.CLOSED)  # renewed since the sweep looked
        held = r.reserved_micros + r.debited_micros
        settling = state == "settled"
        assert not settling or cost is not None
        closed_charge = None if settling else r.debited_micros
        postings = ledger_postings(call_id, closed_charge_micros=closed_charge, cost_micros=cost)
        overrun = max(0, cost - held) if cost is not None else 0
        if overrun:
            log.warning("settle overrun call=%s cost_micros=%d overrun_micros=%d", call_id, cost, overrun)
        orm = session if isinstance(session, Session) else None
        if orm is None and len(postings) > 1:
            raise _NeedsSession  # several postings: post_entries reads and inserts them through a session
        post_entries(orm, account_id, postings, call_id=call_id, held_delta_micros=-held,
                     locked_balance_micros=balance,
                     execute=lambda _session, statement, params: self._exec(session, statement, params))
        self._exec(session, _CLOSE_CALL, {
            "call": call_id, "state": state, "seq": max(r.seq, seq), "closed_at": ms_to_datetime(now_ms),
            "overrun": r.overrun_micros + overrun, "cost": cost, "closed_charge": closed_charge})
        if settling:
            assert cost is not None
            return SettleOutcome(call_id, account_id, SettleStatus.SETTLED, cost, r.debited_micros,
                                 r.reserved_micros, r.overrun_micros + overrun, bundle_used_s=r.bundle_used_s)
        return ReleaseOutcome(call_id, ReleaseStatus.RELEASED, r.reserved_micros, r.debited_micros)

    @staticmethod
    def _commit_bundles(session: Session, r: Reservation, covered_s: int) -> None:
        """Close a live call's bundle holds: ``covered_s`` used, in draw order; the rest back."""
        holds = load_holds(r.bundle_slots)
        if not holds:
            return
        used = commit([held for _, held in holds], covered_s)
        for (slot, held), seconds in zip(holds, used, strict=True):
            period = open_period(session, r.account_id, slot)
            period.reserved_s -= min(held, period.reserved_s)
            post_use(session, r.account_id, r.call_id, period, slot, seconds)
        r.bundle_used_s = sum(used)

    @staticmethod
    def _spend_rows(session: Session, account_id: str, spend: SpendPeriods) -> list[SpendPeriod]:
        """The day's and the month's counters of the caps, locked (created at zero)."""
        rows = []
        for kind, start in (("day", spend.day_start_ms), ("month", spend.month_start_ms)):
            row = session.scalar(select(SpendPeriod).where(
                SpendPeriod.account_id == account_id, SpendPeriod.kind == kind, SpendPeriod.start_ms == start)
                .with_for_update())
            if row is None:
                row = SpendPeriod(account_id=account_id, kind=kind, start_ms=start, spent_micros=0, held_micros=0)
                session.add(row)
            rows.append(row)
        session.flush()
        return rows

    def _call_spend_rows(self, session: Session, r: Reservation) -> list[SpendPeriod]:
        """The counters the call counts on: none when its account had no cap at its authorize."""
        if not r.spend_day_ms and not r.spend_month_ms:
            return []
        return self._spend_rows(session, r.account_id, SpendPeriods(r.spend_day_ms, r.spend_month_ms))

    @staticmethod
    def _commit_without_holds(session: Session, r: Reservation, bundle: BundleSettle) -> None:
        """A call whose holds were lost with its reservation (a cache restart): take its covered
        seconds from what the periods have left, in draw order; what none has left goes to the
        first (the call did use them, and the periods must not give them out again)."""
        if not bundle.slots or bundle.covered_s <= 0:
            return
        periods = [open_period(session, r.account_id, slot) for slot in bundle.slots]
        used = commit([max(p.granted_s - p.used_s - p.reserved_s, 0) for p in periods], bundle.covered_s)
        for period, slot, seconds in zip(periods, bundle.slots, used, strict=True):
            post_use(session, r.account_id, r.call_id, period, slot, seconds)
        r.bundle_used_s = r.bundle_held_s = bundle.covered_s

    @staticmethod
    def _commit_bundles_late(session: Session, r: Reservation, covered_s: int) -> None:
        """A settle after the call's holds closed (expiry, release): what it used beyond what
        the close committed, on the periods in order, up to each one's hold first."""
        extra = covered_s - r.bundle_used_s
        holds = load_holds(r.bundle_slots)
        if extra <= 0 or not holds:
            return
        room = commit([held for _, held in holds], r.bundle_used_s)
        used = commit([max(held - done, 0) for (_, held), done in zip(holds, room, strict=True)], extra)
        for (slot, _), seconds in zip(holds, used, strict=True):
            post_use(session, r.account_id, r.call_id, open_period(session, r.account_id, slot), slot, seconds,
                     late=True)
        r.bundle_used_s = covered_s

    def _settle_without_reservation(self, session: Session, call_id: str, seq: int, cost: int, now_ms: int,
                                    account_hint: str | None, bundle: BundleSettle | None = None) -> SettleOutcome:
        if account_hint is None:
            raise UnknownCall(f"settle of unknown call {call_id!r}: no reservation and no account to charge")
        if self._lock_account(session, account_hint) is None:
            raise NotFound(f"settle of call {call_id!r}: unknown account {account_hint!r}")
        log.warning("settle without reservation call=%s account=%s cost_micros=%d: charged in full", call_id,
                    account_hint, cost)
        now = ms_to_datetime(now_ms)
        r = Reservation(call_id=call_id, account_id=account_hint, node="", state="settled", seq=seq,
                        granted_micros=0, last_debit_micros=0, auth_granted_micros=0, auth_available_micros=0,
                        reserved_micros=0, debited_micros=0, overrun_micros=cost, cost_micros=cost,
                        created_at=now, expires_at=now, closed_at=now)
        session.add(r)
        if bundle is not None:
            self._commit_without_holds(session, r, bundle)
        session.flush()
        self._post(session, r)
        return SettleOutcome(call_id, account_hint, SettleStatus.WITHOUT_RESERVATION, cost, 0, 0, cost,
                             bundle_used_s=r.bundle_used_s)

    def release(self, call_id: str, seq: int, now_ms: int, *, account_id: str | None = None) -> ReleaseOutcome:
        check_call_id(call_id)
        return self._run_plain(lambda s: self._close(s, call_id, seq, now_ms, "released"))

    def _close(self, session: Tx, call_id: str, seq: int, now_ms: int, state: str) -> ReleaseOutcome:
        """Release (or expire) an open reservation; its nibble debits are charged."""
        plain = self._close_plain(session, call_id, seq, now_ms, state)
        if isinstance(plain, ReleaseOutcome):
            return plain
        session = self._orm(session)  # the entity path
        r, account = self._lock_call_and_account(session, call_id)
        if r is None or account is None:
            return ReleaseOutcome(call_id, ReleaseStatus.UNKNOWN_CALL)
        if r.state != "open":
            replay = r.state == state == "released"
            return ReleaseOutcome(call_id, ReleaseStatus.REPLAYED if replay else ReleaseStatus.CLOSED, 0,
                                  r.closed_charge_micros or 0)
        if state == "expired" and datetime_to_ms(r.expires_at) > now_ms:
            return ReleaseOutcome(call_id, ReleaseStatus.CLOSED)  # renewed since the sweep looked
        released = r.reserved_micros
        account.reserved_micros -= r.reserved_micros + r.debited_micros
        _move(self._call_spend_rows(session, r), held=-(r.reserved_micros + r.debited_micros), spent=r.debited_micros)
        self._commit_bundles(session, r, r.bundle_used_s)  # what its nibbles used; the rest goes back
        r.state, r.reserved_micros, r.closed_charge_micros = state, 0, r.debited_micros
        r.seq = max(r.seq, seq)
        r.closed_at = ms_to_datetime(now_ms)
        session.flush()
        self._post(session, r)
        return ReleaseOutcome(call_id, ReleaseStatus.RELEASED, released, r.debited_micros)

    def expire(self, now_ms: int, *, limit: int = 1000) -> ExpireReport:
        now = ms_to_datetime(now_ms)
        candidates = self._run(lambda s: list(s.scalars(
            select(Reservation.call_id).where(Reservation.state == "open", Reservation.expires_at <= now)
            .order_by(Reservation.expires_at).limit(limit))))
        expired: list[str] = []
        for call_id in candidates:
            outcome = self._run_plain(lambda s, c=call_id: self._close(s, c, 0, now_ms, "expired"))  # type: ignore[misc]
            if outcome.status is ReleaseStatus.RELEASED:
                log.warning("reservation expired call=%s released_micros=%d charged_micros=%d", call_id,
                            outcome.released_micros, outcome.charged_micros)
                expired.append(call_id)
        return ExpireReport(tuple(expired), posted=len(expired), pending=0)

    # ------------------------------------------------------------------ warm-up

    def warm_up(self, account_id: str, node: str, now_ms: int) -> bool:
        """A made-up call of one micro-unit on ``account_id``, authorized, nibbled and settled
        in one transaction that is rolled back: nothing stays, and every statement of a plain
        call has been compiled (SQLAlchemy's cache, the driver statements) before the first real
        call pays for it (agent/adapters/sql/warm_up.py). False: the account could not carry it
        (refused, no money, caps or bundles: another path); what ran is compiled all the same."""
        call_id = f"warm-up:{uuid.uuid4().hex}"
        with self._sessions() as session:
            session.begin()
            try:
                authorized = self._authorize(session, account_id, call_id, node, 1, 0, now_ms, 60_000)
                if not authorized.allowed or authorized.granted_micros < 1:
                    return False
                nibbled = self._nibble(session, NibbleRequest(call_id, 1, 1, 0, now_ms, 60_000, account_id))
                if not nibbled.applied:
                    return False
                return isinstance(self._close_plain(session, call_id, 2, now_ms, "settled", 1), SettleOutcome)
            finally:
                session.rollback()

    # ------------------------------------------------------------------ views

    def live_calls(self) -> list[LiveCall]:
        def work(session: Session) -> list[LiveCall]:
            rows = session.scalars(select(Reservation).where(Reservation.state == "open")
                                   .order_by(Reservation.created_at))
            return [LiveCall(r.account_id, r.call_id, r.node, r.seq, r.reserved_micros, r.debited_micros,
                             r.overrun_micros, datetime_to_ms(r.created_at), datetime_to_ms(r.expires_at),
                             r.bundle_held_s, r.bundle_used_s)
                    for r in rows]

        return self._run(work)

    def bundle_periods(self, account_id: str) -> dict[tuple[int, int], PeriodState]:
        return self._run(lambda s: periods_of(s, account_id))

    def account_state(self, account_id: str) -> AccountState:
        def work(session: Session) -> AccountState:
            account = session.get(Account, account_id)
            if account is None:
                raise NotFound(f"unknown account {account_id!r}")
            plan = session.get(RatePlan, account.rate_plan_id)
            live, debited = session.execute(
                select(func.count(), func.coalesce(func.sum(Reservation.debited_micros), 0))
                .where(Reservation.account_id == account_id, Reservation.state == "open")).one()
            overrun = session.scalar(select(func.coalesce(func.sum(Reservation.overrun_micros), 0))
                                     .where(Reservation.account_id == account_id)) or 0
            return AccountState(
                account_id=account_id, status=account.status,
                balance_micros=account.balance_micros - int(debited),
                reserved_micros=account.reserved_micros - int(debited),
                credit_limit_micros=account.credit_limit_micros,
                max_concurrent_calls=account.max_concurrent_calls, live_calls=int(live),
                plan=plan.name if plan is not None else "", currency=account.currency,
                overrun_micros=int(overrun))

        return self._run(work)

    def shard_of(self, account_id: str) -> str:
        return ""  # one database: one shard

    def close(self) -> None:
        """The engine belongs to the caller."""
