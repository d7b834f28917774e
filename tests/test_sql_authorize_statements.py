"""The embedded SQL store's authorization is in every call's post-dial delay: it runs a fixed,
short list of statements (no ORM entity loaded or flushed for an account without bundles or
caps), and counts the live calls only for an account with a call limit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.plans import create_plan
from agent.core.errors import Conflict

T0 = 1_800_000_000_000
UNIT = 1_000_000


TRACE: list[str] = []  # every statement SQLite ran, as its trace callback saw it


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    found = make_engine(f"sqlite:///{tmp_path}/ledger.db")
    # SQLite's own trace: the store runs its hot statements on the driver's cursor, past
    # SQLAlchemy's events (agent/adapters/sql/driver_statements.py).
    event.listen(found, "connect", lambda dbapi, _record: dbapi.set_trace_callback(TRACE.append))
    upgrade(found)
    with transaction(session_factory(found)) as s:
        create_plan(s, "retail", currency="EUR")
        repo.create_account(s, "plain", plan="retail", balance_micros=10 * UNIT)
        repo.create_account(s, "limited", plan="retail", balance_micros=10 * UNIT, max_concurrent_calls=1)
    yield found
    found.dispose()


def _statements(engine: Engine, run: Any) -> list[str]:
    TRACE.clear()
    run()
    return [" ".join(statement.split())[:60] for statement in TRACE]


def test_an_authorization_is_six_statements_and_a_commit_and_a_call_limit_adds_the_count(engine: Engine) -> None:
    store = SqlBalanceStore(session_factory(engine))
    plain = _statements(engine, lambda: store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000))
    assert [s.split()[0] for s in plain] == ["BEGIN", "SELECT", "SELECT", "SELECT", "INSERT", "UPDATE",
                                                "COMMIT"], plain
    assert not any("count(" in s.lower() for s in plain)
    limited = _statements(engine, lambda: store.authorize("limited", "c2", "n1", UNIT, UNIT, T0, 60_000))
    assert sum("count(" in s.lower() for s in limited) == 1, limited
    second = store.authorize("limited", "c3", "n1", UNIT, UNIT, T0 + 1, 60_000)
    assert (second.allowed, str(second.reason)) == (False, "max_calls")  # the count still binds
    assert store.account_state("plain").reserved_micros == UNIT


def test_a_replayed_authorization_writes_nothing(engine: Engine) -> None:
    store = SqlBalanceStore(session_factory(engine))
    first = store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000)
    again = _statements(engine, lambda: store.authorize("plain", "c1", "n1", 2 * UNIT, UNIT, T0 + 5, 60_000))
    assert not any(s.split()[0] in ("INSERT", "UPDATE") for s in again), again
    replay = store.authorize("plain", "c1", "n1", 2 * UNIT, UNIT, T0 + 5, 60_000)
    assert (replay.replayed, replay.granted_micros) == (True, first.granted_micros)
    assert store.account_state("plain").reserved_micros == UNIT


def test_a_nibble_batch_mixing_plain_and_bundle_calls_of_one_account_keeps_its_money_exact(
        engine: Engine) -> None:
    """On SQLite a batch of nibbles is one transaction: a bundle call's nibble loads the account
    as an entity, a plain call's updates it with a statement, the next bundle call's must see
    that update (a stale entity would write the account's held money back without it)."""
    from sqlalchemy import func, select

    from agent.adapters.sql.models import Account, Bundle, BundleGrant, Reservation
    from agent.core.balance import NibbleRequest
    from agent.core.bundles import BundleSlot

    day_ms = 86_400_000
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        repo.create_account(s, "mix", plan="retail", balance_micros=100 * UNIT)
        bundle = Bundle(name="free", seconds=90, period="month", anchor=1, rollover=False)
        s.add(bundle)
        s.flush()
        found = BundleGrant(account_id="mix", bundle_id=bundle.id, valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                            reference="grant-mix")
        s.add(found)
        s.flush()
        grant_id = found.id
    slot = BundleSlot(grant_id, T0 - 10 * day_ms, 90, T0 + 20 * day_ms, None)
    store = SqlBalanceStore(sessions)
    ttl = 600_000
    b1 = store.authorize("mix", "b1", "n1", UNIT, UNIT, T0, ttl, bundle_slots=[slot], bundle_want_s=60)
    b2 = store.authorize("mix", "b2", "n1", UNIT, UNIT, T0, ttl, bundle_slots=[slot], bundle_want_s=60)
    p1 = store.authorize("mix", "p1", "n1", 2 * UNIT, UNIT, T0, ttl)
    assert (b1.bundle_granted_s, b2.bundle_granted_s, p1.granted_micros) == (60, 30, 2 * UNIT)
    now = T0 + 60_000
    outs = store.debit_and_reserve_many([
        NibbleRequest("b1", 1, 0, UNIT, now, ttl, bundle_used_s=60, bundle_want_s=60),  # out of seconds: money
        NibbleRequest("p1", 1, UNIT, 2 * UNIT, now, ttl),
        NibbleRequest("b2", 1, UNIT, UNIT, now, ttl, bundle_used_s=30, bundle_want_s=60)])
    assert [o.status.value for o in outs] == ["granted"] * 3
    with transaction(sessions) as s:
        held = s.scalar(select(func.sum(Reservation.reserved_micros + Reservation.debited_micros))
                        .where(Reservation.account_id == "mix", Reservation.state == "open"))
        reserved = s.scalar(select(Account.reserved_micros).where(Account.id == "mix"))
    assert reserved == held, (reserved, held)
    assert held == UNIT + (2 * UNIT + UNIT) + (UNIT + b2.granted_micros)


def _ledger_ok(engine: Engine) -> None:
    """Balances equal their ledger, held money equals the open calls' (no CDRs here: the charges'
    own check needs them)."""
    from agent.adapters.sql.reconcile import Report, check_balances, check_reserved

    report = Report()
    with transaction(session_factory(engine)) as s:
        check_balances(s, report)
        check_reserved(s, report, 10)
    assert report.ok, report.problems


def test_a_plain_settle_release_and_expiry_are_core_statements_and_keep_the_ledger_exact(engine: Engine) -> None:
    """Every call closes once, on SQLite in the daemon's loop: a call without bundle holds or
    spend counters settles (or is released, or expires) in a fixed list of statements, no entity."""
    from agent.core.balance import ReleaseStatus, SettleStatus

    store = SqlBalanceStore(session_factory(engine))
    store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000)
    store.debit_and_reserve("c1", 1, UNIT // 2, UNIT, T0 + 1_000, 60_000)
    settle = _statements(engine, lambda: store.settle("c1", 2, 2 * UNIT, T0 + 2_000))
    assert [s.split()[0] for s in settle] == [
        "BEGIN", "SELECT", "SELECT", "SELECT", "SELECT", "UPDATE", "INSERT", "UPDATE", "COMMIT"], settle
    # held 1.5 (0.5 debited + 1 reserved), cost 2: 0.5 overrun, charged in full
    replay = store.settle("c1", 2, 2 * UNIT, T0 + 3_000)
    assert (replay.status, replay.cost_micros, replay.overrun_micros) == (SettleStatus.REPLAYED, 2 * UNIT, UNIT // 2)
    state = store.account_state("plain")
    assert (state.balance_micros, state.reserved_micros) == (8 * UNIT, 0)

    store.authorize("plain", "c2", "n1", UNIT, UNIT, T0, 60_000)
    store.debit_and_reserve("c2", 1, UNIT // 4, UNIT, T0 + 1_000, 60_000)
    release = store.release("c2", 2, T0 + 2_000)
    assert (release.status, release.released_micros, release.charged_micros) == (
        ReleaseStatus.RELEASED, UNIT, UNIT // 4)
    store.authorize("plain", "c3", "n1", UNIT, UNIT, T0, 60_000)  # never nibbled: nothing charged
    quiet = _statements(engine, lambda: store.release("c3", 1, T0 + 2_000))
    assert not any(s.startswith("INSERT") for s in quiet), quiet
    store.authorize("plain", "c4", "n1", UNIT, UNIT, T0, 60_000)
    assert store.expire(T0 + 59_000).expired == ()  # not yet
    assert store.expire(T0 + 60_000).expired == ("c4",)
    late = store.settle("c2", 3, UNIT, T0 + 5_000)  # after its release: the entity path adjusts
    assert late.status is SettleStatus.AFTER_EXPIRY
    state = store.account_state("plain")
    assert (state.balance_micros, state.reserved_micros, state.live_calls) == (
        8 * UNIT - UNIT, 0, 0)
    _ledger_ok(engine)


def test_a_settle_whose_charge_reference_is_taken_is_refused_as_before(engine: Engine) -> None:
    """The Core path never writes a second entry under a reference: another movement under the
    call's charge reference is refused, and nothing of the close is written."""
    store = SqlBalanceStore(session_factory(engine))
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        repo.post_entry(s, "plain", kind="adjustment", amount_micros=-UNIT, reference="charge:c9")
    store.authorize("plain", "c9", "n1", UNIT, UNIT, T0, 60_000)
    with pytest.raises(Conflict):
        store.settle("c9", 1, UNIT, T0 + 1_000)
    state = store.account_state("plain")
    assert (state.balance_micros, state.reserved_micros) == (9 * UNIT, UNIT)  # nothing half-written


def test_post_entries_keeps_a_repeated_movement_refuses_another_and_chains_the_balances(engine: Engine) -> None:
    """The Core posting both stores close calls with (the SQL store's settle, the Redis store's
    ledger poster): idempotent per reference as ``post_entry`` is, balances after in order."""
    from sqlalchemy import select

    from agent.adapters.sql.models import Account, LedgerEntry
    from agent.core.balance import LedgerPosting

    sessions = session_factory(engine)
    first = [LedgerPosting("charge", -UNIT, "charge:x1", "call"),
             LedgerPosting("adjustment", UNIT // 4, "charge-late:x1", "late")]
    with transaction(sessions) as s:
        assert repo.post_entries(s, "plain", first, call_id="x1") == [True, True]
    with transaction(sessions) as s:  # a replay: nothing new, nothing moved
        assert repo.post_entries(s, "plain", first, call_id="x1") == [False, False]
    with transaction(sessions) as s:
        rows = s.execute(select(LedgerEntry.reference, LedgerEntry.balance_after_micros)
                         .where(LedgerEntry.call_id == "x1").order_by(LedgerEntry.id)).all()
        balance = s.scalar(select(Account.balance_micros).where(Account.id == "plain"))
    assert [tuple(r) for r in rows] == [("charge:x1", 9 * UNIT), ("charge-late:x1", 9 * UNIT + UNIT // 4)]
    assert balance == 9 * UNIT + UNIT // 4
    with pytest.raises(Conflict), transaction(sessions) as s:
        repo.post_entries(s, "plain", [LedgerPosting("charge", -2 * UNIT, "charge:x1", "call")], call_id="x1")
    with pytest.raises(Conflict), transaction(sessions) as s:  # the same reference on another account
        repo.post_entries(s, "limited", [first[0]], call_id="x1")
    _ledger_ok(engine)


class _CountingSessions(sessionmaker[Session]):
    """A session factory that counts the sessions it makes."""

    made = 0

    def __call__(self, **local_kw: Any) -> Session:
        type(self).made += 1
        return super().__call__(**local_kw)


def test_the_plain_steps_run_without_an_orm_session_and_the_others_fall_back_to_one(engine: Engine) -> None:
    """On SQLite an authorization, a nibble batch and a close of a plain call are one raw
    transaction each (no session made: its machinery was a third of an authorization); a step
    that needs entities (a capped account's spend counters) is rolled back and run in a session,
    with the same money."""
    sessions = _CountingSessions(engine, expire_on_commit=False)
    store = SqlBalanceStore(sessions)
    _CountingSessions.made = 0
    assert store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000).allowed
    assert store.debit_and_reserve("c1", 1, UNIT // 2, UNIT, T0 + 6_000, 60_000).applied
    assert store.settle("c1", 2, UNIT, T0 + 9_000).cost_micros == UNIT
    assert _CountingSessions.made == 0
    assert store.release("nobody", 1, T0).status.name == "UNKNOWN_CALL"  # the entity path says so
    _CountingSessions.made = 0

    with transaction(session_factory(engine)) as s:
        repo.set_limits(s, "plain", daily_micros=5 * UNIT)
    capped = store.authorize("plain", "c2", "n1", UNIT, UNIT, T0 + 10_000, 60_000)
    assert capped.allowed and _CountingSessions.made == 1  # the spend counters: the session path
    store.settle("c2", 1, UNIT // 2, T0 + 12_000)
    state = store.account_state("plain")
    assert (state.balance_micros, state.reserved_micros, state.live_calls) == (10 * UNIT - UNIT - UNIT // 2, 0, 0)


def test_a_refused_step_on_a_raw_transaction_leaves_nothing_open(engine: Engine) -> None:
    store = SqlBalanceStore(session_factory(engine))
    store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000)
    with pytest.raises(Conflict):  # the same call id on another account: refused mid-transaction
        store.authorize("limited", "c1", "n1", UNIT, UNIT, T0, 60_000)
    # rolled back: the next steps take the write lock at once and the money is as it was
    assert store.authorize("limited", "c2", "n1", UNIT, UNIT, T0 + 1, 60_000).allowed
    assert store.account_state("limited").reserved_micros == UNIT
    assert store.account_state("plain").reserved_micros == UNIT


def test_a_locked_database_on_a_raw_transaction_is_the_store_unavailable(tmp_path: Path) -> None:
    """A driver error in a raw transaction is classified as the session path classifies it:
    a write lock held past the busy timeout makes the store unavailable (the guard's circuit
    and journal then decide), not a crash with sqlite3's own exception."""
    import sqlite3

    from agent.core.balance import StoreUnavailable

    locked = make_engine(f"sqlite:///{tmp_path}/locked.db")
    upgrade(locked)
    with transaction(session_factory(locked)) as s:
        create_plan(s, "retail", currency="EUR")
        repo.create_account(s, "plain", plan="retail", balance_micros=10 * UNIT)
    event.listen(locked, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA busy_timeout=50"))
    locked.dispose()  # the next connections get the short timeout
    store = SqlBalanceStore(session_factory(locked))
    holder = sqlite3.connect(str(tmp_path / "locked.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000).allowed  # and back once free
    locked.dispose()
