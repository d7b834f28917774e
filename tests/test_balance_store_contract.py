"""One contract, two balance stores: Redis (Lua) and SQL (SQLite, PostgreSQL, MariaDB).

Every test runs on every store; a store instance per "node" has its own connections.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from agent.adapters.sql.bundles_admin import check_bundles
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import Bundle, BundleGrant, BundlePeriod, BundlePrefix, BundleUsage
from agent.adapters.sql.reconcile import Report
from agent.core.balance import (
    BundleSettle,
    DenyReason,
    NibbleRequest,
    NibbleStatus,
    ReleaseStatus,
    SettleStatus,
    UnknownCall,
)
from agent.core.bundles import BundleSlot
from agent.core.errors import InvalidInput
from tests.balance_helpers import REDIS_KINDS, STORE_KINDS, T0, UNIT, Engines, World, world_for

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


def test_authorize_many_gives_each_step_what_authorize_alone_would(w: World) -> None:
    """The levels above a reseller's customer in one store call (one round trip on Redis)."""
    from agent.core.balance import AuthorizeStep

    w.account("rich", balance=10 * UNIT)
    w.account("poor", balance=UNIT // 2)
    w.account("closed", balance=10 * UNIT, status="suspended")
    store = w.store()
    assert store.authorize("rich", "before", "n1", UNIT, UNIT, T0, TTL).allowed  # now in Redis (if Redis)
    w.account("fresh", balance=3 * UNIT)  # never loaded: the store loads it during the call

    def step(account: str, call_id: str, want: int = 2 * UNIT, minimum: int = UNIT) -> AuthorizeStep:
        return AuthorizeStep(account, call_id, "n1", want, minimum, T0, TTL)

    out = store.authorize_many([step("rich", "c1^1"), step("poor", "c2^1"), step("nobody", "c3^1"),
                                step("closed", "c4^1"), step("fresh", "c5^1", want=5 * UNIT),
                                step("rich", "before", want=7 * UNIT)])
    assert [(o.call_id, o.allowed, o.reason, o.granted_micros, o.available_micros, o.replayed) for o in out] == [
        ("c1^1", True, None, 2 * UNIT, 9 * UNIT, False),
        ("c2^1", False, DenyReason.INSUFFICIENT_FUNDS, 0, UNIT // 2, False),
        ("c3^1", False, DenyReason.UNKNOWN_ACCOUNT, 0, 0, False),
        ("c4^1", False, DenyReason.SUSPENDED, 0, out[3].available_micros, False),
        ("c5^1", True, None, 3 * UNIT, 3 * UNIT, False),
        ("before", True, None, UNIT, 10 * UNIT, True)]  # a replay: its first outcome, nothing more held
    assert store.account_state("rich").reserved_micros == 3 * UNIT
    assert store.account_state("fresh").reserved_micros == 3 * UNIT
    assert store.account_state("poor").reserved_micros == 0
    assert store.authorize_many([]) == []


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


# ------------------------------------------------------------- bundles (DESIGN §9), both stores

DAY_MS = 86_400_000
P0 = T0 - 10 * DAY_MS  # the period in force at T0
P1 = P0 + 30 * DAY_MS  # the next one
P_NEXT = P1 + 30 * DAY_MS
LATER = P_NEXT + 60 * DAY_MS
BTTL = 600_000  # bundle calls here nibble every minute


def grant(w: World, account_id: str, seconds: int, *, rollover: bool = False) -> int:
    """Sell a bundle of ``seconds`` per period to the account; returns the grant id."""
    with transaction(w.sessions) as s:
        count = s.scalar(select(func.count()).select_from(Bundle)) or 0
        bundle = Bundle(name=f"free-{count + 1}", seconds=seconds, period="month", anchor=1, rollover=rollover)
        s.add(bundle)
        s.flush()
        s.add(BundlePrefix(bundle_id=bundle.id, prefix="33"))
        row = BundleGrant(account_id=account_id, bundle_id=bundle.id, valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                          valid_until=None, reference=f"grant-{account_id}-{count + 1}")
        s.add(row)
        s.flush()
        return int(row.id)


def slot(grant_id: int, seconds: int, start: int = P0, *, carry_from: int | None = None) -> BundleSlot:
    return BundleSlot(grant_id, start, seconds, start + 30 * DAY_MS, carry_from)


def usage(w: World, *, call_id: str | None = None) -> list[tuple[str, int, str]]:
    """bundle_usage rows (kind, seconds, reference), of one call or all, in insertion order."""
    with transaction(w.sessions) as s:
        query = select(BundleUsage.kind, BundleUsage.seconds, BundleUsage.reference).order_by(BundleUsage.id)
        if call_id is not None:
            query = query.where(BundleUsage.call_id == call_id)
        return [(k, int(n), r) for k, n, r in s.execute(query)]


def sql_periods(w: World, account_id: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(granted, used) of each bundle_periods row of the account."""
    with transaction(w.sessions) as s:
        rows = s.execute(select(BundlePeriod.grant_id, BundlePeriod.period_start_ms, BundlePeriod.granted_s,
                                BundlePeriod.used_s).where(BundlePeriod.account_id == account_id))
        return {(int(g), int(st)): (int(granted), int(used)) for g, st, granted, used in rows}


def row_sums(w: World, account_id: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(granted, used) of each period of the account from its bundle_usage rows alone."""
    with transaction(w.sessions) as s:
        rows = s.execute(select(BundleUsage.grant_id, BundleUsage.period_start_ms, BundleUsage.kind,
                                func.sum(BundleUsage.seconds))
                         .where(BundleUsage.account_id == account_id)
                         .group_by(BundleUsage.grant_id, BundleUsage.period_start_ms, BundleUsage.kind))
        sums: dict[tuple[int, int], list[int]] = {}
        for g, st, kind, total in rows:
            entry = sums.setdefault((int(g), int(st)), [0, 0])
            if kind in ("grant", "rollover"):
                entry[0] += int(total)
            else:
                entry[1] -= int(total)
        return {key: (granted, used) for key, (granted, used) in sums.items()}


def periods(w: World, account_id: str) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(granted, used, reserved) of each period as the store sees it now."""
    return {key: (p.granted_s, p.used_s, p.reserved_s) for key, p in w.store().bundle_periods(account_id).items()}


def assert_bundle_books(w: World, account_id: str, *, overdrawn: bool = False) -> None:
    """No live call left: the store's periods, the bundle_periods rows and the sum of the
    bundle_usage rows agree (left = granted - used), once pending writes are done, and
    `ledger check` finds nothing wrong with them (``overdrawn``: but a period below zero, which
    a settle that lost its holds may leave: core/bundles.py commit)."""
    w.store().expire(LATER)  # writes what Redis has not written yet (no call is live any more)
    seen = periods(w, account_id)
    assert all(reserved == 0 for _, _, reserved in seen.values())
    in_store = {key: (granted, used) for key, (granted, used, _) in seen.items()}
    assert in_store == sql_periods(w, account_id) == row_sums(w, account_id)
    report = Report()
    with transaction(w.sessions) as s:  # what `ledger check` says of the bundle figures
        check_bundles(s, report, embedded=w.kind not in REDIS_KINDS)
    assert [p for p in report.problems if not (overdrawn and p.problem == "bundle period below zero")] == []


def test_bundle_call_with_no_money_is_allowed_and_reserves_no_money(w: World) -> None:
    w.account("alice")  # zero balance
    g = grant(w, "alice", 600)
    store = w.store()
    out = store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 600)], bundle_want_s=60)
    assert (out.allowed, out.reason, out.granted_micros, out.available_micros) == (True, None, 0, 0)
    assert (out.bundle_granted_s, out.bundle_available_s) == (60, 600)
    assert periods(w, "alice") == {(g, P0): (600, 0, 60)}
    assert store.account_state("alice").reserved_micros == 0
    assert [(c.call_id, c.bundle_held_s, c.bundle_used_s) for c in store.live_calls()] == [("c1", 60, 0)]
    settled = store.settle("c1", 1, 0, T0 + 45_000, bundle=BundleSettle(45, (slot(g, 600),)))
    assert (settled.status, settled.bundle_used_s, settled.cost_micros) == (SettleStatus.SETTLED, 45, 0)
    assert periods(w, "alice") == {(g, P0): (600, 45, 0)}
    assert usage(w) == [("grant", 600, f"bundle-grant:{g}:{P0}"), ("use", -45, f"bundle:c1:{g}:{P0}")]
    assert w.entries("c1") == [("charge", 0, "charge:c1")]
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_a_call_partly_in_its_bundle_is_allowed_and_holds_money_for_the_rest(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    w.account("bob")  # no money at all
    ga, gb = grant(w, "alice", 30), grant(w, "bob", 30)
    store = w.store()
    out = store.authorize("alice", "a1", "n1", 2 * UNIT, UNIT, T0, BTTL, bundle_slots=[slot(ga, 30)],
                          bundle_want_s=60)
    assert (out.allowed, out.granted_micros, out.bundle_granted_s, out.bundle_available_s) == (True, 2 * UNIT, 30, 30)
    assert store.account_state("alice").reserved_micros == 2 * UNIT
    # Its first second is covered: allowed whatever the money, holding what there is (nothing).
    broke = store.authorize("bob", "b1", "n1", 2 * UNIT, UNIT, T0, BTTL, bundle_slots=[slot(gb, 30)],
                            bundle_want_s=60)
    assert (broke.allowed, broke.granted_micros, broke.bundle_granted_s) == (True, 0, 30)
    assert periods(w, "alice") == {(ga, P0): (30, 0, 30)}
    store.settle("a1", 1, 1_500_000, T0 + 90_000, bundle=BundleSettle(30, (slot(ga, 30),)))
    store.settle("b1", 1, 0, T0 + 20_000, bundle=BundleSettle(20, (slot(gb, 30),)))
    assert periods(w, "alice") == {(ga, P0): (30, 30, 0)}
    assert periods(w, "bob") == {(gb, P0): (30, 20, 0)}
    assert w.sql_balance("alice") == 8_500_000
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_a_customer_with_a_bundle_and_its_level_in_one_authorize_many_as_each_alone(w: World) -> None:
    """A reseller's customer (with its bundle) and the level above it in one store call (one
    round trip on Redis): the customer's step is authorize's, bundle included; another node can
    settle the customer's call without being told its account (the call's hint), and the
    level's own steps name theirs."""
    from agent.core.balance import AuthorizeStep

    w.account("alice", balance=10 * UNIT)
    w.account("tenant:r1", balance=5 * UNIT)
    g = grant(w, "alice", 30)
    store = w.store()
    customer, level = store.authorize_many([
        AuthorizeStep("alice", "c1", "n1", 2 * UNIT, UNIT, T0, BTTL, (slot(g, 30),), 60),
        AuthorizeStep("tenant:r1", "c1^1", "n1", UNIT, UNIT, T0, BTTL)])
    assert (customer.allowed, customer.granted_micros, customer.bundle_granted_s, customer.bundle_available_s) == (
        True, 2 * UNIT, 30, 30)
    assert (level.allowed, level.granted_micros, level.bundle_granted_s) == (True, UNIT, 0)
    assert periods(w, "alice") == {(g, P0): (30, 0, 30)}
    assert (store.account_state("alice").reserved_micros, store.account_state("tenant:r1").reserved_micros) == (
        2 * UNIT, UNIT)
    other = w.store()  # another node: it never saw the call
    settled = other.settle("c1", 1, 1_500_000, T0 + 90_000, bundle=BundleSettle(30, (slot(g, 30),)))
    assert (settled.status, settled.cost_micros) == (SettleStatus.SETTLED, 1_500_000)
    assert other.settle("c1^1", 1, 2 * UNIT, T0 + 90_000, account_id="tenant:r1").status is SettleStatus.SETTLED
    assert (w.sql_balance("alice"), w.sql_balance("tenant:r1")) == (8_500_000, 3 * UNIT)
    assert periods(w, "alice") == {(g, P0): (30, 30, 0)}
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_an_empty_bundle_leaves_the_call_to_money_and_its_minimum(w: World) -> None:
    w.account("alice", balance=UNIT // 2)
    g = grant(w, "alice", 60)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 60)], bundle_want_s=60)
    store.settle("c1", 1, 0, T0 + 60_000, bundle=BundleSettle(60, (slot(g, 60),)))
    denied = store.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 1, BTTL, bundle_slots=[slot(g, 60)],
                             bundle_want_s=60)
    assert (denied.allowed, denied.reason, denied.bundle_granted_s, denied.bundle_available_s) == (
        False, DenyReason.INSUFFICIENT_FUNDS, 0, 0)
    money = store.authorize("alice", "c3", "n1", UNIT, UNIT // 4, T0 + 2, BTTL, bundle_slots=[slot(g, 60)],
                            bundle_want_s=60)
    assert (money.allowed, money.granted_micros, money.bundle_granted_s) == (True, UNIT // 2, 0)
    assert periods(w, "alice") == {(g, P0): (60, 60, 0)}
    store.settle("c3", 1, 300_000, T0 + 30_000, bundle=BundleSettle(0, (slot(g, 60),)))
    assert usage(w, call_id="c3") == []
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_nibbles_draw_the_next_slice_from_the_bundle_then_a_partial_grant_asks_for_money(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 150)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 150)], bundle_want_s=60)
    first = store.debit_and_reserve_many([NibbleRequest("c1", 1, 0, UNIT, T0 + 60_000, BTTL, bundle_used_s=60,
                                                        bundle_want_s=60)])[0]
    assert (first.status, first.granted_micros, first.debited_micros) == (NibbleStatus.GRANTED, 0, 0)
    assert (first.bundle_granted_s, first.bundle_held_s) == (60, 120)
    second = store.debit_and_reserve_many([NibbleRequest("c1", 2, 0, UNIT, T0 + 120_000, BTTL, bundle_used_s=120,
                                                         bundle_want_s=60)])[0]
    assert (second.granted_micros, second.bundle_granted_s, second.bundle_held_s) == (UNIT, 30, 150)
    assert periods(w, "alice") == {(g, P0): (150, 0, 150)}
    assert store.account_state("alice").reserved_micros == UNIT
    third = store.debit_and_reserve_many([NibbleRequest("c1", 3, 500_000, UNIT, T0 + 180_000, BTTL,
                                                        bundle_used_s=150)])[0]
    assert (third.granted_micros, third.bundle_granted_s, third.bundle_held_s) == (UNIT, 0, 150)
    assert [(c.bundle_held_s, c.bundle_used_s) for c in store.live_calls()] == [(150, 150)]
    out = store.settle("c1", 4, 800_000, T0 + 200_000)  # no bundle given: what the nibbles recorded
    assert (out.bundle_used_s, out.released_micros) == (150, UNIT)
    assert periods(w, "alice") == {(g, P0): (150, 150, 0)}
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_calls_sharing_one_period_never_take_more_than_it_has(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 100)
    node1, node2 = w.store(), w.store()
    one = node1.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    two = node2.authorize("alice", "c2", "n2", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    assert [(o.bundle_granted_s, o.bundle_available_s, o.granted_micros) for o in (one, two)] == [
        (60, 100, 0), (40, 40, UNIT)]
    more = node1.debit_and_reserve_many([NibbleRequest("c1", 1, 0, UNIT, T0 + 60_000, BTTL, bundle_used_s=60,
                                                       bundle_want_s=60)])[0]
    assert (more.bundle_granted_s, more.granted_micros) == (0, UNIT)
    assert periods(w, "alice") == {(g, P0): (100, 0, 100)}
    node2.settle("c2", 1, 0, T0 + 30_000, bundle=BundleSettle(30, (slot(g, 100),)))  # 10 s go back
    assert periods(w, "alice") == {(g, P0): (100, 30, 60)}
    three = node2.authorize("alice", "c3", "n2", UNIT, UNIT, T0 + 1, BTTL, bundle_slots=[slot(g, 100)],
                            bundle_want_s=60)
    assert (three.bundle_granted_s, three.bundle_available_s) == (10, 10)
    node1.settle("c1", 2, 0, T0 + 60_000, bundle=BundleSettle(60, (slot(g, 100),)))
    node2.settle("c3", 1, 0, T0 + 5_000, bundle=BundleSettle(5, (slot(g, 100),)))
    assert periods(w, "alice") == {(g, P0): (100, 95, 0)}
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_concurrent_bundle_calls_on_many_nodes_take_the_period_exactly_once(w: World) -> None:
    w.account("alice", balance=100 * UNIT)
    g = grant(w, "alice", 1000)
    nodes = [w.store() for _ in range(3)]
    taken: list[tuple[int, int]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        store = nodes[index % 3]
        for n in range(6):
            call = f"t{index}-{n}"
            out = store.authorize("alice", call, "n", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 1000)],
                                  bundle_want_s=60)
            nib = store.debit_and_reserve_many([NibbleRequest(call, 1, 0, UNIT, T0 + 60_000, BTTL,
                                                              bundle_used_s=out.bundle_granted_s,
                                                              bundle_want_s=60)])[0]
            with lock:
                taken.append((out.bundle_granted_s, nib.bundle_granted_s))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(taken) == 36 and sum(a + b for a, b in taken) == 1000  # 36 calls asked for 4,320 s of 1,000
    assert periods(w, "alice") == {(g, P0): (1000, 0, 1000)}
    assert sum(c.bundle_held_s for c in w.store().live_calls()) == 1000
    for call in [c.call_id for c in w.store().live_calls()]:
        w.store().settle(call, 2, 0, T0 + 90_000)  # each used what its nibble recorded
    assert periods(w, "alice")[(g, P0)][1:] == (sum(a for a, _ in taken), 0)
    assert_bundle_books(w, "alice")


def test_bundle_steps_replayed_change_nothing(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 200)
    store = w.store()
    first = store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 200)], bundle_want_s=60)
    again = w.store().authorize("alice", "c1", "n2", UNIT, UNIT, T0 + 5, BTTL, bundle_slots=[slot(g, 200)],
                                bundle_want_s=60)
    assert again.replayed and (again.granted_micros, again.bundle_granted_s) == (0, first.bundle_granted_s) == (0, 60)
    request = NibbleRequest("c1", 1, 0, UNIT, T0 + 60_000, BTTL, bundle_used_s=60, bundle_want_s=60)
    nib = store.debit_and_reserve_many([request])[0]
    replay = w.store().debit_and_reserve_many([request])[0]
    assert replay.status is NibbleStatus.REPLAYED
    assert (replay.bundle_granted_s, replay.bundle_held_s, replay.granted_micros) == (
        nib.bundle_granted_s, nib.bundle_held_s, nib.granted_micros) == (60, 120, 0)
    assert periods(w, "alice") == {(g, P0): (200, 0, 120)}
    bundle = BundleSettle(90, (slot(g, 200),))
    settled = store.settle("c1", 2, 0, T0 + 90_000, bundle=bundle)
    replayed = w.store().settle("c1", 2, 0, T0 + 91_000, bundle=bundle)
    assert (replayed.status, replayed.bundle_used_s) == (SettleStatus.REPLAYED, settled.bundle_used_s) == (
        SettleStatus.REPLAYED, 90)
    assert w.store().settle("c1", 2, 0, T0 + 92_000, bundle=BundleSettle(120, (slot(g, 200),))).status is (
        SettleStatus.REPLAYED)
    assert periods(w, "alice") == {(g, P0): (200, 90, 0)}
    assert usage(w) == [("grant", 200, f"bundle-grant:{g}:{P0}"), ("use", -90, f"bundle:c1:{g}:{P0}")]
    assert_bundle_books(w, "alice")


def test_settle_commits_the_covered_seconds_over_the_holds_in_draw_order(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    ga, gb = grant(w, "alice", 30), grant(w, "alice", 100)
    store = w.store()
    slots = (slot(ga, 30), slot(gb, 100))
    out = store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=slots, bundle_want_s=60)
    assert (out.bundle_granted_s, out.bundle_available_s) == (60, 130)
    assert periods(w, "alice") == {(ga, P0): (30, 0, 30), (gb, P0): (100, 0, 30)}
    store.debit_and_reserve_many([NibbleRequest("c1", 1, 0, UNIT, T0 + 60_000, BTTL, bundle_used_s=60,
                                                bundle_want_s=60)])
    assert periods(w, "alice") == {(ga, P0): (30, 0, 30), (gb, P0): (100, 0, 90)}
    settled = store.settle("c1", 2, 0, T0 + 75_000, bundle=BundleSettle(75, slots))
    assert settled.bundle_used_s == 75
    assert periods(w, "alice") == {(ga, P0): (30, 30, 0), (gb, P0): (100, 45, 0)}
    assert usage(w, call_id="c1") == [("use", -30, f"bundle:c1:{ga}:{P0}"), ("use", -45, f"bundle:c1:{gb}:{P0}")]
    # The order given is the order drawn: the other way round, the second grant goes first.
    out = store.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 1, BTTL, bundle_slots=slots[::-1], bundle_want_s=60)
    assert out.bundle_granted_s == 55 and periods(w, "alice")[(gb, P0)] == (100, 45, 55)
    store.settle("c2", 1, 0, T0 + 10_000, bundle=BundleSettle(10, slots[::-1]))
    assert periods(w, "alice") == {(ga, P0): (30, 30, 0), (gb, P0): (100, 55, 0)}
    assert_bundle_books(w, "alice")


def test_release_and_expiry_commit_what_the_nibbles_used(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 300)
    store = w.store()
    for call in ("r1", "e1"):
        store.authorize("alice", call, "n1", UNIT, UNIT, T0, 1000, bundle_slots=[slot(g, 300)], bundle_want_s=60)
        store.debit_and_reserve_many([NibbleRequest(call, 1, 0, UNIT, T0 + 500, 1000, bundle_used_s=50,
                                                    bundle_want_s=60)])
    assert periods(w, "alice") == {(g, P0): (300, 0, 240)}
    released = store.release("r1", 2, T0 + 600)
    assert (released.status, released.charged_micros) == (ReleaseStatus.RELEASED, 0)
    assert periods(w, "alice") == {(g, P0): (300, 50, 120)}
    assert store.expire(T0 + 1500).expired == ("e1",)
    assert periods(w, "alice") == {(g, P0): (300, 100, 0)}
    assert usage(w, call_id="r1") == [("use", -50, f"bundle:r1:{g}:{P0}")]
    # A settle after the expiry uses what it covered beyond that, as one late row.
    late = store.settle("e1", 2, 0, T0 + 2000, bundle=BundleSettle(70, (slot(g, 300),)))
    assert (late.status, late.bundle_used_s) == (SettleStatus.AFTER_EXPIRY, 70)
    assert usage(w, call_id="e1") == [("use", -50, f"bundle:e1:{g}:{P0}"), ("use", -20, f"bundle-late:e1:{g}:{P0}")]
    assert periods(w, "alice") == {(g, P0): (300, 120, 0)}
    assert_bundle_books(w, "alice")
    assert_books_balance(w, "alice")


def test_the_next_period_opens_with_the_rollover_of_the_one_before(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 100, rollover=True)
    store = w.store()
    before = slot(g, 100, P0, carry_from=P0 - 30 * DAY_MS)  # the period before it was never drawn on
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[before], bundle_want_s=60)
    assert periods(w, "alice") == {(g, P0): (200, 0, 60)}
    store.settle("c1", 1, 0, T0 + 30_000, bundle=BundleSettle(30, (before,)))
    store.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 1, BTTL, bundle_slots=[before], bundle_want_s=60)
    # At most one allowance rolls over, what the earlier period has left now (c2 holds 60).
    nxt = slot(g, 100, P1, carry_from=P0)
    out = store.authorize("alice", "c3", "n1", UNIT, UNIT, P1 + 1, BTTL, bundle_slots=[nxt], bundle_want_s=60)
    assert (out.bundle_granted_s, out.bundle_available_s) == (60, 200)
    store.settle("c2", 1, 0, T0 + 10_000, bundle=BundleSettle(10, (before,)))
    assert periods(w, "alice") == {(g, P0): (200, 40, 0), (g, P1): (200, 0, 60)}  # opened once: no move
    store.settle("c3", 1, 0, P1 + 60_000, bundle=BundleSettle(60, (nxt,)))
    later = slot(g, 100, P_NEXT, carry_from=P1)
    store.authorize("alice", "c4", "n1", UNIT, UNIT, P_NEXT, BTTL, bundle_slots=[later], bundle_want_s=60)
    assert periods(w, "alice")[(g, P_NEXT)] == (200, 0, 60)
    store.release("c4", 1, P_NEXT + 1)
    assert_bundle_books(w, "alice")
    assert sorted(row for row in usage(w) if row[0] != "use") == sorted([
        ("grant", 100, f"bundle-grant:{g}:{P0}"), ("rollover", 100, f"bundle-rollover:{g}:{P0}"),
        ("grant", 100, f"bundle-grant:{g}:{P1}"), ("rollover", 100, f"bundle-rollover:{g}:{P1}"),
        ("grant", 100, f"bundle-grant:{g}:{P_NEXT}"), ("rollover", 100, f"bundle-rollover:{g}:{P_NEXT}")])


def test_the_rollover_is_what_the_earlier_period_left(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 100, rollover=True)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    store.settle("c1", 1, 0, T0 + 70_000, bundle=BundleSettle(70, (slot(g, 100),)))
    nxt = slot(g, 100, P1, carry_from=P0)
    out = store.authorize("alice", "c2", "n1", UNIT, UNIT, P1, BTTL, bundle_slots=[nxt], bundle_want_s=60)
    assert out.bundle_available_s == 130
    store.release("c2", 1, P1 + 1)
    assert periods(w, "alice") == {(g, P0): (100, 70, 0), (g, P1): (130, 0, 0)}
    assert_bundle_books(w, "alice")
    assert ("rollover", 30, f"bundle-rollover:{g}:{P1}") in usage(w)


def test_a_settle_without_reservation_takes_the_seconds_from_the_slots_given(w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    ga, gb = grant(w, "alice", 30), grant(w, "alice", 100)
    slots = (slot(ga, 30), slot(gb, 100))
    store = w.store()
    out = store.settle("lost", 3, 0, T0, account_id="alice", bundle=BundleSettle(45, slots))
    assert (out.status, out.bundle_used_s) == (SettleStatus.WITHOUT_RESERVATION, 45)
    assert periods(w, "alice") == {(ga, P0): (30, 30, 0), (gb, P0): (100, 15, 0)}
    again = w.store().settle("lost", 3, 0, T0, account_id="alice", bundle=BundleSettle(45, slots))
    assert again.status is SettleStatus.REPLAYED
    # What no period has left goes to the first (the call did use those seconds).
    store.settle("lost2", 3, 0, T0, account_id="alice", bundle=BundleSettle(100, slots))
    assert periods(w, "alice") == {(ga, P0): (30, 45, 0), (gb, P0): (100, 100, 0)}
    assert usage(w, call_id="lost2") == [("use", -15, f"bundle:lost2:{ga}:{P0}"),
                                         ("use", -85, f"bundle:lost2:{gb}:{P0}")]
    assert w.entries("lost") == [("charge", 0, "charge:lost")]
    assert_bundle_books(w, "alice", overdrawn=True)


def test_a_call_reserved_again_without_its_slots_commits_what_it_covered_from_the_settle_s_slots(
        w: World) -> None:
    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 100)
    store = w.store()
    store.settle("c0", 1, 0, T0, account_id="alice", bundle=BundleSettle(30, (slot(g, 100),)))
    # The engine reserves a call again from money alone when the store lost it (store_port.py).
    assert store.authorize("alice", "c1", "n1", UNIT, 1, T0, BTTL).bundle_granted_s == 0
    out = store.settle("c1", 3, 0, T0 + 50_000, bundle=BundleSettle(50, (slot(g, 100),)))
    assert (out.status, out.bundle_used_s) == (SettleStatus.SETTLED, 50)
    assert periods(w, "alice") == {(g, P0): (100, 80, 0)}
    assert usage(w, call_id="c1") == [("use", -50, f"bundle:c1:{g}:{P0}")]
    assert_bundle_books(w, "alice")


def test_periods_opened_by_a_denied_call_reach_the_usage_ledger(w: World) -> None:
    w.account("alice", balance=10 * UNIT, max_calls=1)
    g = grant(w, "alice", 100)
    store = w.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL)
    denied = store.authorize("alice", "c2", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    assert (denied.allowed, denied.reason, denied.bundle_available_s) == (False, DenyReason.MAX_CALLS, 100)
    store.expire(T0 + 1)
    assert usage(w) == [("grant", 100, f"bundle-grant:{g}:{P0}")]
    store.release("c1", 1, T0 + 2)
    assert_bundle_books(w, "alice")


def test_bundle_steps_journaled_while_the_store_is_down_are_applied_once_it_is_back(w: World) -> None:
    from agent.services.clock import ManualClock
    from agent.services.store_guard import StoreGuard

    w.account("alice", balance=10 * UNIT)
    g = grant(w, "alice", 200)
    flaky = Flaky(w.store())
    guard = StoreGuard(flaky, clock=ManualClock(T0), probe_interval_ms=1)  # type: ignore[arg-type]
    assert guard.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 200)],
                           bundle_want_s=60).bundle_granted_s == 60
    flaky.down = True
    nib = guard.debit_and_reserve_many([NibbleRequest("c1", 1, 0, UNIT, T0 + 60_000, BTTL, account_id="alice",
                                                      bundle_used_s=60, bundle_want_s=60)])[0]
    assert nib.status is NibbleStatus.STORE_UNAVAILABLE
    out = guard.settle("c1", 2, 0, T0 + 55_000, account_id="alice", bundle=BundleSettle(55, (slot(g, 200),)))
    assert out.status is SettleStatus.JOURNALED
    assert periods(w, "alice") == {(g, P0): (200, 0, 60)}
    flaky.down = False
    guard.clock.advance(10)  # type: ignore[attr-defined]
    assert guard.recover() == 2
    assert periods(w, "alice") == {(g, P0): (200, 55, 0)}
    assert usage(w, call_id="c1") == [("use", -55, f"bundle:c1:{g}:{P0}")]
    assert_bundle_books(w, "alice")


class Flaky:
    """A store that answers ``StoreUnavailable`` while ``down`` (any step)."""

    def __init__(self, store: object) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> object:
        from agent.core.balance import StoreUnavailable

        attr = getattr(self.store, name)
        if not callable(attr) or name == "shard_of":  # local: answers while the store is down
            return attr

        def call(*args: object, **kwargs: object) -> object:
            if self.down:
                raise StoreUnavailable(f"{name}: down")
            return attr(*args, **kwargs)

        return call


# ------------------------------------------------- Redis: bundle periods rebuilt from the ledger


def test_bundle_periods_come_back_from_sql_after_redis_lost_everything(rw: World) -> None:
    rw.account("alice", balance=10 * UNIT)
    g = grant(rw, "alice", 100, rollover=True)
    store = rw.store()
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    store.settle("c1", 1, 0, T0 + 40_000, bundle=BundleSettle(40, (slot(g, 100),)))
    rw.wipe_redis()
    restarted = rw.store()
    assert periods(rw, "alice") == {(g, P0): (100, 40, 0)}
    # The rollover is computed from what SQL says the earlier period left.
    nxt = slot(g, 100, P1, carry_from=P0)
    out = restarted.authorize("alice", "c2", "n1", UNIT, UNIT, P1, BTTL, bundle_slots=[nxt], bundle_want_s=60)
    assert out.bundle_available_s == 160
    restarted.settle("c2", 1, 0, P1 + 60_000, bundle=BundleSettle(60, (nxt,)))
    assert_bundle_books(rw, "alice")
    assert_books_balance(rw, "alice")


def test_a_rebuild_during_bundle_calls_keeps_their_holds_and_unwritten_uses(rw: World, tmp_path: object) -> None:
    from agent.adapters.redis.store import RedisBalanceStore
    from agent.adapters.sql.engine import make_engine, session_factory

    rw.account("alice", balance=10 * UNIT)
    g = grant(rw, "alice", 300)
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    for call in ("c1", "c2", "c3"):
        store.authorize("alice", call, "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 300)], bundle_want_s=60)
    store.settle("c1", 1, 0, T0 + 10_000, bundle=BundleSettle(10, (slot(g, 300),)))
    dead_sql = session_factory(make_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
    out = rw.store(dead_sql).settle("c2", 1, 0, T0 + 20_000, bundle=BundleSettle(20, (slot(g, 300),)))
    assert not out.ledger_posted
    assert usage(rw, call_id="c2") == []
    before = periods(rw, "alice")
    assert before == {(g, P0): (300, 30, 60)}
    store.rebuild("alice")
    assert periods(rw, "alice") == before
    report = store.expire(T0 + 30_000)  # the sweeper writes c2 (its SQL write had failed)
    assert report.posted == 1
    assert usage(rw, call_id="c2") == [("use", -20, f"bundle:c2:{g}:{P0}")]
    store.settle("c3", 1, 0, T0 + 30_000, bundle=BundleSettle(30, (slot(g, 300),)))
    store.rebuild("alice")
    assert periods(rw, "alice") == {(g, P0): (300, 60, 0)}
    assert_bundle_books(rw, "alice")
    assert_books_balance(rw, "alice")


def test_a_period_opened_while_sql_is_down_is_written_by_the_sweeper(rw: World, tmp_path: object) -> None:
    from agent.adapters.sql.engine import make_engine, session_factory

    rw.account("alice", balance=10 * UNIT)
    g = grant(rw, "alice", 100)
    rw.store().account_state("alice")  # the account is in Redis; SQL goes away
    dead_sql = session_factory(make_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
    node = rw.store(dead_sql)
    node.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    node.settle("c1", 1, 0, T0 + 50_000, bundle=BundleSettle(50, (slot(g, 100),)))
    assert node.expire(T0 + 60_000).pending == 2  # the call and the period opening
    assert usage(rw) == []
    report = rw.store().expire(T0 + 70_000)
    assert (report.posted, report.pending) == (1, 0)
    assert usage(rw) == [("grant", 100, f"bundle-grant:{g}:{P0}"), ("use", -50, f"bundle:c1:{g}:{P0}")]
    assert_bundle_books(rw, "alice")


def test_the_sweepers_index_holds_what_exists_and_nothing_for_a_refused_call(rw: World) -> None:
    """authorize.lua writes the index entries with what they index (one script, one slot): an
    allowed call's entry due at its expiry and its account hint, nothing for a refused call
    (no clean-up round trip), and the account's periods entry as soon as a period is opened,
    even for a call then refused."""
    from agent.adapters.redis.store import RedisBalanceStore, make_client

    rw.account("alice", balance=UNIT)
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    keys = store._keys
    index = keys.index_of("alice")
    raw = make_client(rw.redis_url, 2000)
    try:
        assert store.authorize("alice", "ok1", "n1", UNIT, UNIT, T0, TTL).allowed
        assert raw.zscore(index, keys.member("alice", "ok1")) == T0 + TTL
        round_trips: list[object] = []
        execute = store._execute
        store._execute = lambda *a, **k: round_trips.append(a) or execute(*a, **k)  # type: ignore[method-assign]
        assert not store.authorize("alice", "no1", "n1", UNIT, UNIT, T0, TTL).allowed  # the money is held
        store._execute = execute  # type: ignore[method-assign]
        assert len(round_trips) == 1  # the refusal itself: nothing to clean up after it
        assert raw.zscore(index, keys.member("alice", "no1")) is None
        assert raw.get(keys.call_account("ok1")) == "alice" and raw.get(keys.call_account("no1")) is None
        assert raw.zscore(index, keys.periods_member("alice")) is None
        g = grant(rw, "alice", 100)
        store.refresh("alice")
        outcome = store.authorize("alice", "no2", "n1", 10 * UNIT, 10 * UNIT, T0 + 1, BTTL,
                                  bundle_slots=[slot(g, 100)], bundle_want_s=0)
        assert not outcome.allowed  # money alone decides (no bundle seconds wanted): refused
        assert raw.zscore(index, keys.periods_member("alice")) == T0 + 1  # the period it opened is indexed
        assert raw.zscore(index, keys.member("alice", "no2")) is None
    finally:
        raw.close()
    store.release("ok1", 1, T0 + 2)


def test_bundle_seconds_given_back_in_sql_reach_redis_with_the_refresh(rw: World) -> None:
    from agent.adapters.redis.store import RedisBalanceStore

    rw.account("alice", balance=10 * UNIT)
    g = grant(rw, "alice", 100)
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    store.settle("c1", 1, 0, T0 + 60_000, bundle=BundleSettle(60, (slot(g, 100),)))
    store.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 1, BTTL, bundle_slots=[slot(g, 100)], bundle_want_s=60)
    with transaction(rw.sessions) as s:  # what a re-rating writes: an adjust row giving 25 s back
        s.add(BundleUsage(account_id="alice", grant_id=g, period_start_ms=P0, kind="adjust", seconds=25,
                          reference="rerate:c1", call_id="c1"))
        s.get_one(BundlePeriod, (g, P0)).used_s -= 25
    assert periods(rw, "alice") == {(g, P0): (100, 60, 40)}
    assert store.refresh("alice")
    assert periods(rw, "alice") == {(g, P0): (100, 35, 40)}
    store.release("c2", 1, T0 + 2)
    assert_bundle_books(rw, "alice")
