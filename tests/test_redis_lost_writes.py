"""Redis loses the last writes of a dead master (replication is asynchronous) or of a restart
from an older dump; the SQL ledger, written after each step, is the truth.

Each test takes a snapshot of every key of its world (DUMP, with TTLs), lets a step reach Redis
and the ledger, then puts the snapshot back: exactly what a replica that had not received that
step holds once it is promoted. Then it checks that the money is still exact: the ledger is not
written twice or refused, and the account's Redis balance comes back to the ledger's.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import redis

from agent.adapters.redis.store import RedisBalanceStore
from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import transaction
from agent.core.balance import SettleStatus
from tests.balance_helpers import T0, UNIT, World, postgres_redis_world

TTL = 60_000


@pytest.fixture
def w(postgres_url: str, redis_url_single: str) -> Iterator[World]:
    yield from postgres_redis_world(postgres_url, redis_url_single)


class Snapshot:
    """Every key of the world as it is now, to be put back later (the promoted replica)."""

    def __init__(self, w: World) -> None:
        self.w = w
        raw = redis.Redis.from_url(w.redis_url)  # bytes: DUMP's payload is binary
        self.keys: dict[bytes, tuple[bytes, int]] = {}
        for key in raw.scan_iter(match=f"{w.redis_prefix}*".encode(), count=1000):
            self.keys[key] = (raw.dump(key), max(0, int(raw.pttl(key))))
        raw.close()

    def put_back(self) -> None:
        self.w.wipe_redis()
        raw = redis.Redis.from_url(self.w.redis_url)
        for key, (value, pttl) in self.keys.items():
            raw.restore(key, pttl, value)
        raw.close()


def _store(w: World) -> RedisBalanceStore:
    store = w.store()
    assert isinstance(store, RedisBalanceStore)
    return store


def test_a_settle_lost_by_redis_but_in_the_ledger_stands_and_the_balance_comes_back(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    w.account("alice", balance=10 * UNIT)
    store = _store(w)
    assert store.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL).allowed
    store.debit_and_reserve("c1", 1, 2 * UNIT, 2 * UNIT, T0 + 30_000, TTL)
    before_settle = Snapshot(w)
    assert store.settle("c1", 2, 3 * UNIT, T0 + 45_000).status is SettleStatus.SETTLED
    assert w.sql_balance("alice") == 7 * UNIT
    before_settle.put_back()  # the settle is lost: Redis has the call open, 2 debited, 2 held
    assert store.account_state("alice").balance_micros == 8 * UNIT

    with caplog.at_level(logging.WARNING):
        report = store.expire(T0 + 30_000 + 2 * TTL)  # its reservation expires: the sweeper closes it
    assert report.expired == ("c1",) and report.pending == 0, report
    assert w.entries("c1") == [("charge", -3 * UNIT, "charge:c1")], "the ledger's settle stands, nothing doubled"
    assert w.sql_balance("alice") == 7 * UNIT
    state = store.account_state("alice")
    assert (state.balance_micros, state.reserved_micros) == (7 * UNIT, 0), state
    assert "a step lost with a Redis master" in caplog.text
    assert store.expire(T0 + 30_000 + 3 * TTL).pending == 0, "the call must not come back at every sweep"
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_an_expiry_lost_by_redis_then_the_late_settle_is_charged_once_with_its_adjustment(w: World) -> None:
    w.account("bob", balance=10 * UNIT)
    store = _store(w)
    assert store.authorize("bob", "c2", "n1", 2 * UNIT, UNIT, T0, TTL).allowed
    store.debit_and_reserve("c2", 1, 2 * UNIT, 2 * UNIT, T0 + 30_000, TTL)
    before_expiry = Snapshot(w)
    assert store.expire(T0 + 30_000 + 2 * TTL).expired == ("c2",)  # posted: charge:c2 = the 2 debited
    assert w.entries("c2") == [("charge", -2 * UNIT, "charge:c2")]
    before_expiry.put_back()  # the expiry is lost: Redis has the call open again

    out = store.settle("c2", 2, UNIT + UNIT // 2, T0 + 200_000)  # the node settles it: 1.50
    assert out.status is SettleStatus.SETTLED, out
    assert w.entries("c2") == [("charge", -2 * UNIT, "charge:c2"),
                               ("adjustment", UNIT // 2, "charge-late:c2")], "charged once: the 1.50 it cost"
    assert w.sql_balance("bob") == 10 * UNIT - (UNIT + UNIT // 2)
    state = store.account_state("bob")
    assert (state.balance_micros, state.reserved_micros) == (w.sql_balance("bob"), 0), state
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_a_settle_lost_before_any_nibble_is_closed_by_the_rebuild_as_the_ledger_has_it(w: World) -> None:
    """Settled inside its first slice (no nibble debited anything), then the settle is lost: the
    promoted replica has the call open with nothing applied. The rebuild of the promotion must
    close it at the ledger's charge; left open, the expiry closed it with nothing to post and
    Redis kept the balance 1.50 above the ledger's."""
    w.account("frank", balance=10 * UNIT)
    store = _store(w)
    assert store.authorize("frank", "c6", "n1", 2 * UNIT, UNIT, T0, TTL).allowed
    before_settle = Snapshot(w)
    assert store.settle("c6", 1, UNIT + UNIT // 2, T0 + 20_000).status is SettleStatus.SETTLED
    assert w.sql_balance("frank") == 10 * UNIT - (UNIT + UNIT // 2)
    before_settle.put_back()

    store.rebuild("frank")  # what the sweep does for the accounts of a promoted replica
    state = store.account_state("frank")
    assert (state.balance_micros, state.reserved_micros) == (w.sql_balance("frank"), 0), state
    assert [c.call_id for c in store.live_calls()] == [], "the call is over: no reservation, not live"
    report = store.expire(T0 + 2 * TTL)
    assert report.expired == () and report.pending == 0, report
    replay = store.settle("c6", 1, UNIT + UNIT // 2, T0 + 21_000)  # the node's retry of its lost reply
    assert replay.status is SettleStatus.REPLAYED, replay
    assert w.entries("c6") == [("charge", -(UNIT + UNIT // 2), "charge:c6")]
    assert store.account_state("frank").balance_micros == w.sql_balance("frank")
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_a_call_open_again_after_a_lost_expiry_stays_open_through_a_rebuild_and_settles_once(w: World) -> None:
    """The ledger has the call's expiry charge, Redis has it open (the expiry was lost): the node
    may still settle it, so the rebuild keeps it open and the settle adds the late adjustment."""
    w.account("gina", balance=10 * UNIT)
    store = _store(w)
    assert store.authorize("gina", "c7", "n1", 2 * UNIT, UNIT, T0, TTL).allowed
    store.debit_and_reserve("c7", 1, 2 * UNIT, 2 * UNIT, T0 + 30_000, TTL)
    before_expiry = Snapshot(w)
    assert store.expire(T0 + 30_000 + 2 * TTL).expired == ("c7",)
    before_expiry.put_back()

    store.rebuild("gina")
    assert [c.call_id for c in store.live_calls()] == ["c7"]
    out = store.settle("c7", 2, 3 * UNIT, T0 + 200_000)
    assert out.status is SettleStatus.SETTLED, out
    assert w.entries("c7") == [("charge", -2 * UNIT, "charge:c7"), ("adjustment", -UNIT, "charge-late:c7")]
    assert w.sql_balance("gina") == 7 * UNIT
    state = store.account_state("gina")
    assert (state.balance_micros, state.reserved_micros) == (7 * UNIT, 0), state
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_a_top_up_lost_by_redis_comes_back_with_the_rebuild(w: World) -> None:
    w.account("carol", balance=UNIT)
    store = _store(w)
    assert store.authorize("carol", "c3", "n1", UNIT, UNIT, T0, TTL).allowed
    before_topup = Snapshot(w)
    with transaction(w.sessions) as s:
        repo.topup(s, "carol", 5 * UNIT, reference="t1")
    assert store.refresh("carol")
    assert store.account_state("carol").balance_micros == 6 * UNIT
    before_topup.put_back()
    assert store.account_state("carol").balance_micros == UNIT, "the top-up is lost in Redis"
    store.rebuild("carol")
    assert store.account_state("carol").balance_micros == 6 * UNIT


def test_a_new_replication_id_rebuilds_once_across_nodes_and_again_after_a_failed_attempt(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's side of a promotion on one Redis (a Sentinel failover, a restart): the ids are
    the real server's until the test swaps them for what a promoted replica would answer."""
    from sqlalchemy.exc import OperationalError

    from agent.core.balance import StoreUnavailable

    w.account("dave", balance=UNIT)
    node1, node2 = _store(w), _store(w)
    assert node1.authorize("dave", "c4", "n1", UNIT, UNIT, T0, TTL).allowed
    assert node1.expire(T0).rebuilt == 0 and node2.expire(T0).rebuilt == 0  # the ids as they are
    with transaction(w.sessions) as s:
        repo.topup(s, "dave", 5 * UNIT, reference="t2")  # in SQL; Redis never hears of it (lost)
    assert node1.account_state("dave").balance_micros == UNIT

    promoted = [("a-new-replication-id-" + uuid.uuid4().hex, None)]
    monkeypatch.setattr(node1, "_replication_ids", lambda: promoted)
    monkeypatch.setattr(node2, "_replication_ids", lambda: promoted)
    real_query = node1._accounts_changed_since

    def sql_down(since_ms: int, slots: set[int] | None) -> list[str]:
        raise OperationalError("select", {}, Exception("connection refused"))

    monkeypatch.setattr(node1, "_accounts_changed_since", sql_down)
    with pytest.raises(StoreUnavailable):
        node1.expire(T0 + 1)  # SQL away at the sweep that sees the promotion: nothing claimed
    monkeypatch.setattr(node1, "_accounts_changed_since", real_query)
    assert node1.expire(T0 + 2).rebuilt == 1, "the next sweep rebuilds"
    assert node1.account_state("dave").balance_micros == 6 * UNIT
    assert node2.expire(T0 + 3).rebuilt == 0, "another node saw the same promotion: rebuilt once"
    assert node1.expire(T0 + 4).rebuilt == 0, "and once only on the node that did it"


def test_a_node_started_after_the_promotion_notices_it(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The id the sweeps saw lives in Redis itself (replicated like the balances), not in a
    daemon's memory: every node may have restarted between the promotion and the next sweep."""
    w.account("hank", balance=UNIT)
    before = _store(w)
    assert before.authorize("hank", "c8", "n1", UNIT, UNIT, T0, TTL).allowed
    assert before.expire(T0).rebuilt == 0  # the sweep of the node that ran before: the marker
    with transaction(w.sessions) as s:
        repo.topup(s, "hank", 5 * UNIT, reference="t3")  # Redis never hears of it (lost)
    before.close()

    after = _store(w)  # a daemon started after the promotion: it never saw the old id
    promoted = [("promoted-" + uuid.uuid4().hex, None)]
    monkeypatch.setattr(after, "_replication_ids", lambda: promoted)
    assert after.account_state("hank").balance_micros == UNIT
    assert after.expire(T0 + 1).rebuilt == 1
    assert after.account_state("hank").balance_micros == 6 * UNIT
    assert after.expire(T0 + 2).rebuilt == 0, "once: the marker now holds the new id"


def test_no_marker_yet_rebuilds_nothing(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new deployment, or a Redis restarted empty (every account loads from SQL when first
    used): the first sweep only writes the marker."""
    w.account("ivy", balance=UNIT)
    store = _store(w)
    w.wipe_redis()
    ids = [("fresh-" + uuid.uuid4().hex, None)]
    monkeypatch.setattr(store, "_replication_ids", lambda: ids)
    assert store.expire(T0).rebuilt == 0
    marker = store._keys.replication_marker(None)
    store._client.set(marker, "not a marker")  # written by something else: noted afresh, not read as a change
    ids[0] = ("another-" + uuid.uuid4().hex, None)
    assert store.expire(T0 + 1).rebuilt == 0
    assert str(store._client.get(marker)).startswith(ids[0][0] + " ")


def test_a_redis_that_refuses_info_still_sweeps(w: World, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Some managed Redis services rename or refuse INFO: the failover watch is off (said once),
    the sweep itself goes on."""
    w.account("erin", balance=10 * UNIT)
    store = _store(w)
    assert store.authorize("erin", "c5", "n1", UNIT, UNIT, T0, TTL).allowed

    def refused(*args: object, **kwargs: object) -> object:
        raise redis.ResponseError("unknown command 'INFO'")

    monkeypatch.setattr(store._client, "info", refused)
    with caplog.at_level(logging.WARNING):
        assert store.expire(T0 + 2 * TTL).expired == ("c5",)
        assert store.expire(T0 + 3 * TTL).rebuilt == 0
    assert caplog.text.count("INFO replication refused") == 1
