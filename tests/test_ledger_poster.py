"""The daemon's Redis store writes closed calls to the SQL ledger off the store deadline.

A busy database used to make settles miss the 250 ms deadline (the ledger post ran inside it):
the guard opened its circuit and, under fail_closed, live calls were cut (bench_nodes.py). Here
the database is made slow for real: another transaction holds the account's row lock in
PostgreSQL, and the store's own connections give up waiting after a lock_timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from agent.adapters.redis.store import RETRY_PENDING_MS, RedisBalanceStore, make_client
from agent.adapters.sql.models import Account
from agent.core.balance import SettleStatus
from agent.services.clock import ManualClock
from agent.services.store_guard import StoreGuard
from tests.balance_helpers import T0, UNIT, World, postgres_redis_world

TTL = 60_000
LOCK_TIMEOUT_MS = 500


@pytest.fixture
def w(postgres_url: str, redis_url_single: str) -> Iterator[World]:
    # The store's connections wait at most LOCK_TIMEOUT_MS for a row lock: a post that waits on
    # the lock held below fails (SQL refused) instead of hanging the test.
    yield from postgres_redis_world(postgres_url, redis_url_single,
                                    connect_args={"options": f"-c lock_timeout={LOCK_TIMEOUT_MS}"})


def _store(w: World, *, post_later: bool) -> RedisBalanceStore:
    assert w.redis_prefix is not None
    store = RedisBalanceStore(make_client(w.redis_url, 250), w.sessions, key_prefix=w.redis_prefix,
                              post_later=post_later)
    w.opened.append(store)
    return store


class RowLock:
    """Another client holding an account's row lock, as a long report or a stuck writer would."""

    def __init__(self, w: World, account_id: str) -> None:
        self.session = Session(w.engine)
        self.session.begin()
        self.session.execute(select(Account).where(Account.id == account_id).with_for_update())

    def release(self) -> None:
        self.session.rollback()
        self.session.close()


def test_a_settle_answers_within_the_deadline_while_the_database_holds_the_account_and_posts_after(
        w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = _store(w, post_later=True)
    guard = StoreGuard(store, clock=ManualClock(T0), timeout_ms=250)
    assert guard.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL).allowed
    lock = RowLock(w, "alice")
    try:
        started = time.monotonic()
        out = guard.settle("c1", 1, 3 * UNIT // 2, T0 + 9000)
        took_s = time.monotonic() - started
        assert out.status is SettleStatus.SETTLED, out
        assert took_s < 0.25, f"the settle waited {took_s:.3f} s for SQL"
        assert guard.available, "a slow database must not open the balance store's circuit"
        assert store.account_state("alice").balance_micros == 10 * UNIT - 3 * UNIT // 2  # Redis has it
        assert store.ledger_backlog == 1
        assert w.entries("c1") == []  # SQL does not yet
    finally:
        lock.release()
    assert store.flush_ledger(5.0)
    assert [(kind, amount) for kind, amount, _ in w.entries("c1")] == [("charge", -3 * UNIT // 2)]
    assert w.sql_balance("alice") == 10 * UNIT - 3 * UNIT // 2
    assert store.ledger_backlog == 0
    assert store.expire(T0 + 10 * TTL).pending == 0  # nothing left for the sweeper
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_a_post_the_database_refused_is_written_once_by_another_nodes_sweeper(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    node_a, node_b = _store(w, post_later=True), _store(w, post_later=True)
    assert node_a.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL).allowed
    lock = RowLock(w, "alice")
    try:
        assert node_a.settle("c1", 1, UNIT, T0 + 5000).status is SettleStatus.SETTLED
        assert node_a.flush_ledger(5.0)  # the post ran and met the lock: refused after lock_timeout
        assert w.entries("c1") == []
    finally:
        lock.release()
    assert node_b.expire(T0 + 5000).pending == 0, "not due yet: the poster has its chance first"
    report = node_b.expire(T0 + 5000 + RETRY_PENDING_MS + 1)
    assert (report.posted, report.pending) == (0, 1)  # queued for node b's poster
    assert node_b.flush_ledger(5.0)
    assert [(kind, amount) for kind, amount, _ in w.entries("c1")] == [("charge", -UNIT)]
    assert node_b.expire(T0 + 10 * TTL).pending == 0
    assert node_a.expire(T0 + 10 * TTL).pending == 0
    assert w.sql_balance("alice") == 9 * UNIT
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_closing_the_store_writes_what_it_queued(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = _store(w, post_later=True)
    for i in range(20):
        assert store.authorize("alice", f"c{i}", "n1", UNIT // 10, UNIT // 10, T0, TTL).allowed
    for i in range(20):
        store.settle(f"c{i}", 1, UNIT // 10, T0 + 3000)
    store.close()
    w.opened.remove(store)
    assert w.sql_balance("alice") == 10 * UNIT - 20 * (UNIT // 10)
    with w.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM ledger_entries WHERE kind = 'charge'")) == 20
