"""The gevent engine end to end with an in-memory store, a fake switch and the real clock."""

from __future__ import annotations

import gevent
import pytest

from agent.core.cdr import CallRecord, Disposition
from agent.core.events import (
    AuthorizeRequest,
    DenyReason,
    Direction,
    EndedCall,
    LegAnswered,
    LegCreated,
    LegHungUp,
    PbxCdrReread,
    PbxConnected,
)
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo, RatingRefused
from agent.ports import LiveCall
from agent.services.clock import SystemClock
from agent.services.engine import FROM_PBX_CDR, Engine, EngineSettings, LeftBehind
from agent.sim.memory_store import MemoryStore

PER_SECOND = RateRow(prefix="33", destination="France", rate_micros=60_000)  # 1000 micro-units a second


class Rater:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        if destination.startswith("900"):
            raise RatingRefused(DenyReason.BLOCKED, "destination 900 is blocked")
        return RatedCall(PER_SECOND, RatingInfo("retail", 1, "33", 60_000))


class FakeSwitch:
    name = "asterisk"

    def __init__(self, engine: Engine, clock: SystemClock, *, obey: bool = True) -> None:
        self.engine = engine
        self.clock = clock
        self.obey = obey
        self.hangups: list[tuple[str, bool, int]] = []
        self.backstops: list[tuple[str, int]] = []

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        self.hangups.append((leg_id, escalate, self.clock.now_ms()))
        if self.obey or escalate:
            self.engine.on_event(LegHungUp(leg_id, self.clock.now_ms() + 5, cause="NORMAL_CLEARING"))

    def warn(self, leg_id: str, seconds_left: int) -> None:
        pass

    def arm_backstop(self, leg_id: str, at_ms: int, caller_leg_id: str = "") -> None:
        self.backstops.append((leg_id, at_ms))

    def connected(self) -> bool:
        return True


class Cdrs:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def submit(self, record: CallRecord) -> None:
        self.records.append(record)


@pytest.fixture
def setup():
    clock = SystemClock()
    store = MemoryStore()
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                    rater=Rater(), clock=clock, cdr=cdrs)
    switch = FakeSwitch(engine, clock)
    engine.add_switch(switch)
    engine.start()
    yield engine, store, switch, cdrs, clock
    engine.stop(1)


def _wait(predicate, timeout=5.0):
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.01)


def test_call_is_cut_when_the_money_runs_out_and_settled_once(setup) -> None:
    engine, store, switch, cdrs, clock = setup
    store.add_account("alice", 2_500)  # two and a half seconds of talk
    decision = engine.authorize(AuthorizeRequest("asterisk", "A1", "alice", "33123", clock.now_ms()))
    assert decision.allowed and decision.limit_ms == 2000
    engine.on_event(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
    answered = clock.now_ms()
    engine.on_event(LegAnswered("B1", answered))
    _wait(lambda: switch.hangups)
    leg, escalate, at_ms = switch.hangups[0]
    assert not escalate
    assert 2000 <= at_ms - answered <= 2000 + 100  # cut on time, within 100 ms on a busy machine
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.disposition is Disposition.CUT
    assert record.rating.cost_micros == 2000
    assert store.accounts["alice"].balance_micros == 500
    assert store.open_reservations() == 0
    assert engine.live_calls() == 0


def test_unconfirmed_cut_is_escalated(setup) -> None:
    engine, store, switch, cdrs, clock = setup
    switch.obey = False
    store.add_account("bob", 1_000)
    assert engine.authorize(AuthorizeRequest("asterisk", "A2", "bob", "33123", clock.now_ms())).allowed
    engine.on_event(LegCreated("B2", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A2"))
    engine.on_event(LegAnswered("B2", clock.now_ms()))
    _wait(lambda: any(escalate for _, escalate, _ in switch.hangups))
    _wait(lambda: cdrs.records)
    assert cdrs.records[0].disposition is Disposition.CUT


def test_denials_name_their_reason(setup) -> None:
    engine, store, _, _, clock = setup
    store.add_account("poor", 0)
    deny = engine.authorize(AuthorizeRequest("asterisk", "A3", "poor", "33123", clock.now_ms()))
    assert not deny.allowed and deny.reason is DenyReason.INSUFFICIENT_FUNDS
    unknown = engine.authorize(AuthorizeRequest("asterisk", "A4", "ghost", "33123", clock.now_ms()))
    assert unknown.reason is DenyReason.UNKNOWN_ACCOUNT
    blocked = engine.authorize(AuthorizeRequest("asterisk", "A5", "poor", "900123", clock.now_ms()))
    assert blocked.reason is DenyReason.BLOCKED
    empty = engine.authorize(AuthorizeRequest("asterisk", "A6", "", "33123", clock.now_ms()))
    assert empty.reason is DenyReason.UNKNOWN_ACCOUNT


def test_authorizing_the_same_call_twice_reserves_once(setup) -> None:
    engine, store, _, _, clock = setup
    store.add_account("carol", 10_000)
    first = engine.authorize(AuthorizeRequest("asterisk", "A7", "carol", "33123", clock.now_ms()))
    again = engine.authorize(AuthorizeRequest("asterisk", "A7", "carol", "33123", clock.now_ms()))
    assert first.call_id == again.call_id and again.allowed
    assert store.accounts["carol"].reserved_micros == 1_000


def test_store_down_denies_quickly_and_shutting_down_denies(setup) -> None:
    engine, store, _, _, clock = setup
    store.add_account("dave", 10_000)
    store.unavailable = True
    started = clock.monotonic_ms()
    decision = engine.authorize(AuthorizeRequest("asterisk", "A8", "dave", "33123", clock.now_ms()))
    assert decision.reason is DenyReason.STORE_UNAVAILABLE
    assert clock.monotonic_ms() - started < 1000
    store.unavailable = False
    engine.stop_accepting()
    assert engine.authorize(AuthorizeRequest("asterisk", "A9", "dave", "33123", clock.now_ms())).reason \
        is DenyReason.SHUTTING_DOWN


def test_operator_hangup_cuts_a_live_call_and_charges_up_to_the_request(setup) -> None:
    engine, store, switch, cdrs, clock = setup
    store.add_account("carol", 100_000)
    decision = engine.authorize(AuthorizeRequest("asterisk", "A3", "carol", "33123", clock.now_ms()))
    engine.on_event(LegCreated("B3", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A3"))
    engine.on_event(LegAnswered("B3", clock.now_ms()))
    gevent.sleep(0.3)
    assert not engine.request_hangup("n1-unknown")
    assert engine.request_hangup(decision.call_id, "fraud check")
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.disposition is Disposition.CUT
    assert {leg for leg, _, _ in switch.hangups} == {"A3", "B3"}
    assert record.rating.cost_micros == 1000  # 0.3 s: one started second
    assert store.accounts["carol"].balance_micros == 99_000
    assert store.open_reservations() == 0



# ------------------------------------------------------------------------------------ failures (issue 14)


class HungStore:
    """A BalanceStore that never answers (a Redis that accepts connections and says nothing)."""

    def __init__(self) -> None:
        self.calls = 0

    def shard_of(self, account_id: str) -> str:  # local in every store: never hangs
        return ""

    def __getattr__(self, name: str):  # authorize, debit_and_reserve_many, settle, ...
        def hang(*args, **kwargs):
            self.calls += 1
            gevent.sleep(3600)
        return hang


def test_fail_open_takes_effect_when_the_store_hangs() -> None:
    """The guard owns the deadline: its timeout opens the circuit and fail_open grants offline
    credit (a second, racing deadline in the engine used to deny every call instead)."""
    from agent.services.store_guard import StoreGuard
    from agent.services.store_port import EngineStoreAdapter

    clock = SystemClock()
    hung = HungStore()
    guard = StoreGuard(hung, clock=clock, policy="fail_open", timeout_ms=100, offline_credit_micros=5_000)
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), rater=Rater(), clock=clock, cdr=Cdrs(),
                    store=EngineStoreAdapter(guard, node="n1", ttl_ms=30_000))
    engine.start()
    try:
        started = clock.monotonic_ms()
        first = engine.authorize(AuthorizeRequest("asterisk", "A1", "alice", "33123", clock.now_ms()))
        took_first = clock.monotonic_ms() - started
        started = clock.monotonic_ms()
        second = engine.authorize(AuthorizeRequest("asterisk", "A2", "alice", "33123", clock.now_ms()))
        took_second = clock.monotonic_ms() - started
        assert first.allowed and second.allowed  # offline credit: 5 s of talk for the account
        assert 90 <= took_first < 600 and took_second < 50  # one deadline, then the circuit is open
        assert hung.calls == 1 and not guard.available
        poor = engine.authorize(AuthorizeRequest("asterisk", "A3", "alice", "33123", clock.now_ms()))
        assert poor.allowed and poor.limit_ms <= 3_000  # what is left of the offline credit, no more
    finally:
        engine.stop(1)


class SlowStore(MemoryStore):
    """Settles take 1.2 s: the store is up, but slow (longer than the cut the test waits for)."""

    def __init__(self) -> None:
        super().__init__()
        self.settle_calls = 0

    def settle(self, call_id, seq, cost_micros, now_ms, account_id="", bundle=None):
        self.settle_calls += 1
        gevent.sleep(1.2)
        super().settle(call_id, seq, cost_micros, now_ms, account_id, bundle)


def test_the_loop_never_waits_for_a_slow_store() -> None:
    """With every store worker busy on slow settles, the other calls' timers still fire on time:
    the loop only queues work (it used to block in Pool.spawn, cutting nobody meanwhile)."""
    clock = SystemClock()
    store = SlowStore()
    cdrs = Cdrs()
    settings = EngineSettings(node="n1", nibble_seconds=1, store_workers=2, switch_workers=2, nibble_workers=2)
    engine = Engine(settings=settings,
                    store=store, rater=Rater(), clock=clock, cdr=cdrs)
    switch = FakeSwitch(engine, clock)
    engine.add_switch(switch)
    engine.lateness_samples = []
    engine.start()
    try:
        for n in range(6):
            store.add_account(f"a{n}", 100_000)
            assert engine.authorize(AuthorizeRequest("asterisk", f"A{n}", f"a{n}", "33123", clock.now_ms())).allowed
            engine.on_event(LegCreated(f"B{n}", clock.now_ms(), Direction.OUTBOUND, parent_leg_id=f"A{n}"))
            engine.on_event(LegAnswered(f"B{n}", clock.now_ms()))
        store.add_account("short", 1_500)  # cut 1 s after its answer
        assert engine.authorize(AuthorizeRequest("asterisk", "AS", "short", "33123", clock.now_ms())).allowed
        gevent.sleep(0.2)
        for n in range(6):  # six settles: two run (1.2 s each), four wait in the queue
            engine.on_event(LegHungUp(f"B{n}", clock.now_ms()))
        engine.on_event(LegCreated("BS", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="AS"))
        answered = clock.now_ms()
        engine.on_event(LegAnswered("BS", answered))
        _wait(lambda: any(leg == "AS" for leg, _, _ in switch.hangups), timeout=3)
        (cut_at,) = [at for leg, _, at in switch.hangups if leg == "AS"]
        assert 1000 <= cut_at - answered <= 1000 + 100
        assert max(engine.lateness_samples) < 100
        _wait(lambda: len(cdrs.records) == 7, timeout=10)
        assert store.settle_calls == 7
    finally:
        engine.stop(1)


class RefusingStore(MemoryStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.settle_calls = 0
        self.release_seqs: list[int] = []

    def settle(self, call_id, seq, cost_micros, now_ms, account_id="", bundle=None):
        self.settle_calls += 1
        raise self.error

    def release(self, call_id, seq, now_ms, account_id=""):
        self.release_seqs.append(seq)
        super().release(call_id, seq, now_ms, account_id)


def _answer_and_hang_up(engine: Engine, store: MemoryStore, clock: SystemClock, n: int) -> None:
    store.add_account(f"acct{n}", 100_000)
    assert engine.authorize(AuthorizeRequest("asterisk", f"A{n}", f"acct{n}", "33123", clock.now_ms())).allowed
    engine.on_event(LegCreated(f"B{n}", clock.now_ms(), Direction.OUTBOUND, parent_leg_id=f"A{n}"))
    engine.on_event(LegAnswered(f"B{n}", clock.now_ms()))
    engine.on_event(LegHungUp(f"B{n}", clock.now_ms() + 400))


def test_a_settle_refused_for_good_is_not_retried_and_the_cdr_is_written() -> None:
    from agent.core.errors import Conflict

    clock = SystemClock()
    store = RefusingStore(Conflict("already settled at another cost"))
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), store=store, rater=Rater(), clock=clock,
                    cdr=cdrs)
    engine.start()
    try:
        _answer_and_hang_up(engine, store, clock, 1)
        _wait(lambda: cdrs.records)
        gevent.sleep(0.5)
        assert store.settle_calls == 1 and engine.metrics.settle_retries._value.get() == 0
        assert engine.live_calls() == 0
    finally:
        engine.stop(1)


def test_a_shutdown_during_a_failing_settle_still_writes_the_cdr() -> None:
    clock = SystemClock()
    store = RefusingStore(ConnectionError("store unreachable"))
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), store=store, rater=Rater(), clock=clock,
                    cdr=cdrs)
    engine.start()
    _answer_and_hang_up(engine, store, clock, 2)
    _wait(lambda: store.settle_calls >= 2)  # retried: a transient failure
    assert cdrs.records == []
    engine.stop(1)
    (record,) = cdrs.records
    assert record.call_id == "n1-A2" and record.rating.cost_micros > 0


def test_a_release_carries_its_own_seq() -> None:
    clock = SystemClock()
    store = RefusingStore(ConnectionError("unused"))
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), store=store, rater=Rater(), clock=clock,
                    cdr=cdrs)
    engine.start()
    try:
        store.add_account("r", 100_000)
        assert engine.authorize(AuthorizeRequest("asterisk", "AR", "r", "33123", clock.now_ms())).allowed
        engine.on_event(LegHungUp("AR", clock.now_ms()))  # gone before anything was dialled
        _wait(lambda: cdrs.records)
        assert store.release_seqs == [1]
    finally:
        engine.stop(1)


def test_an_ntp_step_moves_the_live_calls_with_it() -> None:
    """The wall clock steps (NTP) while a call is live: its cut keeps its real instant, forward or
    backward, and its duration its monotonic length."""
    from agent.services.clock import ManualClock

    for step in (10_000, -10_000):
        clock = ManualClock(1_800_000_000_000)
        store = MemoryStore()
        store.add_account("alice", 3_500)
        engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), store=store, rater=Rater(),
                        clock=clock, cdr=Cdrs())
        assert engine.authorize(AuthorizeRequest("asterisk", "A1", "alice", "33123", clock.now_ms())).allowed
        engine._apply(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
        answered = clock.now_ms()
        engine._apply(LegAnswered("B1", answered))
        first_timer = engine.registry.next_timer_ms()
        assert first_timer == answered + 1_000
        engine._now_ms()
        clock.advance(200)
        clock.step_wall(step)
        now = engine._now_ms()
        assert engine.registry.next_timer_ms() == first_timer + step  # still 800 ms away
        assert engine.registry.next_timer_ms() - now == 800
        assert engine.registry.sessions["n1-A1"].answer_ms == answered + step


def _left_behind(engine: Engine, store: MemoryStore, clock: SystemClock, a_leg: str) -> tuple[str, int]:
    """A call an earlier run left: reserved in the store, published (answered 5 s ago)."""
    now = clock.now_ms()
    call_id = engine.call_id_of_leg(a_leg)
    assert store.authorize("alice", call_id, 1_000, 1_000, now - 5_000).allowed
    engine.adoptable[call_id] = LiveCall(account_id="alice", call_id=call_id, node="n1", seq=0, reserved_micros=1_000,
                                         debited_micros=0, overrun_micros=0, created_ms=now - 5_000,
                                         expires_ms=now + 30_000)
    engine.adoptable_facts[call_id] = LeftBehind(call_id, "asterisk", "33123", "100", a_leg, now - 5_000, now - 4_800)
    return call_id, now


def test_a_left_behind_call_waits_for_its_pbx_cdr_line_when_the_pbx_had_not_written_it(setup) -> None:
    """Found by bench_faults: a call that ended just before the resync's listing had no line in
    the PBX's CDR file yet; it was billed from the store's nibbles. It now waits for the file's
    second read and is billed its real duration from it."""
    engine, store, switch, cdrs, clock = setup
    store.add_account("alice", 100_000)
    call_id, now = _left_behind(engine, store, clock, "A9")
    engine.on_event(PbxConnected("asterisk", now, (), (), now, cdr_reread=True))
    gevent.sleep(0.2)
    assert not cdrs.records and call_id in engine.adoptable
    engine.on_event(PbxCdrReread("asterisk", now + 2_000, (EndedCall("A9", now - 4_800, now - 1_500),)))
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.rating is not None and record.rating.reason == FROM_PBX_CDR
    assert (record.duration_ms, record.rating.cost_micros) == (3_300, 4_000)
    assert store.settled[call_id] == 4_000 and not engine.adoptable


def test_a_left_behind_call_without_a_line_on_the_second_read_is_billed_from_the_store(setup) -> None:
    engine, store, switch, cdrs, clock = setup
    store.add_account("alice", 100_000)
    call_id, now = _left_behind(engine, store, clock, "A8")
    engine.on_event(PbxConnected("asterisk", now, (), (), now, cdr_reread=True))
    engine.on_event(PbxCdrReread("asterisk", now + 2_000, ()))
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.rating is not None and record.rating.reason != FROM_PBX_CDR
    assert record.hangup_cause == "ENDED_WHILE_AGENT_DOWN" and store.settled[call_id] == 0


def test_a_call_gone_during_an_ami_outage_ends_at_its_late_pbx_cdr_line(setup) -> None:
    """The same race for a call this run supervised: gone from the listing after a PBX
    reconnect, its CDR line not written yet. It ends at the line's instant once read, not at
    the resync instant (which would bill the outage)."""
    engine, store, switch, cdrs, clock = setup
    store.add_account("alice", 100_000)
    assert engine.authorize(AuthorizeRequest("asterisk", "A1", "alice", "33123", clock.now_ms())).allowed
    engine.on_event(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
    answered = clock.now_ms()
    engine.on_event(LegAnswered("B1", answered))
    gevent.sleep(0.1)
    engine.on_event(PbxConnected("asterisk", answered + 3_000, (), (), answered + 3_000, cdr_reread=True))
    gevent.sleep(0.2)
    assert engine.live_calls() == 1 and not cdrs.records  # held for its line
    engine.on_event(PbxCdrReread("asterisk", answered + 5_000, (EndedCall("A1", answered, answered + 1_200),)))
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.duration_ms == 1_200 and record.rating is not None and record.rating.cost_micros == 2_000
