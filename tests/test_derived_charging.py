"""Derived charging (DESIGN §11) through the gevent engine with the in-memory store: a customer of
a reseller pays its reseller's price, the reseller's account pays the operator's price for the
same call, the call lasts what every level can pay, and each level is its own store call."""

from __future__ import annotations

import gevent
import pytest

from agent.core.cdr import Disposition
from agent.core.events import (
    AuthorizeRequest,
    DenyReason,
    Direction,
    LegAnswered,
    LegCreated,
    LegHungUp,
    LiveLeg,
    PbxConnected,
)
from agent.core.fx import Conversion, ConvertedTariff
from agent.core.rating import RateRow
from agent.core.session import LevelRated, RatedCall, RatingInfo, RatingRefused, level_call_id
from agent.ports import LiveCall
from agent.services.clock import SystemClock
from agent.services.engine import Engine, EngineSettings
from agent.sim.memory_store import MemoryStore
from tests.engine_fakes import Cdrs, Switch

# The reseller sells at 2000 micro-units a second; the operator sells to the reseller at 1000.
RETAIL = RateRow(prefix="33", destination="France", rate_micros=120_000)
WHOLESALE = RateRow(prefix="33", destination="France", rate_micros=60_000)
RESELLER = "tenant:acme"


class ChainRater:
    """The customer ``c*`` of reseller acme (a plan priced in acme's money), acme's account on the
    operator's plan; ``direct`` is a customer of the operator. ``fx`` converts the customer's price."""

    def __init__(self) -> None:
        self.fx: Conversion | None = None
        self.no_rate_above = False

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        if account_id == RESELLER:
            if self.no_rate_above:
                raise RatingRefused(DenyReason.NO_RATE, "no rate for 33 in plan wholesale")
            return RatedCall(WHOLESALE, RatingInfo("wholesale", 2, "33", 60_000, "USD", "USD"))
        if account_id == "direct":
            return RatedCall(WHOLESALE, RatingInfo("wholesale", 2, "33", 60_000, "USD", "USD"))
        if self.fx is not None:
            return RatedCall(ConvertedTariff(RETAIL, self.fx),
                             RatingInfo("acme-retail", 1, "33", 120_000, "USD", "EUR", self.fx.rate_e10))
        return RatedCall(RETAIL, RatingInfo("acme-retail", 1, "33", 120_000, "USD", "USD"))

    def rate_chain(self, account_id: str, destination: str, at_ms: int) -> tuple[LevelRated, ...]:
        if account_id == "direct":
            return ()
        try:
            rated = self.rate(RESELLER, destination, at_ms)
        except RatingRefused as refused:
            raise RatingRefused(refused.reason, f"tenant 'acme': {refused.detail}") from None
        return (LevelRated(1, "acme", "default", RESELLER, rated),)



@pytest.fixture
def setup():
    clock = SystemClock()
    store = MemoryStore()
    cdrs = Cdrs()
    rater = ChainRater()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                    rater=rater, clock=clock, cdr=cdrs)
    switch = Switch(engine, clock)
    engine.add_switch(switch)
    engine.start()
    yield engine, store, switch, cdrs, clock, rater
    engine.stop(1)


def _wait(predicate, timeout=6.0):
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.01)


def _call(engine: Engine, clock: SystemClock, leg: str, account: str) -> int:
    engine.on_event(LegCreated(f"B{leg}", clock.now_ms(), Direction.OUTBOUND, parent_leg_id=f"A{leg}"))
    answered = clock.now_ms()
    engine.on_event(LegAnswered(f"B{leg}", answered))
    return answered


def test_a_reseller_with_less_money_than_its_customer_cuts_the_call_at_its_own_instant(setup) -> None:
    engine, store, switch, cdrs, clock, _ = setup
    store.add_account("c1", 100_000)  # 50 s at the reseller's price
    store.add_account(RESELLER, 3_500)  # 3.5 s at the operator's price: the limit
    decision = engine.authorize(AuthorizeRequest("asterisk", "A1", "c1", "33123", clock.now_ms()))
    assert decision.allowed and decision.limit_ms == 3_000  # min over the levels
    answered = _call(engine, clock, "1", "c1")
    _wait(lambda: switch.hangups)
    assert 3_000 <= switch.hangups[0][1] - answered <= 3_150
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.disposition is Disposition.CUT
    assert record.rating.cost_micros == 6_000 and record.rating.tenant == "acme"  # the customer: acme's price
    (level,) = record.upper
    assert (level.level, level.tenant, level.account_id, level.cost_micros, level.billed_seconds) == \
        (1, "default", RESELLER, 3_000, 3)  # the reseller: the operator's price of the same 3 s
    assert store.accounts["c1"].balance_micros == 94_000
    assert store.accounts[RESELLER].balance_micros == 500
    assert store.settled == {engine.call_id_of_leg("A1"): 6_000, level_call_id(engine.call_id_of_leg("A1"), 1): 3_000}
    assert store.open_reservations() == 0


def test_a_customer_with_less_money_than_its_reseller_is_cut_at_its_own_instant(setup) -> None:
    engine, store, switch, cdrs, clock, _ = setup
    store.add_account("c2", 5_000)  # 2.5 s at 2000/s
    store.add_account(RESELLER, 1_000_000)
    decision = engine.authorize(AuthorizeRequest("asterisk", "A2", "c2", "33123", clock.now_ms()))
    assert decision.allowed and decision.limit_ms == 2_000
    _call(engine, clock, "2", "c2")
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    assert record.rating.cost_micros == 4_000 and record.upper[0].cost_micros == 2_000
    assert store.accounts[RESELLER].balance_micros == 1_000_000 - 2_000


def test_a_call_that_ends_normally_charges_every_level_its_own_price_converted(setup) -> None:
    engine, store, switch, cdrs, clock, rater = setup
    rater.fx = Conversion("USD", "EUR", 9_200_000_000)  # the customer pays in EUR at 0.92
    store.add_account("c3", 100_000)
    store.add_account(RESELLER, 100_000)
    assert engine.authorize(AuthorizeRequest("asterisk", "A3", "c3", "33123", clock.now_ms())).allowed
    answered = _call(engine, clock, "3", "c3")
    gevent.sleep(1.3)
    engine.on_event(LegHungUp("B3", answered + 1_250, cause="NORMAL_CLEARING"))
    engine.on_event(LegHungUp("A3", answered + 1_260, cause="NORMAL_CLEARING"))
    _wait(lambda: cdrs.records)
    (record,) = cdrs.records
    # 2 s billed: 4000 USD micro-units at acme's price, 3680 EUR; the reseller 2000 USD.
    assert (record.rating.cost_micros, record.rating.plan_cost_micros, record.rating.currency) == (3_680, 4_000, "EUR")
    assert record.upper[0].cost_micros == 2_000
    assert store.accounts["c3"].balance_micros == 100_000 - 3_680
    assert store.accounts[RESELLER].balance_micros == 100_000 - 2_000
    assert store.open_reservations() == 0


def test_a_reseller_that_cannot_pay_refuses_the_call_and_releases_the_customer(setup) -> None:
    engine, store, switch, cdrs, clock, rater = setup
    store.add_account("c4", 100_000)
    store.add_account(RESELLER, 500)  # not even one second
    decision = engine.authorize(AuthorizeRequest("asterisk", "A4", "c4", "33123", clock.now_ms()))
    assert not decision.allowed and decision.reason is DenyReason.INSUFFICIENT_FUNDS
    assert "acme" in decision.detail
    _wait(lambda: store.open_reservations() == 0)
    assert store.accounts["c4"].reserved_micros == 0 and store.accounts["c4"].balance_micros == 100_000
    rater.no_rate_above = True  # no rate at the reseller's level: refused with that level's reason
    store.topup(RESELLER, 100_000)
    decision = engine.authorize(AuthorizeRequest("asterisk", "A5", "c4", "33123", clock.now_ms()))
    assert not decision.allowed and decision.reason is DenyReason.NO_RATE and "acme" in decision.detail
    assert store.open_reservations() == 0


def test_a_customer_that_cannot_pay_refuses_with_its_own_reason_and_its_reseller_is_given_back_its_hold(
        setup) -> None:
    # The customer and its reseller are reserved in one store call (one round trip): a refused
    # customer's reseller held the first slice for that moment only, and gets it back.
    engine, store, switch, cdrs, clock, rater = setup
    store.add_account("c8", 50)  # not even one second of its own
    store.add_account(RESELLER, 100_000)
    decision = engine.authorize(AuthorizeRequest("asterisk", "A8", "c8", "33123", clock.now_ms()))
    assert not decision.allowed and decision.reason is DenyReason.INSUFFICIENT_FUNDS
    assert "acme" not in decision.detail  # the customer's own refusal, not its reseller's
    _wait(lambda: store.open_reservations() == 0)
    assert store.accounts[RESELLER].reserved_micros == 0 and store.accounts[RESELLER].balance_micros == 100_000
    store.accounts["c8"].status = "suspended"
    store.topup("c8", 100_000)
    refused = engine.authorize(AuthorizeRequest("asterisk", "A9", "c8", "33123", clock.now_ms()))
    assert not refused.allowed and refused.reason is DenyReason.SUSPENDED
    _wait(lambda: store.open_reservations() == 0)
    assert store.accounts[RESELLER].reserved_micros == 0


def test_a_suspended_reseller_refuses_new_calls_and_lets_live_ones_drain(setup) -> None:
    engine, store, switch, cdrs, clock, _ = setup
    store.add_account("c6", 100_000)
    store.add_account(RESELLER, 4_000)  # 4 s
    assert engine.authorize(AuthorizeRequest("asterisk", "A6", "c6", "33123", clock.now_ms())).allowed
    answered = _call(engine, clock, "6", "c6")
    store.accounts[RESELLER].status = "suspended"
    refused = engine.authorize(AuthorizeRequest("asterisk", "A7", "c6", "33123", clock.now_ms()))
    assert not refused.allowed and refused.reason is DenyReason.SUSPENDED
    # The live call goes on (drain) until the reseller's money runs out, then it is cut.
    _wait(lambda: switch.hangups)
    assert 4_000 <= switch.hangups[0][1] - answered <= 4_150
    _wait(lambda: cdrs.records)
    assert cdrs.records[0].upper[0].cost_micros == 4_000
    assert store.accounts[RESELLER].balance_micros == 0


def test_a_direct_customer_has_no_upper_level(setup) -> None:
    engine, store, switch, cdrs, clock, _ = setup
    store.add_account("direct", 2_500)
    decision = engine.authorize(AuthorizeRequest("asterisk", "A8", "direct", "33123", clock.now_ms()))
    assert decision.allowed and decision.limit_ms == 2_000
    _call(engine, clock, "8", "direct")
    _wait(lambda: cdrs.records)
    assert cdrs.records[0].upper == () and cdrs.records[0].rating.cost_micros == 2_000
    assert list(store.settled) == [engine.call_id_of_leg("A8")]


def test_a_restarted_agent_adopts_every_level_of_a_call_and_charges_each_once() -> None:
    """A crash between two levels' nibble steps: the customer's slice 2 was debited, the
    reseller's not. The restarted agent adopts both store calls; each level ends charged its own
    price of the real time, once."""
    clock = SystemClock()
    store = MemoryStore()
    cdrs = Cdrs()
    store.add_account("c9", 100_000)
    store.add_account(RESELLER, 100_000)
    first = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), store=store, rater=ChainRater(),
                   clock=clock, cdr=cdrs)
    call_id = first.call_id_of_leg("A9")
    level_id = level_call_id(call_id, 1)
    now = clock.now_ms()
    answered = now - 2_500
    # What the earlier run left: the customer reserved and two nibbles debited; the reseller one.
    store.authorize("c9", call_id, 2_000, 2_000, answered)
    store.authorize(RESELLER, level_id, 1_000, 1_000, answered)
    from agent.core.session import NibbleStep
    store.nibbles([NibbleStep(call_id, 1, 2_000, 2_000, "c9"), NibbleStep(level_id, 1, 1_000, 1_000, RESELLER)],
                  answered + 1_000)
    store.nibbles([NibbleStep(call_id, 2, 2_000, 2_000, "c9")], answered + 2_000)  # the crash: level 1 not sent
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                    rater=ChainRater(), clock=clock, cdr=cdrs)
    engine.adoptable = {
        call_id: LiveCall("c9", call_id, "n1", 2, 2_000, 4_000, 0, answered, now + 30_000),
        level_id: LiveCall(RESELLER, level_id, "n1", 1, 1_000, 1_000, 0, answered, now + 30_000),
    }
    switch = Switch(engine, clock)
    engine.add_switch(switch)
    engine.start()
    try:
        engine.on_event(PbxConnected("asterisk", clock.now_ms(), (
            LiveLeg("A9", Direction.INBOUND, callee="33123", created_ms=answered - 100),
            LiveLeg("B9", Direction.OUTBOUND, created_ms=answered - 50, parent_leg_id="A9", answered=True,
                    answered_ms=answered))))
        _wait(lambda: call_id in engine.registry.sessions)
        gevent.sleep(0.4)
        assert not cdrs.records and not switch.hangups
        end = clock.now_ms()
        engine.on_event(LegHungUp("B9", end, cause="NORMAL_CLEARING"))
        engine.on_event(LegHungUp("A9", end, cause="NORMAL_CLEARING"))
        _wait(lambda: cdrs.records)
    finally:
        engine.stop(1)
    (record,) = cdrs.records
    seconds = -(-(end - answered) // 1000)
    assert record.rating.cost_micros == 2_000 * seconds
    assert record.upper[0].cost_micros == 1_000 * seconds
    assert store.settled == {call_id: 2_000 * seconds, level_id: 1_000 * seconds}
    assert store.accounts["c9"].balance_micros == 100_000 - 2_000 * seconds
    assert store.accounts[RESELLER].balance_micros == 100_000 - 1_000 * seconds
    assert store.open_reservations() == 0


def _left_behind(store: MemoryStore, clock: SystemClock, cdrs: Cdrs, rater: ChainRater, account: str, leg: str,
                 started_ms: int) -> tuple[Engine, str, str]:
    """What a run that died left: a call of ``account`` (a customer of acme) and its level-1
    store call, each reserved at ``started_ms`` and one nibble debited a second later; and the
    engine of the next run, started, with both adoptable and the call's facts (its leg ``leg``)."""
    from agent.core.session import NibbleStep
    from agent.services.engine import LeftBehind

    store.add_account(account, 100_000)
    store.add_account(RESELLER, 100_000)
    call_id = f"n1-{leg}"
    level_id = level_call_id(call_id, 1)
    now = clock.now_ms()
    store.authorize(account, call_id, 2_000, 2_000, started_ms)
    store.authorize(RESELLER, level_id, 1_000, 1_000, started_ms)
    store.nibbles([NibbleStep(call_id, 1, 2_000, 2_000, account), NibbleStep(level_id, 1, 1_000, 1_000, RESELLER)],
                  started_ms + 1_000)
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1), store=store, rater=rater,
                    clock=clock, cdr=cdrs)
    engine.adoptable = {
        call_id: LiveCall(account, call_id, "n1", 1, 2_000, 2_000, 0, started_ms, now + 30_000),
        level_id: LiveCall(RESELLER, level_id, "n1", 1, 1_000, 1_000, 0, started_ms, now + 30_000),
    }
    engine.adoptable_facts = {call_id: LeftBehind(call_id, "asterisk", "33123", "", leg, started_ms, started_ms)}
    engine.add_switch(Switch(engine, clock))
    engine.start()
    return engine, call_id, level_id


def test_a_call_left_behind_is_settled_at_every_level_with_what_each_debited() -> None:
    """A call of a reseller's customer that ended while no agent ran: each level is charged
    what its own nibbles debited, once, and the record carries every level."""
    clock = SystemClock()
    store = MemoryStore()
    cdrs = Cdrs()
    engine, call_id, level_id = _left_behind(store, clock, cdrs, ChainRater(), "c10", "A10",
                                             clock.now_ms() - 5_000)
    try:
        engine.on_event(PbxConnected("asterisk", clock.now_ms(), ()))
        _wait(lambda: cdrs.records)
        _wait(lambda: store.open_reservations() == 0)
    finally:
        engine.stop(1)
    (record,) = cdrs.records
    assert (record.rating.cost_micros, record.rating.tenant) == (2_000, "acme")
    assert [(g.level, g.account_id, g.tenant, g.cost_micros) for g in record.upper] == [(1, RESELLER, "default", 1_000)]
    assert store.settled == {call_id: 2_000, level_id: 1_000}
    assert not engine.adoptable


@pytest.mark.parametrize("fx", [None, Conversion("USD", "EUR", 9_200_000_000)], ids=["same-currency", "converted"])
def test_a_call_left_behind_billed_from_the_pbx_cdr_charges_every_level_its_price_of_the_real_time(
        fx: Conversion | None) -> None:
    """The PBX's own CDR says the call talked 7.2 s, past what the nibbles had debited (they
    stopped with the agent). The customer pays its price of those 8 billed seconds, and the
    reseller its own: before, the reseller was charged only what its nibbles had debited. A
    customer in another currency than its plan: the decision records the rate used (before: no
    rate recorded, so a re-rating could not convert as the charge did)."""
    clock = SystemClock()
    store = MemoryStore()
    cdrs = Cdrs()
    rater = ChainRater()
    rater.fx = fx
    from agent.core.events import EndedCall
    from agent.services.engine import FROM_PBX_CDR

    answered = clock.now_ms() - 10_000
    engine, call_id, level_id = _left_behind(store, clock, cdrs, rater, "c11", "A11", answered)
    try:
        engine.on_event(PbxConnected("asterisk", clock.now_ms(), (), (EndedCall("A11", answered, answered + 7_200),)))
        _wait(lambda: cdrs.records)
        _wait(lambda: store.open_reservations() == 0)
    finally:
        engine.stop(1)
    (record,) = cdrs.records
    cost = 16_000 if fx is None else 14_720  # 8 s at 2,000 USD micro-units, or in EUR at 0.92
    assert (record.rating.reason, record.duration_ms, record.rating.cost_micros) == (FROM_PBX_CDR, 7_200, cost)
    assert (record.rating.plan_currency, record.rating.currency, record.rating.fx_rate_e10,
            record.rating.plan_cost_micros) == ("USD", "USD" if fx is None else "EUR",
                                                None if fx is None else 9_200_000_000, 16_000)
    assert [(g.level, g.account_id, g.tenant, g.cost_micros, g.billed_seconds, g.reason, g.plan_name)
            for g in record.upper] == [(1, RESELLER, "default", 8_000, 8, FROM_PBX_CDR, "wholesale")]
    assert store.settled == {call_id: cost, level_id: 8_000}
    assert store.accounts[RESELLER].balance_micros == 100_000 - 8_000
    assert not engine.adoptable


def test_an_adopted_call_in_its_bundle_on_a_plan_in_another_currency_keeps_its_bundle_seconds() -> None:
    """The known gap: a restarted agent adopting a call that draws on a bundle, on a USD plan for
    an EUR account, priced it in money (adoption saw only a plain rate row). Now the plan's own
    row is put in its bundle under the conversion: a call inside its bundle costs nothing."""
    from agent.core.bundles import BundleSlot

    slot = BundleSlot(1, 0, 120, 2**50)
    conversion = Conversion("USD", "EUR", 9_000_000_000)

    class BundleRater:
        def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
            return RatedCall(ConvertedTariff(WHOLESALE, conversion),
                             RatingInfo("usd", 2, "33", 60_000, "USD", "EUR", conversion.rate_e10), (slot,))

    clock = SystemClock()
    store = MemoryStore()
    cdrs = Cdrs()
    store.add_account("eve", 100_000)
    call_id = "n1-A11"
    now = clock.now_ms()
    answered = now - 1_500
    held = store.authorize("eve", call_id, 0, 0, answered, bundle_slots=(slot,), bundle_want_s=6)
    assert held.bundle_granted_s == 6
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=6, hangup_verify_ms=400), store=store,
                    rater=BundleRater(), clock=clock, cdr=cdrs)
    engine.adoptable = {call_id: LiveCall("eve", call_id, "n1", 0, 0, 0, 0, answered, now + 30_000,
                                          bundle_held_s=6, bundle_used_s=0)}
    engine.add_switch(Switch(engine, clock))
    engine.start()
    try:
        engine.on_event(PbxConnected("asterisk", clock.now_ms(), (
            LiveLeg("A11", Direction.INBOUND, callee="33123", created_ms=answered - 100),
            LiveLeg("B11", Direction.OUTBOUND, parent_leg_id="A11", answered=True, created_ms=answered - 50,
                    answered_ms=answered))))
        _wait(lambda: call_id in engine.registry.sessions)
        end = clock.now_ms() + 500
        engine.on_event(LegHungUp("B11", end, cause="NORMAL_CLEARING"))
        engine.on_event(LegHungUp("A11", end, cause="NORMAL_CLEARING"))
        _wait(lambda: cdrs.records)
    finally:
        engine.stop(1)
    (record,) = cdrs.records
    assert record.rating.bundle_seconds == -(-(end - answered) // 1000)
    assert record.rating.cost_micros == 0  # in its bundle: no money (it was 0.9 x 1000/s before the fix)
    assert store.accounts["eve"].balance_micros == 100_000


def test_level_call_ids_stay_within_64_characters_and_never_collide_with_a_call_id() -> None:
    from agent.services.engine import CALL_ID_UNSAFE

    assert level_call_id("n1-1700000000.1", 0) == "n1-1700000000.1"
    assert level_call_id("n1-1700000000.1", 2) == "n1-1700000000.1^2"
    long_a, long_b = "n" * 63 + "a", "n" * 63 + "b"
    ids = {level_call_id(call, level) for call in (long_a, long_b) for level in (1, 2, 3)}
    assert len(ids) == 6 and all(len(i) <= 64 and i.isprintable() for i in ids)
    assert all(CALL_ID_UNSAFE.search(i) for i in ids)  # "^": a call id the engine makes never has one


def test_the_pure_session_steps_every_level_its_own_difference_and_cuts_at_the_poorest() -> None:
    from agent.core.events import LegAnswered, LegCreated
    from agent.core.session import CallSession, Leg, NibbleStep, SessionSettings, SettleStep, TimerKind, payers_of

    settings = SessionSettings(nibble_ms=1_000)
    chain = (LevelRated(1, "acme", "default", RESELLER, RatedCall(WHOLESALE, RatingInfo("wholesale"))),)
    upper = payers_of("c", chain, [1_000])
    upper[0].available_micros = 2_500
    session = CallSession("c", "n1", "asterisk", "c11", "33123", "", Leg("A", Direction.INBOUND, 0), 0, RETAIL,
                          RatingInfo("acme-retail"), settings, 2_000, 2_000, upper=upper, seller="acme")
    session.on_leg_created(LegCreated("B", 0, Direction.OUTBOUND, parent_leg_id="A"))
    session.on_answered(LegAnswered("B", 10_000))
    steps = [e for e in session.on_timer(TimerKind.NIBBLE, session.token, 11_000) if isinstance(e, NibbleStep)]
    assert [(s.call_id, s.level, s.debit_micros, s.reserve_micros) for s in steps] == [
        ("c", 0, 2_000, 2_000), ("c^1", 1, 1_000, 1_000)]
    assert session.on_nibble_result(1, 2_000, 2_000, 11_000) == []  # the customer alone: wait for the reseller
    effects = session.on_nibble_result(1, 500, 1_000, 11_000, level=1)  # the reseller has 0.5 s left
    assert session.exhausted and session.cut_at_ms == 10_000 + 1_000  # 1.5 s paid at level 1: 1 whole second
    assert "acme" in session.cut_reason and effects
    settle = [e for e in session.on_hung_up(LegHungUp("B", 11_000)) if isinstance(e, SettleStep)]
    assert [(s.call_id, s.level, s.cost_micros) for s in settle] == [("c", 0, 2_000), ("c^1", 1, 1_000)]

