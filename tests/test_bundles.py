"""Free-minute bundles (DESIGN §9): the money formula, its inverse, periods, and one call that
starts in its bundle and finishes in money, driven through the session and the memory store."""

from __future__ import annotations

import heapq
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.bundles import (
    BundleDef,
    BundleGrant,
    BundleSlot,
    BundleTariff,
    PeriodKind,
    check_bundle,
    max_seconds_with_bundle,
    money_micros_for_seconds,
    parse_prefixes,
    period_bounds,
    slots_for,
)
from agent.core.errors import InvalidInput
from agent.core.events import AuthorizeRequest, Direction, LegAnswered, LegCreated, LegHungUp
from agent.core.rating import RateRow, cost_micros_for_seconds
from agent.core.session import ArmTimer, Finished, NibbleStep, RatedCall, RatingInfo, SessionSettings, SettleStep
from agent.services.authorize import decide
from agent.sim.memory_store import MemoryStore


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


rows = st.builds(
    RateRow, prefix=st.just("33"), destination=st.just("FR"), rate_micros=st.integers(0, 5_000_000),
    connect_fee_micros=st.integers(0, 200_000), initial_increment=st.integers(1, 90), increment=st.integers(1, 60),
    minimum_seconds=st.integers(0, 120), grace_seconds=st.integers(0, 10))


def independent_money(row: RateRow, seconds: int, held_s: int) -> int:
    """§9 written out from the DESIGN text, independently of agent/core."""
    if seconds == 0 or seconds <= row.grace_seconds:
        return 0
    b = max(seconds, row.minimum_seconds)
    if b <= row.initial_increment:
        b = row.initial_increment
    else:
        b = row.initial_increment + -(-(b - row.initial_increment) // row.increment) * row.increment
    covered = min(b, held_s)
    fee = 0 if covered > 0 else row.connect_fee_micros
    return fee + -(-(row.rate_micros * (b - covered)) // 60)


# ------------------------------------------------------------------------------ the formula


@given(rows, st.integers(0, 7_200), st.integers(0, 7_200))
def test_money_follows_the_design_formula(row: RateRow, seconds: int, held_s: int) -> None:
    assert money_micros_for_seconds(row, seconds, held_s) == independent_money(row, seconds, held_s)


@given(rows, st.integers(0, 7_200))
def test_without_bundle_seconds_the_money_is_the_plain_rating(row: RateRow, seconds: int) -> None:
    assert money_micros_for_seconds(row, seconds, 0) == cost_micros_for_seconds(row, seconds)


@given(rows, st.integers(1, 3_600), st.integers(0, 3_600))
def test_money_never_decreases_with_time_once_in_the_bundle(row: RateRow, seconds: int, held_s: int) -> None:
    """Nibble debits are differences of this function: none may be negative."""
    assert money_micros_for_seconds(row, seconds + 1, held_s) >= money_micros_for_seconds(row, seconds, held_s)


@given(rows, st.integers(0, 50_000_000), st.integers(1, 3_600))
def test_max_seconds_with_a_bundle_is_exact(row: RateRow, budget: int, held_s: int) -> None:
    m = max_seconds_with_bundle(row, budget, held_s, cap_seconds=100_000)
    if m == 0:
        # Nothing affordable beyond a free grace period.
        assert all(money_micros_for_seconds(row, d, held_s) > budget or d <= row.grace_seconds
                   for d in range(1, row.grace_seconds + row.minimum_seconds + row.initial_increment + 2))
        return
    assert m > row.grace_seconds
    assert money_micros_for_seconds(row, m, held_s) <= budget
    if m < 100_000:
        assert money_micros_for_seconds(row, m + 1, held_s) > budget


def test_a_call_that_runs_past_its_bundle_pays_only_beyond_it_without_connect_fee() -> None:
    # 1.20/min, 30/6 increments, 0.10 connect fee; 100 s talked with 60 bundle seconds:
    # billed 102 s (30 + 12 x 6), 60 covered, 42 s of money = 0.84; no connect fee.
    row = RateRow("33", "FR", 1_200_000, connect_fee_micros=100_000, initial_increment=30, increment=6)
    assert money_micros_for_seconds(row, 100, 60) == 840_000
    assert money_micros_for_seconds(row, 100, 0) == 100_000 + 2_040_000
    assert money_micros_for_seconds(row, 55, 60) == 0
    # 0.50 of money after a 60 s bundle: 25 s more, on a 6 s increment boundary: 84 s.
    assert max_seconds_with_bundle(row, 500_000, 60) == 84


# ------------------------------------------------------------------------------ periods


def month(anchor: int, rollover: bool = False) -> BundleDef:
    return check_bundle(BundleDef("eu", 600, ("33",), PeriodKind.MONTH, anchor, rollover))


def test_a_month_anchored_on_the_31st_starts_on_the_last_day_of_shorter_months() -> None:
    bundle = month(31)
    assert period_bounds(bundle, "UTC", ms("2027-02-15T12:00:00+00:00")) == (
        ms("2027-01-31T00:00:00+00:00"), ms("2027-02-28T00:00:00+00:00"))
    assert period_bounds(bundle, "UTC", ms("2027-03-01T00:00:00+00:00")) == (
        ms("2027-02-28T00:00:00+00:00"), ms("2027-03-31T00:00:00+00:00"))
    assert period_bounds(bundle, "UTC", ms("2028-02-29T08:00:00+00:00"))[0] == ms("2028-02-29T00:00:00+00:00")


def test_periods_roll_at_local_midnight_of_the_accounts_timezone() -> None:
    bundle = month(1)
    # 23:30 UTC on 31 January is already 1 February in Paris: the new period.
    start, end = period_bounds(bundle, "Europe/Paris", ms("2027-01-31T23:30:00+00:00"))
    assert start == ms("2027-02-01T00:00:00+01:00") and end == ms("2027-03-01T00:00:00+01:00")
    week = check_bundle(BundleDef("wk", 60, ("33",), PeriodKind.WEEK, 1))
    start, end = period_bounds(week, "UTC", ms("2027-01-07T10:00:00+00:00"))  # a Thursday
    assert start == ms("2027-01-04T00:00:00+00:00") and end - start == 7 * 86_400_000


def test_bad_bundles_are_refused_with_the_reason() -> None:
    with pytest.raises(InvalidInput, match="prefix 2 '33a' must be digits"):
        check_bundle(BundleDef("x", 60, ("33", "33a")))
    with pytest.raises(InvalidInput, match="anchor is a day of the month, 1-31"):
        check_bundle(BundleDef("x", 60, ("33",), PeriodKind.MONTH, 32))
    with pytest.raises(InvalidInput, match="rates.txt:2: prefix '44x'"):
        parse_prefixes("33, 34\n44x\n", "rates.txt")
    assert parse_prefixes("+33 34 # mobiles\n\n35", "f") == ("33", "34", "35")


def test_slots_are_the_matching_grants_in_force_earliest_expiry_first_with_rollover() -> None:
    now = ms("2027-03-10T10:00:00+00:00")
    grants = [
        BundleGrant(1, "alice", month(1, rollover=True), ms("2027-01-01T00:00:00+00:00")),
        BundleGrant(2, "alice", check_bundle(BundleDef("promo", 120, ("3361",), PeriodKind.ONCE)),
                    ms("2027-03-01T00:00:00+00:00"), ms("2027-03-20T00:00:00+00:00")),
        BundleGrant(3, "alice", check_bundle(BundleDef("uk", 300, ("44",))), ms("2027-01-01T00:00:00+00:00")),
        BundleGrant(4, "alice", month(1), ms("2027-04-01T00:00:00+00:00")),  # not yet in force
    ]
    slots = slots_for(grants, "33612345678", now, "UTC")
    assert [slot.grant_id for slot in slots] == [2, 1]  # the promo ends first
    assert slots[1] == BundleSlot(1, ms("2027-03-01T00:00:00+00:00"), 600, ms("2027-04-01T00:00:00+00:00"),
                                  ms("2027-02-01T00:00:00+00:00"))
    assert slots_for(grants, "4420", now, "UTC")[0].carry_from_ms is None
    assert slots_for(grants, "4930", now, "UTC") == ()


# ------------------------------------------------------------------ a call, end to end


class Rater:
    def __init__(self, row: RateRow, slots: tuple[BundleSlot, ...]) -> None:
        self.row, self.slots = row, slots

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        return RatedCall(self.row, RatingInfo("retail", 1, self.row.prefix, self.row.rate_micros), self.slots)


def run_call(store: MemoryStore, rater: Rater, talk_s: int, *, leg: str = "A1", at_ms: int = 1_000_000,
             nibble_s: int = 10) -> tuple[int, Finished]:
    """Authorize, answer, talk ``talk_s`` (or until cut), settle: returns (cost, record)."""
    settings = SessionSettings(nibble_ms=nibble_s * 1000)
    request = AuthorizeRequest("asterisk", leg, "alice", "33612345678", at_ms)
    outcome = decide(request, call_id=f"c-{leg}", node="n1", rater=rater,
                     store_authorize=lambda a, w, m, s, ws: store.authorize(a, f"c-{leg}", w, m, at_ms,
                                                                           bundle_slots=s, bundle_want_s=ws),
                     settings=settings, max_call_seconds=14_400, now_ms=at_ms)
    session = outcome.session
    assert session is not None, outcome.decision
    timers: list[tuple[int, int, ArmTimer]] = []
    seq = 0
    finished: list[Finished] = []
    costs: list[int] = []

    def apply(effects: list[object], now: int) -> None:
        nonlocal seq
        for effect in effects:
            if isinstance(effect, ArmTimer):
                seq += 1
                heapq.heappush(timers, (effect.at_ms, seq, effect))
            elif isinstance(effect, NibbleStep):
                (result,) = store.nibbles([effect], now)
                apply(session.on_nibble_result(effect.seq, result.granted_micros, result.debited_micros, now,
                                               store_ok=result.ok, bundle_granted_s=result.bundle_granted_s), now)
            elif isinstance(effect, SettleStep):
                store.settle(effect.call_id, effect.seq, effect.cost_micros, now, "alice", effect.bundle)
                costs.append(effect.cost_micros)
                apply(session.on_settled(now, effect.cost_micros), now)
            elif isinstance(effect, Finished):
                finished.append(effect)

    answer_ms = at_ms + 2_000
    apply(session.on_leg_created(LegCreated("B1", at_ms + 100, Direction.OUTBOUND)), at_ms + 100)
    apply(session.on_answered(LegAnswered("B1", answer_ms)), answer_ms)
    hangup_ms = answer_ms + talk_s * 1000
    while timers and timers[0][0] < hangup_ms and not costs:
        at, _, timer = heapq.heappop(timers)
        apply(session.on_timer(timer.kind, timer.token, at), at)
        if session.cut_by_agent and not costs:  # the PBX confirms the cut at once
            apply(session.on_hung_up(LegHungUp("B1", at)), at)
            apply(session.on_hung_up(LegHungUp(leg, at)), at)
    if not costs:
        apply(session.on_hung_up(LegHungUp("B1", hangup_ms)), hangup_ms)
        apply(session.on_hung_up(LegHungUp(leg, hangup_ms)), hangup_ms)
    while timers and not finished:
        at, _, timer = heapq.heappop(timers)
        apply(session.on_timer(timer.kind, timer.token, at), at)
    assert costs and finished
    return costs[0], finished[0]


ROW = RateRow("33", "FR", 1_200_000, connect_fee_micros=100_000, initial_increment=30, increment=6, rate_id=1)


def slot(seconds: int) -> BundleSlot:
    return BundleSlot(7, 0, seconds, 2**62)


def test_a_call_starts_in_its_bundle_and_finishes_in_money() -> None:
    store = MemoryStore()
    store.add_account("alice", 1_000_000)
    cost, finished = run_call(store, Rater(ROW, (slot(60),)), talk_s=100)
    # 100 s: billed 102, 60 from the bundle, 42 s of money at 1.20/min = 0.84, no connect fee.
    assert cost == 840_000
    assert store.accounts["alice"].balance_micros == 1_000_000 - 840_000
    assert store.periods[(7, 0)].used_s == 60 and store.periods[(7, 0)].reserved_s == 0
    assert finished.record.rating is not None and finished.record.rating.bundle_seconds == 60


def test_an_account_with_no_money_talks_its_bundle_and_is_cut_when_it_runs_out() -> None:
    store = MemoryStore()
    store.add_account("alice", 0)
    cost, finished = run_call(store, Rater(ROW, (slot(45),)), talk_s=300)
    assert cost == 0
    # Cut where the bundle ends on the rate's block structure: 42 s bills 30 + 2 x 6 = 42, the
    # 43rd second would bill 48 (3 s of money the account does not have).
    assert finished.record.duration_ms == 42_000
    assert store.periods[(7, 0)].used_s == 42 and store.periods[(7, 0)].reserved_s == 0


def test_two_calls_share_one_bundle_without_using_a_second_twice() -> None:
    store = MemoryStore()
    store.add_account("alice", 10_000_000)
    rater = Rater(ROW, (slot(90),))
    first, _ = run_call(store, rater, talk_s=60, leg="A1")
    second, record = run_call(store, rater, talk_s=60, leg="A2", at_ms=2_000_000)
    assert first == 0  # 60 s in the bundle
    # 30 bundle seconds left: the second call pays 30 s of money, no connect fee.
    assert second == 600_000 and record.record.rating is not None and record.record.rating.bundle_seconds == 30
    assert store.periods[(7, 0)].used_s == 90


def test_an_empty_bundle_leaves_the_call_to_money_with_its_connect_fee() -> None:
    store = MemoryStore()
    store.add_account("alice", 10_000_000)
    rater = Rater(ROW, (slot(30),))
    run_call(store, rater, talk_s=30, leg="A1")
    cost, record = run_call(store, rater, talk_s=40, leg="A2", at_ms=2_000_000)
    assert cost == 100_000 + 840_000  # 42 billed seconds, connect fee: no bundle covers this call
    assert record.record.rating is not None and record.record.rating.bundle_seconds == 0


def test_the_pbx_limit_at_authorize_counts_the_bundle_and_the_money() -> None:
    store = MemoryStore()
    store.add_account("alice", 600_000)  # 30 s of money beyond the bundle
    request = AuthorizeRequest("asterisk", "A9", "alice", "33612345678", 1_000)
    outcome = decide(request, call_id="c9", node="n1", rater=Rater(ROW, (slot(120),)),
                     store_authorize=lambda a, w, m, s, ws: store.authorize(a, "c9", w, m, 1_000, bundle_slots=s,
                                                                           bundle_want_s=ws),
                     settings=SessionSettings(nibble_ms=10_000), max_call_seconds=14_400, now_ms=1_000)
    assert outcome.decision.allowed and outcome.decision.limit_ms == 150_000
    assert isinstance(outcome.session.tariff if outcome.session else None, BundleTariff)
    assert store.accounts["alice"].reserved_micros == 0  # the first slice is in the bundle


@pytest.mark.parametrize("when", ["2027-02-28T00:00:00+00:00", "2027-02-28T23:59:59+00:00"])
def test_the_february_period_of_an_anchor_31_bundle_lasts_to_the_end_of_the_month(when: str) -> None:
    start, end = period_bounds(month(31), "UTC", ms(when))
    assert datetime.fromtimestamp(start / 1000, UTC).day == 28
    assert datetime.fromtimestamp(end / 1000, UTC).day == 31


def test_an_adopted_call_in_its_bundle_goes_on_drawing_on_it() -> None:
    """An agent restarted mid-call: the store says the call holds 30 bundle seconds and used 20,
    no money debited. The new run nibbles on from there and keeps drawing on the bundle."""
    from agent.core.session import CallSession, Leg, TimerKind

    settings = SessionSettings(nibble_ms=10_000)
    session = CallSession(
        call_id="c1", node="n1", pbx="asterisk", account_id="alice", destination="33612345678", caller="100",
        a_leg=Leg("A1", Direction.INBOUND, 1_000), authorized_ms=1_000,
        tariff=BundleTariff(ROW, 30, (slot(600),)), rating=RatingInfo("retail"), settings=settings,
        granted_micros=0, limit_ms=0)
    session.on_leg_created(LegCreated("B1", 1_100, Direction.OUTBOUND))
    session.on_answered(LegAnswered("B1", 2_000))
    effects = session.adopt_progress(debited_micros=0, reserved_micros=0, seq=2, now_ms=24_000, bundle_used_s=30)
    # 30 seconds used: one nibble covers them (the rate's first block is 30 s); the flat stretch
    # after it costs nothing, so catching up through it is free.
    assert session.bundle_open and session.nibbles_done == 1
    nibble = next(e for e in effects if isinstance(e, ArmTimer) and e.kind is TimerKind.NIBBLE)
    (step,) = session.on_timer(TimerKind.NIBBLE, nibble.token, nibble.at_ms)
    assert isinstance(step, NibbleStep)
    assert (step.debit_micros, step.bundle_used_s, step.bundle_want_s) == (0, 30, 0)  # 20 s: billed 30
    session.on_nibble_result(step.seq, 0, 0, 24_000)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, 32_000)
    assert (step.debit_micros, step.bundle_used_s, step.bundle_want_s) == (0, 30, 12)  # 40 s: billed 42
    session.on_nibble_result(step.seq, 0, 0, 32_000, bundle_granted_s=12)
    assert session.bundle_seconds == 42 and session.bundle_open and not session.exhausted
