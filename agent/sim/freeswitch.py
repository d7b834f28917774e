"""A fake FreeSWITCH event socket on loopback that plays whole calls (tests, benchmarks, demo).

It writes the bytes mod_event_socket writes (the frame layouts of reference/protocols.md §4 and
the captures in shared/captures/freeswitch; its event encoder reproduces every captured event
byte for byte, see tests/test_esl_protocol.py) and behaves like the billing dialplan of
dialplan/freeswitch/billing.xml around the agent:

* ``place_call(account, destination, ...)`` creates the A leg and asks the agent, as the
  shipped billing.xml does: ``mode="socket"`` (the default) sets ``billing_refusal`` and runs
  the ``socket`` application, an outbound connection to ``authorize_port`` (``connect``
  answered with the channel data, then the agent's ``api`` commands answered one by one, until
  the agent closes; a port that refuses leaves no decision); then, in the same pass, an empty
  ``billing_refusal`` dials, anything else transfers back into the context: ``deny`` hangs up
  with ``billing_hangup_cause``, no decision with NORMAL_TEMPORARY_FAILURE (billing-unreachable);
  ``mode="socket2"`` plays the older two-pass billing.xml (``billing_asked``, no
  ``billing_refusal``: the transfer after the socket reads ``billing_decision``);
  ``mode="park"`` parks the A leg (CHANNEL_PARK with ``billing_destination`` and
  ``accountcode``) and waits for the ``uuid_transfer``; without one, ``park_timeout`` hangs the
  call up;
* after the transfer it reads ``billing_decision``: ``deny`` hangs up with
  ``billing_hangup_cause``; ``allow`` dials (and so does the one-pass socket dialplan whose
  refusal the agent cleared): the B-leg attempts in order (gateway failover),
  each a CHANNEL_CREATE, a CHANNEL_PROGRESS carrying its SIP Call-ID, then a failure or the
  answer; an answered leg gets the dialplan's ``execute_on_answer`` backstop
  (``sched_hangup +billing_backstop_s``), the caller is answered and bridged; after ``talk_ms``
  the caller (or the callee) hangs up and the other side follows (``hangup_after_bridge``);
* ``callee_backstop=False`` plays a dialplan without the callee-leg backstop (the agent's own cut
  then ends calls that run out of money);
* API commands: ``uuid_kill`` (ignored when ``ignore_uuid_kill``: the escalation test),
  ``hupall``, ``sched_hangup``, ``uuid_setvar(_multi)``, ``uuid_getvar``, ``uuid_transfer``,
  ``uuid_broadcast``, ``uuid_dump``, ``uuid_exists``, ``show channels as json``, ``status``,
  and ``bgapi``; the wrong password gets ``-ERR invalid`` and the goodbye notice;
* faults: ``drop_connections()`` (the socket dies mid-call, calls go on), ``stall(s)``
  (nothing written for a while: a black-holed link), ``inject(bytes)`` (malformed frames).

Time is the real clock (gevent timers); timestamps are wall-clock µs on FreeSWITCH's 20 ms
tick (``STAMP_TICK_US``: the last tick at or before the instant, as the real one stamps; made
strictly increasing by a µs where two fall on one tick); events reach a connection when its
listener wakes, as on the real one (``EVENT_TICK_S``: every 20 ms, and right after the reply to
each command it reads; ``flush_events()`` writes them now);
uuids come from a seeded generator. Run ``python -m agent.sim.freeswitch --help`` for a
standalone server (the benchmark runs it in a separate process).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import socket
from gevent.server import StreamServer

from agent.adapters.freeswitch.esl_protocol import (
    encode_api_response,
    encode_auth_request,
    encode_command_reply,
    encode_disconnect_notice,
    encode_event,
    encode_event_body,
    url_encode,
)

log = logging.getLogger(__name__)

DEFAULT_PASSWORD = "ClueCon"
STAMP_TICK_US = 20_000
"""FreeSWITCH's time stamps move once per soft-timer tick, 20 ms by default (switch_time.c; seen
on 1.11.1: agent/adapters/freeswitch/translate.py)."""
EVENT_TICK_S = 0.02
"""An event-socket listener writes its queued events when it wakes: on a command (after its
reply), else every 20 ms (mod_event_socket's read_packet sleeps in a 20 ms poll that new events
do not interrupt; seen on 1.11.1: agent/adapters/freeswitch/translate.py). 0: every event at once."""
Q850 = {
    "NORMAL_CLEARING": 16, "USER_BUSY": 17, "NO_USER_RESPONSE": 18, "NO_ANSWER": 19, "CALL_REJECTED": 21,
    "NO_ROUTE_DESTINATION": 3, "UNALLOCATED_NUMBER": 1, "INVALID_NUMBER_FORMAT": 28,
    "NORMAL_TEMPORARY_FAILURE": 41, "OUTGOING_CALL_BARRED": 52, "DESTINATION_OUT_OF_ORDER": 27,
    "ORIGINATOR_CANCEL": 487, "ALLOTTED_TIMEOUT": 602, "MANAGER_REQUEST": 503, "NORMAL_CIRCUIT_CONGESTION": 34,
    "SERVICE_UNAVAILABLE": 63, "RECOVERY_ON_TIMER_EXPIRE": 102, "MEDIA_TIMEOUT": 604, "GATEWAY_DOWN": 609,
}
"""The cause names this fake knows. FreeSWITCH's own table (switch_channel.c CAUSE_CHART) has more;
a name in neither, such as "TEMPORARY_FAILURE", is NORMAL_CLEARING to FreeSWITCH
(switch_channel_str2cause), and to this fake: found on a real FreeSWITCH, where billing.xml's
refusals with that name reached the caller as a normal clearing instead of a 503."""
# billing.xml's fail_on_single_reject: a routed bridge stops at these instead of the next carrier.
FAIL_ON_SINGLE_REJECT = frozenset({"USER_BUSY", "NO_ANSWER", "NO_USER_RESPONSE", "ORIGINATOR_CANCEL"})
STATE_NUMBERS = {"CS_NEW": 0, "CS_INIT": 1, "CS_ROUTING": 2, "CS_EXECUTE": 4, "CS_CONSUME_MEDIA": 7,
                 "CS_EXCHANGE_MEDIA": 5, "CS_HANGUP": 10, "CS_REPORTING": 11, "CS_DESTROY": 12}


@dataclass(frozen=True)
class Attempt:
    """One B-leg attempt of the bridge; several attempts in order are a gateway failover."""

    gateway: str = "carrier"
    ring_ms: int = 20  # until the first SIP response: CHANNEL_PROGRESS with the leg's Call-ID
    answer_after_ms: int = 50  # from the attempt's start to the answer (or the failure)
    fail_cause: str = ""  # non-empty: the attempt fails with this cause instead of answering


@dataclass
class FakeCall:
    """A scripted call and what happened to it."""

    account: str
    destination: str
    caller: str
    attempts: tuple[Attempt, ...]
    talk_ms: int
    hangup_by: str  # "caller" | "callee"
    early_answer: bool
    a_uuid: str = ""
    b_uuids: list[str] = field(default_factory=list)
    parked_at: float = 0.0  # perf_counter when CHANNEL_PARK was written
    transferred_at: float = 0.0  # perf_counter when uuid_transfer was read
    decision: str = ""
    outcome: str = ""  # answered | denied | failed | park_timeout | killed_while_parked | cancelled
    hangup_cause: str = ""  # the A leg's
    b_hangup_cause: str = ""  # the answered B leg's
    b_answered_us: int = 0
    a_ended_us: int = 0
    b_ended_us: int = 0
    warnings: list[str] = field(default_factory=list)
    done: gevent.event.Event = field(default_factory=gevent.event.Event)

    @property
    def auth_latency_ms(self) -> float:
        return (self.transferred_at - self.parked_at) * 1000 if self.transferred_at else float("nan")

    @property
    def talk_us(self) -> int:
        """Billable time as FreeSWITCH saw it: B answer to the end of the call."""
        if not self.b_answered_us:
            return 0
        end = min(x for x in (self.a_ended_us, self.b_ended_us) if x) if (self.a_ended_us or self.b_ended_us) else 0
        return max(0, end - self.b_answered_us)


@dataclass
class FakeChannel:
    uuid: str
    direction: str  # inbound | outbound
    name: str
    caller: str
    destination: str
    created_us: int
    call: FakeCall
    variables: dict[str, str] = field(default_factory=dict)
    gateway: str = ""
    state: str = "CS_INIT"
    call_state: str = "DOWN"
    answer_state: str = "ringing"
    answered_us: int = 0
    progress_us: int = 0
    bridged_us: int = 0
    hangup_us: int = 0
    hangup_cause: str = ""
    peer: FakeChannel | None = None
    other_type: str = ""  # originator (on a B leg) | originatee (on the A leg once bridged)
    parked: bool = False
    transfer: gevent.event.Event = field(default_factory=gevent.event.Event)
    ended: gevent.event.Event = field(default_factory=gevent.event.Event)


class _Connection:
    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.authed = False
        self.events: set[str] = set()
        self.all_events = False
        self.lock = gevent.lock.Semaphore()
        self.alive = True
        self.queued: list[bytes] = []  # events waiting for the listener's next wake-up

    def wants(self, name: str) -> bool:
        return self.authed and (self.all_events or name in self.events)

    def send(self, data: bytes) -> None:
        if not self.alive:
            return
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False

    def flush(self) -> None:
        if self.queued:
            data, self.queued = b"".join(self.queued), []
            self.send(data)


class FakeFreeswitch:
    """An event-socket server on loopback with scripted calls (see the module docstring)."""

    def __init__(self, *, password: str = DEFAULT_PASSWORD, host: str = "127.0.0.1", port: int = 0, seed: int = 7,
                 heartbeat_s: float = 20.0, park_timeout_s: float = 10.0, ignore_uuid_kill: bool = False,
                 callee_backstop: bool = True, hostname: str = "fake-fs", mode: str = "socket",
                 authorize_host: str = "127.0.0.1", authorize_port: int = 8084, authorize_guard_s: int = 10,
                 cdr_file: str = "", clock: Callable[[], float] = time.time,
                 stamp_tick_us: int = STAMP_TICK_US, event_tick_s: float = EVENT_TICK_S) -> None:
        if mode not in ("socket", "socket2", "park"):
            raise ValueError(f"mode must be socket, socket2 or park, not {mode!r}")
        self.mode = mode
        self.authorize_host = authorize_host
        self.authorize_port = authorize_port  # set by whoever starts the agent's listener
        self.authorize_guard_s = authorize_guard_s  # billing.xml's sched_hangup before the socket
        self.cdr_file = cdr_file  # mod_cdr_csv's file ("": none)
        self.password = password
        self.heartbeat_s = heartbeat_s
        self.park_timeout_s = park_timeout_s
        self.ignore_uuid_kill = ignore_uuid_kill
        self.callee_backstop = callee_backstop  # False: a dialplan without the execute_on_answer backstop
        self.hostname = hostname
        self.clock = clock
        self.stamp_tick_us = max(1, stamp_tick_us)
        self.event_tick_s = max(0.0, event_tick_s)
        self._rng = random.Random(seed)
        self.core_uuid = self._new_uuid()
        self.server = StreamServer((host, port), self._serve)
        self.group = gevent.pool.Group()
        self.channels: dict[str, FakeChannel] = {}
        self.scheduled: dict[str, list[gevent.Greenlet[Any, Any]]] = {}  # sched_hangup tasks by channel uuid
        self.calls: list[FakeCall] = []
        self.commands: list[str] = []  # every command received, in order (auth included)
        self.command_at: list[float] = []  # the monotonic instant each of ``commands`` arrived
        # Gateways that fail every attempt with this cause (a carrier answering 503 gives
        # NORMAL_CIRCUIT_CONGESTION): the agent's routes (a '|' failover billing_trunk) then go on
        # to the next; billing.xml's fail_on_single_reject causes end the bridge instead.
        self.failing_gateways: dict[str, str] = {}
        self.connections_accepted = 0
        self.slow_api: dict[str, float] = {}  # verb -> seconds it takes (its output is taken first)
        self._connections: set[_Connection] = set()
        self._sequence = 0
        self._last_us = 0
        self._stalled_until = 0.0
        self._started = time.monotonic()
        self._sessions_since_start = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> FakeFreeswitch:
        self.server.start()
        if self.heartbeat_s > 0:
            self.group.spawn(self._heartbeats)
        if self.event_tick_s > 0:
            self.group.spawn(self._event_ticks)
        return self

    def stop(self) -> None:
        self.server.stop(timeout=1)
        for conn in list(self._connections):
            self._close(conn)
        self.group.kill(timeout=2)

    def __enter__(self) -> FakeFreeswitch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- scripting

    def place_call(self, account: str, destination: str, *, answer_after_ms: int = 50, talk_ms: int = 1000,
                   caller: str = "1001", attempts: Iterable[Attempt] | None = None, hangup_by: str = "caller",
                   early_answer: bool = False) -> FakeCall:
        """Start a call through the billing dialplan; returns its handle (``call.done`` is set at the end)."""
        plan = tuple(attempts) if attempts is not None else (Attempt(answer_after_ms=answer_after_ms),)
        call = FakeCall(account, destination, caller, plan, talk_ms, hangup_by, early_answer)
        call.a_uuid = self._new_uuid()
        self.calls.append(call)
        self.group.spawn(self._run_call, call)
        return call

    def flush_events(self) -> None:
        """Write the queued events now, as a listener does when it wakes (EVENT_TICK_S)."""
        for conn in list(self._connections):
            conn.flush()

    def drop_connections(self) -> None:
        """The TCP connections die (no goodbye); calls go on."""
        for conn in list(self._connections):
            self._close(conn)

    def stall(self, seconds: float) -> None:
        """Write nothing (no events, replies or heartbeats) for ``seconds``: a black-holed link."""
        self._stalled_until = time.monotonic() + seconds

    def inject(self, data: bytes) -> None:
        """Write raw bytes to every authenticated connection (malformed-frame tests)."""
        for conn in list(self._connections):
            if conn.authed:
                conn.send(data)

    def fire(self, headers: list[tuple[str, str]], body: str = "") -> None:
        """Send an arbitrary event (``Event-Name`` first) to its subscribers."""
        name = headers[0][1] if headers and headers[0][0] == "Event-Name" else ""
        self._send_event(name, lambda: encode_event(headers, body))

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every placed call has finished."""
        deadline = time.monotonic() + timeout_s
        for call in list(self.calls):
            if not call.done.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def live_connections(self) -> int:
        return sum(1 for conn in self._connections if conn.alive and conn.authed)

    # ---------------------------------------------------------------- calls

    def _run_call(self, call: FakeCall) -> None:
        try:
            self._play(call)
        except Exception:  # a fake that dies silently would hang the tests
            log.exception("fake call %s failed", call.a_uuid)
        finally:
            self._write_cdr(call)
            call.done.set()

    def _write_cdr(self, call: FakeCall) -> None:
        """mod_cdr_csv, the caller's leg, with a template that starts ``"${uuid}",
        "${answer_uepoch}","${end_uepoch}"`` (µs; an unanswered call's answer is 0)."""
        if not self.cdr_file or not call.a_uuid:
            return
        ended_us = call.a_ended_us or call.b_ended_us or self._now_us()
        with open(self.cdr_file, "a", encoding="utf-8") as out:
            out.write(f'"{call.a_uuid}","{call.b_answered_us or 0}","{ended_us}","{call.hangup_cause}"\n')

    def _play(self, call: FakeCall) -> None:
        now = self._now_us()
        self._sessions_since_start += 1
        a = FakeChannel(call.a_uuid, "inbound", f"sofia/customers/{call.caller}@127.0.0.1:5060", call.caller,
                        call.destination, now, call)
        a.variables.update({
            "direction": "inbound", "uuid": a.uuid, "sip_call_id": f"{self._rng.getrandbits(48):x}@127.0.0.1",
            "sip_from_user": call.caller, "sofia_profile_name": "customers", "accountcode": call.account,
            "call_uuid": a.uuid,
        })
        self.channels[a.uuid] = a
        self._channel_event("CHANNEL_CREATE", a, ("switch_core_state_machine.c", "switch_core_session_run", 608))
        a.state = "CS_EXECUTE"
        a.call_state = "RINGING"
        if call.early_answer:
            self._answer(a)
        one_pass = False
        if self.mode in ("socket", "socket2"):
            # billing-authorize: set the destination (and, in one pass, where the call goes
            # unless the agent allows it), ask the agent over the socket application.
            if self.mode == "socket":
                a.variables.update({"billing_destination": call.destination,
                                    "billing_refusal": f"{call.destination} XML billing-outbound"})
            else:
                a.variables.update({"billing_destination": call.destination, "billing_asked": "true"})
            a.variables["current_application"] = "socket"
            call.parked_at = time.perf_counter()
            self.schedule_hangup(a, self.authorize_guard_s, "NORMAL_TEMPORARY_FAILURE")
            self._outbound_socket(a)
            call.transferred_at = time.perf_counter()
            if a.ended.is_set():
                call.outcome = call.outcome or "killed_while_parked"
                return
            # One pass: an empty billing_refusal dials at once; else (and in two passes) the
            # transfer back into the context reads the decision.
            one_pass = self.mode == "socket" and not a.variables.get("billing_refusal")
            if not one_pass and not a.variables.get("billing_decision"):
                call.outcome = "failed"
                self.hangup(a, "NORMAL_TEMPORARY_FAILURE")  # billing-unreachable
                return
        else:
            # The billing-authorize extension of a parking dialplan: park for the agent.
            a.variables.update({"billing_destination": call.destination, "current_application": "park"})
            a.parked = True
            self._channel_event("CHANNEL_PARK", a, ("switch_ivr.c", "switch_ivr_park", 1010))
            call.parked_at = time.perf_counter()
            gevent.wait([a.transfer, a.ended], count=1, timeout=self.park_timeout_s)
            if a.ended.is_set():
                call.outcome = call.outcome or "killed_while_parked"
                return
            if not a.transfer.is_set():
                call.outcome = "park_timeout"
                self.hangup(a, "NORMAL_CLEARING")
                return
            a.parked = False
            self._channel_event("CHANNEL_UNPARK", a, ("switch_ivr.c", "switch_ivr_park", 1213))
        call.decision = "allow" if one_pass else a.variables.get("billing_decision", "")
        if call.decision == "deny":
            call.outcome = "denied"
            self.hangup(a, a.variables.get("billing_hangup_cause") or "CALL_REJECTED")
            return
        if call.decision != "allow":
            call.outcome = "failed"
            self.hangup(a, "NO_ROUTE_DESTINATION")  # no extension matches without a decision
            return
        if not one_pass:
            # An older dialplan's own sched_cancel (the guard) and the caller's ceiling
            # ("sched_hangup +" with no number would hang up at once). billing.xml's one pass
            # dials at once: the agent replaces the guard itself (api sched_del, sched_hangup).
            self._api_sched_del(a.uuid)
            ceiling = a.variables.get("billing_ceiling_s", "")
            if ceiling.isdigit():
                self.schedule_hangup(a, int(ceiling), "ALLOTTED_TIMEOUT")
        a.variables["current_application"] = "bridge"
        last_cause = "NO_ROUTE_DESTINATION"
        routed = self._routed_attempts(call, a)
        for attempt in routed or call.attempts:
            result = self._dial(call, a, attempt)
            if result is None:
                return  # answered and finished, or the caller went away
            last_cause = result
            if routed and result in FAIL_ON_SINGLE_REJECT:
                break
        call.outcome = "failed"
        self.hangup(a, last_cause)

    def _routed_attempts(self, call: FakeCall, a: FakeChannel) -> tuple[Attempt, ...]:
        """The attempts of the agent's routes: the channel's own ``billing_trunk`` as a '|'
        failover string (``sofia/gateway/a/NUM|sofia/gateway/b`` + ``/NUM``), each gateway with
        the call's first attempt's timings and ``failing_gateways``' cause; () when not routed."""
        trunk = a.variables.get("billing_trunk", "")
        if "|" not in trunk and not trunk.startswith("sofia/gateway/"):
            return ()
        base = call.attempts[0]
        attempts = []
        for part in f"{trunk}/{call.destination}".split("|"):
            pieces = part.split("/")
            gateway = pieces[2] if len(pieces) > 3 and pieces[:2] == ["sofia", "gateway"] else ""
            attempts.append(replace(base, gateway=gateway or "invalid",
                                    fail_cause="" if gateway else "INVALID_GATEWAY")
                            if not gateway or gateway not in self.failing_gateways
                            # a carrier that refuses (503) answers at once, not after the ring time
                            else replace(base, gateway=gateway, fail_cause=self.failing_gateways[gateway],
                                         answer_after_ms=base.ring_ms))
        return tuple(attempts)

    def _outbound_socket(self, a: FakeChannel) -> None:
        """mod_event_socket's ``socket`` application (sync, full): connect; answer ``connect``
        with the channel's data (one command/reply header block, URL-encoded, as
        switch_event_serialize writes it); run each ``api`` command and answer it; stop when the
        agent closes. A refused or silent port just ends the application."""
        try:
            sock = socket.create_connection((self.authorize_host, self.authorize_port), timeout=2.0)
        except OSError as exc:
            log.info("socket application: cannot connect to %s:%s: %s", self.authorize_host, self.authorize_port,
                     exc)
            return
        buffer = b""
        try:
            sock.settimeout(10.0)
            while True:
                while b"\n\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                command, _, buffer = buffer.partition(b"\n\n")
                text = command.decode("utf-8", "replace").strip()
                self._record(f"outbound {text}")
                if text == "connect":
                    headers = [("Content-Type", "command/reply"), ("Reply-Text", "+OK"), ("Socket-Mode", "static"),
                               ("Control", "full"), *self.channel_headers("CHANNEL_DATA", a)]
                    sock.sendall("".join(f"{name}: {url_encode(value)}\n" for name, value in headers).encode()
                                 + b"\n")
                elif text.startswith("api "):
                    sock.sendall(encode_api_response(self.api(text[4:])))
                else:
                    sock.sendall(encode_command_reply("-ERR command not found"))
        except OSError:
            return
        finally:
            sock.close()

    def _dial(self, call: FakeCall, a: FakeChannel, attempt: Attempt) -> str | None:
        """One B-leg attempt; returns its failure cause, or None when the call is over."""
        b = FakeChannel(self._new_uuid(), "outbound", f"sofia/gateway/{attempt.gateway}/{call.destination}",
                        call.caller, call.destination, self._now_us(), call, gateway=attempt.gateway)
        b.variables.update({
            "direction": "outbound", "is_outbound": "true", "uuid": b.uuid, "sip_gateway_name": attempt.gateway,
            "sip_profile_name": "gateway", "originator": a.uuid, "originating_leg_uuid": a.uuid,
            "call_uuid": a.uuid, "signal_bond": a.uuid,
        })
        b.peer, b.other_type = a, "originator"
        call.b_uuids.append(b.uuid)
        self.channels[b.uuid] = b
        self._channel_event("CHANNEL_CREATE", b, ("switch_core_state_machine.c", "switch_core_session_run", 608),
                            call_uuid=a.uuid)
        if a.ended.wait(attempt.ring_ms / 1000):
            self.hangup(b, "ORIGINATOR_CANCEL")
            call.outcome = call.outcome or "cancelled"
            return None
        b.variables["sip_call_id"] = str(uuidlib.UUID(int=self._rng.getrandbits(128), version=4))
        b.progress_us = self._now_us()
        b.call_state = "EARLY"
        self._channel_event("CHANNEL_PROGRESS", b, ("switch_channel.c", "switch_channel_perform_mark_ring_ready", 3576),
                            call_uuid=a.uuid)
        if a.ended.wait(max(0, attempt.answer_after_ms - attempt.ring_ms) / 1000):
            self.hangup(b, "ORIGINATOR_CANCEL")
            call.outcome = call.outcome or "cancelled"
            return None
        if b.ended.is_set():
            return b.hangup_cause or "NORMAL_TEMPORARY_FAILURE"
        if attempt.fail_cause:
            self.hangup(b, attempt.fail_cause)
            return attempt.fail_cause
        self._answer(b, call_uuid=a.uuid)
        call.b_answered_us = b.answered_us
        self._backstop_on_answer(a, b)
        if not a.answered_us:
            self._answer(a)
        self._bridge(a, b)
        call.outcome = "answered"
        if not gevent.wait([a.ended, b.ended], count=1, timeout=call.talk_ms / 1000):
            self.hangup(a if call.hangup_by == "caller" else b, "NORMAL_CLEARING")
        a.ended.wait(5)
        b.ended.wait(5)
        return None

    def _answer(self, ch: FakeChannel, call_uuid: str = "") -> None:
        ch.answered_us = self._now_us()
        ch.answer_state = "answered"
        ch.call_state = "ACTIVE"
        self._channel_event("CHANNEL_ANSWER", ch, ("switch_channel.c", "switch_channel_perform_mark_answered", 3848),
                            call_uuid=call_uuid)

    def _bridge(self, a: FakeChannel, b: FakeChannel) -> None:
        now = self._now_us()
        a.bridged_us = b.bridged_us = now
        a.peer, a.other_type = b, "originatee"
        a.variables.update({"bridge_uuid": b.uuid, "signal_bond": b.uuid, "last_bridge_to": b.uuid})
        b.variables.update({"bridge_uuid": a.uuid, "last_bridge_to": a.uuid})
        self._channel_event("CHANNEL_BRIDGE", a, ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1689),
                            extra=[("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)])

    def _backstop_on_answer(self, a: FakeChannel, b: FakeChannel) -> None:
        """The dialplan's ``execute_on_answer='sched_hangup +${billing_backstop_s} ALLOTTED_TIMEOUT'``."""
        raw = a.variables.get("billing_backstop_s", "")
        if raw.isdigit() and self.callee_backstop:
            self.schedule_hangup(b, int(raw), "ALLOTTED_TIMEOUT")

    def schedule_hangup(self, ch: FakeChannel, seconds: int, cause: str) -> None:
        """``sched_hangup +N``: FreeSWITCH fires at floor(now) + N whole seconds (+0: now)."""
        if seconds == 0:
            self.group.spawn(self.hangup, ch, cause)
            return
        fire_at = int(self.clock()) + seconds
        task = gevent.spawn_later(max(0.0, fire_at - self.clock()), self.hangup, ch, cause)
        self.group.add(task)
        self.scheduled.setdefault(ch.uuid, []).append(task)

    def _api_sched_del(self, arg: str) -> str:
        """``sched_del <group>``: the tasks whose group is the channel's uuid (mod_commands)."""
        group = arg.strip()
        if not group:
            return "-ERR Invalid syntax\n"
        tasks = [task for task in self.scheduled.pop(group, []) if not task.dead]
        for task in tasks:
            task.kill(block=False)
        return f"+OK Deleted: {len(tasks)}\n"

    def hangup(self, ch: FakeChannel, cause: str) -> None:
        """Hang a channel up with its events; a bridged peer follows (hangup_after_bridge)."""
        if ch.hangup_us:
            return
        if cause not in Q850 and not cause.isdigit():
            log.warning("hangup cause %r is no FreeSWITCH cause name: NORMAL_CLEARING", cause)
            cause = "NORMAL_CLEARING"
        ch.hangup_us = self._now_us()
        ch.hangup_cause = cause
        ch.state, ch.call_state, ch.answer_state = "CS_HANGUP", "HANGUP", "hangup"
        self._channel_event("CHANNEL_HANGUP", ch, ("switch_channel.c", "switch_channel_perform_hangup", 3383),
                            extra=[("Hangup-Cause", cause)])
        peer = ch.peer if ch.peer is not None and ch.bridged_us else None
        if peer is not None:
            a_side = ch if ch.direction == "inbound" else peer
            b_side = peer if a_side is ch else ch
            if not a_side.variables.get("_unbridged"):
                a_side.variables["_unbridged"] = "1"
                self._channel_event("CHANNEL_UNBRIDGE", a_side,
                                    ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1883),
                                    extra=[("Bridge-A-Unique-ID", a_side.uuid), ("Bridge-B-Unique-ID", b_side.uuid)])
        ch.state = "CS_REPORTING"
        ch.variables.update(self._cdr_variables(ch, cause))
        self._channel_event("CHANNEL_HANGUP_COMPLETE", ch,
                            ("switch_core_state_machine.c", "switch_core_session_reporting_state", 943),
                            extra=[("Hangup-Cause", cause)])
        ch.state = "CS_DESTROY"
        self._channel_event("CHANNEL_DESTROY", ch,
                            ("switch_core_session.c", "switch_core_session_perform_destroy", 1738))
        self.channels.pop(ch.uuid, None)
        call = ch.call
        if ch.direction == "inbound":
            call.a_ended_us = ch.hangup_us
            call.hangup_cause = cause
        elif ch.answered_us:
            call.b_ended_us = ch.hangup_us
            call.b_hangup_cause = cause
        ch.ended.set()
        if peer is not None and not peer.hangup_us:
            self.hangup(peer, "NORMAL_CLEARING")

    def _cdr_variables(self, ch: FakeChannel, cause: str) -> dict[str, str]:
        end = ch.hangup_us
        answered = ch.answered_us
        bill_us = end - answered if answered else 0
        return {
            "hangup_cause": cause, "hangup_cause_q850": str(Q850.get(cause, 16)),
            "start_uepoch": str(ch.created_us), "answer_uepoch": str(answered), "end_uepoch": str(end),
            "duration": str(end // 1_000_000 - ch.created_us // 1_000_000),
            "billsec": str(end // 1_000_000 - answered // 1_000_000 if answered else 0),
            "billmsec": str(bill_us // 1000), "billusec": str(bill_us),
        }

    # ---------------------------------------------------------------- events

    def _now_us(self) -> int:
        now = int(self.clock() * 1_000_000)
        now -= now % self.stamp_tick_us
        self._last_us = max(now, self._last_us + 1)
        return self._last_us

    def _core_headers(self, name: str, calling: tuple[str, str, int]) -> list[tuple[str, str]]:
        at_us = self._now_us()
        self._sequence += 1
        seconds = at_us / 1_000_000
        return [
            ("Event-Name", name), ("Core-UUID", self.core_uuid), ("FreeSWITCH-Hostname", self.hostname),
            ("FreeSWITCH-Switchname", self.hostname), ("FreeSWITCH-IPv4", "127.0.0.1"), ("FreeSWITCH-IPv6", "::1"),
            ("Event-Date-Local", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))),
            ("Event-Date-GMT", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))),
            ("Event-Date-Timestamp", str(at_us)), ("Event-Calling-File", calling[0]),
            ("Event-Calling-Function", calling[1]), ("Event-Calling-Line-Number", str(calling[2])),
            ("Event-Sequence", str(self._sequence)),
        ]

    def channel_headers(self, name: str, ch: FakeChannel, calling: tuple[str, str, int] = ("fake.c", "fake", 1), *,
                        extra: list[tuple[str, str]] | None = None, call_uuid: str = "") -> list[tuple[str, str]]:
        """The headers FreeSWITCH puts on a channel event (switch_channel_event_set_data)."""
        headers = self._core_headers(name, calling)
        headers += extra or []
        headers += [
            ("Channel-State", ch.state), ("Channel-Call-State", ch.call_state),
            ("Channel-State-Number", str(STATE_NUMBERS.get(ch.state, 4))), ("Channel-Name", ch.name),
            ("Unique-ID", ch.uuid), ("Call-Direction", ch.direction), ("Presence-Call-Direction", ch.direction),
            ("Channel-HIT-Dialplan", "true" if ch.direction == "inbound" else "false"),
            ("Channel-Call-UUID", call_uuid or ch.uuid), ("Answer-State", ch.answer_state),
        ]
        if ch.hangup_cause:
            headers.append(("Hangup-Cause", ch.hangup_cause))
        headers += self._profile("Caller", ch, with_times=True)
        if ch.peer is not None and ch.other_type:
            headers.append(("Other-Type", ch.other_type))
            headers += self._profile("Other-Leg", ch.peer, with_times=False)
        headers += [(f"variable_{key}", value) for key, value in ch.variables.items() if not key.startswith("_")]
        return headers

    @staticmethod
    def _profile(prefix: str, ch: FakeChannel, *, with_times: bool) -> list[tuple[str, str]]:
        def t(value: int) -> str:
            return str(value) if with_times else "0"

        return [
            (f"{prefix}-Direction", ch.direction), (f"{prefix}-Logical-Direction", ch.direction),
            (f"{prefix}-Username", ch.caller), (f"{prefix}-Dialplan", "XML"),
            (f"{prefix}-Caller-ID-Name", ch.caller), (f"{prefix}-Caller-ID-Number", ch.caller),
            (f"{prefix}-Network-Addr", "127.0.0.1"), (f"{prefix}-ANI", ch.caller),
            (f"{prefix}-Destination-Number", ch.destination), (f"{prefix}-Unique-ID", ch.uuid),
            (f"{prefix}-Source", "mod_sofia"), (f"{prefix}-Context", "billing-outbound"),
            (f"{prefix}-Channel-Name", ch.name), (f"{prefix}-Profile-Index", "1"),
            (f"{prefix}-Profile-Created-Time", t(ch.created_us)), (f"{prefix}-Channel-Created-Time", t(ch.created_us)),
            (f"{prefix}-Channel-Answered-Time", t(ch.answered_us)),
            (f"{prefix}-Channel-Progress-Time", t(ch.progress_us)),
            (f"{prefix}-Channel-Progress-Media-Time", "0"), (f"{prefix}-Channel-Hangup-Time", t(ch.hangup_us)),
            (f"{prefix}-Channel-Transfer-Time", "0"), (f"{prefix}-Channel-Resurrect-Time", "0"),
            (f"{prefix}-Channel-Bridged-Time", t(ch.bridged_us)), (f"{prefix}-Channel-Last-Hold", "0"),
            (f"{prefix}-Channel-Hold-Accum", "0"), (f"{prefix}-Screen-Bit", "true"),
            (f"{prefix}-Privacy-Hide-Name", "false"), (f"{prefix}-Privacy-Hide-Number", "false"),
        ]

    def _channel_event(self, name: str, ch: FakeChannel, calling: tuple[str, str, int], *,
                       extra: list[tuple[str, str]] | None = None, call_uuid: str = "") -> None:
        self._send_event(name, lambda: encode_event(self.channel_headers(name, ch, calling, extra=extra,
                                                                         call_uuid=call_uuid)))

    def _send_event(self, name: str, build: Callable[[], bytes]) -> None:
        targets = [conn for conn in self._connections if conn.wants(name)]
        if not targets or self._stalled():
            if not targets:
                self._sequence += 1  # FreeSWITCH numbers every event, delivered or not
            return
        data = build()
        for conn in targets:
            if self.event_tick_s > 0:
                conn.queued.append(data)
            else:
                conn.send(data)

    def _event_ticks(self) -> None:
        """The listeners' idle wake-ups: what they queued since goes out (EVENT_TICK_S)."""
        while True:
            gevent.sleep(self.event_tick_s)
            if not self._stalled():
                self.flush_events()

    def _record(self, command: str) -> None:
        """``commands`` and ``command_at`` are kept in step here only."""
        self.commands.append(command)
        self.command_at.append(time.monotonic())

    def _stalled(self) -> bool:
        return time.monotonic() < self._stalled_until

    def _heartbeats(self) -> None:
        while True:
            gevent.sleep(self.heartbeat_s)
            self._send_event("HEARTBEAT", self._heartbeat_frame)

    def _heartbeat_frame(self) -> bytes:
        up = int((time.monotonic() - self._started) * 1000)
        return encode_event(self._core_headers("HEARTBEAT", ("switch_core.c", "send_heartbeat", 91)) + [
            ("Event-Info", "System Ready"),
            ("Up-Time", f"0 years, 0 days, 0 hours, 0 minutes, {up // 1000} seconds, {up % 1000} milliseconds, "
                        "0 microseconds"),
            ("FreeSWITCH-Version", "1.10.12-fake"), ("Uptime-msec", str(up)),
            ("Session-Count", str(len(self.channels))), ("Max-Sessions", "2000"), ("Session-Per-Sec", "300"),
            ("Session-Since-Startup", str(self._sessions_since_start)), ("Idle-CPU", "99.000000"),
        ])

    # ---------------------------------------------------------------- the socket

    def _serve(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as mod_event_socket does
        conn = _Connection(sock, address)
        self._connections.add(conn)
        self.connections_accepted += 1
        try:
            if not self._stalled():
                conn.send(encode_auth_request())
            buf = b""
            while conn.alive:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                while conn.alive:
                    end = buf.find(b"\n\n")
                    if end < 0:
                        break
                    command, buf = buf[:end].decode("utf-8", "replace"), buf[end + 2:]
                    self._record(command)
                    if not self._stalled():
                        self._command(conn, command.strip())
                        conn.flush()  # the listener woke for the command: its queued events follow the reply
        except OSError:
            pass
        finally:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        conn.alive = False
        self._connections.discard(conn)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    def _reply(self, conn: _Connection, text: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        conn.send(encode_command_reply(text, extra))

    def _command(self, conn: _Connection, command: str) -> None:
        verb, _, rest = command.partition(" ")
        if not conn.authed:
            if verb != "auth":
                self._reply(conn, "-ERR command not found")
            elif rest == self.password:
                conn.authed = True
                self._reply(conn, "+OK accepted")
            else:
                self._reply(conn, "-ERR invalid")
                conn.send(encode_disconnect_notice())
                self._close(conn)
            return
        if verb == "event":
            self._subscribe(conn, rest)
        elif verb == "api":
            conn.send(encode_api_response(self.api(rest)))
        elif verb == "bgapi":
            job = self._new_uuid()
            self._reply(conn, f"+OK Job-UUID: {job}", [("Job-UUID", job)])
            self.group.spawn(self._background_job, job, rest)
        elif verb in ("nixevent", "noevents", "filter", "linger", "nolinger", "log", "nolog"):
            self._reply(conn, "+OK")
        elif verb == "exit":
            self._reply(conn, "+OK bye")
            conn.send(encode_disconnect_notice())
            self._close(conn)
        else:
            self._reply(conn, "-ERR command not found")

    def _subscribe(self, conn: _Connection, rest: str) -> None:
        kind, _, names = rest.partition(" ")
        if kind != "plain":
            self._reply(conn, f"-ERR the fake FreeSWITCH speaks only event plain, not {kind}")
            return
        words = [word for word in names.split() if word != "CUSTOM"]
        if not words:
            self._reply(conn, "-ERR no keywords supplied")
            return
        if "ALL" in words:
            conn.all_events = True
        conn.events.update(words)
        self._reply(conn, "+OK event listener enabled plain")

    def _background_job(self, job: str, command: str) -> None:
        output = self.api(command)
        verb, _, arg = command.partition(" ")
        self._send_event("BACKGROUND_JOB", lambda: encode_event(
            self._core_headers("BACKGROUND_JOB", ("mod_event_socket.c", "api_exec", 1580))
            + [("Job-UUID", job), ("Job-Command", verb), ("Job-Command-Arg", arg)], output))

    # ---------------------------------------------------------------- api

    def api(self, command: str) -> str:
        """Run one API command as mod_commands would; returns its output."""
        verb, _, arg = command.strip().partition(" ")
        handler = _API.get(verb)
        try:
            output = handler(self, arg.strip()) if handler else f"-ERR {verb} Command not found!\n"
        except (ValueError, IndexError) as exc:
            output = f"-ERR {verb}: {exc}\n"
        if verb in self.slow_api:  # the socket is busy meanwhile; calls and their events go on
            gevent.sleep(self.slow_api[verb])
        self._send_event("API", lambda: encode_event(
            self._core_headers("API", ("switch_loadable_module.c", "switch_api_execute", 3140))
            + [("API-Command", verb)] + ([("API-Command-Argument", arg)] if arg else [])))
        return output

    def _api_uuid_kill(self, arg: str) -> str:
        leg, _, cause = arg.partition(" ")
        ch = self.channels.get(leg)
        if ch is None or ch.hangup_us:
            return "-ERR No such channel!\n"
        if not self.ignore_uuid_kill:
            self.group.spawn(self.hangup, ch, cause.strip() or "NORMAL_CLEARING")
        return "+OK\n"

    def _api_hupall(self, arg: str) -> str:
        words = arg.split()
        cause = words[0] if words else "MANAGER_REQUEST"
        pairs = list(zip(words[1::2], words[2::2], strict=False))
        for ch in list(self.channels.values()):
            if all(ch.variables.get(name) == value for name, value in pairs):
                self.group.spawn(self.hangup, ch, cause)
        if pairs:
            return f"+OK hangup all channels matching [{pairs[0][0]}]=[{pairs[0][1]}] with cause: {cause}\n"
        return f"+OK hangup all channels with cause {cause}\n"

    def _api_sched_hangup(self, arg: str) -> str:
        words = arg.split()
        if len(words) < 2:
            return "-USAGE: [+]<time> <uuid> [<cause>]\n"
        ch = self.channels.get(words[1])
        if ch is None:
            return "-ERR No such channel!\n"
        cause = words[2] if len(words) > 2 else "ALLOTTED_TIMEOUT"
        when = words[0]
        seconds = int(when[1:]) if when.startswith("+") else max(0, int(when) - int(self.clock()))
        self.schedule_hangup(ch, seconds, cause)
        return "+OK\n"

    def _api_uuid_setvar(self, arg: str) -> str:
        leg, _, rest = arg.partition(" ")
        ch = self.channels.get(leg)
        if ch is None:
            return "-ERR No such channel!\n"
        name, _, value = rest.partition(" ")
        if not name:
            return "-ERR No variable specified\n"
        if value:
            ch.variables[name] = value
        else:
            ch.variables.pop(name, None)
        return "+OK\n"

    def _api_uuid_setvar_multi(self, arg: str) -> str:
        leg, _, rest = arg.partition(" ")
        ch = self.channels.get(leg)
        if ch is None:
            return "-ERR No such channel!\n-USAGE: <uuid> <var>=<value>;<var>=<value>...\n"
        for pair in rest.split(";"):
            name, _, value = pair.partition("=")
            if name and value:
                ch.variables[name] = value
            elif name:  # an empty value unsets (switch_channel_set_variable)
                ch.variables.pop(name, None)
        return "+OK\n"

    def _api_uuid_getvar(self, arg: str) -> str:
        leg, _, name = arg.partition(" ")
        ch = self.channels.get(leg)
        if ch is None:
            return "-ERR No such channel!\n"
        return ch.variables.get(name.strip(), "_undef_")

    def _api_uuid_transfer(self, arg: str) -> str:
        words = arg.split()
        if len(words) < 2:
            return "-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n"
        ch = self.channels.get(words[0])
        if ch is None or ch.hangup_us:
            return "-ERR No such channel!\n"
        if ch.parked and not ch.transfer.is_set():
            ch.call.transferred_at = time.perf_counter()
            ch.transfer.set()
        return "+OK\n"

    def _api_uuid_broadcast(self, arg: str) -> str:
        words = arg.split()
        ch = self.channels.get(words[0]) if words else None
        if ch is None or len(words) < 2:
            return "-ERR invalid uuid\n"
        ch.call.warnings.append(words[1])
        return "+OK Message sent\n"

    def _api_uuid_dump(self, arg: str) -> str:
        ch = self.channels.get(arg.split(" ", maxsplit=1)[0])
        if ch is None:
            return "-ERR No such channel!\n"
        call_uuid = ch.variables.get("call_uuid", ch.uuid) if ch.direction == "outbound" and not ch.hangup_us else ""
        headers = self.channel_headers("CHANNEL_DATA", ch, ("mod_commands.c", "uuid_dump_function", 6495),
                                       call_uuid=call_uuid)
        return encode_event_body(headers).decode()

    def _api_uuid_exists(self, arg: str) -> str:
        return "true" if arg in self.channels else "false"

    def _api_show(self, arg: str) -> str:
        if not arg.startswith("channels"):
            return "-USAGE: show channels [as json]\n"
        rows = [self._channel_row(ch) for ch in sorted(self.channels.values(), key=lambda c: c.created_us)]
        if not rows:
            return '{"row_count": 0}\n'
        return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))

    def _channel_row(self, ch: FakeChannel) -> dict[str, str]:
        created = ch.created_us // 1_000_000
        return {
            "uuid": ch.uuid, "direction": ch.direction,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)), "created_epoch": str(created),
            "name": ch.name, "state": ch.state, "cid_name": ch.caller, "cid_num": ch.caller, "ip_addr": "127.0.0.1",
            "dest": ch.destination, "application": ch.variables.get("current_application", ""),
            "application_data": "", "dialplan": "XML", "context": "billing-outbound",
            "hostname": self.hostname, "accountcode": ch.variables.get("accountcode", ""),
            "callstate": ch.call_state, "call_uuid": ch.variables.get("call_uuid", ch.uuid),
        }

    def _api_status(self, arg: str) -> str:
        return (f"UP 0 years, 0 days, 0 hours, 0 minutes, {int(time.monotonic() - self._started)} seconds\n"
                f"FreeSWITCH (Version 1.10.12-fake) is ready\n{self._sessions_since_start} session(s) since startup\n"
                f"{len(self.channels)} session(s) - peak 0, last 5min 0\n")

    def _new_uuid(self) -> str:
        return str(uuidlib.UUID(int=self._rng.getrandbits(128), version=4))


_API: dict[str, Callable[[FakeFreeswitch, str], str]] = {
    "uuid_kill": FakeFreeswitch._api_uuid_kill,
    "hupall": FakeFreeswitch._api_hupall,
    "sched_hangup": FakeFreeswitch._api_sched_hangup,
    "sched_del": FakeFreeswitch._api_sched_del,
    "uuid_setvar": FakeFreeswitch._api_uuid_setvar,
    "uuid_setvar_multi": FakeFreeswitch._api_uuid_setvar_multi,
    "uuid_getvar": FakeFreeswitch._api_uuid_getvar,
    "uuid_transfer": FakeFreeswitch._api_uuid_transfer,
    "uuid_broadcast": FakeFreeswitch._api_uuid_broadcast,
    "uuid_dump": FakeFreeswitch._api_uuid_dump,
    "uuid_exists": FakeFreeswitch._api_uuid_exists,
    "show": FakeFreeswitch._api_show,
    "status": FakeFreeswitch._api_status,
}


# ------------------------------------------------------------------------------------ standalone


def _load(fake: FakeFreeswitch, rate: float, calls: int, talk_ms: int) -> dict[str, Any]:
    """Place ``calls`` calls at ``rate`` per second; report the park -> transfer latencies."""
    interval = 1.0 / rate
    started = time.perf_counter()
    placed: list[FakeCall] = []
    for index in range(calls):
        gevent.sleep(max(0.0, started + index * interval - time.perf_counter()))
        placed.append(fake.place_call(f"acct{index % 50}", f"3314{index:06d}", answer_after_ms=20, talk_ms=talk_ms))
    placing_s = time.perf_counter() - started
    fake.wait_idle(talk_ms / 1000 + 30)
    latencies = sorted(call.auth_latency_ms for call in placed if call.transferred_at)
    outcomes: dict[str, int] = {}
    for call in placed:
        outcomes[call.outcome or "unfinished"] = outcomes.get(call.outcome or "unfinished", 0) + 1
    return {"calls": calls, "rate": rate, "authorized": len(latencies), "latencies_ms": latencies,
            "outcomes": outcomes, "seconds": time.perf_counter() - started, "offered_rate": calls / placing_s}


# What a sofia leg carries besides the billing variables (names from real events): events of the
# flood weigh what FreeSWITCH's weigh (4-10 KB), so the parsing figures are honest.
SOFIA_VARIABLES = {
    **{f"sip_{name}": value for name, value in (
        ("from_user", "1001"), ("from_port", "5060"), ("from_uri", "1001@127.0.0.1:5060"), ("from_host", "127.0.0.1"),
        ("local_network_addr", "127.0.0.1"), ("network_ip", "127.0.0.1"), ("network_port", "5060"),
        ("invite_stamp", "1795335300137004"), ("received_ip", "127.0.0.1"), ("received_port", "5060"),
        ("via_protocol", "udp"), ("from_tag", "5081SIPpTag001"), ("full_via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9"),
        ("full_from", "<sip:1001@127.0.0.1:5060>;tag=5081SIPpTag001"), ("full_to", "<sip:3312345@127.0.0.1:5080>"),
        ("req_user", "3312345"), ("req_port", "5080"), ("req_uri", "3312345@127.0.0.1:5080"), ("req_host", "127.0.0.1"),
        ("to_user", "3312345"), ("to_port", "5080"), ("to_uri", "3312345@127.0.0.1:5080"), ("to_host", "127.0.0.1"),
        ("contact_user", "1001"), ("contact_port", "5060"), ("contact_uri", "1001@127.0.0.1:5060"),
        ("contact_host", "127.0.0.1"), ("via_host", "127.0.0.1"), ("via_port", "5060"), ("cseq", "1"))},
    "switch_r_sdp": "v=0\no=user1 53655765 2353687637 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\n"
                    "m=audio 6000 RTP/AVP 0\na=rtpmap:0 PCMU/8000\n",
    **{f"rtp_{name}": value for name, value in (
        ("use_codec_string", "PCMU"), ("audio_recv_pt", "0"), ("use_codec_name", "PCMU"), ("use_codec_rate", "8000"),
        ("use_codec_ptime", "20"), ("use_codec_channels", "1"), ("last_audio_codec_string", "PCMU@8000h@20i@1c"),
        ("use_pt", "0"), ("use_ssrc", "51171884"), ("local_sdp_str", "v=0\no=FreeSWITCH 1 2 IN IP4 127.0.0.1\n"))},
    "ep_codec_string": "CORE_PCM_MODULE.PCMU@8000h@20i@64000b", "remote_video_media_flow": "inactive",
    "remote_audio_media_flow": "sendrecv", "read_codec": "PCMU", "original_read_codec": "PCMU", "read_rate": "8000",
    "original_read_rate": "8000", "write_codec": "PCMU", "write_rate": "8000", "dtmf_type": "info",
    "endpoint_disposition": "ANSWER", "local_media_ip": "127.0.0.1", "local_media_port": "21002",
    "advertised_media_ip": "127.0.0.1", "remote_media_ip": "127.0.0.1", "remote_media_port": "6008",
    "sofia_profile_name": "customers", "sofia_profile_url": "sip:mod_sofia@127.0.0.1:5080",
}


def synthetic_call_frames(fake: FakeFreeswitch, calls: int) -> list[bytes]:
    """The event frames of ``calls`` whole calls (create, progress, answer, bridge, hangups), for floods."""
    frames: list[bytes] = []

    def frame(name: str, ch: FakeChannel, **kw: Any) -> bytes:
        return encode_event(fake.channel_headers(name, ch, ("fake.c", "flood", 1), **kw))

    for index in range(calls):
        call = FakeCall("acct", f"3314{index:06d}", "1001", (), 0, "caller", False)
        now = fake._now_us()
        a = FakeChannel(fake._new_uuid(), "inbound", "sofia/customers/1001@127.0.0.1:5060", "1001",
                        call.destination, now, call,
                        variables={"accountcode": "acct", "sip_call_id": f"{index}@x", **SOFIA_VARIABLES})
        b = FakeChannel(fake._new_uuid(), "outbound", f"sofia/gateway/carrier/{call.destination}", "1001",
                        call.destination, now, call, gateway="carrier",
                        variables={"originator": a.uuid, "sip_gateway_name": "carrier", "call_uuid": a.uuid,
                                   **SOFIA_VARIABLES})
        b.peer, b.other_type = a, "originator"
        frames.append(frame("CHANNEL_CREATE", a))
        frames.append(frame("CHANNEL_CREATE", b, call_uuid=a.uuid))
        b.variables["sip_call_id"] = f"b{index}@carrier"
        b.progress_us = fake._now_us()
        frames.append(frame("CHANNEL_PROGRESS", b, call_uuid=a.uuid))
        b.answered_us = a.answered_us = fake._now_us()
        b.answer_state = a.answer_state = "answered"
        frames.append(frame("CHANNEL_ANSWER", b, call_uuid=a.uuid))
        frames.append(frame("CHANNEL_ANSWER", a))
        a.peer, a.other_type = b, "originatee"
        a.bridged_us = b.bridged_us = fake._now_us()
        bridge = [("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)]
        frames.append(frame("CHANNEL_BRIDGE", a, extra=bridge))
        a.hangup_us = b.hangup_us = fake._now_us()
        a.hangup_cause = b.hangup_cause = "NORMAL_CLEARING"
        frames.append(frame("CHANNEL_UNBRIDGE", a, extra=bridge))
        a.variables.update(fake._cdr_variables(a, "NORMAL_CLEARING"))
        b.variables.update(fake._cdr_variables(b, "NORMAL_CLEARING"))
        frames.append(frame("CHANNEL_HANGUP_COMPLETE", a, extra=[("Hangup-Cause", "NORMAL_CLEARING")]))
        frames.append(frame("CHANNEL_HANGUP_COMPLETE", b, extra=[("Hangup-Cause", "NORMAL_CLEARING")]))
    return frames


def _flood(fake: FakeFreeswitch, events: int, pool_calls: int) -> dict[str, Any]:
    """Write ``events`` event frames as fast as the socket takes them (a pool of calls, repeated)."""
    pool = synthetic_call_frames(fake, pool_calls)
    chunk: list[bytes] = []
    chunk_bytes = 0
    written = 0
    total_bytes = 0
    started = time.perf_counter()
    while written < events:
        frame = pool[written % len(pool)]
        chunk.append(frame)
        chunk_bytes += len(frame)
        written += 1
        if chunk_bytes >= 256 * 1024 or written == events:
            fake.inject(b"".join(chunk))
            total_bytes += chunk_bytes
            chunk, chunk_bytes = [], 0
    return {"flood_events": events, "flood_bytes": total_bytes, "flood_write_s": time.perf_counter() - started,
            "mean_event_bytes": total_bytes // max(1, events)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake FreeSWITCH event socket for tests, benchmarks and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--heartbeat", type=float, default=20.0, help="seconds between HEARTBEAT events")
    parser.add_argument("--load-rate", type=float, default=0.0, help="place calls at this rate once a client is in")
    parser.add_argument("--load-calls", type=int, default=0)
    parser.add_argument("--talk-ms", type=int, default=1000)
    parser.add_argument("--flood-events", type=int, default=0, help="write this many events as fast as possible")
    parser.add_argument("--flood-pool", type=int, default=500, help="distinct calls the flood cycles through")
    args = parser.parse_args(argv)
    fake = FakeFreeswitch(password=args.password, host=args.host, port=args.port, heartbeat_s=args.heartbeat)
    fake.start()
    print(json.dumps({"listening": fake.port}), flush=True)
    try:
        if args.load_calls or args.flood_events:
            while fake.live_connections() == 0:
                gevent.sleep(0.05)
            gevent.sleep(0.5)  # let the client subscribe and resync
            if args.load_calls:
                print(json.dumps(_load(fake, args.load_rate, args.load_calls, args.talk_ms)), flush=True)
            if args.flood_events:
                print(json.dumps(_flood(fake, args.flood_events, args.flood_pool)), flush=True)
                sys.stdin.readline()  # keep the socket open until the client has read everything
        else:
            gevent.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
