"""The failure policy: Redis down at start, Redis cut mid-call, a store that hangs; nothing lost."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.core.balance import DenyReason, NibbleStatus, ReleaseStatus, SettleStatus
from agent.services.clock import ManualClock
from agent.services.store_guard import Journal, StoreGuard
from tests.balance_helpers import T0, UNIT, Engines, World, world_for

TTL = 60_000


class CuttableProxy:
    """A loopback TCP proxy to Redis that a test can cut (connections reset, new ones refused
    by closing them at once) and restore: a Redis that dies mid-call and comes back."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target, timeout=5)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("guard"))
    yield found
    found.dispose()


@pytest.fixture(params=["redis"])
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    p = CuttableProxy()
    yield p
    p.close()


def redis_store(w: World, url: str, timeout_ms: int = 250) -> RedisBalanceStore:
    store = RedisBalanceStore(make_client(url, timeout_ms), w.sessions, key_prefix=w.redis_prefix or "")
    w.opened.append(store)
    return store


def test_fail_closed_with_redis_down_at_start_denies_within_the_deadline(w: World) -> None:
    clock = ManualClock(T0)
    guard = StoreGuard(redis_store(w, "redis://127.0.0.1:1/0"), clock=clock, timeout_ms=250)
    started = time.monotonic()
    out = guard.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert (out.allowed, out.reason) == (False, DenyReason.STORE_UNAVAILABLE)
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    assert guard.authorize("alice", "c2", "n1", UNIT, UNIT, T0, TTL).reason is DenyReason.STORE_UNAVAILABLE
    assert time.monotonic() - started < 0.05, "the open circuit answers at once"
    assert not guard.available


def test_fail_open_grants_at_most_the_offline_credit_per_account(w: World) -> None:
    clock = ManualClock(T0)
    guard = StoreGuard(redis_store(w, "redis://127.0.0.1:1/0"), clock=clock, policy="fail_open",
                       offline_credit_micros=3 * UNIT)
    first = guard.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, TTL)
    assert (first.allowed, first.granted_micros) == (True, 2 * UNIT)
    second = guard.authorize("alice", "c2", "n1", 2 * UNIT, UNIT // 2, T0, TTL)
    assert (second.allowed, second.granted_micros) == (True, UNIT)
    assert guard.authorize("alice", "c3", "n1", UNIT, 1, T0, TTL).reason is DenyReason.STORE_UNAVAILABLE
    assert guard.authorize("bob", "c4", "n1", UNIT, UNIT, T0, TTL).allowed  # per account
    nibble = guard.debit_and_reserve("c1", 1, 2 * UNIT, UNIT, T0 + 6000, TTL)
    assert (nibble.status, nibble.granted_micros) == (NibbleStatus.OFFLINE, 0)  # alice's credit is spent


def test_fail_closed_redis_cut_mid_call_loses_nothing_once_it_returns(w: World, proxy: CuttableProxy) -> None:
    w.account("alice", balance=10 * UNIT)
    clock = ManualClock(T0)
    guard = StoreGuard(redis_store(w, f"redis://127.0.0.1:{proxy.port}/0"), clock=clock, probe_interval_ms=1000)
    assert guard.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL).allowed
    assert guard.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 6000, TTL).status is NibbleStatus.GRANTED
    proxy.cut()
    cut = guard.debit_and_reserve("c1", 2, UNIT, UNIT, T0 + 12000, TTL)
    assert (cut.status, cut.granted_micros) == (NibbleStatus.STORE_UNAVAILABLE, 0)  # cut at the end of the slice
    assert guard.authorize("alice", "c2", "n1", UNIT, UNIT, T0 + 12000, TTL).reason is DenyReason.STORE_UNAVAILABLE
    settled = guard.settle("c1", 3, 2_500_000, T0 + 13000)
    assert settled.status is SettleStatus.JOURNALED and not settled.ledger_posted
    assert w.entries("c1") == []
    proxy.restore()
    clock.advance(1000)
    assert guard.recover() == 2
    assert guard.available and len(guard.journal) == 0
    assert w.entries("c1") == [("charge", -2_500_000, "charge:c1")]
    assert guard.recover() == 0
    state = guard.account_state("alice")
    assert (state.balance_micros, state.reserved_micros, state.live_calls) == (7_500_000, 0, 0)
    assert w.sql_balance("alice") == 7_500_000


def test_fail_open_calls_continue_on_offline_credit_and_are_charged_once_back(w: World, proxy: CuttableProxy,
                                                                              tmp_path: Path) -> None:
    w.account("alice", balance=10 * UNIT)
    clock = ManualClock(T0)
    journal_path = tmp_path / "journal.jsonl"
    guard = StoreGuard(redis_store(w, f"redis://127.0.0.1:{proxy.port}/0"), clock=clock, policy="fail_open",
                       offline_credit_micros=2 * UNIT, journal=Journal(journal_path))
    guard.authorize("alice", "live", "n1", UNIT, UNIT, T0, TTL)
    proxy.cut()
    # Every step names its account (the engine's steps do): the guard keeps no call map.
    nibble = guard.debit_and_reserve("live", 1, UNIT, UNIT, T0 + 6000, TTL, account_id="alice")
    assert (nibble.status, nibble.granted_micros) == (NibbleStatus.OFFLINE, UNIT)
    offline = guard.authorize("alice", "new", "n1", UNIT, UNIT, T0 + 7000, TTL)
    assert (offline.allowed, offline.granted_micros) == (True, UNIT)
    assert guard.settle("live", 2, 1_800_000, T0 + 11000, account_id="alice").status is SettleStatus.JOURNALED
    assert guard.settle("new", 1, 900_000, T0 + 12000).status is SettleStatus.JOURNALED  # offline: it knows
    assert len(Journal(journal_path)) == 4  # in the kernel at once: a restarted agent would replay them
    proxy.restore()
    clock.advance(1000)
    assert guard.recover() == 4
    assert w.entries("live") == [("charge", -1_800_000, "charge:live")]
    assert w.entries("new") == [("charge", -900_000, "charge:new")]
    state = guard.account_state("alice")
    assert (state.balance_micros, state.reserved_micros, state.live_calls) == (7_300_000, 0, 0)
    assert w.sql_balance("alice") == 7_300_000
    assert Journal(journal_path).entries() == []


def test_a_restarted_agent_replays_the_journal_it_left(w: World, tmp_path: Path) -> None:
    w.account("alice", balance=10 * UNIT)
    journal_path = tmp_path / "journal.jsonl"
    good = redis_store(w, "redis://127.0.0.1:6379/0")
    good.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    down = StoreGuard(redis_store(w, "redis://127.0.0.1:1/0"), clock=ManualClock(T0), journal=Journal(journal_path))
    assert down.settle("c1", 1, 600_000, T0 + 1, account_id="alice").status is SettleStatus.JOURNALED
    assert down.release("c2", 1, T0 + 2).status is ReleaseStatus.JOURNALED
    restarted = StoreGuard(good, clock=ManualClock(T0 + 5000), journal=Journal(journal_path))
    assert restarted.recover() == 2
    assert w.entries("c1") == [("charge", -600_000, "charge:c1")]
    assert w.sql_balance("alice") == 9_400_000


class HangingStore:
    """A store that never answers authorize (a hung connection), around a real one."""

    def __init__(self, store: RedisBalanceStore) -> None:
        self.store = store

    def authorize(self, *args: object, **kwargs: object) -> object:
        gevent.sleep(5)
        raise AssertionError("the deadline should have fired")

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_a_hanging_store_is_cut_off_at_the_deadline(w: World) -> None:
    guard = StoreGuard(HangingStore(redis_store(w, "redis://127.0.0.1:6379/0")),  # type: ignore[arg-type]
                       clock=ManualClock(T0), timeout_ms=100)
    started = time.monotonic()
    out = guard.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert out.reason is DenyReason.STORE_UNAVAILABLE
    assert time.monotonic() - started < 0.5


def test_the_embedded_sql_store_down_is_the_same_policy(tmp_path: Path) -> None:
    from agent.adapters.sql.balance_store import SqlBalanceStore
    from agent.adapters.sql.engine import make_engine, session_factory

    dead = SqlBalanceStore(session_factory(make_engine("postgresql://postgres@127.0.0.1:1/none",
                                                       connect_timeout_seconds=1)))
    guard = StoreGuard(dead, clock=ManualClock(T0))
    out = guard.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL)
    assert (out.allowed, out.reason) == (False, DenyReason.STORE_UNAVAILABLE)
    assert guard.settle("c0", 1, UNIT, T0, account_id="alice").status is SettleStatus.JOURNALED


def test_a_redis_that_restarts_empty_does_not_cut_a_call_that_has_money(w: World) -> None:
    """Issue 14.9: the store lost the live call (its keys are gone); the next nibble reserves the
    slice again from the account's balance (rebuilt from the SQL ledger), the call goes on, and
    the settle charges its whole cost once."""
    import redis as redis_lib

    from agent.core.session import NibbleStep
    from agent.services.store_port import EngineStoreAdapter

    w.account("alice", balance=10 * UNIT)
    store = EngineStoreAdapter(redis_store(w, "redis://127.0.0.1:6379/0"), node="n1", ttl_ms=TTL)
    assert store.authorize("alice", "live", UNIT, UNIT, T0).allowed
    (first,) = store.nibbles([NibbleStep("live", 1, UNIT, UNIT, "alice")], T0 + 6_000)
    assert first.ok and first.granted_micros == UNIT
    client = redis_lib.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in client.scan_iter(match=f"{w.redis_prefix}*", count=1000):  # Redis restarted with nothing
        client.delete(key)
    client.close()
    (second,) = store.nibbles([NibbleStep("live", 2, UNIT, UNIT, "alice")], T0 + 12_000)
    assert second.ok and second.granted_micros == UNIT and second.debited_micros == UNIT
    store.settle("live", 3, 3 * UNIT, T0 + 15_000, "alice")
    assert w.entries("live") == [("charge", -3 * UNIT, "charge:live")]
    assert w.sql_balance("alice") == 7 * UNIT
    state = store.store.account_state("alice")
    assert (state.balance_micros, state.reserved_micros, state.live_calls) == (7 * UNIT, 0, 0)
    w.record_settled_calls()
    assert w.ledger_problems() == []


def test_a_balance_redis_cannot_hold_exactly_is_refused_by_name(w: World) -> None:
    """Issue 14.10: Lua numbers are doubles, exact up to 2**53 micro-units; beyond, the account
    is refused with a clear error instead of being loaded rounded (…980001 read as …980000)."""
    from agent.core.errors import InvalidInput

    w.account("dong", balance=9_007_199_254_980_001)  # 9e9 units: realistic in VND
    store = redis_store(w, "redis://127.0.0.1:6379/0")
    with pytest.raises(InvalidInput, match=r"account 'dong': balance 9007199254\.980001 exceeds what the Redis "
                                           r"balance store holds exactly \(9007199254\.740991"):
        store.authorize("dong", "c1", "n1", UNIT, UNIT, T0, TTL)
    w.account("fine", balance=9_007_199_254_740_991)
    assert store.authorize("fine", "c2", "n1", UNIT, UNIT, T0, TTL).allowed
    assert store.account_state("fine").balance_micros == 9_007_199_254_740_991  # exact at the limit


def test_the_journal_writes_at_once_and_fsyncs_in_groups_off_the_caller(tmp_path: Path) -> None:
    """Issue 14.8: during an outage every nibble is journaled; each append is one write (in the
    kernel when it returns: a kill -9 keeps it) and the fsyncs are grouped by ``sync``, which the
    daemon runs in a thread, never one per nibble on the hub."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    synced: list[int] = []
    for seq in range(1, 101):
        journal.append({"op": "nibble", "call_id": "c1", "seq": seq})
    assert len(Journal(path)) == 100  # readable by a restarted agent before any fsync
    journal.sync(fsync=synced.append)
    journal.sync(fsync=synced.append)  # nothing new: no second fsync
    assert len(synced) == 1
    journal.drop_first(60)
    assert [e["seq"] for e in Journal(path).entries()] == list(range(61, 101))
    journal.append({"op": "nibble", "call_id": "c1", "seq": 101})
    journal.close()
    assert len(Journal(path)) == 41


class SlowFlakyStore:
    """A real store whose settles take ``delay_s``, and that can be down, or fail once on a call."""

    def __init__(self, store: RedisBalanceStore) -> None:
        self.store = store
        self.delay_s = 0.0
        self.down = False
        self.fail_once_on: str | None = None

    def settle(self, call_id: str, *args: object, **kwargs: object) -> object:
        from agent.core.balance import StoreUnavailable

        if self.down or self.fail_once_on == call_id:
            self.fail_once_on = None
            raise StoreUnavailable("down")
        gevent.sleep(self.delay_s)
        return self.store.settle(call_id, *args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_concurrent_settles_never_drop_a_journaled_step(w: World) -> None:
    """Found on a real FreeSWITCH under load (bench_realpbx): several store workers replayed the
    journal at once, each then dropped as many entries as it had applied, so a step journaled
    meanwhile was dropped unapplied and its call was never charged (50 calls in one run). One
    replay at a time; whoever finds one running journals its own step behind it."""
    for n in range(1, 6):
        w.account(f"a{n}", balance=10 * UNIT)
    clock = ManualClock(T0)
    store = SlowFlakyStore(redis_store(w, "redis://127.0.0.1:6379/0"))
    guard = StoreGuard(store, clock=clock, timeout_ms=2_000, probe_interval_ms=1000)  # type: ignore[arg-type]
    for n in range(1, 6):
        assert guard.authorize(f"a{n}", f"c{n}", "n1", UNIT, UNIT, T0, TTL).allowed
    store.down = True
    for n in (1, 2):  # the store is down: journaled
        assert guard.settle(f"c{n}", 1, UNIT, T0 + 1000, account_id=f"a{n}").status is SettleStatus.JOURNALED
    store.down = False
    store.delay_s = 0.05
    clock.advance(1000)
    first = gevent.spawn(guard.settle, "c3", 1, UNIT, T0 + 2000, account_id="a3")  # replays c1, c2 slowly
    gevent.sleep(0.01)
    second = gevent.spawn(guard.settle, "c4", 1, UNIT, T0 + 2000, account_id="a4")
    gevent.sleep(0.06)
    store.fail_once_on = "c1"  # a third settle meets the store failing once
    third = gevent.spawn(guard.settle, "c5", 1, UNIT, T0 + 2000, account_id="a5")
    gevent.joinall([first, second, third], timeout=5, raise_error=True)
    clock.advance(1000)
    guard.recover()
    assert len(guard.journal) == 0
    for n in range(1, 6):
        assert w.entries(f"c{n}") == [("charge", -UNIT, f"charge:c{n}")], n


def test_a_slow_or_failed_sweep_never_opens_the_circuit_the_calls_use(w: World) -> None:
    """The sweeper's step has a deadline of its own: a Redis Cluster sweep reads every slot's index
    and took up to 271 ms on the loaded bench box, past the calls' 250 ms (bench_nodes.py)."""
    from agent.core.balance import ExpireReport, StoreUnavailable

    class SlowSweep(RedisBalanceStore):
        fail = False

        def expire(self, now_ms: int, *, limit: int = 1000) -> ExpireReport:
            gevent.sleep(0.4)
            if self.fail:
                raise StoreUnavailable("Redis Cluster unavailable during expire: a master is down")
            return super().expire(now_ms, limit=limit)

    w.account("alice", balance=10 * UNIT)
    store = SlowSweep(make_client(w.redis_url, 250), w.sessions, key_prefix=w.redis_prefix or "")
    w.opened.append(store)
    guard = StoreGuard(store, clock=ManualClock(T0), timeout_ms=250)
    assert guard.expire(T0).expired == ()
    assert guard.available
    store.fail = True
    with pytest.raises(StoreUnavailable):
        guard.expire(T0)
    assert guard.available and guard.authorize("alice", "c1", "n1", UNIT, UNIT, T0, TTL).allowed


class TwoMasters:
    """A real store seen as two shards ("A", and "B" for accounts starting with b), whose "B"
    part hangs while ``b_hangs`` (a master that accepts and never answers)."""

    def __init__(self, store: RedisBalanceStore) -> None:
        self.store = store
        self.b_hangs = False
        self.hung_batches = 0

    def shard_of(self, account_id: str) -> str:
        return "B" if account_id.startswith("b") else "A"

    def debit_and_reserve_many(self, requests: list[object]) -> object:
        if self.b_hangs and any(getattr(r, "account_id", "").startswith("b") for r in requests):
            self.hung_batches += 1
            gevent.sleep(3600)
        return self.store.debit_and_reserve_many(requests)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_a_hung_master_costs_only_its_own_part_of_a_batch_the_deadline(w: World) -> None:
    """The batch is split by master and the parts run at once, each under its deadline: the
    other master's calls are granted, the hung one's journaled (fail_closed: no grant) and
    replayed in order once it answers; while its circuit is open its new steps are journaled
    without being sent."""
    from agent.core.balance import NibbleRequest

    for account in ("alice", "bob"):
        w.account(account, balance=10 * UNIT)
    clock = ManualClock(T0)
    two = TwoMasters(redis_store(w, "redis://127.0.0.1:6379/0"))
    guard = StoreGuard(two, clock=clock, timeout_ms=100, probe_interval_ms=1000)  # type: ignore[arg-type]
    for account in ("alice", "bob"):
        assert guard.authorize(account, f"c-{account}", "n1", UNIT, UNIT, T0, TTL).allowed

    def batch(seq: int) -> dict[str, NibbleStatus]:
        outcomes = guard.debit_and_reserve_many([NibbleRequest(f"c-{a}", seq, UNIT, UNIT, T0 + seq * 1000, TTL, a)
                                                 for a in ("alice", "bob")])
        return {o.call_id: o.status for o in outcomes}

    two.b_hangs = True
    started = time.monotonic()
    assert batch(1) == {"c-alice": NibbleStatus.GRANTED, "c-bob": NibbleStatus.STORE_UNAVAILABLE}
    assert time.monotonic() - started < 1.0  # one deadline (100 ms), not the hung master's hour
    assert guard.down_shards() == ["B"]
    assert batch(2) == {"c-alice": NibbleStatus.GRANTED, "c-bob": NibbleStatus.STORE_UNAVAILABLE}
    assert two.hung_batches == 1  # the open circuit journals bob's step without sending it
    assert guard.settle("c-alice", 3, 2 * UNIT, T0 + 3000, account_id="alice").ledger_posted
    assert guard.settle("c-bob", 3, 2 * UNIT, T0 + 3000, account_id="bob").status is SettleStatus.JOURNALED
    two.b_hangs = False
    clock.advance(1000)  # the probe is due
    assert guard.recover() == 3  # bob's two nibbles and his settle, in order
    assert guard.available and len(guard.journal) == 0
    for account in ("alice", "bob"):
        assert w.sql_balance(account) == 8 * UNIT, account  # two slices used, charged once
