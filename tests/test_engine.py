"""The gevent engine end to end with an in-memory store, a fake switch and the real clock."""

from __future__ import annotations

import gevent
import pytest

from agent.core.cdr import CallRecord, Disposition
from agent.core.events import (
    AuthorizeRequest,
    DenyReason,
    Direction,
    LegAnswered,
    LegCreated,
    LegHungUp,
)
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo, RatingRefused
from agent.services.clock import SystemClock
from agent.services.engine import Engine, EngineSettings
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

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        self.hangups.append((leg_id, escalate, self.clock.now_ms()))
        if self.obey or escalate:
            self.engine.on_event(LegHungUp(leg_id, self.clock.now_ms() + 5, cause="NORMAL_CLEARING"))

    def warn(self, leg_id: str, seconds_left: int) -> None:
        pass

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
