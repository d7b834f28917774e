"""The pure call session: when billing starts, what each nibble debits, the exact cut."""

from agent.core.cdr import Disposition
from agent.core.events import ArmBackstop, Direction, HangupLeg, LegAnswered, LegCreated, LegHungUp, WarnLeg
from agent.core.session import (
    Alert,
    ArmTimer,
    CallSession,
    Command,
    Finished,
    Leg,
    NibbleStep,
    Phase,
    ReleaseStep,
    SettleStep,
    TimerKind,
)
from tests.session_helpers import FlatTariff, make_session

T0 = 1_000_000
PER_SECOND = FlatTariff(rate_micros=60_000)  # 1000 micro-units per second, 1/1 increments


def _answer_b(session, at_ms, leg="B1"):
    session.on_leg_created(LegCreated(leg, at_ms - 100, Direction.OUTBOUND, parent_leg_id="A1"))
    return session.on_answered(LegAnswered(leg, at_ms))


def _timers(effects):
    return {e.kind: e for e in effects if isinstance(e, ArmTimer)}


def test_billing_starts_at_the_dialled_legs_answer_not_the_callers() -> None:
    session = make_session(PER_SECOND, granted=6_000)
    assert session.on_answered(LegAnswered("A1", T0 + 100)) == []  # the IVR answers the caller
    assert session.phase is Phase.AUTHORIZED
    effects = _answer_b(session, T0 + 20_000)
    assert session.answer_ms == T0 + 20_000
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 26_000


def test_nibbles_debit_the_slice_used_and_reserve_the_next() -> None:
    tariff = FlatTariff(rate_micros=600_000, connect_fee_micros=50_000, initial_increment=30, increment=6)
    session = make_session(tariff, granted=tariff.cost_micros(6000))
    _answer_b(session, T0)
    debits = []
    for k in range(1, 12):
        (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + k * 6000)
        assert isinstance(step, NibbleStep)
        assert step.reserve_micros == tariff.cost_micros((k + 1) * 6000) - tariff.cost_micros(k * 6000)
        debits.append(step.debit_micros)
        session.on_nibble_result(step.seq, step.reserve_micros, step.debit_micros, T0 + k * 6000)
    assert sum(debits) == tariff.cost_micros(11 * 6000)  # never a rounding drift between nibbles


def test_partial_grant_cuts_at_the_exact_instant_the_money_runs_out() -> None:
    session = make_session(PER_SECOND, granted=6_000, warning_ms=2000)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6000)
    # Only 3.5 seconds' worth is left: the call may last 6 + 3 = 9 whole seconds.
    effects = session.on_nibble_result(step.seq, 3_500, step.debit_micros, T0 + 6000)
    timers = _timers(effects)
    assert timers[TimerKind.CUT].at_ms == T0 + 9000
    assert timers[TimerKind.WARN].at_ms == T0 + 7000
    assert session.on_timer(TimerKind.WARN, session.token, T0 + 7000) == [
        Command(session.call_id, WarnLeg("A1", 2))]
    cut = session.on_timer(TimerKind.CUT, session.token, T0 + 9000)
    hangups = [e.command for e in cut if isinstance(e, Command)]
    assert hangups == [HangupLeg("A1", reason="credit exhausted"), HangupLeg("B1", reason="credit exhausted")]
    # The PBX confirms 40 ms later: billed up to the cut, not one started second more.
    (settle,) = session.on_hung_up(LegHungUp("A1", T0 + 9040, cause="NORMAL_CLEARING"))
    assert isinstance(settle, SettleStep)
    assert settle.cost_micros == 9_000
    session.on_hung_up(LegHungUp("B1", T0 + 9045, cause="NORMAL_CLEARING"))
    (finished,) = session.on_settled(T0 + 9100)
    assert isinstance(finished, Finished)
    assert finished.record.disposition is Disposition.CUT
    assert finished.record.duration_ms == 9000


def test_unconfirmed_hangup_escalates_then_alerts() -> None:
    session = make_session(PER_SECOND, granted=2_000, verify_ms=1000)
    effects = _answer_b(session, T0)
    assert _timers(effects)[TimerKind.CUT].at_ms == T0 + 2000
    session.on_timer(TimerKind.CUT, session.token, T0 + 2000)
    escalated = session.on_timer(TimerKind.VERIFY, session.token, T0 + 3000)
    assert any(isinstance(e, Command) and e.command.escalate for e in escalated)
    final = session.on_timer(TimerKind.VERIFY, session.token, T0 + 4000)
    assert any(isinstance(e, Alert) and e.kind == "hangup_not_confirmed" for e in final)
    # When the PBX finally ends it much later, the real duration is charged.
    (settle,) = session.on_hung_up(LegHungUp("A1", T0 + 10_000))
    assert settle.cost_micros == 10_000


def test_confirmed_hangup_needs_no_escalation() -> None:
    session = make_session(PER_SECOND, granted=2_000, verify_ms=1000)
    _answer_b(session, T0)
    session.on_timer(TimerKind.CUT, session.token, T0 + 2000)
    session.on_hung_up(LegHungUp("B1", T0 + 2010))
    session.on_hung_up(LegHungUp("A1", T0 + 2020))
    assert session.on_timer(TimerKind.VERIFY, session.token, T0 + 3000) == []


def test_unanswered_call_is_released_with_its_disposition() -> None:
    session = make_session(PER_SECOND, granted=6_000)
    session.on_leg_created(LegCreated("B1", T0, Direction.OUTBOUND, parent_leg_id="A1"))
    assert session.on_hung_up(LegHungUp("B1", T0 + 500, cause="USER_BUSY")) == []
    (release,) = session.on_hung_up(LegHungUp("A1", T0 + 600, cause="NORMAL_CLEARING"))
    assert isinstance(release, ReleaseStep)
    (finished,) = session.on_settled(T0 + 700)
    assert finished.record.disposition is Disposition.BUSY
    assert finished.record.rating.cost_micros == 0


def test_duplicate_and_out_of_order_events_change_nothing() -> None:
    session = make_session(PER_SECOND, granted=6_000)
    session.on_leg_created(LegCreated("B1", T0, Direction.OUTBOUND, parent_leg_id="A1"))
    session.on_hung_up(LegHungUp("B1", T0 + 100))  # hangup before answer
    assert session.on_answered(LegAnswered("B1", T0 + 200)) == []
    assert session.answer_ms is None and session.phase is Phase.AUTHORIZED
    session2 = make_session(PER_SECOND, granted=6_000)
    _answer_b(session2, T0)
    assert session2.on_answered(LegAnswered("B1", T0 + 5000)) == []  # answered twice
    assert session2.answer_ms == T0
    session2.on_hung_up(LegHungUp("A1", T0 + 3000))
    assert session2.on_hung_up(LegHungUp("A1", T0 + 3000)) == []  # hangup twice
    (settle,) = session2.on_hung_up(LegHungUp("B1", T0 + 3004))  # the callee follows: billed to 3000
    assert settle.cost_micros == 3000


def test_transfer_keeps_billing_while_the_caller_talks_to_another_answered_leg() -> None:
    session = make_session(PER_SECOND, granted=6_000)
    _answer_b(session, T0)
    _answer_b(session, T0 + 4000, leg="C1")  # the callee transferred the caller to C
    assert session.on_hung_up(LegHungUp("B1", T0 + 5000)) == []
    assert session.phase is Phase.ANSWERED
    (settle,) = session.on_hung_up(LegHungUp("C1", T0 + 8000))
    assert settle.cost_micros == 8000


def test_grace_period_call_costs_nothing() -> None:
    session = make_session(FlatTariff(rate_micros=60_000, connect_fee_micros=100_000, grace=5), granted=200_000)
    _answer_b(session, T0)
    session.on_hung_up(LegHungUp("A1", T0 + 4_500))
    (settle,) = session.on_hung_up(LegHungUp("B1", T0 + 4_510))
    assert settle.cost_micros == 0


def test_store_outage_mid_call_cuts_at_the_end_of_the_granted_slice() -> None:
    session = make_session(PER_SECOND, granted=6_000)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6000)
    effects = session.on_nibble_result(step.seq, 0, 0, T0 + 6250, store_ok=False)
    assert _timers(effects)[TimerKind.CUT].at_ms == T0 + 6250  # now: the granted slice is used up


def test_nibbles_run_a_store_deadline_early_so_a_hung_store_cuts_at_the_boundary_exactly() -> None:
    # Issue 14: a nibble at the boundary that waited out a 250 ms deadline cut the call 250 ms
    # into a slice nobody paid for. With the lead, the store's failure is known before it starts.
    session = make_session(PER_SECOND, granted=6_000, nibble_lead_ms=350)
    effects = _answer_b(session, T0)
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 5_650
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 5_650)
    assert (step.debit_micros, step.reserve_micros) == (6_000, 6_000)  # slice 1 debited, slice 2 asked
    effects = session.on_nibble_result(step.seq, 0, 0, T0 + 5_900, store_ok=False)  # the deadline ran out
    assert _timers(effects)[TimerKind.CUT].at_ms == T0 + 6_000
    session.on_timer(TimerKind.CUT, session.token, T0 + 6_000)
    (settle,) = session.on_hung_up(LegHungUp("A1", T0 + 6_030))
    assert settle.cost_micros == 6_000
    # A granted nibble arms the next one the lead before its boundary too.
    session = make_session(PER_SECOND, granted=6_000, nibble_lead_ms=350)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 5_650)
    effects = session.on_nibble_result(step.seq, 6_000, 6_000, T0 + 5_660)
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 11_650


def test_the_nibble_lead_never_exceeds_half_a_nibble() -> None:
    session = make_session(PER_SECOND, granted=1_000, nibble_s=1, nibble_lead_ms=2_000)
    assert _timers(_answer_b(session, T0))[TimerKind.NIBBLE].at_ms == T0 + 500


def test_operator_hangup_stops_billing_at_the_request_and_keeps_nibbling_until_confirmed() -> None:
    session = make_session(PER_SECOND, granted=6_000, verify_ms=1000)
    _answer_b(session, T0)
    effects = session.operator_cut(T0 + 4_200, "operator request")
    hangups = [e.command for e in effects if isinstance(e, Command)]
    assert hangups == [HangupLeg("A1", reason="operator request"), HangupLeg("B1", reason="operator request")]
    # Nibble timers stay armed: if the PBX never ends the call, it keeps being charged.
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6000)
    assert isinstance(step, NibbleStep)
    (settle,) = session.on_hung_up(LegHungUp("A1", T0 + 4_700))
    assert settle.cost_micros == 5_000  # 4.2 s started seconds, not the 4.7 s the PBX took
    session.on_hung_up(LegHungUp("B1", T0 + 4_702))
    (finished,) = session.on_settled(T0 + 4_800)
    assert finished.record.disposition is Disposition.CUT


def test_operator_hangup_before_answer_cuts_the_caller_and_charges_nothing() -> None:
    session = make_session(PER_SECOND, granted=6_000)
    (command,) = [e for e in session.operator_cut(T0 + 500, "fraud") if isinstance(e, Command)]
    assert command.command == HangupLeg("A1", reason="fraud")
    (release,) = session.on_hung_up(LegHungUp("A1", T0 + 600))
    assert isinstance(release, ReleaseStep)
    assert session.operator_cut(T0 + 700, "again") == []


def test_a_call_ended_by_the_pbx_limit_is_recorded_as_cut() -> None:
    # Asterisk's L() may hang up a hair before the agent's own cut: still a cut for credit.
    session = make_session(PER_SECOND, granted=2_000)
    assert session.limit_ms == 2_000
    _answer_b(session, T0)
    session.on_hung_up(LegHungUp("B1", T0 + 1_990, cause="NORMAL_CLEARING"))
    session.on_hung_up(LegHungUp("A1", T0 + 2_000, cause="NORMAL_CLEARING"))
    (finished,) = session.on_settled(T0 + 2_100)
    assert finished.record.disposition is Disposition.CUT
    # A caller who hangs up well before the limit is an ordinary answered call.
    early = make_session(PER_SECOND, granted=6_000, a_leg="A2")
    _answer_b(early, T0, leg="B2")
    early.on_hung_up(LegHungUp("A2", T0 + 3_000, cause="NORMAL_CLEARING"))
    early.on_hung_up(LegHungUp("B2", T0 + 3_002, cause="NORMAL_CLEARING"))
    (finished,) = early.on_settled(T0 + 3_100)
    assert finished.record.disposition is Disposition.ANSWERED


def test_an_adopted_call_continues_from_the_nibbles_the_store_debited() -> None:
    tariff = FlatTariff(rate_micros=600_000, connect_fee_micros=50_000)
    session = make_session(tariff, granted=0, nibble_s=6)
    _answer_b(session, T0)
    debited = tariff.cost_micros(3 * 6000)  # three nibbles done before the restart
    next_slice = tariff.cost_micros(4 * 6000) - debited
    effects = session.adopt_progress(debited_micros=debited, reserved_micros=next_slice, seq=3, now_ms=T0 + 20_000)
    assert session.nibbles_done == 3
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 24_000
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 24_000)
    assert step.seq == 4 and step.debit_micros == next_slice
    # An adopted call whose money is already final is cut when it runs out.
    short = make_session(PER_SECOND, granted=0, a_leg="A2")
    _answer_b(short, T0, leg="B2")
    effects = short.adopt_progress(debited_micros=6_000, reserved_micros=1_500, seq=1, now_ms=T0 + 6_500)
    assert _timers(effects)[TimerKind.CUT].at_ms == T0 + 7_000


def test_an_adopted_call_whose_reservation_the_store_lost_reserves_again_instead_of_being_cut() -> None:
    """A Redis that restarted empty while no agent ran: the call is adopted from what the earlier
    run published, with nothing reserved. That is no verdict on the money: nibble at once (the
    store reserves again), catching up with the time already talked, never a cut at once."""
    session = make_session(PER_SECOND, granted=0, nibble_s=1)
    _answer_b(session, T0)
    effects = session.adopt_progress(debited_micros=0, reserved_micros=0, seq=0, now_ms=T0 + 3_500,
                                      reservation_lost=True)
    assert TimerKind.CUT not in _timers(effects)
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 3_500
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 3_500)
    assert (step.seq, step.debit_micros, step.reserve_micros) == (1, 1_000, 1_000)
    effects = session.on_nibble_result(1, granted_micros=1_000, debited_micros=1_000, now_ms=T0 + 3_510)
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 2_000  # past: the catch-up goes on at once
    # The same adoption without the flag means the money is final: a cut.
    broke = make_session(PER_SECOND, granted=0, a_leg="A2")
    _answer_b(broke, T0, leg="B2")
    assert TimerKind.CUT in _timers(broke.adopt_progress(debited_micros=0, reserved_micros=0, seq=0,
                                                         now_ms=T0 + 3_500))


def test_an_adopted_call_in_a_flat_stretch_of_its_tariff_is_not_cut() -> None:
    # 30 s initial increment, 6 s nibbles: nibbles 2-5 debit nothing and reserve nothing.
    tariff = FlatTariff(rate_micros=600_000, initial_increment=30, increment=6)
    session = make_session(tariff, granted=0, nibble_s=6)
    _answer_b(session, T0)
    effects = session.adopt_progress(debited_micros=tariff.cost_micros(18_000), reserved_micros=0, seq=3,
                                     now_ms=T0 + 20_000)
    assert TimerKind.CUT not in _timers(effects)
    assert _timers(effects)[TimerKind.NIBBLE].at_ms == T0 + 20_000  # catch up at once, debiting nothing
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 20_000)
    assert step.debit_micros == 0


def test_an_adopted_call_is_billed_from_its_real_answer_not_from_the_restart() -> None:
    # The PBX's listing only says the callee is up: the store's last renewal dates the nibbles.
    session = make_session(PER_SECOND, granted=0, nibble_s=1)
    _answer_b(session, T0 + 9_000)  # what a resync after the restart reports
    session.adopt_progress(debited_micros=4_000, reserved_micros=1_000, seq=4, now_ms=T0 + 9_000,
                           last_renewal_ms=T0 + 4_010)  # nibble 4, taken 10 ms late
    assert session.answer_ms == T0 + 10
    session.on_hung_up(LegHungUp("A1", T0 + 9_500))
    session.on_hung_up(LegHungUp("B1", T0 + 9_501))
    (finished,) = session.on_settled(T0 + 9_600)
    assert finished.record.duration_ms == 9_490


def test_a_pbx_limit_that_fires_late_is_not_billed_past_the_limit() -> None:
    session = make_session(PER_SECOND, granted=2_000)
    _answer_b(session, T0)
    # The PBX's backstop ends the callee a hair late, the caller follows.
    (settle,) = [e for e in session.on_hung_up(LegHungUp("B1", T0 + 2_001)) if isinstance(e, SettleStep)]
    assert settle.cost_micros == 2_000  # not a third started second the balance never held


def test_the_record_waits_a_moment_for_the_other_legs_hangup() -> None:
    """The caller's BYE ends the call; the callee's hangup event comes after the settle: the CDR
    still has both legs' ends. A leg whose end never comes does not hold the record forever."""
    session = make_session(PER_SECOND, granted=6_000)
    _answer_b(session, T0)
    session.on_hung_up(LegHungUp("B1", T0 + 3_000))  # the billed leg ends first: billing stops
    (timer,) = session.on_settled(T0 + 3_010)
    assert isinstance(timer, ArmTimer) and timer.kind is TimerKind.FINISH
    (finished,) = session.on_hung_up(LegHungUp("A1", T0 + 3_020, cause="NORMAL_CLEARING"))
    assert isinstance(finished, Finished)
    assert {leg.pbx_unique_id: leg.ended_ms for leg in finished.record.legs} == {"A1": T0 + 3_020, "B1": T0 + 3_000}
    assert finished.record.duration_ms == 3_000 and finished.record.settled_ms == T0 + 3_010
    lone = make_session(PER_SECOND, granted=6_000, a_leg="A2")
    _answer_b(lone, T0, leg="B2")
    lone.on_hung_up(LegHungUp("B2", T0 + 2_000))
    (timer,) = lone.on_settled(T0 + 2_010)
    (finished,) = lone.on_timer(TimerKind.FINISH, timer.token, timer.at_ms)
    assert isinstance(finished, Finished) and lone.on_timer(TimerKind.FINISH, timer.token, timer.at_ms) == []


def test_a_caller_who_transfers_the_call_leaves_the_carrier_leg_billed_until_it_ends() -> None:
    """SIP REFER: the caller's leg leaves, the dialled leg stays up (now talking to the transfer
    target). Billing goes on with it; an ordinary hangup (the callee follows at once) is billed
    to the caller's hangup instant."""
    session = make_session(PER_SECOND, granted=6_000)
    _answer_b(session, T0)
    (check,) = session.on_hung_up(LegHungUp("A1", T0 + 2_000))
    assert check.kind is TimerKind.TRANSFER_CHECK and check.at_ms == T0 + 2_000 + 1_500
    assert session.on_timer(TimerKind.TRANSFER_CHECK, check.token, check.at_ms) == []
    assert session.transferred and session.phase is Phase.ANSWERED
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6_000)  # still nibbling
    session.on_nibble_result(step.seq, 0, step.debit_micros, T0 + 6_000)  # no more money
    cut = session.on_timer(TimerKind.CUT, session.token, T0 + 6_000)
    assert [e.command for e in cut if isinstance(e, Command)] == [HangupLeg("B1", reason="credit exhausted")]
    (settle,) = session.on_hung_up(LegHungUp("B1", T0 + 6_030))
    assert settle.cost_micros == 6_000
    ordinary = make_session(PER_SECOND, granted=6_000, a_leg="A2")
    _answer_b(ordinary, T0, leg="B2")
    ordinary.on_hung_up(LegHungUp("A2", T0 + 2_000))
    (settle,) = ordinary.on_hung_up(LegHungUp("B2", T0 + 2_004))
    assert settle.cost_micros == 2_000 and not ordinary.transferred


def _backstops(effects):
    return [e.command for e in effects if isinstance(e, Command) and isinstance(e.command, ArmBackstop)]


def test_the_pbx_backstop_is_never_before_the_money_and_moves_with_it() -> None:
    """The PBX's own hangup (holds if the agent dies): set by the dialplan at the answer to the
    authorized limit plus the margin; each granted nibble re-arms it one slice and a slack ahead;
    an exhausted call pins it a margin after the cut; money that lands mid-call moves it again."""
    session = make_session(PER_SECOND, granted=6_000, nibble_s=6, limit_ms=20_000)  # 20 s of money at authorize
    assert _backstops(_answer_b(session, T0)) == []
    assert session.backstop_at_ms == T0 + 20_000 + 1_000
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6_000)
    granted = session.on_nibble_result(step.seq, 6_000, step.debit_micros, T0 + 6_000)
    # Reserved to 12 s; the slack (at least 10 s) lets a restarted agent adopt the call in time.
    assert _backstops(granted) == [ArmBackstop("B1", T0 + 12_000 + 10_000, "A1")]
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 12_000)
    partial = session.on_nibble_result(step.seq, 2_500, step.debit_micros, T0 + 12_000)  # 2.5 s left
    assert _timers(partial)[TimerKind.CUT].at_ms == T0 + 14_000
    assert _backstops(partial) == [ArmBackstop("B1", T0 + 14_000 + 1_000, "A1")]
    (chance,) = session.on_timer(TimerKind.LAST_CHANCE, session.token, T0 + 12_000)
    topped_up = session.on_nibble_result(chance.seq, 6_000, 0, T0 + 12_500)  # a top-up landed
    assert TimerKind.CUT not in _timers(topped_up) and not session.exhausted
    assert _backstops(topped_up) == [ArmBackstop("B1", T0 + 18_000 + 10_000, "A1")]


def test_no_call_outlasts_the_longest_call_whatever_the_money() -> None:
    session = make_session(PER_SECOND, granted=6_000, nibble_s=6, max_call_ms=9_000)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6_000)
    effects = session.on_nibble_result(step.seq, 6_000, step.debit_micros, T0 + 6_000)
    assert _timers(effects)[TimerKind.CUT].at_ms == T0 + 9_000 and session.cut_reason == "maximum call duration"
    assert _backstops(effects) == [ArmBackstop("B1", T0 + 10_000, "A1")]


def test_a_cut_for_lack_of_a_grant_says_the_store_granted_nothing() -> None:
    """Issue 14.9: a balance store that answers nothing (or lost the call) is not "credit
    exhausted": the money may well be there."""
    session = make_session(PER_SECOND, granted=6_000)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 6_000)
    effects = session.on_nibble_result(step.seq, 0, 0, T0 + 6_000, store_ok=False, why="unknown_call")
    assert _timers(effects)[TimerKind.CUT].at_ms == T0 + 6_000
    assert session.cut_reason == "no money granted by the balance store (unknown_call)"


def test_a_call_whose_channel_went_away_unseen_is_released_by_the_guard() -> None:
    """Issue 14.4: authorized, then nothing (the channel was already gone): the guard releases
    it instead of holding the account's call slot forever."""
    from agent.core.session import SessionSettings

    session = make_session(PER_SECOND, granted=6_000)
    session.settings = SessionSettings(nibble_ms=6_000, no_answer_guard_ms=180_000)
    (guard,) = session.start()
    assert guard.kind is TimerKind.NO_ANSWER_GUARD and guard.at_ms == session.authorized_ms + 180_000
    (release,) = session.on_timer(TimerKind.NO_ANSWER_GUARD, guard.token, guard.at_ms)
    assert isinstance(release, ReleaseStep) and session.end_cause == "NO_ANSWER_GUARD"


def test_a_call_that_ended_during_a_pbx_outage_ends_where_the_pbx_cdr_says() -> None:
    """The AMI/ESL connection came back: the call's legs are gone. Without the PBX's CDR the
    call ends at the resync instant (bounded by the backstop); with it, at its real end."""
    from agent.core.events import EndedCall

    for ended, expected_ms in ((None, 9_000), (EndedCall("A1", T0, T0 + 4_321), 4_321)):
        session = make_session(PER_SECOND, granted=60_000)
        _answer_b(session, T0)
        session.on_resync({}, T0 + 9_000, ended)
        (finished,) = session.on_settled(T0 + 9_100)
        assert finished.record.duration_ms == expected_ms
        assert finished.record.hangup_cause == "ENDED_DURING_PBX_OUTAGE"


def test_a_call_authorized_after_the_pbx_listing_is_not_ended_by_it() -> None:
    """Found by bench/bench_faults.py: right after a restart the engine took the resync late,
    after a new call was authorized; the listing (asked before) did not show it, and the call
    was ended at once as ENDED_DURING_PBX_OUTAGE, then talked 16 s unbilled."""
    from agent.core.events import PbxConnected
    from agent.core.registry import CallRegistry

    registry = CallRegistry()
    session = make_session(PER_SECOND, granted=60_000, at_ms=T0 + 100)
    registry.add(session)
    registry.feed(PbxConnected("asterisk", T0 + 150, (), listed_ms=T0 + 50))  # listed before it
    assert all(leg.ended_ms is None for leg in session.legs.values())
    registry.feed(PbxConnected("asterisk", T0 + 300, (), listed_ms=T0 + 200))  # listed after: it ended
    assert session.a_leg.ended_ms == T0 + 300


def test_a_cut_sent_late_bills_the_talk_until_it_was_sent() -> None:
    """Found by bench_faults: the agent was down when the money ran out at 5 s; restarted, it
    cut at 7.6 s. The customer talked those 2.6 s: they are charged (an overrun), only the
    PBX's teardown after the hangup is not. A cut a few ms late (a timer) stays free."""
    for sent_at, expected in ((T0 + 5_030, 5_000), (T0 + 7_600, 8_000)):
        session = make_session(PER_SECOND, granted=5_000, nibble_s=6)
        _answer_b(session, T0)  # the grant covers 5 s, less than the first slice: exhausted at once
        assert session.cut_at_ms == T0 + 5_000
        session.on_timer(TimerKind.CUT, session.token, sent_at)
        (settle,) = session.on_hung_up(LegHungUp("A1", sent_at + 40))
        assert settle.cost_micros == expected


def test_a_call_exhausted_shortly_before_its_cut_still_looks_for_a_top_up_in_time() -> None:
    """Found by the real-PBX suite (FreeSWITCH, 2 s nibbles, 5 s of money, a top-up landing
    near 4 s): the nibble that found the money short ran the store deadline early, 1.35 s before
    the cut, too late for the 2 s last-chance look; the top-up was never seen and the call was
    cut. The last look now comes as late as the store deadline allows."""
    session = make_session(PER_SECOND, granted=2_000, nibble_s=2, nibble_lead_ms=350)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 1_650)
    session.on_nibble_result(step.seq, 2_000, 2_000, T0 + 1_660)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 3_650)
    partial = session.on_nibble_result(step.seq, 1_000, 2_000, T0 + 3_660)  # 1 s left: cut at 5 s
    assert _timers(partial)[TimerKind.CUT].at_ms == T0 + 5_000
    assert _timers(partial)[TimerKind.LAST_CHANCE].at_ms == T0 + 4_650
    (chance,) = session.on_timer(TimerKind.LAST_CHANCE, session.token, T0 + 4_650)
    topped_up = session.on_nibble_result(chance.seq, 2_000, 0, T0 + 4_700)  # the top-up is seen
    assert TimerKind.CUT not in _timers(topped_up) and not session.exhausted


def test_a_cut_a_starved_loop_sends_late_bills_no_talk_past_the_money() -> None:
    """Found by bench_nodes (issue 19 finding 3): on a saturated 2-core box, 1 s nibbles, tight
    prepaid accounts ended at -0.01. The agent's cut left 103-703 ms after the money ran out (the
    CUT timer fired late, or the nibble that found the money short answered after the boundary),
    was billed to the instant it was sent, and 1/1 increments made that one whole second more
    than the call held: a settle past the account's floor. The PBX backstop (armed at the money's
    end plus the margin) would have ended the call by then and that end is billed to the money's
    end; a cut of the agent's within the same margin is billed the same way."""
    for answered_late_ms, fired_late_ms in ((0, 113), (696, 703), (0, 1_000)):
        session = make_session(PER_SECOND, granted=1_000, nibble_s=1, nibble_lead_ms=350)
        _answer_b(session, T0)
        for k in (1, 2):  # two slices paid; the nibble at 3 s finds nothing more
            (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + k * 1000 - 350)
            session.on_nibble_result(step.seq, 1_000 if k == 1 else 0, step.debit_micros,
                                     T0 + k * 1000 - 200 + (answered_late_ms if k == 2 else 0))
        assert session.cut_at_ms == T0 + 2_000 and session.budget_micros == 2_000
        session.on_timer(TimerKind.CUT, session.token, T0 + 2_000 + fired_late_ms)
        (settle,) = session.on_hung_up(LegHungUp("A1", T0 + 2_000 + fired_late_ms + 50))
        assert settle.cost_micros == session.budget_micros == 2_000, (answered_late_ms, fired_late_ms)


def test_a_cut_later_than_the_backstop_margin_bills_the_talk_until_it_was_sent() -> None:
    """Past the margin the PBX backstop was not what held the call (it did not get it in time, or
    no agent ran): the customer talked until the cut, and that is charged (an overrun)."""
    session = make_session(PER_SECOND, granted=1_000, nibble_s=1, nibble_lead_ms=350)
    _answer_b(session, T0)
    (step,) = session.on_timer(TimerKind.NIBBLE, session.token, T0 + 650)
    session.on_nibble_result(step.seq, 0, step.debit_micros, T0 + 800)
    assert session.cut_at_ms == T0 + 1_000
    session.on_timer(TimerKind.CUT, session.token, T0 + 2_001)
    (settle,) = session.on_hung_up(LegHungUp("A1", T0 + 2_040))
    assert settle.cost_micros == 3_000


def test_a_live_call_keeps_few_objects_for_the_garbage_collector() -> None:
    """A live call is the session, its legs' dict and its caller leg: nothing else the collector
    tracks (no instance dict, no empty list of reseller levels, no set before the call ends).
    Every tracked object a live call keeps counts towards the next young collection, a pause in
    whatever runs then (authorizations' p99 on a busy node)."""
    import gc

    template = make_session(FlatTariff(60_000), granted=600_000)  # what the engine shares between calls

    def new_call(k: int) -> CallSession:
        return CallSession(call_id=f"c{k}", node="n1", pbx="asterisk", account_id="alice", destination="33123",
                           caller="100", a_leg=Leg(f"L{k}", Direction.INBOUND, T0), authorized_ms=T0,
                           tariff=template.tariff, rating=template.rating, settings=template.settings,
                           granted_micros=600_000, limit_ms=10_000)

    live = [new_call(0)]
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        live.extend(new_call(k) for k in range(1, 101))
        kept = (len(gc.get_objects()) - before) / 100
    finally:
        gc.enable()
    assert kept <= 3, f"{kept} tracked objects per live call"
    session = live[0]
    assert session.legs == {"L0": session.a_leg} and session.upper == () and session.settles_left is None
