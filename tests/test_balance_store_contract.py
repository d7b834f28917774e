"""One contract, two balance stores: Redis (Lua) and SQL (SQLite, PostgreSQL, MariaDB).

Every test runs on every store; a store instance per "node" has its own connections.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from agent.core.balance import (
    DenyReason,
    NibbleRequest,
    NibbleStatus,
    ReleaseStatus,
    SettleStatus,
    UnknownCall,
)
from agent.core.errors import InvalidInput
from tests.balance_helpers import STORE_KINDS, T0, UNIT, Engines, World, world_for

TTL = 30_000


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("contract"))
    yield found
    found.dispose()


@pytest.fixture(params=STORE_KINDS)
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def assert_books_balance(w: World, account_id: str) -> None:
    """No live call left: the store, the SQL balance and the ledger all agree."""
    state = w.store().account_state(account_id)
    assert state.reserved_micros == 0 and state.live_calls == 0
    assert state.balance_micros == w.sql_balance(account_id)
    w.record_settled_calls()
    assert w.ledger_problems() == []


# ------------------------------------------------------------------------------- authorize


def test_authorize_reserves_the_first_slice_and_reports_what_was_available(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    out = w.store().authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL)
    assert (out.allowed, out.reason, out.granted_micros, out.available_micros) == (True, None, 2 * UNIT, 10 * UNIT)
    assert (out.plan, out.currency) == ("retail", "EUR")
    state = w.store().account_state("alice")
    assert (state.balance_micros, state.reserved_micros, state.available_micros) == (10 * UNIT, 2 * UNIT, 8 * UNIT)
    assert state.live_calls == 1


def test_authorize_replayed_returns_the_same_outcome_and_reserves_once(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    first = store.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL)
    again = w.store().authorize("alice", "c1", "n2", 2 * UNIT, UNIT, T0 + 5, TTL)
    assert again.replayed and again.granted_micros == first.granted_micros
    assert again.available_micros == first.available_micros
    assert w.store().account_state("alice").reserved_micros == 2 * UNIT


def test_authorize_grants_what_is_left_and_denies_below_the_minimum(w: World) -> None:
    w.account("alice", balance=3 * UNIT)
    store = w.store()
    assert store.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL).granted_micros == 2 * UNIT
    partial = store.authorize("alice", "c2", "n1", 2 * UNIT, UNIT // 2, T0, TTL)
    assert partial.allowed and partial.granted_micros == UNIT and partial.available_micros == UNIT
    denied = store.authorize("alice", "c3", "n1", 2 * UNIT, 1, T0, TTL)
    assert (denied.allowed, denied.reason, denied.granted_micros) == (False, DenyReason.INSUFFICIENT_FUNDS, 0)
    assert store.account_state("alice").reserved_micros == 3 * UNIT


def test_postpaid_credit_limit_is_spendable_and_no_further(w: World) -> None:
    w.account("corp", credit=5 * UNIT)
    store = w.store()
    out = store.authorize("corp", "c1", "n1", 9 * UNIT, UNIT, T0, TTL)
    assert out.granted_micros == 5 * UNIT
    assert store.authorize("corp", "c2", "n1", UNIT, 1, T0, TTL).reason is DenyReason.INSUFFICIENT_FUNDS


@pytest.mark.parametrize(("status", "reason"), [("suspended", DenyReason.SUSPENDED), ("closed", DenyReason.CLOSED)])
def test_suspended_and_closed_accounts_are_denied(w: World, status: str, reason: DenyReason) -> None:
    w.account("alice", balance=10 * UNIT, status=status)
    out = w.store().authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert (out.allowed, out.reason) == (False, reason)
    assert w.store().account_state("alice").reserved_micros == 0


def test_unknown_account_is_denied(w: World) -> None:
    out = w.store().authorize("nobody", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert (out.allowed, out.reason, out.granted_micros) == (False, DenyReason.UNKNOWN_ACCOUNT, 0)


def test_bad_amounts_are_refused_before_anything_is_stored(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    with pytest.raises(InvalidInput, match="less than the minimum"):
        store.authorize("alice", "c1", "n1", 1, 2, T0, TTL)
    with pytest.raises(InvalidInput, match="micro-units"):
        store.authorize("alice", "c1", "n1", -1, 0, T0, TTL)
    with pytest.raises(InvalidInput, match="call id"):
        store.authorize("alice", "", "n1", 1, 1, T0, TTL)
    assert store.account_state("alice").reserved_micros == 0


def test_max_concurrent_calls_are_counted_across_nodes(w: World) -> None:
    w.account("alice", balance=100 * UNIT, max_calls=2)
    node1, node2, node3 = w.store(), w.store(), w.store()
    assert node1.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL).allowed
    assert node2.authorize("alice", "c2", "n2", UNIT, UNIT, T0, TTL).allowed
    third = node3.authorize("alice", "c3", "n3", UNIT, UNIT, T0, TTL)
    assert (third.allowed, third.reason) == (False, DenyReason.MAX_CALLS)
    node1.settle("c1", 1, 0, T0 + 1)
    assert node3.authorize("alice", "c3", "n3", UNIT, UNIT, T0 + 2, TTL).allowed


# --------------------------------------------------------------------------------- nibbles


def test_nibble_debits_the_slice_used_and_reserves_the_next(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    out = store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 6000, TTL)
    assert (out.status, out.granted_micros, out.debited_micros, out.total_debited_micros) == (
        NibbleStatus.GRANTED, UNIT, UNIT, UNIT)
    state = store.account_state("alice")
    assert (state.balance_micros, state.reserved_micros, state.available_micros) == (9 * UNIT, UNIT, 8 * UNIT)


def test_nibble_replayed_changes_nothing_and_an_older_seq_is_stale(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    first = store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 6000, TTL)
    replay = w.store().debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 6001, TTL)
    assert replay.status is NibbleStatus.REPLAYED
    assert (replay.granted_micros, replay.debited_micros) == (first.granted_micros, first.debited_micros)
    store.debit_and_reserve("c1", 2, UNIT, UNIT, T0 + 12000, TTL)
    assert store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 12001, TTL).status is NibbleStatus.STALE
    state = store.account_state("alice")
    assert (state.balance_micros, state.reserved_micros) == (8 * UNIT, UNIT)


def test_a_partial_grant_is_all_that_is_left(w: World) -> None:
    w.account("alice", balance=5 * UNIT // 2)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 1, TTL).granted_micros == UNIT
    last = store.debit_and_reserve("c1", 2, UNIT, UNIT, T0 + 2, TTL)
    assert last.granted_micros == UNIT // 2
    assert store.account_state("alice").available_micros == 0
    assert store.debit_and_reserve("c1", 3, UNIT // 2, UNIT, T0 + 3, TTL).granted_micros == 0


def test_a_debit_beyond_the_reservation_is_charged_and_the_overrun_recorded(w: World) -> None:
    w.account("alice", balance=2 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    out = store.debit_and_reserve("c1", 1, 3 * UNIT, UNIT, T0 + 1, TTL)
    assert (out.granted_micros, out.debited_micros, out.overrun_micros) == (0, 3 * UNIT, 2 * UNIT)
    state = store.account_state("alice")
    assert (state.balance_micros, state.overrun_micros) == (-UNIT, 2 * UNIT)
    settled = store.settle("c1", 2, 3 * UNIT, T0 + 2)
    assert settled.cost_micros == 3 * UNIT
    assert w.entries("c1") == [("charge", -3 * UNIT, "charge:c1")]
    assert_books_balance(w, "alice")


def test_nibble_of_an_unknown_call_gets_nothing(w: World) -> None:
    out = w.store().debit_and_reserve("ghost", 1, UNIT, UNIT, T0, TTL)
    assert (out.status, out.granted_micros, out.debited_micros) == (NibbleStatus.UNKNOWN_CALL, 0, 0)


def test_batched_nibbles_give_the_same_outcomes_in_order(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    w.account("bob", balance=UNIT)
    store = w.store()
    store.authorize("alice", "a1", "n1", UNIT, UNIT, T0, TTL)
    store.authorize("bob", "b1", "n1", UNIT, UNIT, T0, TTL)
    outs = store.debit_and_reserve_many([
        NibbleRequest("a1", 1, UNIT, UNIT, T0 + 1, TTL), NibbleRequest("ghost", 1, UNIT, UNIT, T0 + 1, TTL),
        NibbleRequest("b1", 1, UNIT, UNIT, T0 + 1, TTL)])
    assert [(o.call_id, o.status, o.granted_micros) for o in outs] == [
        ("a1", NibbleStatus.GRANTED, UNIT), ("ghost", NibbleStatus.UNKNOWN_CALL, 0), ("b1", NibbleStatus.GRANTED, 0)]


# ---------------------------------------------------------------------------------- settle


def test_settle_charges_the_cost_once_and_releases_the_rest(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 6000, TTL)
    out = store.settle("c1", 2, 1_400_000, T0 + 8000)
    assert (out.status, out.cost_micros, out.debited_micros, out.released_micros, out.overrun_micros) == (
        SettleStatus.SETTLED, 1_400_000, UNIT, UNIT, 0)
    assert out.ledger_posted and out.account_id == "alice"
    assert w.entries("c1") == [("charge", -1_400_000, "charge:c1")]
    again = w.store().settle("c1", 2, 1_400_000, T0 + 9000)
    assert again.status is SettleStatus.REPLAYED
    conflict = store.settle("c1", 2, 5 * UNIT, T0 + 9000)
    assert conflict.status is SettleStatus.CONFLICT and conflict.cost_micros == 1_400_000
    assert w.entries("c1") == [("charge", -1_400_000, "charge:c1")]
    assert w.sql_balance("alice") == 8_600_000
    assert store.debit_and_reserve("c1", 3, UNIT, UNIT, T0 + 9001, TTL).status is NibbleStatus.CLOSED
    assert_books_balance(w, "alice")


def test_a_zero_cost_settle_still_writes_the_call_s_one_charge(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    store.settle("c1", 1, 0, T0 + 1)
    assert w.entries("c1") == [("charge", 0, "charge:c1")]
    assert_books_balance(w, "alice")


def test_settle_larger_than_the_reservation_is_charged_and_the_overrun_recorded(w: World) -> None:
    w.account("alice", balance=2 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    out = store.settle("c1", 1, 3 * UNIT, T0 + 1)
    assert (out.status, out.cost_micros, out.overrun_micros) == (SettleStatus.SETTLED, 3 * UNIT, 2 * UNIT)
    assert w.sql_balance("alice") == -UNIT
    assert store.account_state("alice").overrun_micros == 2 * UNIT
    assert_books_balance(w, "alice")


def test_settle_of_an_unknown_call_is_an_error_without_an_account(w: World) -> None:
    with pytest.raises(UnknownCall, match="ghost"):
        w.store().settle("ghost", 1, UNIT, T0)


def test_settle_of_an_unknown_call_with_its_account_charges_it_in_full(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    out = w.store().settle("lost", 3, 2 * UNIT, T0, account_id="alice")
    assert (out.status, out.cost_micros, out.overrun_micros) == (SettleStatus.WITHOUT_RESERVATION, 2 * UNIT, 2 * UNIT)
    assert w.entries("lost") == [("charge", -2 * UNIT, "charge:lost")]
    assert w.store().settle("lost", 3, 2 * UNIT, T0, account_id="alice").status is SettleStatus.REPLAYED
    assert w.sql_balance("alice") == 8 * UNIT
    assert_books_balance(w, "alice")


# ---------------------------------------------------------------------------------- release


def test_release_gives_the_reservation_back_without_a_charge(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL)
    out = store.release("c1", 1, T0 + 1)
    assert (out.status, out.released_micros, out.charged_micros) == (ReleaseStatus.RELEASED, 2 * UNIT, 0)
    assert w.store().release("c1", 1, T0 + 2).status is ReleaseStatus.REPLAYED
    assert store.release("ghost", 1, T0).status is ReleaseStatus.UNKNOWN_CALL
    assert w.entries("c1") == []
    assert_books_balance(w, "alice")
    assert w.sql_balance("alice") == 10 * UNIT


def test_release_of_a_call_that_nibbled_charges_what_was_used(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 1, TTL)
    out = store.release("c1", 2, T0 + 2)
    assert (out.released_micros, out.charged_micros) == (UNIT, UNIT)
    assert w.entries("c1") == [("charge", -UNIT, "charge:c1")]
    assert_books_balance(w, "alice")


# ----------------------------------------------------------------------------------- expiry


def test_a_reservation_not_renewed_expires_and_its_debits_are_charged_once(w: World) -> None:
    w.account("alice", balance=10 * UNIT, max_calls=1)
    node1, sweeper = w.store(), w.store()
    node1.authorize("alice", "c1", "n1", UNIT, UNIT, T0, 1000)
    node1.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 500, 1000)  # renewed until T0 + 1500
    assert sweeper.expire(T0 + 1400).expired == ()
    report = sweeper.expire(T0 + 1500)
    assert report.expired == ("c1",)
    assert sweeper.expire(T0 + 1600).expired == ()
    assert w.entries("c1") == [("charge", -UNIT, "charge:c1")]
    assert node1.debit_and_reserve("c1", 2, UNIT, UNIT, T0 + 1600, 1000).status is NibbleStatus.CLOSED
    assert node1.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 1600, 1000).allowed  # the slot is free
    node1.release("c2", 1, T0 + 1601)
    assert_books_balance(w, "alice")
    assert w.sql_balance("alice") == 9 * UNIT


def test_a_call_past_its_ttl_frees_its_slot_and_gets_no_grant_before_the_sweep(w: World) -> None:
    w.account("alice", balance=10 * UNIT, max_calls=1)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, 1000)
    assert store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 1000, 1000).status is NibbleStatus.EXPIRED
    assert store.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 1000, 1000).allowed
    assert store.settle("c1", 1, UNIT, T0 + 1001).status is SettleStatus.SETTLED
    store.release("c2", 1, T0 + 1002)
    assert_books_balance(w, "alice")


def test_settle_after_expiry_charges_the_rest_as_one_late_adjustment(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, 1000)
    store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 500, 1000)
    store.expire(T0 + 2000)
    out = store.settle("c1", 2, 1_700_000, T0 + 3000)
    assert (out.status, out.cost_micros, out.overrun_micros) == (SettleStatus.AFTER_EXPIRY, 1_700_000, 700_000)
    assert w.entries("c1") == [("charge", -UNIT, "charge:c1"), ("adjustment", -700_000, "charge-late:c1")]
    assert store.settle("c1", 2, 1_700_000, T0 + 3001).status is SettleStatus.REPLAYED
    assert len(w.entries("c1")) == 2
    assert w.sql_balance("alice") == 8_300_000
    assert_books_balance(w, "alice")


def test_an_orphan_that_never_nibbled_expires_without_a_ledger_entry(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, 1000)
    assert store.expire(T0 + 1000).expired == ("c1",)
    assert w.entries("c1") == []
    assert_books_balance(w, "alice")


def test_live_calls_lists_the_open_reservations_of_every_node(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    w.account("bob", balance=10 * UNIT)
    w.store().authorize("alice", "a1", "n1", UNIT, UNIT, T0, TTL)
    w.store().authorize("bob", "b1", "n2", 2 * UNIT, UNIT, T0 + 1, TTL)
    w.store().authorize("bob", "b2", "n2", UNIT, UNIT, T0 + 2, TTL)
    w.store().settle("b2", 1, 0, T0 + 3)
    live = w.store().live_calls()
    assert [(c.call_id, c.account_id, c.node, c.reserved_micros, c.expires_ms) for c in live] == [
        ("a1", "alice", "n1", UNIT, T0 + TTL), ("b1", "bob", "n2", 2 * UNIT, T0 + 1 + TTL)]


# ----------------------------------------------------------------------- zero overspend


def _run_call(store: object, account: str, call_id: str, rng: random.Random, slice_micros: int,
              now: list[int], lock: threading.Lock) -> int:
    """One call as the charger drives it; returns its settled cost."""
    def tick() -> int:
        with lock:
            now[0] += 1
            return now[0]

    auth = store.authorize(account, call_id, "n", slice_micros, slice_micros, tick(), 60_000)  # type: ignore[attr-defined]
    if not auth.allowed:
        return 0
    if rng.random() < 0.1:  # never answered
        store.release(call_id, 1, tick())  # type: ignore[attr-defined]
        return 0
    budget, debited, seq = auth.granted_micros, 0, 0
    for _ in range(rng.randint(0, 8)):
        seq += 1
        out = store.debit_and_reserve(call_id, seq, slice_micros, slice_micros, tick(), 60_000)  # type: ignore[attr-defined]
        debited += slice_micros
        budget = debited + out.granted_micros
        if out.granted_micros < slice_micros:
            break  # exhausted: cut when the budget runs out
    cost = debited + rng.randint(0, budget - debited)  # hang-up somewhere in what was granted
    store.settle(call_id, seq + 1, cost, tick())  # type: ignore[attr-defined]
    return cost


def test_concurrent_calls_on_many_nodes_never_overspend(w: World) -> None:
    credit = 3 * UNIT
    account = w.account("corp", balance=20 * UNIT, credit=credit)
    slice_micros = 700_000
    lock, now, lowest = threading.Lock(), [T0], [0]
    stop = threading.Event()
    nodes = [w.store() for _ in range(3)]

    def watch() -> None:
        monitor = w.store()
        lowest[0] = monitor.account_state(account).available_micros
        while not stop.is_set():
            state = monitor.account_state(account)
            lowest[0] = min(lowest[0], state.available_micros, state.balance_micros + credit)

    def worker(index: int) -> None:
        rng = random.Random(index)
        for n in range(8):
            _run_call(nodes[index % 3], account, f"t{index}-{n}", rng, slice_micros, now, lock)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    watcher.join(timeout=10)
    state = w.store().account_state(account)
    assert lowest[0] >= 0, "available went below zero: the balance went below -credit_limit"
    assert state.balance_micros >= -credit and state.overrun_micros == 0
    assert w.charges_total(account) == w.sql_balance(account) - 20 * UNIT
    assert w.store().live_calls() == []
    assert_books_balance(w, account)


# ------------------------------------------------------- Redis: a cache rebuilt from the ledger


@pytest.fixture(params=["redis", "redis-cluster"])
def rw(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def test_an_account_missing_from_redis_is_loaded_and_top_ups_reach_it(rw: World) -> None:
    from agent.adapters.redis.store import RedisBalanceStore
    from agent.adapters.sql import accounts as repo
    from agent.adapters.sql.engine import transaction

    rw.account("alice", balance=10 * UNIT)
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    assert store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL).available_micros == 10 * UNIT
    with transaction(rw.sessions) as s:
        repo.topup(s, "alice", 5 * UNIT, "pay-1")
        repo.set_status(s, "alice", "suspended")
    assert store.refresh("alice")
    state = store.account_state("alice")
    assert (state.balance_micros, state.reserved_micros, state.status) == (15 * UNIT, UNIT, "suspended")
    assert store.authorize("alice", "c2", "n1", UNIT, UNIT, T0, TTL).reason is DenyReason.SUSPENDED


def test_after_redis_lost_everything_a_settle_charges_once_and_redis_converges_to_sql(rw: World) -> None:
    rw.account("alice", balance=10 * UNIT)
    rw.store().authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    rw.store().debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 1, TTL)
    rw.wipe_redis()
    restarted = rw.store()  # an agent that restarted too: only the PBX still knows the account
    assert restarted.debit_and_reserve("c1", 2, UNIT, UNIT, T0 + 2, TTL, account_id="alice").status is (
        NibbleStatus.UNKNOWN_CALL)
    out = restarted.settle("c1", 3, 2_500_000, T0 + 3, account_id="alice")
    assert out.status is SettleStatus.WITHOUT_RESERVATION and out.ledger_posted
    assert rw.entries("c1") == [("charge", -2_500_000, "charge:c1")]
    assert_books_balance(rw, "alice")
    assert rw.sql_balance("alice") == 7_500_000


def test_a_rebuild_during_live_calls_keeps_what_they_already_took(rw: World) -> None:
    from agent.adapters.redis.store import RedisBalanceStore

    rw.account("alice", balance=10 * UNIT)
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    store.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 1, TTL)
    store.authorize("alice", "c2", "n1", UNIT, UNIT, T0, TTL)
    store.settle("c2", 1, 300_000, T0 + 2)
    before = store.account_state("alice")
    after = store.rebuild("alice")
    assert (after.balance_micros, after.reserved_micros) == (before.balance_micros, before.reserved_micros)
    assert after.balance_micros == 10 * UNIT - UNIT - 300_000
    store.settle("c1", 2, 1_200_000, T0 + 3)
    assert_books_balance(rw, "alice")


def test_a_ledger_write_that_failed_is_written_by_the_sweeper(rw: World, tmp_path: object) -> None:
    from agent.adapters.sql.engine import make_engine, session_factory

    rw.account("alice", balance=10 * UNIT)
    node = rw.store()
    node.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    dead_sql = session_factory(make_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
    out = rw.store(dead_sql).settle("c1", 1, 800_000, T0 + 1)
    assert out.status is SettleStatus.SETTLED and not out.ledger_posted
    assert rw.entries("c1") == []
    assert node.account_state("alice").balance_micros == 9_200_000  # Redis has it already
    report = node.expire(T0 + 10_000)
    assert (report.posted, report.pending) == (1, 0)
    assert rw.entries("c1") == [("charge", -800_000, "charge:c1")]
    assert_books_balance(rw, "alice")


def test_redis_down_is_store_unavailable_quickly(rw: World) -> None:
    import time

    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.core.balance import StoreUnavailable

    store = RedisBalanceStore(make_client("redis://127.0.0.1:1/0", 200), rw.sessions)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="Redis unavailable during authorize"):
        store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert time.monotonic() - started < 1.0


def test_a_nibble_seq_below_one_is_refused(w: World) -> None:
    with pytest.raises(InvalidInput, match="seq 0"):
        w.store().debit_and_reserve("c1", 0, UNIT, UNIT, T0, TTL)
