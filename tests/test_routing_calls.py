"""Wholesale routing on whole calls (DESIGN §10, issue 17): the daemon as an admin runs it, with
carriers and buy decks in SQL, against the fake Asterisk and FreeSWITCH, which dial the routes
the agent sets as the shipped dialplans do (the real PBXes: tests/realpbx/test_routing.py).

The demo database sells France at 0.60/min per second (plan ``demo``, EUR). Carriers: ``cheap``
buys it at 0.10 and answers 503 (congestion), ``backup`` at 0.20 and answers, ``dear`` at 0.90
costs more than the sell price and is left out (revenue assurance); none of them rates the UK.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agent.adapters.sql.carriers import create_carrier
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.models import Call, CallLeg, RatingDecision, utcnow
from agent.adapters.sql.rate_import import import_deck
from agent.adapters.sql.reconcile import check_ledger
from agent.cli.demo import SimulatedPbx, demo_config, prepare_database
from agent.daemon import Daemon
from tests.test_daemon import adopt_to_the_end, wait_for

SELL_PER_MIN = 600_000  # the demo deck's France
BUY = {"cheap": 100_000, "backup": 200_000, "dear": 900_000}


def _trunk(kind: str, carrier: str) -> str:
    if kind == "asterisk":
        return f"PJSIP/{carrier}"
    return carrier if carrier == "backup" else f"sofia/gateway/{carrier}"  # a bare gateway name is dialled too


@pytest.fixture(params=["asterisk", "freeswitch"])
def routed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Daemon, SimulatedPbx]]:
    kind = str(request.param)
    url = f"sqlite:///{tmp_path / 'billing-agent.db'}"
    prepare_database(url, tmp_path).dispose()
    sql = make_engine(url)
    sessions = session_factory(sql)
    for priority, (carrier, rate) in enumerate(BUY.items()):
        with transaction(sessions) as session:
            create_carrier(session, carrier, trunk=_trunk(kind, carrier), priority=priority)
        deck = tmp_path / f"{carrier}.csv"
        deck.write_text(f"prefix,destination,rate\n33,France ({carrier}),{rate / 1e6:.2f}\n")
        import_deck(sessions, deck, "", carrier=carrier)
    sql.dispose()
    pbx = SimulatedPbx(kind)
    pbx.congest("cheap")
    config = demo_config(tmp_path, kind, pbx.agi_port, pbx.port)
    agent = Daemon(replace(config, daemon=replace(config.daemon, drain_seconds=2.0)))
    agent.start()
    try:
        wait_for(lambda: all(a.connected() for a in agent.adapters))
        yield agent, pbx
    finally:
        if not agent.stopped.is_set():
            agent.shutdown()
        pbx.stop()


def _rows(url: str) -> tuple[list[Any], list[Any], list[Any]]:
    sql = make_engine(url)
    try:
        with sql.connect() as conn:
            calls = conn.execute(select(Call.id, Call.destination, Call.disposition, Call.duration_ms)).all()
            legs = conn.execute(select(CallLeg.call_id, CallLeg.direction, CallLeg.peer, CallLeg.hangup_cause,
                                       CallLeg.billed).order_by(CallLeg.created_at)).all()
            d = RatingDecision
            decisions = conn.execute(select(d.billed_seconds, d.cost_micros, d.carrier, d.buy_prefix, d.buy_rate_micros,
                                            d.buy_billed_seconds, d.buy_cost_micros, d.margin_micros)).all()
        with transaction(session_factory(sql)) as session:
            report = check_ledger(session, now=utcnow(), grace=timedelta(0))
        assert report.ok, report.problems
        return calls, legs, decisions
    finally:
        sql.dispose()


def test_the_cheapest_carrier_that_can_take_the_call_carries_it_and_the_cdr_names_it(
        routed: tuple[Daemon, SimulatedPbx]) -> None:
    agent, pbx = routed
    call = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=2_000)
    no_route = pbx.fake.place_call("alice", "442071234567", talk_ms=1_000)
    assert call.done.wait(20) and no_route.done.wait(20)
    if pbx.kind == "asterisk":  # the routes in LCR order, the loss-making carrier left out
        assert call.routes == ["PJSIP/cheap", "PJSIP/backup"]
        assert call.attempts == [("PJSIP/cheap", "CONGESTION")]
        assert (no_route.decision, no_route.reason, no_route.billing_cause) == ("deny", "no_route", "34")
    else:
        assert no_route.outcome == "denied"
    assert call.outcome == "answered"
    agent.shutdown()

    calls, legs, decisions = _rows(agent.config.database.url)
    assert [(c.destination, c.disposition) for c in calls] == [("33142685300", "ANSWERED")]  # refusals: no CDR
    (decision,) = decisions
    outbound = [(leg.peer, leg.billed) for leg in legs if leg.direction == "outbound"]
    assert outbound == [("cheap", False), ("backup", True)]  # the 503'd attempt is a leg of the call
    assert [leg.hangup_cause for leg in legs if leg.peer == "cheap"][0] in ("34", "NORMAL_CIRCUIT_CONGESTION")
    seconds = decision.billed_seconds
    assert 2 <= seconds <= 3
    assert decision.cost_micros == -(-SELL_PER_MIN * seconds // 60)
    assert (decision.carrier, decision.buy_prefix, decision.buy_rate_micros) == ("backup", "33", BUY["backup"])
    assert decision.buy_billed_seconds == seconds  # 1/1 on both sides
    assert decision.buy_cost_micros == -(-BUY["backup"] * seconds // 60)
    assert decision.margin_micros == decision.cost_micros - decision.buy_cost_micros > 0


def test_a_disabled_carrier_is_avoided_by_new_calls_and_a_margin_below_the_floor_alerts(
        routed: tuple[Daemon, SimulatedPbx]) -> None:
    from agent.adapters.sql.carriers import set_enabled, set_route_policy
    from agent.adapters.sql.models import FraudAlert

    agent, pbx = routed
    sql = make_engine(agent.config.database.url)
    try:
        with transaction(session_factory(sql)) as session:
            set_enabled(session, "backup", False)
            set_route_policy(session, "demo", "lcr", margin_floor="90%")  # 0.60 sold, 0.10 bought: 83 %
        assert agent.route_book is not None
        agent.route_book.refresh_all()
        call = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=1_000)
        assert call.done.wait(20)
        # cheap is congested, backup disabled, dear a loss: no carrier takes the call
        assert call.outcome in ("refused", "failed")
        if pbx.kind == "asterisk":
            assert call.routes == ["PJSIP/cheap"]
        agent.shutdown()
        with sql.connect() as conn:
            kinds = conn.execute(select(FraudAlert.kind, FraudAlert.account_id)).all()
        assert ("margin_predicted", "alice") in kinds
    finally:
        sql.dispose()



def test_a_carrier_at_its_channel_limit_is_left_out_until_a_call_ends(routed: tuple[Daemon, SimulatedPbx]) -> None:
    from sqlalchemy import update

    from agent.adapters.sql.models import Carrier

    agent, pbx = routed
    sql = make_engine(agent.config.database.url)
    try:
        with transaction(session_factory(sql)) as session:
            session.execute(update(Carrier).where(Carrier.name == "backup").values(max_channels=1))
    finally:
        sql.dispose()
    assert agent.route_book is not None and agent.engine is not None
    agent.route_book.refresh_all()
    first = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=3_000)
    wait_for(lambda: agent.engine is not None and agent.engine.carrier_calls.get("backup") == 1)
    # the call tried cheap first (503) and counts against backup, which carries it
    assert "cheap" not in agent.engine.carrier_calls
    second = pbx.fake.place_call("alice", "33142685301", answer_after_ms=50, talk_ms=1_000)
    assert second.done.wait(20)
    assert second.outcome in ("refused", "failed")  # backup full, cheap refuses: nobody takes it
    if pbx.kind == "asterisk":
        assert second.routes == ["PJSIP/cheap"]
    assert first.done.wait(20) and first.outcome == "answered"
    wait_for(lambda: agent.engine is not None and not agent.engine.carrier_calls)
    third = pbx.fake.place_call("alice", "33142685302", answer_after_ms=50, talk_ms=500)
    assert third.done.wait(20) and third.outcome == "answered"  # the channel is free again


def test_a_routed_call_adopted_after_a_restart_keeps_its_carrier_and_margin(
        routed: tuple[Daemon, SimulatedPbx]) -> None:
    """The earlier run kept the routes in memory only: the restarted agent asks the route book
    again (the same list: the draw is seeded by the call id), so the CDR still names the carrier
    that answered, with its buy cost and the margin."""
    agent, pbx = routed
    call = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=7_000)
    wait_for(lambda: any(c["phase"] == "answered" for c in agent.live_call_dicts()))
    agent.shutdown()  # drains 2 s, then hands the call over: its reservation stays open
    assert not call.done.is_set()
    adopt_to_the_end(agent.config, call, ends_within_s=20)
    calls, legs, decisions = _rows(agent.config.database.url)
    assert [(c.destination, c.disposition) for c in calls] == [("33142685300", "ANSWERED")]
    (decision,) = decisions
    seconds = decision.billed_seconds
    assert 6 <= seconds <= 8
    assert (decision.carrier, decision.buy_prefix, decision.buy_rate_micros) == ("backup", "33", BUY["backup"])
    assert decision.buy_cost_micros == -(-BUY["backup"] * seconds // 60)
    assert decision.margin_micros == decision.cost_micros - decision.buy_cost_micros > 0
