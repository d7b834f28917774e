"""The Asterisk adapter against the fake Asterisk (agent/sim/asterisk.py): real sockets on
loopback, the real call engine (agent/services/engine.py) with an in-memory balance store.

No monkey-patching: the adapter and the fake use gevent's own sockets; test bodies wait on
gevent events. A few tests use a small recording engine to look at the leg events themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import pytest
from gevent import socket
from gevent.server import StreamServer

from agent.adapters.asterisk import adapter as adapter_module
from agent.adapters.asterisk.adapter import AsteriskAdapter, AsteriskSettings
from agent.adapters.asterisk.ami import AmiSettings, NotConnected
from agent.core.cdr import CallRecord, Disposition
from agent.core.events import (
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    Direction,
    LegAnswered,
    LegCreated,
    LegEvent,
    LegHungUp,
    LegUpdated,
    PbxConnected,
    PbxDisconnected,
)
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo, RatingRefused
from agent.services.clock import SystemClock
from agent.services.engine import Engine, EngineSettings
from agent.sim.asterisk import FakeAsterisk, FakeCall
from agent.sim.memory_store import MemoryStore

WAIT_S = 8.0
SECRET = "s3cret"
PER_SECOND = RateRow(prefix="33", destination="France", rate_micros=60_000)  # 1000 micro-units a second


class Rater:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        if destination.startswith("900"):
            raise RatingRefused(DenyReason.BLOCKED, "destination 900 is blocked")
        return RatedCall(PER_SECOND, RatingInfo("retail", 1, "33", 60_000))


class Cdrs:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.changed = gevent.event.Event()

    def submit(self, record: CallRecord) -> None:
        self.records.append(record)
        self.changed.set()

    def wait(self, count: int = 1) -> list[CallRecord]:
        with gevent.Timeout(WAIT_S, AssertionError(f"{len(self.records)} CDRs, expected {count}")):
            while len(self.records) < count:
                self.changed.clear()
                self.changed.wait(0.05)
        return self.records


class Recorder:
    """Wraps the engine: records every leg event the adapter hands over."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[LegEvent] = []
        self.requests: list[AuthorizeRequest] = []

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        self.requests.append(request)
        decision: AuthorizeDecision = self.inner.authorize(request)
        return decision

    def on_event(self, event: LegEvent) -> None:
        self.events.append(event)
        self.inner.on_event(event)

    def of(self, kind: type[Any], leg_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (leg_id is None or e.leg_id == leg_id)]


@dataclass
class World:
    store: MemoryStore
    engine: Engine
    recorder: Recorder
    cdrs: Cdrs
    fake: FakeAsterisk
    adapters: list[AsteriskAdapter]

    def start_adapter(self, *, wait: bool = True, **ami: Any) -> AsteriskAdapter:
        options: dict[str, Any] = {"port": self.fake.ami_port, "secret": SECRET, "backoff_initial_s": 0.05,
                                   "backoff_max_s": 0.2, "login_refused_delay_s": 0.3, "ping_interval_s": 1.0,
                                   "ping_timeout_s": 0.5, "connect_timeout_s": 1.0, "action_timeout_s": 1.0}
        options.update(ami)
        adapter = AsteriskAdapter(self.recorder, AsteriskSettings(agi_port=0, ami=AmiSettings(**options)))
        self.engine.add_switch(adapter)
        self.adapters.append(adapter)
        adapter.start()
        self.fake.agi_port = adapter.agi_port
        if wait:
            assert adapter.synced.wait(WAIT_S), adapter.ami.last_error
        return adapter


@pytest.fixture
def world() -> Iterator[World]:
    store = MemoryStore()
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=500), store=store,
                    rater=Rater(), clock=SystemClock(), cdr=cdrs)
    engine.start()
    fake = FakeAsterisk("127.0.0.1", 1, ami_secret=SECRET, login_failure_delay_s=0.05).start()
    state = World(store, engine, Recorder(engine), cdrs, fake, [])
    yield state
    for adapter in state.adapters:
        adapter.stop(timeout_s=1.0)
    fake.stop()
    engine.stop(1)


def seconds_up(duration_ms: int) -> int:
    return -(-duration_ms // 1000)


def finish(call: FakeCall) -> FakeCall:
    assert call.done.wait(WAIT_S), f"call {call.a_uniqueid} did not finish ({call.outcome})"
    return call


def wait_for(predicate: Callable[[], bool], what: str = "condition", timeout_s: float = WAIT_S) -> None:
    with gevent.Timeout(timeout_s, AssertionError(f"timed out waiting for {what}")):
        while not predicate():
            gevent.sleep(0.02)


# ------------------------------------------------------------------------------------ whole calls


def test_answered_call_is_authorized_limited_and_billed_from_the_callee_answer(world: World) -> None:
    world.store.add_account("1001", 10_000_000)
    adapter = world.start_adapter()
    call = finish(world.fake.place_call("1001", "33123456", caller="2001", answer_after_ms=150, talk_ms=1200))
    (record,) = world.cdrs.wait()
    assert call.outcome == "answered" and call.decision == "allow" and call.agi_status == "SUCCESS"
    # One command, one round trip (res_agi reads commands one at a time: nothing pipelined).
    assert call.agi_commands == [
        'EXEC MSet "BILLING_LIMIT_MS=10000000,BILLING_BACKSTOP_MS=10001000,BILLING_DECISION=allow"']
    assert call.agi_stalled == 0
    assert call.limit_ms == 10_000_000 and call.backstop_raw == "10001000"  # the backstop: 1 s after the money
    (request,) = world.recorder.requests
    assert (request.pbx, request.leg_id, request.account_id, request.destination, request.caller, request.group_id) == (
        "asterisk", call.a_uniqueid, "1001", "33123456", "2001", call.a_uniqueid)
    assert request.channel.startswith("PJSIP/")
    assert [e.sip_call_id for e in world.recorder.of(LegUpdated, call.a_uniqueid) if e.sip_call_id]  # AMI Getvar
    b = call.b_uniqueids[0]
    created = world.recorder.of(LegCreated, b)[0]
    assert created.direction is Direction.OUTBOUND and created.group_id == call.a_uniqueid
    assert [e.sip_call_id for e in world.recorder.of(LegUpdated, b) if e.sip_call_id]  # Getvar CHANNEL(pjsip,call-id)
    assert record.disposition is Disposition.ANSWERED and record.pbx == "asterisk"
    assert record.answered_ms == world.recorder.of(LegAnswered, b)[0].at_ms
    assert record.answered_ms is not None and abs(record.answered_ms - call.answered_ms) < 5
    assert record.duration_ms >= 1150, record.duration_ms  # talk_ms=1200 on the fake's clock
    assert record.rating.billed_seconds == seconds_up(record.duration_ms)
    assert record.rating.cost_micros == record.rating.billed_seconds * 1000
    assert world.store.accounts["1001"].balance_micros == 10_000_000 - record.rating.cost_micros
    assert {leg.pbx_unique_id for leg in record.legs} == {call.a_uniqueid, b}
    assert all(leg.sip_call_id for leg in record.legs)
    assert adapter.agi.stats.errors == 0 and adapter.ami.stats.garbage == 0


def test_call_is_cut_when_the_money_runs_out(world: World) -> None:
    world.store.add_account("1002", 2_500)  # 2.5 s at one unit per ms
    world.start_adapter()
    call = finish(world.fake.place_call("1002", "33123456", talk_ms=10_000))
    (record,) = world.cdrs.wait()
    # The agent cuts at 2 s exactly; the PBX's own backstop (L(x): the callee's hangup time) sits
    # a second later, so it never takes paid time away.
    assert call.limit_ms == 2000 and call.backstop_raw == "3000"
    assert call.outcome == "cut" and call.cut_by == "ami"
    assert record.disposition is Disposition.CUT
    assert 1950 <= record.duration_ms <= 2000, record.duration_ms
    assert record.rating.cost_micros == 2000
    assert world.store.accounts["1002"].balance_micros >= 0
    assert world.store.open_reservations() == 0


def test_two_calls_sharing_a_balance_are_cut_by_the_agent(world: World) -> None:
    world.store.add_account("1018", 4_000)  # each call alone could talk 3 or 4 s; together about 2 s each
    world.start_adapter()
    calls = [world.fake.place_call("1018", "33123456", talk_ms=10_000) for _ in range(2)]
    for call in calls:
        finish(call)
    records = world.cdrs.wait(2)
    assert [call.cut_by for call in calls].count("ami") >= 1  # the agent's Hangup, before any L() limit
    assert all(record.disposition is Disposition.CUT for record in records)
    assert sum(record.rating.cost_micros for record in records) <= 4_000
    assert world.store.accounts["1018"].balance_micros >= 0 and world.store.open_reservations() == 0


def test_engine_cut_goes_out_as_an_ami_hangup(world: World) -> None:
    world.store.add_account("1003", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1003", "33123456", talk_ms=10_000)
    wait_for(lambda: bool(call.b_uniqueids) and bool(world.recorder.of(LegAnswered, call.b_uniqueids[0])), "answer")
    adapter.hangup(call.a_uniqueid, "NORMAL_CLEARING")
    finish(call)
    assert call.outcome == "cut" and call.cut_by == "ami"
    assert {"Action": "Hangup", "Channel": call.a_uniqueid, "Cause": "16"}.items() <= next(
        a for a in world.fake.actions if a.get("Action") == "Hangup").items()
    (record,) = world.cdrs.wait()
    assert record.disposition is Disposition.ANSWERED  # the engine did not decide it: not a credit cut


@pytest.mark.parametrize(("account", "balance", "destination", "reason", "cause"), [
    ("1004", 0, "33123456", "insufficient_funds", "52"),
    ("1005", 10_000_000, "900123", "blocked", "52"),
    ("nobody", None, "33123456", "unknown_account", "21"),
    ("1006", 10_000_000, "", "bad_request", "28"),
])
def test_denied_calls_are_refused_by_the_dialplan(world: World, account: str, balance: int | None,
                                                 destination: str, reason: str, cause: str) -> None:
    if balance is not None:
        world.store.add_account(account, balance)
    world.start_adapter()
    call = finish(world.fake.place_call(account, destination))
    assert (call.outcome, call.decision, call.reason, call.billing_cause) == ("denied", "deny", reason, cause)
    assert call.hangup_cause == int(cause) and not call.b_uniqueids
    assert call.agi_commands == [f'EXEC MSet "BILLING_REASON={reason},BILLING_CAUSE={cause},BILLING_DECISION=deny"']
    gevent.sleep(0.2)
    assert world.cdrs.records == [] and world.engine.live_calls() == 0


def test_too_many_calls(world: World) -> None:
    world.store.add_account("1007", 10_000_000, max_calls=1)
    world.start_adapter()
    first = world.fake.place_call("1007", "33123456", talk_ms=1500)
    wait_for(lambda: first.decision == "allow", "first decision")
    second = finish(world.fake.place_call("1007", "33123457"))
    assert (second.outcome, second.reason, second.billing_cause) == ("denied", "max_calls", "17")
    assert finish(first).outcome == "answered"


def test_agent_unreachable_means_refused(world: World) -> None:
    world.store.add_account("1008", 10_000_000)
    adapter = world.start_adapter()
    port = adapter.agi_port
    adapter.agi.stop()  # the FastAGI port is closed now
    world.fake.agi_port = port
    call = finish(world.fake.place_call("1008", "33123456"))
    assert (call.outcome, call.agi_status, call.decision, call.hangup_cause) == ("refused", "FAILURE", "", 21)


def test_ami_drop_mid_call_reconnects_resyncs_and_still_bills(world: World) -> None:
    world.store.add_account("1009", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1009", "33123456", talk_ms=1500)
    wait_for(lambda: bool(call.b_uniqueids) and bool(world.recorder.of(LegAnswered, call.b_uniqueids[0])), "answer")
    world.fake.drop_ami_connections()
    wait_for(lambda: len(world.recorder.of(PbxConnected)) == 2, "reconnect")
    resync = world.recorder.of(PbxConnected)[1]
    assert {leg.leg_id for leg in resync.live_legs} == {call.a_uniqueid, call.b_uniqueids[0]}
    assert world.recorder.of(PbxDisconnected)
    finish(call)
    (record,) = world.cdrs.wait()
    assert record.disposition is Disposition.ANSWERED and record.duration_ms >= 1450
    assert record.rating.billed_seconds == seconds_up(record.duration_ms)
    assert adapter.ami.stats.connections == 2


def test_an_ami_user_that_cannot_read_call_events_is_named_once_per_connection(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asterisk sends a user without ``read = call`` no call event and says nothing: the agent
    notices that an allowed call never showed and names the missing right, once. A check per
    allowed call runs only until one call's events have shown on the connection; a new
    connection (another login, maybe other rights) checks again."""
    monkeypatch.setattr(adapter_module, "RIGHTS_CHECK_DELAY_S", 0.1)
    world.store.add_account("1020", 10_000_000)
    adapter = world.start_adapter()
    finish(world.fake.place_call("1020", "33123456", talk_ms=200))
    world.cdrs.wait()
    wait_for(lambda: not adapter._rights_checks, "the first check")
    finish(world.fake.place_call("1020", "33123456", talk_ms=50))
    assert not adapter._rights_checks  # the right is proven on this connection: no more timers
    assert "needs 'read = call'" not in caplog.text
    world.fake.ami_read = frozenset({"system", "dialplan", "reporting"})  # the operator edits manager.conf
    world.fake.drop_ami_connections()
    wait_for(lambda: adapter.synced.is_set() and adapter.ami.stats.connections == 2, "reconnect")
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            call = finish(world.fake.place_call("1020", "33123456", talk_ms=50))
            assert call.decision == "allow"
        wait_for(lambda: "needs 'read = call'" in caplog.text, "the missing right named")
        wait_for(lambda: not adapter._rights_checks, "the checks")
    assert caplog.text.count("needs 'read = call'") == 1


def test_call_ending_during_an_ami_outage_is_ended_by_the_resync(world: World) -> None:
    world.store.add_account("1010", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1010", "33123456", talk_ms=600)
    wait_for(lambda: bool(call.b_uniqueids) and bool(world.recorder.of(LegAnswered, call.b_uniqueids[0])), "answer")
    world.fake.refuse_logins(True)
    world.fake.drop_ami_connections()
    finish(call)  # ends while the agent cannot log in
    assert not adapter.connected() and world.cdrs.records == []
    world.fake.refuse_logins(False)
    (record,) = world.cdrs.wait()
    assert record.hangup_cause == "ENDED_DURING_PBX_OUTAGE"
    assert record.rating.billed_seconds >= 1  # billed up to the resync at most


def test_hangup_during_an_agi_command(world: World) -> None:
    world.store.add_account("1011", 10_000_000)
    adapter = world.start_adapter()
    call = finish(world.fake.place_call("1011", "33123456", agi_hangup_at_command=1))
    assert call.outcome in ("cancelled", "refused", "denied") and not call.b_uniqueids
    # The caller's BYE lands while the one command runs: its reply, then HANGUP (the agent has
    # its answer and closes); the decision was set, but nothing is dialled on a dead channel.
    assert call.agi_commands[-1].endswith('BILLING_DECISION=allow"')
    (record,) = world.cdrs.wait()
    assert record.disposition is not Disposition.ANSWERED and record.rating.cost_micros == 0
    assert world.store.open_reservations() == 0 and world.store.accounts["1011"].balance_micros == 10_000_000
    assert adapter.agi.stats.errors == 0


def test_forked_dial_bills_the_leg_that_answered(world: World) -> None:
    world.store.add_account("1012", 10_000_000)
    world.start_adapter()
    call = finish(world.fake.place_call("1012", "33123456", forks=2, talk_ms=1100))
    (record,) = world.cdrs.wait()
    assert len(call.b_uniqueids) == 2
    assert record.disposition is Disposition.ANSWERED
    assert record.rating.billed_seconds == seconds_up(record.duration_ms) >= 2
    billed = [leg for leg in record.legs if leg.billed]
    assert len(billed) == 1 and len(record.legs) == 3
    loser = next(leg for leg in record.legs if leg.direction == "outbound" and not leg.billed)
    assert loser.answered_ms is None


def test_busy_callee_is_not_billed(world: World) -> None:
    world.store.add_account("1013", 10_000_000)
    world.start_adapter()
    call = finish(world.fake.place_call("1013", "33123456", busy=True))
    (record,) = world.cdrs.wait()
    assert call.outcome == "busy" and record.disposition is Disposition.BUSY and record.rating.cost_micros == 0


# ------------------------------------------------------------------------------------ bad input, faults


def test_login_refused_is_logged_and_retried_with_backoff(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    world.fake.refuse_logins(True)
    adapter = world.start_adapter(wait=False)
    gevent.sleep(1.2)
    assert not adapter.connected()
    assert 1 <= adapter.ami.stats.login_refusals <= 5  # 0.3 s apart (+ the fake's own pause), not a busy loop
    assert any("refused the login of user 'billing': Authentication failed" in r.getMessage() for r in caplog.records)
    world.fake.refuse_logins(False)
    assert adapter.synced.wait(WAIT_S)
    assert adapter.connected()


def test_calls_are_refused_while_ami_is_down(world: World) -> None:
    world.store.add_account("1017", 10_000_000)
    world.fake.refuse_logins(True)
    adapter = world.start_adapter(wait=False)
    call = finish(world.fake.place_call("1017", "33123456"))
    assert (call.outcome, call.reason, call.billing_cause) == ("denied", "pbx_unsupervised", "41")
    assert world.recorder.requests == []  # the engine was not even asked
    world.fake.refuse_logins(False)
    assert adapter.synced.wait(WAIT_S)
    assert finish(world.fake.place_call("1017", "33123456", talk_ms=100)).outcome == "answered"


def test_garbage_on_the_ami_socket(world: World) -> None:
    world.store.add_account("1014", 10_000_000)
    adapter = world.start_adapter()
    world.fake.inject_ami(b"\x00\xffnot a header\r\nEvent: Hangup\r\n\r\nrandom words\r\n\r\n")
    wait_for(lambda: adapter.ami.stats.garbage == 2, "garbage counted")
    assert adapter.connected() and len(world.recorder.of(PbxConnected)) == 1
    world.fake.inject_ami(b"x" * 300_000)  # no end of message: the connection is reset
    wait_for(lambda: len(world.recorder.of(PbxConnected)) == 2, "reconnect after a framing error")
    assert adapter.ami.stats.framing_errors == 1
    call = finish(world.fake.place_call("1014", "33123456", talk_ms=200))
    assert call.outcome == "answered"
    assert world.cdrs.wait()[0].disposition is Disposition.ANSWERED


def test_silent_ami_is_detected_by_the_ping_watchdog(world: World) -> None:
    adapter = world.start_adapter(ping_interval_s=0.2, ping_timeout_s=0.2)
    world.fake.stall_ami(1.0)
    wait_for(lambda: len(world.recorder.of(PbxConnected)) == 2, "reconnect after a silent AMI")
    assert adapter.ami.stats.ping_failures >= 1


def agi_exchange(port: int, data: bytes, *, close: bool = False, timeout_s: float = 3.0,
                 replies: tuple[bytes, ...] = (b"200 result=0\n",)) -> bytes:
    """Play Asterisk: the environment, then one reply per command line as it comes (the last of
    ``replies`` repeats), until the agent closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        answered = 0
        with gevent.Timeout(timeout_s, False):
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                out += chunk
                while not close and out.count(b"\n") > answered:
                    sock.sendall(replies[min(answered, len(replies) - 1)])
                    answered += 1
        return out
    finally:
        sock.close()


ENV = (b"agi_network: yes\nagi_network_script: authorize?acct=1\nagi_request: agi://127.0.0.1/authorize?acct=1\n"
       b"agi_channel: DAHDI/1-1\nagi_type: DAHDI\nagi_uniqueid: 1795335999.1\nagi_callerid: unknown\n"
       b"agi_extension: 33123456\nagi_accountcode: \nagi_arg_1: %s\n\n")


def test_malformed_agi_peers_never_stall_the_agent(world: World) -> None:
    world.store.add_account("1015", 10_000_000)
    adapter = world.start_adapter()
    port = adapter.agi_port
    other = gevent.spawn(gevent.sleep, 0)
    assert agi_exchange(port, b"agi_network: yes\nagi_chan", close=True) == b""  # EOF before the blank line
    assert agi_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", close=True) == b""
    assert adapter.agi.stats.bad_environments == 2
    call = finish(world.fake.place_call("1015", "33123456", agi_truncate=True))
    assert call.outcome == "refused" and call.decision == ""
    assert other.dead  # the hub kept running (panoramisk's reader would spin here, freezing everything)
    # A "?query" suffix still routes; no tech-specific Call-ID for DAHDI; the argument is the account.
    reply = agi_exchange(port, ENV % b"nobody")
    assert reply == b'EXEC MSet "BILLING_REASON=unknown_account,BILLING_CAUSE=21,BILLING_DECISION=deny"\n'
    unknown_script = agi_exchange(port, (ENV % b"1015").replace(b"script: authorize?acct=1", b"script: billing"))
    assert unknown_script.endswith(b'BILLING_DECISION=deny"\n')
    assert adapter.stats.refused_requests == 1


def test_an_asterisk_without_mset_leaves_no_decision(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """EXEC of an application Asterisk does not have answers ``200 result=-2``: the MSet was the
    session's last command (our side of the stream ended with it), so no decision landed and
    the dialplan refuses the call; the log says why."""
    world.store.add_account("1019", 10_000_000)
    adapter = world.start_adapter()
    with caplog.at_level(logging.ERROR):
        reply = agi_exchange(adapter.agi_port, ENV % b"1019", replies=(b"200 result=-2\n",))
        wait_for(lambda: adapter.stats.mset_refused == 1, "the refused MSet is seen")
    assert reply == b'EXEC MSet "BILLING_LIMIT_MS=10000000,BILLING_BACKSTOP_MS=10001000,BILLING_DECISION=allow"\n'
    assert "EXEC MSet answered '200 result=-2'" in caplog.text


def test_the_decision_ends_the_agents_side_of_the_stream(world: World) -> None:
    """The MSet is the last command: the agent half-closes with it, so res_agi reads the end of
    the stream right after it has run the command (the dialplan goes on), without waiting for
    the agent to read the reply and close."""
    world.store.add_account("1020", 10_000_000)
    adapter = world.start_adapter()
    sock = socket.create_connection(("127.0.0.1", adapter.agi_port))
    try:
        sock.sendall(ENV % b"1020")
        data = b""
        with gevent.Timeout(3.0):
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            assert sock.recv(4096) == b""  # the end of the agent's stream, before any reply was written
        assert data.startswith(b'EXEC MSet "BILLING_LIMIT_MS=')
        sock.sendall(b"200 result=0\n")
    finally:
        sock.close()
    wait_for(lambda: adapter.agi.stats.active == 0, "the session ends")


def test_agi_port_in_use_fails_fast(world: World) -> None:
    adapter = world.start_adapter()
    other = AsteriskAdapter(world.recorder, AsteriskSettings(agi_port=adapter.agi_port,
                                                             ami=AmiSettings(port=world.fake.ami_port)))
    with pytest.raises(OSError):
        other.start()
    assert not other.connected()


def test_hangup_of_a_channel_asterisk_no_longer_knows(world: World) -> None:
    adapter = world.start_adapter()
    adapter.hangup("1795335999.77")
    assert world.recorder.of(LegHungUp, "1795335999.77")[0].cause == "NO_SUCH_CHANNEL"
    adapter.hangup("1795335999.77")
    assert len(world.recorder.of(LegHungUp, "1795335999.77")) == 1


def test_escalated_hangup_hits_every_leg_of_the_call(world: World) -> None:
    world.store.add_account("1016", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1016", "33123456", talk_ms=10_000, ignore_ami_hangup=True)
    wait_for(lambda: bool(call.b_uniqueids) and bool(world.recorder.of(LegAnswered, call.b_uniqueids[0])), "answer")
    adapter.hangup(call.a_uniqueid, "NORMAL_CLEARING", escalate=True)
    targets = [a.get("Channel") for a in world.fake.actions if a.get("Action") == "Hangup"]
    assert targets[0] == call.a_uniqueid and call.b_uniqueids[0] in targets and len(targets) == 3
    world.fake.ignore_hangups(call, False)
    adapter.hangup(call.a_uniqueid)
    finish(call)


# ------------------------------------------------------------------------------------ AMI client, small peer


class NullEngine:
    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        raise AssertionError("no call in this test")

    def on_event(self, event: LegEvent) -> None:
        pass


class TinyAmi:
    """An AMI peer that logs in, lists no channels, records actions and never answers Hangup."""

    def __init__(self) -> None:
        self.actions: list[dict[str, str]] = []
        self.sockets: list[socket.socket] = []
        self.server = StreamServer(("127.0.0.1", 0), self._serve)
        self.server.start()

    def _serve(self, sock: socket.socket, address: Any) -> None:
        self.sockets.append(sock)
        sock.sendall(b"Asterisk Call Manager/9.0.0\r\n")
        buffer = b""
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\r\n\r\n" in buffer:
                block, buffer = buffer.split(b"\r\n\r\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().split("\r\n"))
                self.actions.append(fields)
                aid = fields["ActionID"].encode()
                if fields["Action"] == "Login":
                    sock.sendall(b"Response: Success\r\nActionID: %s\r\nMessage: Authentication accepted\r\n\r\n" % aid)
                elif fields["Action"] == "CoreShowChannels":
                    sock.sendall(b"Response: Success\r\nActionID: %s\r\nEventList: start\r\n\r\n"
                                 b"Event: CoreShowChannelsComplete\r\nActionID: %s\r\nEventList: Complete\r\n"
                                 b"ListItems: 0\r\n\r\n" % (aid, aid))

    def drop(self) -> None:
        for sock in self.sockets:
            sock.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def stop(self) -> None:
        self.drop()
        self.server.stop(timeout=1)


def test_actions_pending_at_a_drop_fail_at_once_and_are_never_resent() -> None:
    peer = TinyAmi()
    recorder = Recorder(NullEngine())
    adapter = AsteriskAdapter(recorder, AsteriskSettings(agi_port=0, ami=AmiSettings(
        port=peer.server.server_port, backoff_initial_s=0.05, backoff_max_s=0.1, action_timeout_s=5.0)))
    try:
        adapter.start()
        assert adapter.synced.wait(WAIT_S)
        pending = gevent.spawn(adapter.hangup, "1795335999.5")
        wait_for(lambda: any(a["Action"] == "Hangup" for a in peer.actions), "the Hangup sent")
        peer.drop()
        with pytest.raises(NotConnected, match="AMI connection lost"):
            pending.get(timeout=1.0)  # not after action_timeout_s: at the drop
        wait_for(lambda: len(recorder.of(PbxConnected)) == 2, "reconnect")
        gevent.sleep(0.2)
        assert [a["Action"] for a in peer.actions].count("Hangup") == 1  # panoramisk would re-send it now
        assert [a["Action"] for a in peer.actions].count("Login") == 2
    finally:
        adapter.stop(1.0)
        peer.stop()


def test_a_call_answered_during_an_ami_outage_is_billed_from_its_real_answer(world: World) -> None:
    world.store.add_account("1011", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1011", "33123456", answer_after_ms=300, talk_ms=2_500)
    wait_for(lambda: bool(call.b_uniqueids), "dial")
    world.fake.refuse_logins(True)
    world.fake.drop_ami_connections()  # the callee answers while the agent cannot see it
    wait_for(lambda: bool(call.answered_ms), "answer on the PBX")
    gevent.sleep(1.2)
    world.fake.refuse_logins(False)
    wait_for(lambda: len(world.recorder.of(PbxConnected)) == 2, "reconnect")
    resync = world.recorder.of(PbxConnected)[1]
    (b_leg,) = [leg for leg in resync.live_legs if leg.leg_id == call.b_uniqueids[0]]
    assert abs(b_leg.answered_ms - call.answered_ms) <= 5  # CDR(answer,u), not the resync instant
    finish(call)
    (record,) = world.cdrs.wait()
    assert abs(record.duration_ms - 2_500) <= 150  # the whole talk, not only what followed the resync
    assert adapter.ami.stats.connections == 2


def test_the_backstop_moves_when_the_agent_re_arms_it(world: World) -> None:
    """``arm_backstop``: AMI ``Setvar TIMEOUT(absolute)`` on the callee (ms precision, relative to
    now) moves the callee's hangup time that ``L(x)`` set (fixtures/captures/asterisk-*/ami-rearm.txt)."""
    world.store.add_account("1020", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1020", "33123456", talk_ms=30_000)
    wait_for(lambda: bool(call.b_uniqueids) and world.fake.find_channel(call.b_uniqueids[0]) is not None
             and world.fake.find_channel(call.b_uniqueids[0]).timeout_at > 0, "the callee's backstop armed")
    armed_at = time.time()
    adapter.arm_backstop(call.b_uniqueids[0], int(armed_at * 1000) + 700, call.a_uniqueid)
    finish(call)
    assert call.cut_by == "backstop" and call.backstop_rearms == 1
    assert 0.65 <= call.ended_ms / 1000 - armed_at <= 0.9
    assert any(a.get("Action") == "Setvar" and a.get("Variable") == "TIMEOUT(absolute)" for a in world.fake.actions)
    assert adapter.stats.backstops_armed == 1


def test_a_listed_leg_that_hangs_up_before_the_listing_reaches_the_engine_is_told_again(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by bench_faults: after a restart the resync listed a call, the call hung up while the
    adapter was still looking up answers, and its hangup reached the engine before the listing:
    the engine (which adopts calls from the listing) dropped it, adopted the call, cut it for
    nothing and never ended it. The hangup is now told again after the listing."""
    world.store.add_account("1017", 10_000_000)
    adapter = world.start_adapter()
    call = world.fake.place_call("1017", "33123456", talk_ms=30_000)
    wait_for(lambda: bool(call.b_uniqueids) and bool(world.recorder.of(LegAnswered, call.b_uniqueids[0])), "answer")
    looked_up = adapter._missed_answers

    def hang_up_meanwhile(legs: list[str]) -> dict[str, int]:
        world.fake.hangup(call)
        wait_for(lambda: adapter.translator.has_ended(call.a_uniqueid), "the hangup event")
        return looked_up(legs)

    monkeypatch.setattr(adapter, "_missed_answers", hang_up_meanwhile)
    world.fake.drop_ami_connections()
    wait_for(lambda: len(world.recorder.of(PbxConnected)) == 2, "reconnect")
    events = world.recorder.events
    resync_at = events.index(world.recorder.of(PbxConnected)[1])
    assert call.a_uniqueid in {leg.leg_id for leg in events[resync_at].live_legs}  # listed before it ended
    again = [e for e in events[resync_at:] if isinstance(e, LegHungUp) and e.leg_id == call.a_uniqueid]
    assert again and again[0] == world.recorder.of(LegHungUp, call.a_uniqueid)[0]  # same instant and cause
