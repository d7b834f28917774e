"""The FreeSWITCH client and adapter against the fake FreeSWITCH (real sockets on loopback).

No monkey-patching: greenswitch, the adapter and the fake all use gevent's own sockets, and the
test body waits on gevent events. The engine is a small recording fake with scripted decisions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.pool
import pytest
from gevent import socket as gsocket
from gevent.server import StreamServer
from greenswitch import InboundESL

from agent.adapters.freeswitch.adapter import AuthorizeServer, FreeswitchAdapter, FreeswitchSettings
from agent.adapters.freeswitch.esl import EslSettings, NotConnected
from agent.adapters.freeswitch.esl_protocol import FrameReader, encode_command, encode_event
from agent.adapters.listener import serve_tcp
from agent.core.events import (
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    Direction,
    LegAnswered,
    LegBridged,
    LegCreated,
    LegEvent,
    LegHungUp,
    LegUpdated,
    PbxConnected,
    PbxDisconnected,
)
from agent.services.call_path import CALL_PATH
from agent.sim.freeswitch import Attempt, FakeCall, FakeFreeswitch

WAIT_S = 5.0


class FakeEngine:
    """Records what the adapter reports; decides calls with a script; can cut like the engine."""

    def __init__(self, decide: Callable[[AuthorizeRequest], AuthorizeDecision] | None = None) -> None:
        self.decide = decide or (lambda request: AuthorizeDecision(True, f"call-{request.leg_id}", limit_ms=60_000))
        self.requests: list[AuthorizeRequest] = []
        self.decided: set[str] = set()
        self.events: list[LegEvent] = []
        self.events_after_decision: list[LegEvent] = []
        self.changed = gevent.event.Event()
        self.switch: FreeswitchAdapter | None = None
        self.cut_after_ms = 0
        self.group = gevent.pool.Group()

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        self.requests.append(request)
        decision = self.decide(request)
        self.decided.add(request.leg_id)
        self._changed()
        return decision

    def on_event(self, event: LegEvent) -> None:
        self.events.append(event)
        if getattr(event, "leg_id", "") in self.decided:
            self.events_after_decision.append(event)
        if (isinstance(event, LegAnswered) and self.cut_after_ms and self.switch is not None
                and self._is_b_leg(event.leg_id)):
            a_leg = self.created(event.leg_id).parent_leg_id
            self.group.add(gevent.spawn_later(self.cut_after_ms / 1000, self.switch.hangup, a_leg, "NORMAL_CLEARING"))
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed.clear()

    def _is_b_leg(self, leg_id: str) -> bool:
        return any(isinstance(e, LegCreated) and e.leg_id == leg_id and e.direction is Direction.OUTBOUND
                   for e in self.events)

    def of(self, kind: type[Any], leg_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (leg_id is None or e.leg_id == leg_id)]

    def created(self, leg_id: str) -> LegCreated:
        return next(e for e in self.events if isinstance(e, LegCreated) and e.leg_id == leg_id)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        with gevent.Timeout(timeout_s, AssertionError(f"timed out waiting; events so far: {self.events}")):
            while not predicate():
                self.changed.wait(0.05)

    def hung_up(self, *leg_ids: str) -> bool:
        ended = {e.leg_id for e in self.of(LegHungUp)}
        return all(leg in ended for leg in leg_ids)


@pytest.fixture
def fake() -> Iterator[FakeFreeswitch]:
    server = FakeFreeswitch(heartbeat_s=0.2, park_timeout_s=3.0, mode="park").start()
    yield server
    server.stop()


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    recorder = FakeEngine()
    yield recorder
    recorder.group.kill()


Started = list[FreeswitchAdapter]


@pytest.fixture
def started() -> Iterator[Started]:
    adapters: Started = []
    yield adapters
    for adapter in adapters:
        adapter.stop(timeout_s=1.0)


def start_adapter(port: int, engine: FakeEngine, started: Started, *, wait: bool = True,
                  **esl: Any) -> FreeswitchAdapter:
    options: dict[str, Any] = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "heartbeat_timeout_s": 2.0,
                               "command_timeout_s": 1.0, "connect_timeout_s": 1.0}
    options.update(esl)
    adapter = FreeswitchAdapter(engine, FreeswitchSettings(esl=EslSettings(port=port, **options)))
    engine.switch = adapter
    started.append(adapter)
    adapter.start()
    if wait:
        assert adapter.synced.wait(WAIT_S), adapter.client.last_error
    return adapter


def finish(call: FakeCall) -> None:
    assert call.done.wait(WAIT_S), f"call {call.a_uuid} did not finish ({call.outcome})"


def b_leg(call: FakeCall, index: int = -1) -> str:
    return call.b_uuids[index]


# ------------------------------------------------------------------------------------ calls


def test_answered_call_is_billed_from_the_b_leg_answer(fake: FakeFreeswitch, engine: FakeEngine,
                                                       started: Started) -> None:
    start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", caller="2001", early_answer=True,
                           attempts=[Attempt(gateway="carrier", ring_ms=30, answer_after_ms=200)], talk_ms=400)
    finish(call)
    a, b = call.a_uuid, b_leg(call)
    engine.wait_for(lambda: engine.hung_up(a, b))

    request = engine.requests[0]
    assert (request.pbx, request.leg_id, request.account_id, request.destination, request.caller) == (
        "freeswitch", a, "1001", "33123456", "2001")
    assert request.group_id == a and request.sip_call_id.endswith("@127.0.0.1")

    created_b = engine.created(b)
    assert (created_b.direction, created_b.parent_leg_id, created_b.group_id, created_b.peer) == (
        Direction.OUTBOUND, a, a, "carrier")
    assert created_b.sip_call_id == ""  # it arrives with the first SIP response
    assert engine.of(LegUpdated, b)[0].sip_call_id == fake_sip_call_id(engine, b)
    assert engine.created(a).direction is Direction.INBOUND

    a_answer = engine.of(LegAnswered, a)[0].at_ms
    b_answer = engine.of(LegAnswered, b)[0].at_ms
    assert b_answer == call.b_answered_us // 1000  # Caller-Channel-Answered-Time of the B leg
    assert b_answer - a_answer >= 200  # the IVR answered the caller long before the callee
    assert engine.of(LegBridged, a)[0].peer_leg_id == b
    a_end = engine.of(LegHungUp, a)[0]
    assert a_end.cause == "NORMAL_CLEARING" and a_end.cause_code == 16
    billed_ms = a_end.at_ms - b_answer
    assert 380 <= billed_ms <= 1000, billed_ms
    assert billed_ms == call.a_ended_us // 1000 - call.b_answered_us // 1000

    setvars = [c for c in fake.commands if c.startswith("api uuid_setvar_multi")]
    # The backstop never before the money: +1 s for floor(now); the caller's ceiling (billing-dial
    # schedules it) = backstop + ring allowance.
    assert setvars[:2] == [
        f"api uuid_setvar_multi {a} billing_decision=allow;billing_backstop_s=61;billing_ceiling_s=181",
        f"api uuid_setvar_multi {a} billing_call_id=call-{a};billing_limit_ms=60000"]
    assert f"api uuid_transfer {a} 33123456 XML billing-outbound" in fake.commands


def fake_sip_call_id(engine: FakeEngine, leg_id: str) -> str:
    updates = engine.of(LegUpdated, leg_id)
    return updates[0].sip_call_id if updates else ""


def test_cut_when_the_engine_says_so(fake: FakeFreeswitch, engine: FakeEngine, started: Started) -> None:
    engine.cut_after_ms = 300
    start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=5000)
    finish(call)
    a, b = call.a_uuid, b_leg(call)
    engine.wait_for(lambda: engine.hung_up(a, b))
    assert f"api uuid_kill {a} NORMAL_CLEARING" in fake.commands
    assert 300 <= call.talk_us // 1000 < 1000
    assert engine.of(LegHungUp, a)[0].at_ms - engine.of(LegAnswered, b)[0].at_ms < 1000


def test_backstop_ends_the_call_when_the_agent_is_gone(fake: FakeFreeswitch, engine: FakeEngine,
                                                       started: Started) -> None:
    engine.decide = lambda request: AuthorizeDecision(True, "c1", limit_ms=2000)
    adapter = start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=10_000)
    engine.wait_for(lambda: bool(engine.of(LegAnswered)))
    adapter.stop(timeout_s=1.0)  # the agent dies right after the answer
    finish(call)
    talk_ms = call.talk_us // 1000
    # Never before the money runs out (the customer paid for it); the whole-second scheduler
    # ends it within a second and a half after (the agent, when alive, cuts at the instant).
    assert 2000 <= talk_ms <= 3050, talk_ms  # sched_hangup +3 fires at floor(answer) + 3 s
    assert (call.b_hangup_cause, call.hangup_cause) == ("ALLOTTED_TIMEOUT", "NORMAL_CLEARING")
    assert f"api uuid_setvar_multi {call.a_uuid} billing_decision=allow;billing_backstop_s=3;billing_ceiling_s=123" \
           in fake.commands


def test_denied_call_is_hung_up_with_a_clear_cause(fake: FakeFreeswitch, engine: FakeEngine,
                                                   started: Started) -> None:
    engine.decide = lambda request: AuthorizeDecision(False, "c2", reason=DenyReason.INSUFFICIENT_FUNDS,
                                                      detail="balance 0.00; needs 0.06; first second")
    start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456")
    finish(call)
    assert call.outcome == "denied" and call.hangup_cause == "OUTGOING_CALL_BARRED"
    assert call.b_uuids == []
    setvars = next(c for c in fake.commands if c.startswith("api uuid_setvar_multi"))
    assert "billing_decision=deny;billing_reason=insufficient_funds;billing_hangup_cause=OUTGOING_CALL_BARRED;" \
           "billing_detail=balance 0.00  needs 0.06  first second" in setvars
    engine.wait_for(lambda: engine.hung_up(call.a_uuid))


def test_b_leg_failover_to_a_second_gateway(fake: FakeFreeswitch, engine: FakeEngine, started: Started) -> None:
    start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=300, attempts=[
        Attempt(gateway="carrier", fail_cause="NORMAL_TEMPORARY_FAILURE"), Attempt(gateway="backup")])
    finish(call)
    first, second = call.b_uuids
    engine.wait_for(lambda: engine.hung_up(call.a_uuid, first, second))
    assert [engine.created(leg).peer for leg in (first, second)] == ["carrier", "backup"]
    assert all(engine.created(leg).parent_leg_id == call.a_uuid for leg in (first, second))
    failed = engine.of(LegHungUp, first)[0]
    assert (failed.cause, failed.cause_code) == ("NORMAL_TEMPORARY_FAILURE", 41)
    assert fake_sip_call_id(engine, first) and fake_sip_call_id(engine, second)
    assert fake_sip_call_id(engine, first) != fake_sip_call_id(engine, second)
    assert engine.of(LegAnswered, first) == []
    assert engine.of(LegAnswered, second)[0].at_ms == call.b_answered_us // 1000
    assert engine.of(LegBridged, call.a_uuid)[0].peer_leg_id == second


def test_hangup_while_authorizing_reaches_the_engine_after_its_decision(fake: FakeFreeswitch, engine: FakeEngine,
                                                                        started: Started) -> None:
    def slow(request: AuthorizeRequest) -> AuthorizeDecision:
        fake.hangup(fake.channels[request.leg_id], "ORIGINATOR_CANCEL")  # the caller gives up meanwhile
        gevent.sleep(0.1)
        return AuthorizeDecision(True, "c3", limit_ms=60_000)

    engine.decide = slow
    adapter = start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456")
    finish(call)
    engine.wait_for(lambda: engine.hung_up(call.a_uuid))
    assert [type(e) for e in engine.events_after_decision] == [LegHungUp]
    assert engine.of(LegHungUp, call.a_uuid)[0].cause == "ORIGINATOR_CANCEL"
    assert adapter.stats.vanished_legs == 0  # the real hangup event was used, not a guess


def test_calls_parked_while_the_agent_was_away_are_authorized_at_resync(fake: FakeFreeswitch, engine: FakeEngine,
                                                                        started: Started) -> None:
    call = fake.place_call("1001", "33123456", talk_ms=200)
    gevent.sleep(0.05)  # parked, nobody listening
    start_adapter(fake.port, engine, started)
    finish(call)
    assert call.outcome == "answered"
    assert engine.requests[0].leg_id == call.a_uuid
    connected = engine.of(PbxConnected)[0]
    assert [leg.leg_id for leg in connected.live_legs] == [call.a_uuid]


# ------------------------------------------------------------------------------------ the socket


def test_dropped_socket_mid_call_reconnects_resyncs_and_still_bills(fake: FakeFreeswitch, engine: FakeEngine,
                                                                   started: Started) -> None:
    adapter = start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=900)
    engine.wait_for(lambda: bool(engine.of(LegBridged)))
    fake.drop_connections()
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)
    assert engine.of(PbxDisconnected)
    resync = engine.of(PbxConnected)[1]
    live = {leg.leg_id: leg for leg in resync.live_legs}
    a, b = call.a_uuid, b_leg(call)
    assert set(live) == {a, b}
    assert live[b].parent_leg_id == a and live[b].answered and live[b].answered_ms == call.b_answered_us // 1000
    assert live[b].direction is Direction.OUTBOUND and live[a].account_id == "1001"
    assert live[a].bridged_to == b
    finish(call)
    engine.wait_for(lambda: engine.hung_up(a, b))
    billed_ms = engine.of(LegHungUp, a)[0].at_ms - engine.of(LegAnswered, b)[0].at_ms
    assert billed_ms == call.a_ended_us // 1000 - call.b_answered_us // 1000 and billed_ms >= 880
    assert adapter.client.connections == 2


def test_events_read_just_before_a_drop_are_still_handed_over(fake: FakeFreeswitch, engine: FakeEngine,
                                                               started: Started) -> None:
    start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=10_000)
    engine.wait_for(lambda: bool(engine.of(LegBridged)))
    fake.hangup(fake.channels[call.a_uuid], "NORMAL_CLEARING")
    fake.flush_events()  # the hangup events are written...
    fake.drop_connections()  # ...and the socket dies right after them
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)
    hangups = [e for e in engine.events if isinstance(e, (LegHungUp, PbxDisconnected))]
    assert [type(e) for e in hangups] == [LegHungUp, LegHungUp, PbxDisconnected]
    assert hangups[0].at_ms == call.a_ended_us // 1000  # the exact instant, not the resync's


def test_legs_that_ended_during_the_outage_are_missing_from_the_resync(fake: FakeFreeswitch, engine: FakeEngine,
                                                                      started: Started) -> None:
    start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=300)
    engine.wait_for(lambda: bool(engine.of(LegBridged)))
    fake.stall(0.8)  # the link is black-holed: no reconnect possible meanwhile
    fake.drop_connections()
    finish(call)
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)
    assert engine.of(PbxConnected)[1].live_legs == ()
    assert not engine.hung_up(call.a_uuid)  # the engine ends them from the resync


def test_a_call_created_during_the_resync_is_live_and_fully_reported(fake: FakeFreeswitch, engine: FakeEngine,
                                                                      started: Started) -> None:
    start_adapter(fake.port, engine, started)
    fake.slow_api["show"] = 0.3  # the listing is taken, then the socket is busy for 0.3 s
    fake.drop_connections()
    engine.wait_for(lambda: sum(c.startswith("api show") for c in fake.commands) == 2)
    call = fake.place_call("1001", "33123456", talk_ms=200)  # created after the listing
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)
    assert call.a_uuid in [leg.leg_id for leg in engine.of(PbxConnected)[1].live_legs]
    finish(call)
    a, b = call.a_uuid, b_leg(call)
    engine.wait_for(lambda: engine.hung_up(a, b))
    assert engine.of(LegAnswered, a) and engine.of(LegAnswered, b)  # not mistaken for ended legs


def test_wrong_password_is_a_clear_error_with_backoff(fake: FakeFreeswitch, engine: FakeEngine,
                                                      started: Started, caplog: pytest.LogCaptureFixture) -> None:
    fake.password = "s3cret"
    caplog.set_level(logging.ERROR)
    adapter = start_adapter(fake.port, engine, started, wait=False, backoff_max_s=0.25)
    gevent.sleep(1.0)
    assert not adapter.connected()
    assert 2 <= adapter.client.auth_failures <= 6, adapter.client.auth_failures  # no crash loop
    assert fake.connections_accepted == adapter.client.auth_failures
    assert any("refused the event-socket password" in r.getMessage() and "event_socket.conf.xml" in r.getMessage()
               for r in caplog.records)
    assert [c for c in fake.commands if c.startswith("auth ")] == ["auth ClueCon"] * fake.connections_accepted
    with pytest.raises(NotConnected):
        adapter.hangup("0f0f0f0f-0000-4000-8000-000000000004")
    fake.password = "ClueCon"
    assert adapter.synced.wait(WAIT_S)


def test_acl_rejection_and_a_silent_server_are_named(engine: FakeEngine, started: Started) -> None:
    def rude(sock: Any, address: Any) -> None:
        text = b"Access Denied, go away.\n"
        sock.sendall(b"Content-Type: text/rude-rejection\nContent-Length: %d\n\n%s" % (len(text), text))

    def silent(sock: Any, address: Any) -> None:
        gevent.sleep(5)

    for handler, expected in ((rude, "rejected this client: 'Access Denied, go away.'"),
                              (silent, "no auth/request from")):
        server = StreamServer(("127.0.0.1", 0), handler)
        server.start()
        try:
            adapter = start_adapter(server.server_port, engine, started, wait=False, connect_timeout_s=0.3)
            with gevent.Timeout(WAIT_S):
                while expected not in adapter.client.last_error:
                    gevent.sleep(0.05)
            assert not adapter.connected()
            adapter.stop(timeout_s=1.0)
        finally:
            server.stop(timeout=1)


def test_heartbeat_silence_makes_the_client_reconnect(fake: FakeFreeswitch, engine: FakeEngine,
                                                      started: Started) -> None:
    adapter = start_adapter(fake.port, engine, started, heartbeat_timeout_s=0.6)
    fake.stall(1.2)
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2, timeout_s=4)
    assert "no data (not even HEARTBEAT) for " in adapter.last_disconnect


def test_a_command_in_flight_times_out_and_resets_the_connection(fake: FakeFreeswitch, engine: FakeEngine,
                                                                 started: Started) -> None:
    adapter = start_adapter(fake.port, engine, started, command_timeout_s=0.3)
    fake.stall(0.5)
    started_at = gevent.get_hub().loop.now()
    with pytest.raises(Exception, match=r"did not answer \['api', 'uuid_kill'\] within 0.3s"):
        adapter.hangup("0f0f0f0f-0000-4000-8000-000000000001")
    assert gevent.get_hub().loop.now() - started_at < 0.6
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)


def test_a_wrong_content_length_resets_the_connection(fake: FakeFreeswitch, engine: FakeEngine,
                                                      started: Started) -> None:
    adapter = start_adapter(fake.port, engine, started)
    good = encode_event([("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", "u1")])
    head, body = good.split(b"\n\n", 1)
    fake.inject(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (len(body) - 7) + body + good)
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)
    assert adapter.stats.frame_errors == 1
    call = fake.place_call("1001", "33123456", talk_ms=100)  # and calls go on
    finish(call)
    assert call.outcome == "answered"


def test_bad_url_encoding_and_unknown_channels_are_handled(fake: FakeFreeswitch, engine: FakeEngine,
                                                           started: Started, caplog: pytest.LogCaptureFixture) -> None:
    adapter = start_adapter(fake.port, engine, started)
    caplog.set_level(logging.WARNING)
    stranger = "5e1f0000-0000-4000-8000-00000000beef"
    body = (b"Event-Name: CHANNEL_ANSWER\nUnique-ID: " + stranger.encode()
            + b"\nCall-Direction: outbound\nvariable_originator: 0000dead-0000-4000-8000-000000000000"
            + b"\nCaller-Caller-ID-Number: 10%ZZ\nCaller-Channel-Answered-Time: 1795335300577002\n\n")
    # The same event framed 5 bytes too long: the connection is reset and resynchronised.
    fake.inject(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (len(body) + 5) + body + b"xxxxx")
    engine.wait_for(lambda: len(engine.of(PbxConnected)) == 2)
    assert engine.of(LegAnswered, stranger) == []
    # Framed right, it is used; its bad escape is reported with the header's name.
    fake.inject(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body)
    fake.fire([("Event-Name", "CHANNEL_HANGUP_COMPLETE"), ("Unique-ID", "0000aaaa-0000-4000-8000-000000000000"),
               ("Hangup-Cause", "NORMAL_CLEARING")])
    fake.fire([("Event-Name", "CHANNEL_BRIDGE")])  # no Unique-ID at all
    engine.wait_for(lambda: engine.hung_up("0000aaaa-0000-4000-8000-000000000000"))
    created = engine.created(stranger)  # introduced from the event's own channel data
    assert created.direction is Direction.OUTBOUND and created.parent_leg_id.startswith("0000dead")
    assert engine.of(LegAnswered, stranger)[0].at_ms == 1795335300577
    assert adapter.stats.bad_events == 1 and adapter.stats.frame_errors == 1
    assert adapter.translator.stats.dropped == 1
    assert engine.created(stranger).caller == "10%ZZ"
    assert any("header Caller-Caller-ID-Number value '10%ZZ' has a bad URL escape '%ZZ' at column 3" in r.getMessage()
               for r in caplog.records)
    call = fake.place_call("1001", "33123456", talk_ms=100)
    finish(call)
    assert call.outcome == "answered"


# ------------------------------------------------------------------------------------ commands


def test_escalated_hangup_when_uuid_kill_is_ignored(engine: FakeEngine, started: Started) -> None:
    with FakeFreeswitch(heartbeat_s=0.2, ignore_uuid_kill=True, mode="park") as deaf:
        adapter = start_adapter(deaf.port, engine, started)
        call = deaf.place_call("1001", "33123456", talk_ms=10_000)
        engine.wait_for(lambda: bool(engine.of(LegBridged)))
        adapter.hangup(call.a_uuid, "NORMAL_CLEARING")
        gevent.sleep(0.3)
        assert not engine.hung_up(call.a_uuid)  # the switch ignored it: the engine escalates
        adapter.hangup(call.a_uuid, "NORMAL_CLEARING", escalate=True)
        engine.wait_for(lambda: engine.hung_up(call.a_uuid, b_leg(call)))
        assert f"api hupall NORMAL_CLEARING call_uuid {call.a_uuid}" in deaf.commands
        finish(call)


def test_hangup_of_a_leg_freeswitch_no_longer_knows_reports_it_ended(fake: FakeFreeswitch, engine: FakeEngine,
                                                                     started: Started) -> None:
    adapter = start_adapter(fake.port, engine, started)
    ghost = "0f0f0f0f-0000-4000-8000-000000000002"
    adapter.hangup(ghost)
    assert engine.of(LegHungUp, ghost)[0].cause == "NO_SUCH_CHANNEL"
    adapter.hangup(ghost)  # once only
    assert len(engine.of(LegHungUp, ghost)) == 1
    with pytest.raises(ValueError, match="is not a channel uuid"):
        adapter.hangup("x y\n\nexit")


def test_warning_is_broadcast_to_the_caller(fake: FakeFreeswitch, engine: FakeEngine, started: Started) -> None:
    adapter = start_adapter(fake.port, engine, started)
    call = fake.place_call("1001", "33123456", talk_ms=400)
    engine.wait_for(lambda: bool(engine.of(LegBridged)))
    adapter.warn(call.a_uuid, 30)
    finish(call)
    assert call.warnings == ["tone_stream://%(200,100,800);loops=3"]
    assert f"api uuid_broadcast {call.a_uuid} tone_stream://%(200,100,800);loops=3 aleg" in fake.commands


def test_stock_greenswitch_understands_the_fake(fake: FakeFreeswitch) -> None:
    """The fake's bytes are those greenswitch was written against."""
    client = InboundESL("127.0.0.1", fake.port, "ClueCon")
    with gevent.Timeout(WAIT_S):
        client.connect()
        assert client.send("api uuid_kill 0f0f0f0f-0000-4000-8000-000000000003").data == "-ERR No such channel!\n"
        client.stop()


def test_the_fake_writes_events_when_its_listener_wakes_as_freeswitch_does() -> None:
    """Real FreeSWITCH 1.11.1 writes a listener's queued events every 20 ms, or right after the
    reply to a command it reads (agent/adapters/freeswitch/translate.py): never the moment they
    happen. The fake does the same (here every 0.2 s, to be seen), so the agent meets replies
    that overtake older events."""
    reader = FrameReader()

    def frames(conn: Any, timeout_s: float) -> list[str]:
        conn.settimeout(timeout_s)
        try:
            data = conn.recv(65536)
        except TimeoutError:
            return []
        return [frame.reply_text or frame.content_type for frame in reader.feed(data)]

    def until(conn: Any, count: int) -> list[str]:
        got: list[str] = []
        with gevent.Timeout(WAIT_S):
            while len(got) < count:
                got += frames(conn, WAIT_S)
        return got

    event = [("Event-Name", "CHANNEL_CREATE"), ("Unique-ID", "0f0f0f0f-0000-4000-8000-00000000000a")]
    with FakeFreeswitch(heartbeat_s=0, event_tick_s=0.2) as fake, \
            gsocket.create_connection(("127.0.0.1", fake.port), timeout=2.0) as conn:
        assert until(conn, 1) == ["auth/request"]
        conn.sendall(encode_command("auth ClueCon") + encode_command("event plain CHANNEL_CREATE"))
        assert until(conn, 2) == ["+OK accepted", "+OK event listener enabled plain"]
        fake.fire(event)
        assert until(conn, 1) == ["text/event-plain"]  # at a wake-up
        woke = time.monotonic()
        fake.fire(event)
        assert frames(conn, 0.05) == []  # queued: not written at once
        assert until(conn, 1) == ["text/event-plain"]
        assert time.monotonic() - woke >= 0.15  # the next wake-up
        fake.fire(event)
        conn.sendall(encode_command("api status"))
        assert until(conn, 2) == ["api/response", "text/event-plain"]  # the command woke it: reply, then the event


def test_the_backstop_moves_when_the_agent_re_arms_it(fake: FakeFreeswitch, engine: FakeEngine,
                                                      started: Started) -> None:
    """``arm_backstop``: the callee's scheduled hangup is deleted and scheduled again at the epoch
    second at or after the new instant (money that landed, or ran out, since the answer)."""
    adapter = start_adapter(fake.port, engine, started)  # 60 s of money at authorize
    call = fake.place_call("1001", "33123456", talk_ms=30_000)
    engine.wait_for(lambda: bool(engine.of(LegAnswered)))
    a, b = call.a_uuid, b_leg(call)
    at_ms = int(time.time() * 1000) + 1_200
    adapter.arm_backstop(b, at_ms, a)
    finish(call)
    epoch = -(-at_ms // 1000)
    assert [c for c in fake.commands if c.startswith(("api sched_del", f"api sched_hangup {epoch}"))] == [
        f"api sched_del {b}", f"api sched_hangup {epoch} {b} ALLOTTED_TIMEOUT",
        f"api sched_del {a}"]
    assert f"api sched_hangup {epoch + 1} {a} ALLOTTED_TIMEOUT" in fake.commands
    assert call.b_hangup_cause == "ALLOTTED_TIMEOUT"
    assert at_ms <= call.b_ended_us // 1000 <= epoch * 1000 + 100  # never before the instant asked
    assert adapter.stats.backstops_armed == 1


# ------------------------------------------------------------------------------------ the socket application


@pytest.fixture
def socket_fake() -> Iterator[FakeFreeswitch]:
    server = FakeFreeswitch(heartbeat_s=0.2, mode="socket").start()
    yield server
    server.stop()


def start_socket_adapter(fake: FakeFreeswitch, engine: FakeEngine, started: Started) -> FreeswitchAdapter:
    options = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "heartbeat_timeout_s": 2.0, "command_timeout_s": 1.0,
               "connect_timeout_s": 1.0}
    adapter = FreeswitchAdapter(engine, FreeswitchSettings(esl=EslSettings(port=fake.port, **options),
                                                           authorize_port=0))
    engine.switch = adapter
    started.append(adapter)
    adapter.start()
    fake.authorize_port = adapter.authorize_port
    assert adapter.synced.wait(WAIT_S), adapter.client.last_error
    return adapter


def test_the_socket_application_authorizes_in_one_round_trip(socket_fake: FakeFreeswitch, engine: FakeEngine,
                                                             started: Started) -> None:
    """billing.xml's ``socket`` app connects; the agent answers ``connect``, decides from the
    channel data, clears the refusal and sets the limit and the caller's ceiling in one write
    and closes; the dialplan dials in the same pass (no parked channel to wake: the park loop
    sleeps 20 ms a turn; no second pass through the context)."""
    start_socket_adapter(socket_fake, engine, started)
    call = socket_fake.place_call("1001", "33123456", caller="2001", answer_after_ms=50, talk_ms=400)
    finish(call)
    assert call.outcome == "answered" and call.decision == "allow"
    (request,) = engine.requests
    assert (request.leg_id, request.account_id, request.destination, request.caller) == (
        call.a_uuid, "1001", "33123456", "2001")
    outbound = [c for c in socket_fake.commands if c.startswith("outbound ")]
    assert outbound == [
        "outbound connect",
        f"outbound api uuid_setvar_multi {call.a_uuid} billing_refusal=;billing_backstop_s=61;"
        "billing_ceiling_s=181"]  # one short command: FreeSWITCH reads an outbound socket a byte at a time
    # billing_decision stays empty: a later pass through billing-outbound (the caller's leg
    # transferred) asks the agent again instead of dialling on an old decision.
    assert not any("billing_decision" in c for c in socket_fake.commands)
    # What the dialplan does not read comes after, over the event socket (off the post-dial
    # path), and so does the caller's ceiling in place of billing.xml's 10 s guard.
    informative = [f"api uuid_setvar_multi {call.a_uuid} billing_call_id=call-{call.a_uuid};billing_limit_ms=60000",
                   f"api sched_del {call.a_uuid}", f"api sched_hangup +181 {call.a_uuid} ALLOTTED_TIMEOUT"]
    engine.wait_for(lambda: all(c in socket_fake.commands for c in informative))
    at = [socket_fake.commands.index(c) for c in informative]
    assert at == sorted(at)  # in this order, on the event socket
    # ... and only once FreeSWITCH has dialled: at once, its api commands ran beside the bridge's
    # set-up on the real FreeSWITCH (post-dial delay).
    decided_at = socket_fake.command_at[socket_fake.commands.index(outbound[1])]
    assert socket_fake.command_at[at[0]] - decided_at >= 0.015  # the real one dials ~2 ms after the end
    assert not any(c.startswith("api uuid_transfer") for c in socket_fake.commands)  # the dialplan transfers
    engine.wait_for(lambda: engine.hung_up(call.a_uuid, b_leg(call)))


def test_the_older_two_pass_dialplan_still_gets_its_decision(engine: FakeEngine, started: Started) -> None:
    """An agent upgraded before billing.xml: a channel without billing_refusal (the older
    dialplan transfers after the socket and dials on billing_decision=allow) gets the decision
    it reads, instead of being refused as undecided."""
    with FakeFreeswitch(heartbeat_s=0.2, mode="socket2") as older:
        start_socket_adapter(older, engine, started)
        call = older.place_call("1001", "33123456", talk_ms=300)
        finish(call)
        assert call.outcome == "answered" and call.decision == "allow"
        assert f"outbound api uuid_setvar_multi {call.a_uuid} billing_decision=allow;billing_backstop_s=61;" \
               "billing_ceiling_s=181" in older.commands


def _read_connect(conn: Any) -> bytes:
    """What the authorize listener writes first, up to its empty line."""
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = conn.recv(64)
        assert chunk, data
        data += chunk
    return data


def test_the_listener_writes_connect_as_it_accepts() -> None:
    """FreeSWITCH waits for ``connect``: the authorize listener writes it in its accept
    callback, before the session's greenlet runs (here one that never writes anything)."""
    entered = gevent.event.Event()

    def silent(sock: Any, peer: tuple[object, int]) -> None:
        entered.set()
        assert peer[1] == len(b"connect\n\n")  # the session is told it was written
        gevent.sleep(2.0)

    server = serve_tcp("127.0.0.1", 0, silent, gevent.pool.Pool(4), server_class=AuthorizeServer)
    try:
        with gsocket.create_connection(("127.0.0.1", server.server_port), timeout=2.0) as conn:
            assert _read_connect(conn) == b"connect\n\n"
            assert entered.wait(2.0)
    finally:
        server.stop(timeout=0.5)


def test_background_work_steps_aside_from_the_connection_on(socket_fake: FakeFreeswitch, engine: FakeEngine,
                                                           started: Started) -> None:
    """The call path starts when FreeSWITCH connects, not when its channel data has arrived:
    a CDR batch or an event burst that would start meanwhile waits (agent/services/call_path.py),
    and no longer once the decision is written."""
    adapter = start_socket_adapter(socket_fake, engine, started)
    assert CALL_PATH.in_flight == 0
    with gsocket.create_connection(("127.0.0.1", adapter.authorize_port), timeout=2.0) as conn:
        assert _read_connect(conn) == b"connect\n\n"
        engine.wait_for(lambda: CALL_PATH.in_flight == 1)  # connected, no channel data yet
        conn.close()
    engine.wait_for(lambda: CALL_PATH.in_flight == 0)  # the session ended: background goes on
    call = socket_fake.place_call("1001", "33123456", talk_ms=100)
    finish(call)
    assert call.decision == "allow" and CALL_PATH.in_flight == 0


def test_a_refusal_over_the_socket_and_an_agent_that_cannot_be_reached(socket_fake: FakeFreeswitch,
                                                                       engine: FakeEngine, started: Started) -> None:
    engine.decide = lambda request: AuthorizeDecision(False, "c9", reason=DenyReason.MAX_CALLS, detail="2 calls up")
    adapter = start_socket_adapter(socket_fake, engine, started)
    denied = socket_fake.place_call("1001", "33123456")
    finish(denied)
    assert (denied.outcome, denied.hangup_cause) == ("denied", "USER_BUSY")
    adapter.stop(timeout_s=1.0)  # the agent is gone: the socket application cannot connect
    refused = socket_fake.place_call("1001", "33123456")
    finish(refused)
    assert (refused.outcome, refused.hangup_cause) == ("failed", "NORMAL_TEMPORARY_FAILURE")  # fail closed


def test_an_allowed_call_outlives_the_dialplans_guard(engine: FakeEngine, started: Started) -> None:
    """billing.xml schedules a hangup (10 s) before it asks, in case the agent never decides; an
    allowed call must not be cut by it: the agent replaces it with the call's own ceiling."""
    with FakeFreeswitch(heartbeat_s=0.2, mode="socket", authorize_guard_s=1) as guarded:
        start_socket_adapter(guarded, engine, started)
        call = guarded.place_call("1001", "33123456", talk_ms=2_500)
        finish(call)
        assert call.outcome == "answered" and call.hangup_cause == "NORMAL_CLEARING"
        assert call.b_ended_us - call.b_answered_us >= 2_400_000


def test_without_the_event_socket_the_ceiling_goes_over_the_authorize_socket(engine: FakeEngine,
                                                                               started: Started) -> None:
    """The agent replaces billing.xml's guard with the caller's ceiling over the event socket
    after the decision; when that socket is down at the decision, it sends both commands in
    its reply instead, so an allowed call still outlives the guard."""
    with FakeFreeswitch(heartbeat_s=0.2, mode="socket", authorize_guard_s=1) as guarded:
        adapter = start_socket_adapter(guarded, engine, started)
        adapter.client.stop(timeout_s=1.0)
        assert not adapter.client.connected
        call = guarded.place_call("1001", "33123456", talk_ms=2_500)
        finish(call)
        assert call.outcome == "answered" and call.hangup_cause == "NORMAL_CLEARING"
        assert call.b_ended_us - call.b_answered_us >= 2_400_000
        outbound = [c for c in guarded.commands if c.startswith("outbound api ")]
        assert outbound[1:] == [f"outbound api sched_del {call.a_uuid}",
                                f"outbound api sched_hangup +181 {call.a_uuid} ALLOTTED_TIMEOUT"], outbound
