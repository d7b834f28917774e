"""A fake Asterisk 20 on loopback that plays whole calls (tests, the demo, manual runs).

It writes the bytes a real Asterisk 20 writes (the captures in shared/captures/asterisk and
reference/protocols.md §1, §2, §5.1; tests/test_fake_asterisk.py compares both) and runs the
billing dialplan of DESIGN §7, context ``billing-outbound``::

    exten => _X.,1,NoOp(billing)
     same => n,Set(BILLING_DECISION=)
     same => n,AGI(agi://${BILLING_AGENT}/authorize,${CHANNEL(accountcode)})
     same => n,GotoIf($["${BILLING_DECISION}" != "allow"]?refused)
     same => n,Dial(${BILLING_TRUNK}/${EXTEN},60,L(${BILLING_LIMIT_MS}[:${BILLING_WARN_MS}]))
     same => n,Hangup()
     same => n(refused),Hangup(${IF($["${BILLING_CAUSE}" != ""]?${BILLING_CAUSE}:21)})

* FastAGI: the fake is the AGI client. ``place_call`` connects to the agent (``agi_host:agi_port``),
  writes the environment block in one write, and answers ``GET VARIABLE``, ``GET FULL VARIABLE``,
  ``SET VARIABLE``, ``VERBOSE``, ``NOOP``, ``ANSWER``, ``HANGUP``, ``EXEC`` like res_agi (510 for
  unknown commands, 520 for bad ``SET VARIABLE`` syntax; after a hangup ``HANGUP\\n`` out of band and
  511 for commands not allowed on a dead channel). An agent that cannot be reached (refused, 2 s
  connect timeout) gives ``AGISTATUS=FAILURE``; the call is refused with cause 21 (fail closed).
* ``Dial(...,L(limit[:warn]))``: the B leg(s) with the AMI events in Asterisk's order (forks: the
  first to answer wins, the others get ``DialEnd CANCEL`` and cause 26; busy: ``DialEnd BUSY``,
  causes 17; no answer: ``DialEnd NOANSWER``). ``limit`` ms after the answer the callee is hung up and
  the caller follows (capture ami-1); ``warn`` ms before that a warning is recorded on the call.
* Routes (DESIGN §10): when the agent sets ``BILLING_ROUTES`` and ``BILLING_ROUTE_1..n``, the
  routes are dialled in turn as the shipped dialplan does: a route whose peer is in
  ``congested_trunks`` (a carrier answering 503) gives a B leg that ends ``DialEnd CONGESTION``,
  cause 34, and the next is tried; a route of another technology is ``CHANUNAVAIL``; the first
  other route carries the call. Every route failing ends the call with cause 34.
* AMI server (``timestampevents = yes``): banner, ``Login`` (wrong secret: 1 s pause, the error,
  close), ``Ping``, ``Events``, ``CoreShowChannels``, ``Status``, ``Getvar``, ``Setvar``, ``Hangup``
  (``Channel`` is a name or a Uniqueid, optional ``Cause``), ``Logoff``; anything else gets Asterisk's
  ``Invalid/unknown command`` error. Events go to the sessions whose ``Events:`` mask takes their class.
* Faults: ``drop_ami_connections()``, ``inject_ami(bytes)``, ``refuse_logins(True)``,
  ``ignore_hangups(call)`` / ``place_call(..., ignore_ami_hangup=True)``, ``stall_ami(seconds)``,
  ``place_call(..., agi_truncate=True)`` (the env block stops before its blank line and the socket
  closes), ``place_call(..., agi_hangup_at_command=N)`` (the caller hangs up while the agent's N-th
  command runs: ``HANGUP\\n`` comes before that command's reply).

Not captured, chosen from the Asterisk source (noted where used): DialState RINGING, fork losers,
NOANSWER and the cause of an AMI-requested hangup carried to the peer leg.
Time is the real clock (gevent timers). Run ``python -m agent.sim.asterisk --help`` for a
standalone fake that places a few calls against an agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import socket
from gevent.server import StreamServer

log = logging.getLogger(__name__)

AMI_BANNER = b"Asterisk Call Manager/9.0.0\r\n"
ASTERISK_VERSION = "20.21.0-rc1"
BILLING_CONTEXT = "billing-outbound"
CUSTOMER_CONTEXT = "from-customer"
CARRIER_CONTEXT = "from-carrier"
AGI_CONNECT_TIMEOUT_S = 2.0  # res_agi: AGI_CONNECT_TIMEOUT 2000 ms
DIAL_TIMEOUT_S = 60

STATE_DESC = {0: "Down", 1: "Rsrvd", 2: "OffHook", 3: "Dialing", 4: "Ring", 5: "Ringing", 6: "Up", 7: "Busy"}
CAUSE_TEXT = {
    0: "Unknown", 1: "Unallocated (unassigned) number", 3: "No route to destination", 16: "Normal Clearing",
    17: "User busy", 18: "No user responding", 19: "User alerting, no answer", 21: "Call Rejected",
    26: "Answered elsewhere", 27: "Destination out of order", 28: "Invalid number format",
    31: "Normal, unspecified", 34: "Circuit/channel congestion", 38: "Network out of order",
    41: "Temporary failure", 42: "Switching equipment congestion", 47: "Resource unavailable, unspecified",
    52: "Outgoing call barred", 57: "Bearer capability not authorized", 63: "Service or option not available",
    102: "Recovery on timer expiry", 127: "Interworking, unspecified",
}
SOFTHANGUP_APPUNLOAD = 16  # SoftHangupRequest's Cause is ast_softhangup's flag, not a Q.850 cause
EVENT_CLASSES = ("system", "call", "log", "verbose", "command", "agent", "user", "config", "dtmf", "reporting",
                 "cdr", "dialplan", "originate", "agi", "cc", "aoc", "test", "security", "message")
AGI_DEAD_OK = ("GET VARIABLE", "GET FULL VARIABLE", "SET VARIABLE", "NOOP", "VERBOSE", "EXEC", "DATABASE",
               "ASYNCAGI BREAK", "SPEECH DESTROY", "SPEECH UNLOAD GRAMMAR")
AGI_COMMANDS = (  # res_agi.c's command table (Asterisk 20), longest first for the prefix match
    "ASYNCAGI BREAK", "CHANNEL STATUS", "CONTROL STREAM FILE", "DATABASE DELTREE", "DATABASE DEL", "DATABASE GET",
    "DATABASE PUT", "GET FULL VARIABLE", "GET DATA", "GET OPTION", "GET VARIABLE", "RECEIVE CHAR",
    "RECEIVE TEXT", "RECORD FILE", "SAY ALPHA", "SAY DATETIME", "SAY DATE", "SAY DIGITS", "SAY NUMBER",
    "SAY PHONETIC", "SAY TIME", "SEND IMAGE", "SEND TEXT", "SET AUTOHANGUP", "SET CALLERID", "SET CONTEXT",
    "SET EXTENSION", "SET MUSIC", "SET PRIORITY", "SET VARIABLE", "SPEECH ACTIVATE GRAMMAR", "SPEECH CREATE",
    "SPEECH DEACTIVATE GRAMMAR", "SPEECH DESTROY", "SPEECH LOAD GRAMMAR", "SPEECH RECOGNIZE", "SPEECH SET",
    "SPEECH UNLOAD GRAMMAR", "STREAM FILE", "TDD MODE", "WAIT FOR DIGIT", "ANSWER", "EXEC", "GOSUB", "HANGUP",
    "NOOP", "VERBOSE")
AGI_511 = "511 Command Not Permitted on a dead channel or intercept routine\n"
AGI_510 = "510 Invalid or unknown command\n"
SET_VARIABLE_USAGE = ("520-Invalid command syntax.  Proper usage follows:\n"
                      " Usage: SET VARIABLE <variablename> <value>\n"
                      "520 End of proper usage.\n")


@dataclass
class FakeCall:
    """A scripted call and what happened to it (read the fields once ``done`` is set)."""

    account: str
    destination: str
    caller: str
    answer_after_ms: int
    talk_ms: int
    hangup_by: str  # "caller" | "callee"
    forks: int
    busy: bool
    no_answer: bool
    ring: bool
    ignore_ami_hangup: bool
    agi_truncate: bool
    agi_hangup_at_command: int
    a_uniqueid: str = ""
    b_uniqueids: list[str] = field(default_factory=list)
    decision: str = ""
    limit_ms: int | None = None
    limit_raw: str = ""  # BILLING_LIMIT_MS as the agent set it
    warn_ms: int | None = None
    reason: str = ""
    billing_cause: str = ""
    agi_status: str = ""  # SUCCESS | FAILURE | HANGUP
    agi_commands: list[str] = field(default_factory=list)  # what the agent sent, in order
    agi_stalled: int = 0  # commands that sat in res_agi's buffer behind another (pipelining)
    backstop_raw: str = ""  # BILLING_BACKSTOP_MS as the agent set it
    backstop_rearms: int = 0  # AMI Setvar TIMEOUT(absolute) on the call's callee
    routes: list[str] = field(default_factory=list)  # BILLING_ROUTE_1..n as the agent set them
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (route, DIALSTATUS) of each route tried
    trunk: str = ""  # the peer name of the trunk that carried the call ("": the configured trunk)
    dial_status: str = ""
    outcome: str = ""  # answered | cut | denied | refused | busy | no_answer | cancelled
    hangup_cause: int = 0  # the A leg's Q.850 cause
    b_hangup_cause: int = 0  # the answered B leg's
    billsec: int = 0  # Asterisk's own: answer to the end of the bridge, truncated
    answered_ms: float = 0.0  # wall clock (epoch ms) of the callee's answer
    ended_ms: float = 0.0  # wall clock (epoch ms) of the end of the call (the A leg's hangup)
    warned_ms: float = 0.0  # wall clock of the L() warning (0: none)
    warnings: int = 0
    cut_by: str = ""  # limit | ami (why a "cut" call ended)
    done: gevent.event.Event = field(default_factory=gevent.event.Event)
    # internal: a hangup request from AMI or from the script
    _stop: gevent.event.Event = field(default_factory=gevent.event.Event, repr=False)
    _stop_leg: Any = field(default=None, repr=False)
    _stop_cause: int = 16
    _rearmed: gevent.event.Event = field(default_factory=gevent.event.Event, repr=False)

    @property
    def talk_s(self) -> float:
        """Wall seconds from the callee's answer to the end."""
        return max(0.0, (self.ended_ms - self.answered_ms) / 1000) if self.answered_ms and self.ended_ms else 0.0


@dataclass
class FakeChannel:
    """One Asterisk channel; its snapshot is what every channel event carries."""

    name: str
    uniqueid: str
    linkedid: str
    role: str  # A | B
    call: FakeCall
    tech: str
    state: int = 0
    caller_num: str = "<unknown>"
    caller_name: str = "<unknown>"
    conn_num: str = "<unknown>"
    conn_name: str = "<unknown>"
    accountcode: str = ""
    context: str = ""
    exten: str = ""
    priority: int = 1
    app: str = ""
    appdata: str = ""
    dnid: str = ""
    call_id: str = ""
    created: float = 0.0
    answered: float = 0.0
    bridge_id: str = ""
    time_to_hangup: int = 0  # epoch seconds of TIMEOUT(absolute), as Status shows it (0: none)
    timeout_at: float = 0.0  # wall clock of TIMEOUT(absolute) (0: none)
    cause: int = 0
    hungup: bool = False
    variables: dict[str, str] = field(default_factory=dict)

    def snapshot(self, prefix: str = "") -> list[tuple[str, str]]:
        return [(prefix + key, value) for key, value in (
            ("Channel", self.name), ("ChannelState", str(self.state)),
            ("ChannelStateDesc", STATE_DESC.get(self.state, "Unknown")),
            ("CallerIDNum", self.caller_num), ("CallerIDName", self.caller_name),
            ("ConnectedLineNum", self.conn_num), ("ConnectedLineName", self.conn_name), ("Language", "en"),
            ("AccountCode", self.accountcode), ("Context", self.context), ("Exten", self.exten),
            ("Priority", str(self.priority)), ("Uniqueid", self.uniqueid), ("Linkedid", self.linkedid))]


def encode_message(fields: Iterable[tuple[str, str]]) -> bytes:
    """``Key: Value\\r\\n`` lines and the empty line that ends an AMI message."""
    return ("".join(f"{key}: {value}\r\n" for key, value in fields) + "\r\n").encode()


def parse_agi_args(line: str) -> list[str]:
    """res_agi's parse_args: split on whitespace, double quotes group, backslash escapes."""
    args: list[str] = []
    current: list[str] = []
    quoted = escaped = started = False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
            started = True
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
            started = True
        elif char in " \t\r\n" and not quoted:
            if started:
                args.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        args.append("".join(current))
    return args


class _AmiSession:
    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.authed = False
        self.username = ""
        self.classes: set[str] = set(EVENT_CLASSES)  # what the session asked for (Events, Login)
        self.read: frozenset[str] = frozenset(EVENT_CLASSES)  # what its user may read (manager.conf)
        self.lock = gevent.lock.Semaphore()
        self.alive = True

    def wants(self, klass: str) -> bool:
        return self.authed and klass in self.classes and klass in self.read

    def send(self, data: bytes) -> None:
        if not self.alive:
            return
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False


def _event_mask(value: str) -> set[str]:
    value = value.strip().lower()
    if value in ("on", "yes", "true", "all", "1"):
        return set(EVENT_CLASSES)
    if value in ("off", "no", "false", "0", ""):
        return set()
    if value == "system,call,log" or "all" in value.split(","):
        return set(EVENT_CLASSES)
    return {word.strip() for word in value.split(",") if word.strip() in EVENT_CLASSES}


class _AgiLink:
    """The FastAGI connection of one call (the fake is the client)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = gevent.lock.Semaphore()
        self.dead = False  # the channel hung up: HANGUP was written, dead-mode rules apply
        self.open = True

    def write(self, text: str) -> None:
        if not self.open:
            return
        with self.lock:
            try:
                self.sock.sendall(text.encode())
            except OSError:
                self.open = False

    def hangup_notice(self) -> None:
        if not self.dead:
            self.dead = True
            self.write("HANGUP\n")


class FakeAsterisk:
    """An AMI server and FastAGI client on loopback with scripted calls (see the module docstring)."""

    def __init__(self, agi_host: str = "127.0.0.1", agi_port: int = 4573, *, ami_host: str = "127.0.0.1",
                 ami_port: int = 0, ami_username: str = "billing", ami_secret: str = "secret",
                 tech: str = "PJSIP", trunk: str = "carrier", seed: int = 7, login_failure_delay_s: float = 1.0,
                 agi_idle_timeout_s: float = 60.0, cdr_file: str = "", ami_read: Iterable[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if tech not in ("PJSIP", "SIP"):
            raise ValueError(f"tech must be PJSIP or SIP, not {tech!r}")
        self.agi_host = agi_host
        self.agi_port = agi_port
        self.cdr_file = cdr_file  # where cdr_custom writes the shipped format ("": no CDR file)
        self.ami_username = ami_username
        self.ami_secret = ami_secret
        # The AMI user's ``read =`` classes (manager.conf; None: all). As on a real Asterisk, an
        # event of another class never reaches the user, and nothing says so (the agent notices
        # that an authorized call shows no events: tests/realpbx/test_real_faults.py).
        self.ami_read = frozenset(EVENT_CLASSES if ami_read is None else ami_read)
        self.tech = tech
        self.trunk = trunk
        # Peer names whose trunk answers 503 (Dial ends CONGESTION, cause 34), as a carrier
        # that is down or full: the shipped dialplan then tries the next BILLING_ROUTE_n.
        self.congested_trunks: set[str] = set()
        self.login_failure_delay_s = login_failure_delay_s
        self.agi_idle_timeout_s = agi_idle_timeout_s
        self.clock = clock
        self._rng = random.Random(seed)
        self.group = gevent.pool.Group()
        self._sessions_group = gevent.pool.Pool()  # unbounded; StreamServer needs a Pool
        self.server = StreamServer((ami_host, ami_port), self._serve, spawn=self._sessions_group)
        self.channels: dict[str, FakeChannel] = {}  # by uniqueid, live ones
        self.calls: list[FakeCall] = []
        self.actions: list[dict[str, str]] = []  # every AMI action received (auth included)
        self.logins_accepted = 0
        self.logins_refused = 0
        self._sessions: set[_AmiSession] = set()
        self._sequence = 3  # the captures' box had made 4 channels before
        self._last_ts = 0.0
        self._stalled_until = 0.0
        self._refuse_logins = False
        self._started = time.monotonic()
        self._threadid = str(140649365198528 + self._rng.randrange(1 << 20) * 4096)

    # ---------------------------------------------------------------- lifecycle

    @property
    def ami_port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> FakeAsterisk:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(timeout=1)
        for session in list(self._sessions):
            self._close(session)
        self.group.kill(timeout=2)
        self._sessions_group.kill(timeout=2)

    def __enter__(self) -> FakeAsterisk:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- scripting

    def place_call(self, account: str, destination: str, *, caller: str = "1001", answer_after_ms: int = 50,
                   talk_ms: int = 1000, hangup_by: str = "caller", forks: int = 1, busy: bool = False,
                   no_answer: bool = False, ring: bool = True, ignore_ami_hangup: bool = False,
                   agi_truncate: bool = False, agi_hangup_at_command: int = 0) -> FakeCall:
        """Start a call into ``billing-outbound``; returns its handle (``call.done`` is set at the end).

        ``answer_after_ms``: from Dial to the callee's answer (or to the busy reply; with ``no_answer``
        the ring time after which Dial gives up). ``talk_ms``: from the answer to the hangup by
        ``hangup_by`` unless the limit or an AMI Hangup ends the call first. ``ring=False`` skips the
        180 Ringing (Newstate Ringing, DialState RINGING), as in the captures.
        """
        if hangup_by not in ("caller", "callee"):
            raise ValueError("hangup_by must be caller or callee")
        call = FakeCall(account, destination, caller, answer_after_ms, talk_ms, hangup_by, max(1, forks), busy,
                        no_answer, ring, ignore_ami_hangup, agi_truncate, agi_hangup_at_command)
        self.calls.append(call)
        self.group.spawn(self._run_call, call)
        return call

    def hangup(self, call: FakeCall, leg: str = "caller", cause: int = 16) -> None:
        """The caller (or the answered callee) hangs up now (a SIP BYE or CANCEL)."""
        self._request_stop(call, leg, cause)

    def ignore_hangups(self, call: FakeCall, ignore: bool = True) -> None:
        """AMI Hangup actions on this call's legs are answered but do nothing (escalation tests)."""
        call.ignore_ami_hangup = ignore

    def drop_ami_connections(self) -> None:
        """The AMI TCP connections die (no goodbye); calls go on."""
        for session in list(self._sessions):
            self._close(session)

    def inject_ami(self, data: bytes) -> None:
        """Write raw bytes to every logged-in AMI session (garbage tests)."""
        for session in list(self._sessions):
            if session.authed:
                session.send(data)

    def refuse_logins(self, refuse: bool = True) -> None:
        self._refuse_logins = refuse

    def stall_ami(self, seconds: float) -> None:
        """Write nothing on AMI (no events, no responses) for ``seconds``: a black-holed link."""
        self._stalled_until = time.monotonic() + seconds

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every placed call has finished."""
        deadline = time.monotonic() + timeout_s
        for call in list(self.calls):
            if not call.done.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def live_channels(self) -> list[FakeChannel]:
        """The channels that exist now, oldest first (``.name``, ``.uniqueid``, ``.call``...)."""
        return sorted(self.channels.values(), key=lambda ch: (ch.created, ch.uniqueid))

    def live_sessions(self) -> int:
        return sum(1 for session in self._sessions if session.alive and session.authed)

    def find_channel(self, name_or_uniqueid: str) -> FakeChannel | None:
        """ast_channel_get_by_name: a channel name (case-insensitive) or a Uniqueid."""
        ch = self.channels.get(name_or_uniqueid)
        if ch is not None:
            return ch
        wanted = name_or_uniqueid.lower()
        for ch in self.channels.values():
            if ch.name.lower() == wanted:
                return ch
        return None

    # ---------------------------------------------------------------- channels

    def _new_channel(self, call: FakeCall, role: str, peer_name: str, linkedid: str = "") -> FakeChannel:
        seq = self._sequence
        self._sequence += 1
        now = self.clock()
        uniqueid = f"{int(now)}.{seq}"
        ch = FakeChannel(name=f"{self.tech}/{peer_name}-{seq:08x}", uniqueid=uniqueid, linkedid=linkedid or uniqueid,
                         role=role, call=call, tech=self.tech, created=now)
        self.channels[uniqueid] = ch
        return ch

    def _call_id(self, role: str) -> str:
        if self.tech == "SIP" and role == "A":
            return f"1-{self._rng.randrange(1000, 30000)}@127.0.0.1"
        if self.tech == "SIP":
            return f"{self._rng.getrandbits(128):032x}@127.0.0.1:5060"
        return str(uuidlib.UUID(int=self._rng.getrandbits(128), version=4))

    def _a_peer_name(self, call: FakeCall) -> str:
        return "127.0.0.1" if self.tech == "SIP" else call.caller

    def _trunk_name(self, index: int, call: FakeCall | None = None) -> str:
        trunk = (call.trunk if call is not None else "") or self.trunk
        return trunk if index == 0 else f"{trunk}{index + 1}"

    # ---------------------------------------------------------------- events

    def _timestamp(self) -> str:
        now = self.clock()
        self._last_ts = max(now, self._last_ts + 0.000001)
        return f"{self._last_ts:.6f}"

    def _stalled(self) -> bool:
        return time.monotonic() < self._stalled_until

    def _emit(self, name: str, klass: str, fields: list[tuple[str, str]], *, timestamp: bool = True) -> None:
        targets = [s for s in self._sessions if s.wants(klass)]
        if not targets or self._stalled():
            return
        head = [("Event", name), ("Privilege", f"{klass},all")]
        if timestamp:
            head.append(("Timestamp", self._timestamp()))
        data = encode_message(head + fields)
        for session in targets:
            session.send(data)

    def _chan_event(self, name: str, ch: FakeChannel, extra: list[tuple[str, str]] | None = None,
                    klass: str = "call") -> None:
        self._emit(name, klass, ch.snapshot() + (extra or []))

    def _varset(self, ch: FakeChannel, name: str, value: str) -> None:
        ch.variables[name] = value
        self._chan_event("VarSet", ch, [("Variable", name), ("Value", value)], klass="dialplan")

    def _newexten(self, ch: FakeChannel, priority: int, app: str, data: str, context: str = "") -> None:
        if context:
            ch.context = context
        ch.priority = priority
        ch.app, ch.appdata = app, data
        self._chan_event("Newexten", ch, [("Extension", ch.exten), ("Application", app), ("AppData", data)],
                         klass="dialplan")

    def _device_state(self, ch: FakeChannel) -> None:
        if self.tech == "SIP":  # chan_sip on the capture box: an IP peer has no device state
            self._emit("DeviceStateChange", "call", [("Device", ch.name.rsplit("-", 1)[0]), ("State", "INVALID")])

    def _newstate(self, ch: FakeChannel, state: int) -> None:
        ch.state = state
        self._chan_event("Newstate", ch)

    def _bridge_fields(self, bridge_id: str, count: int, technology: str) -> list[tuple[str, str]]:
        return [("BridgeUniqueid", bridge_id), ("BridgeType", "basic"), ("BridgeTechnology", technology),
                ("BridgeCreator", "<unknown>"), ("BridgeName", "<unknown>"), ("BridgeNumChannels", str(count)),
                ("BridgeVideoSourceMode", "none")]

    def _dial_event(self, name: str, a: FakeChannel, b: FakeChannel, last: tuple[str, str]) -> None:
        self._emit(name, "call", a.snapshot() + b.snapshot("Dest") + [last])

    def _hangup_event(self, ch: FakeChannel, cause: int) -> None:
        ch.cause = cause
        ch.hungup = True
        self._chan_event("Hangup", ch, [("Cause", str(cause)), ("Cause-txt", CAUSE_TEXT.get(cause, "Unknown"))])
        self.channels.pop(ch.uniqueid, None)

    def _cdr(self, a: FakeChannel, dest: FakeChannel | None, app: str, data: str, start: float, answer: float,
             end: float, disposition: str) -> None:
        def fmt(at: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else ""

        billsec = int(end - answer) if answer else 0
        self._emit("Cdr", "cdr", [
            ("AccountCode", a.accountcode), ("Source", a.caller_num), ("Destination", a.exten),
            ("DestinationContext", a.context), ("CallerID", f'"" <{a.caller_num}>'), ("Channel", a.name),
            ("DestinationChannel", dest.name if dest else ""), ("LastApplication", app), ("LastData", data),
            ("StartTime", fmt(start)), ("AnswerTime", fmt(answer)), ("EndTime", fmt(end)),
            ("Duration", str(int(end - start))), ("BillableSeconds", str(billsec)), ("Disposition", disposition),
            ("AMAFlags", "DOCUMENTATION"), ("UniqueID", a.uniqueid), ("UserField", "")])

    # ---------------------------------------------------------------- the call

    def _run_call(self, call: FakeCall) -> None:
        try:
            self._play(call)
        except Exception:  # a fake that dies silently would hang the tests
            log.exception("fake call %s failed", call.a_uniqueid)
        finally:
            call.ended_ms = call.ended_ms or self.clock() * 1000
            for ch in list(self.channels.values()):
                if ch.call is call:
                    self.channels.pop(ch.uniqueid, None)
            self._write_cdr(call)
            call.done.set()

    def _write_cdr(self, call: FakeCall) -> None:
        """cdr_custom with the shipped mapping (dialplan/asterisk/cdr_custom.conf): the caller's
        uniqueid, ``answer(double)``, ``end(double)`` (epoch seconds, 6 decimals; an unanswered
        call's answer is 0.000000), the disposition."""
        if not self.cdr_file or not call.a_uniqueid:
            return
        answer = f"{call.answered_ms / 1000:.6f}" if call.answered_ms else "0.000000"
        disposition = "ANSWERED" if call.answered_ms else "NO ANSWER"
        with open(self.cdr_file, "a", encoding="utf-8") as out:
            out.write(f'"{call.a_uniqueid}","{answer}","{call.ended_ms / 1000:.6f}","{disposition}"\n')

    def _request_stop(self, call: FakeCall, leg: Any, cause: int) -> None:
        if call._stop.is_set():
            return
        call._stop_leg, call._stop_cause = leg, cause
        call._stop.set()

    def _play(self, call: FakeCall) -> None:
        a = self._new_channel(call, "A", self._a_peer_name(call))
        call.a_uniqueid = a.uniqueid
        a.caller_num, a.exten, a.context, a.dnid = call.caller, call.destination, CUSTOMER_CONTEXT, call.destination
        a.call_id = self._call_id("A")
        if self.tech == "PJSIP":  # chan_pjsip creates the caller's channel ringing (captures asterisk-*-pjsip)
            a.state = 4
        self._chan_event("Newchannel", a)
        if self.tech == "SIP":
            port = 6200 + int(call.caller[-2:]) if call.caller[-2:].isdigit() else 5060
            self._varset(a, "SIPURI", f"sip:{call.caller}@127.0.0.1:{port}")
            self._varset(a, "SIPDOMAIN", "127.0.0.1")
            self._varset(a, "SIPCALLID", a.call_id)
            self._newstate(a, 4)  # chan_sip: Down, then Ring (capture ami-1)
        self._device_state(a)
        # The admin's context sets the account code and enters billing-outbound.
        self._newexten(a, 1, "Set", f"CHANNEL(accountcode)={call.account}")
        a.accountcode = call.account
        self._chan_event("NewAccountCode", a, [("OldAccountCode", "")])
        self._newexten(a, 2, "Goto", f"{BILLING_CONTEXT},{call.destination},1")
        cleared = ("BILLING_DECISION", "BILLING_LIMIT_MS", "BILLING_BACKSTOP_MS", "BILLING_WARN_MS", "BILLING_REASON",
                   "BILLING_CAUSE")
        self._newexten(a, 1, "MSet", ",".join(f"{name}=" for name in cleared), context=BILLING_CONTEXT)
        for name in cleared:
            self._varset(a, name, "")
        self._newexten(a, 2, "AGI", f"agi://{self.agi_host}:{self.agi_port}/authorize,{call.account}")
        call.agi_status = self._agi(call, a)
        self._varset(a, "AGISTATUS", call.agi_status)
        if call.agi_status == "HANGUP" or call._stop.is_set():
            call.outcome = "cancelled"
            self._end_unanswered(a, None, a.variables.get("_hangup_cause_", "") or str(call._stop_cause), "AGI",
                                 "NO ANSWER")
            return
        call.decision = a.variables.get("BILLING_DECISION", "")
        call.reason = a.variables.get("BILLING_REASON", "")
        call.billing_cause = a.variables.get("BILLING_CAUSE", "")
        call.limit_raw = a.variables.get("BILLING_LIMIT_MS", "")
        call.limit_ms = _int_or_none(call.limit_raw)
        call.warn_ms = _int_or_none(a.variables.get("BILLING_WARN_MS", ""))
        call.backstop_raw = a.variables.get("BILLING_BACKSTOP_MS", "")
        count = _int_or_none(a.variables.get("BILLING_ROUTES", "")) or 0
        call.routes = [a.variables.get(f"BILLING_ROUTE_{i}", "") for i in range(1, count + 1)]
        allowed = call.decision == "allow" and call.backstop_raw != ""
        self._newexten(a, 3, "GotoIf", f"{0 if allowed else 1}?refused")
        if not allowed:
            call.outcome = "denied" if call.decision == "deny" else "refused"
            cause = _int_or_none(call.billing_cause) or 21
            self._newexten(a, 10, "Log", f"NOTICE,billing refused {a.name} to {call.destination}")
            self._newexten(a, 11, "Hangup", str(cause))
            self._end_unanswered(a, None, str(cause), "Hangup", "NO ANSWER")
            return
        self._dial(call, a)

    # ---------------------------------------------------------------- FastAGI

    def _agi(self, call: FakeCall, a: FakeChannel) -> str:
        try:
            sock = socket.create_connection((self.agi_host, self.agi_port), timeout=AGI_CONNECT_TIMEOUT_S)
        except OSError as exc:
            log.info("AGI connect to %s:%s failed: %s", self.agi_host, self.agi_port, exc)
            return "FAILURE"
        link = _AgiLink(sock)
        try:
            env = self._agi_env(call, a)
            if call.agi_truncate:
                link.write("".join(env[: len(env) // 2]))
                return "FAILURE"
            link.write("".join(env) + "\n")
            return self._agi_loop(call, a, link, sock)
        finally:
            link.open = False
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _agi_env(self, call: FakeCall, a: FakeChannel) -> list[str]:
        return [f"{key}: {value}\n" for key, value in (
            ("agi_network", "yes"), ("agi_network_script", "authorize"),
            ("agi_request", f"agi://{self.agi_host}:{self.agi_port}/authorize"), ("agi_channel", a.name),
            ("agi_language", "en"), ("agi_type", self.tech), ("agi_uniqueid", a.uniqueid),
            ("agi_version", ASTERISK_VERSION), ("agi_callerid", call.caller or "unknown"),
            ("agi_calleridname", "unknown"), ("agi_callingpres", "0"), ("agi_callingani2", "0"),
            ("agi_callington", "0"), ("agi_callingtns", "0"), ("agi_dnid", call.destination or "unknown"),
            ("agi_rdnis", "unknown"), ("agi_context", BILLING_CONTEXT), ("agi_extension", call.destination),
            ("agi_priority", "2"), ("agi_enhanced", "0.0"), ("agi_accountcode", call.account),
            ("agi_threadid", self._threadid), ("agi_arg_1", call.account))]

    def _agi_loop(self, call: FakeCall, a: FakeChannel, link: _AgiLink, sock: socket.socket) -> str:
        """res_agi's run_agi(): wait until the socket is readable, then ``fgets`` ONE line from a
        stdio buffer (fdopen'd, filled a whole read at a time), run it, and wait again. A second
        command that came in the same read sits in the buffer unseen until more bytes or the
        close make the socket readable: pipelining stalls exactly as on a real Asterisk. At the
        close the buffered lines still run (their replies go nowhere), then the dialplan goes on."""
        watcher = self.group.spawn(self._agi_hangup_watch, call, a, link)
        stdio = b""
        eof = False

        def read() -> bytes | None:
            data: bytes | None = None
            try:
                with gevent.Timeout(self.agi_idle_timeout_s, False):
                    data = sock.recv(4096)
            except OSError:
                data = b""
            return data

        try:
            while True:
                if not eof:  # ast_waitfor_nandfds on the socket: new bytes (or the close) wake it
                    data = read()
                    if data is None:
                        log.warning("AGI peer silent for %.0f s: giving up", self.agi_idle_timeout_s)
                        return "HANGUP" if link.dead else "FAILURE"
                    eof = not data
                    stdio += data
                while b"\n" not in stdio and not eof:  # fgets reads on until the line is whole
                    data = read()
                    if data is None:
                        return "HANGUP" if link.dead else "FAILURE"
                    eof = not data
                    stdio += data
                if not stdio:
                    return "HANGUP" if link.dead else "SUCCESS"  # "AGI Script ... completed"
                line, _, stdio = stdio.partition(b"\n")
                command = line.decode("utf-8", "replace").strip()
                if not command:
                    continue
                if b"\n" in stdio and not eof:
                    call.agi_stalled += 1  # the agent pipelined: the next line waits for more bytes
                call.agi_commands.append(command)
                self._agi_command(a, link, command)
                if call.agi_hangup_at_command and len(call.agi_commands) == call.agi_hangup_at_command:
                    self._caller_hangup_during_agi(call, a, link)
        finally:
            watcher.kill()

    def _agi_hangup_watch(self, call: FakeCall, a: FakeChannel, link: _AgiLink) -> None:
        """An AMI Hangup (or the script) while the AGI runs: HANGUP goes out at once, even when idle."""
        call._stop.wait()
        if not link.dead:
            a.variables["_hangup_cause_"] = str(call._stop_cause)
            if call._stop_leg == "caller":  # a BYE/CANCEL; an AMI Hangup publishes no HangupRequest
                self._chan_event("HangupRequest", a, [("Cause", str(call._stop_cause))])
            link.hangup_notice()

    def _caller_hangup_during_agi(self, call: FakeCall, a: FakeChannel, link: _AgiLink) -> None:
        """The caller's BYE arrives while a command runs: its reply went first, then HANGUP."""
        self._request_stop(call, "caller", 16)  # the watcher writes HANGUP and the HangupRequest
        gevent.idle()
        if not link.dead:
            a.variables["_hangup_cause_"] = "16"
            self._chan_event("HangupRequest", a, [("Cause", "16")])
            link.hangup_notice()

    def _agi_command(self, a: FakeChannel, link: _AgiLink, command: str) -> None:
        command_id = str(self._rng.randrange(1, 2**31))
        base = [("CommandId", command_id), ("Command", command)]
        self._chan_event("AGIExecStart", a, base, klass="agi")
        reply = self._agi_reply(a, link, command)
        code = reply[:3]
        result = {"200": "Success", "510": "Invalid or unknown command", "520": "Usage",
                  "511": "Command Not Permitted on a dead channel or intercept routine"}.get(code, "Failure")
        if code == "200" and "result=-1" in reply:
            code, result = "-1", "Failure"
        link.write(reply)
        self._chan_event("AGIExecEnd", a, [*base, ("ResultCode", code), ("Result", result)], klass="agi")
        if command.upper().split()[:1] == ["HANGUP"] and reply.startswith("200 result=1"):
            link.hangup_notice()

    def _agi_reply(self, a: FakeChannel, link: _AgiLink, command: str) -> str:
        argv = parse_agi_args(command)
        words = [word.upper() for word in argv]
        verb2 = " ".join(words[:2])
        verb1 = words[0] if words else ""
        known = next((name for name in AGI_COMMANDS if words[:len(name.split())] == name.split()), "")
        if not known:
            return AGI_510
        if link.dead and known not in AGI_DEAD_OK and known.split()[0] != "DATABASE":
            return AGI_511
        if verb2 == "GET VARIABLE":
            if len(argv) != 3:
                return "520 Invalid command syntax.  Proper usage not available.\n"
            value = self._read_var(a, argv[2])
            return "200 result=0\n" if value is None else f"200 result=1 ({value})\n"
        if verb2 == "GET FULL" and len(words) >= 4 and words[2] == "VARIABLE":
            target = a
            if len(argv) >= 5:
                found = self.find_channel(argv[4])
                if found is None:
                    return "200 result=0\n"
                target = found
            return f"200 result=1 ({self._expand(target, argv[3])})\n"
        if verb2 == "SET VARIABLE":
            if len(argv) != 4:
                return SET_VARIABLE_USAGE
            self._set_var(a, argv[2], argv[3])
            return "200 result=1\n"
        if verb1 == "VERBOSE":
            return "200 result=1\n"
        if verb1 == "NOOP":
            return "200 result=0\n"
        if verb1 == "ANSWER":
            if a.state != 6:
                a.answered = self.clock()
                self._newstate(a, 6)
            return "200 result=0\n"
        if verb1 == "HANGUP":
            if len(argv) > 1 and self.find_channel(argv[1]) is None:
                return "200 result=-1\n"
            a.variables["_hangup_cause_"] = "16"
            self._request_stop(a.call, "caller", 16)
            return "200 result=1\n"
        if verb1 == "EXEC":
            app = argv[1].lower() if len(argv) > 1 else ""
            if app == "mset":  # pbx_builtin_setvar_multiple: name=value pairs split on commas
                for pair in (argv[2] if len(argv) > 2 else "").split(","):
                    name, sep, value = pair.partition("=")
                    if sep and name.strip():
                        self._set_var(a, name.strip(), value)
                return "200 result=0\n"
            return "200 result=0\n" if app in ("noop", "verbose", "log", "set") else "200 result=-2\n"
        if known in ("STREAM FILE", "CONTROL STREAM FILE"):
            return "200 result=-1 endpos=0\n"  # no sound files on the fake (agi-5: a missing file)
        if known == "CHANNEL STATUS":
            return f"200 result={a.state}\n"
        return "200 result=0\n"

    def _set_var(self, ch: FakeChannel, name: str, value: str) -> None:
        if name.upper() == "CHANNEL(ACCOUNTCODE)":
            ch.accountcode = value
            return
        if name.upper().replace(" ", "") == "TIMEOUT(ABSOLUTE)":
            self._set_timeout(ch, value)
            return
        self._varset(ch, name, value)

    def _set_timeout(self, ch: FakeChannel, value: str, *, rearm: bool = True) -> None:
        """func_timeout.c: ``sscanf("%ld%lf")`` seconds from now, ms and finer kept; 0, a negative
        or junk cancel the hangup. A channel in a bridge wakes up at the instant."""
        match = re.match(r"\s*(\d+)(\.\d*)?", value)
        seconds = float(match.group(1) + (match.group(2) or "")) if match else 0.0
        now = self.clock()
        ch.timeout_at = now + seconds if seconds > 0 else 0.0
        ch.time_to_hangup = int(ch.timeout_at) if ch.timeout_at else 0
        if ch.role == "B" and rearm:
            ch.call.backstop_rearms += 1
        ch.call._rearmed.set()

    def _read_var(self, ch: FakeChannel, name: str) -> str | None:
        """A variable or one of the dialplan functions the billing agent reads."""
        key = name.strip()
        upper = key.upper()
        compact = upper.replace(" ", "")
        if compact == "CHANNEL(ACCOUNTCODE)":
            return ch.accountcode
        if compact == "CHANNEL(PJSIP,CALL-ID)":
            return ch.call_id if ch.tech == "PJSIP" else None
        if upper == "SIPCALLID":
            return ch.call_id if ch.tech == "SIP" else None
        if compact in ("CHANNEL(NAME)", "CHANNEL"):
            return ch.name
        if compact in ("CHANNEL(UNIQUEID)", "UNIQUEID"):
            return ch.uniqueid
        if compact == "CHANNEL(LINKEDID)":
            return ch.linkedid
        if compact == "CALLERID(NUM)":
            return ch.caller_num if ch.caller_num != "<unknown>" else ""
        if compact == "CALLERID(NAME)":
            return ch.caller_name if ch.caller_name != "<unknown>" else ""
        if upper == "EXTEN":
            return ch.exten
        if upper == "CONTEXT":
            return ch.context
        if upper == "PRIORITY":
            return str(ch.priority)
        if compact == "CDR(ANSWER,U)":  # epoch seconds with microseconds, as res_cdr's "u" option
            return f"{ch.answered:.6f}" if ch.answered else "0.000000"
        if compact in ("CDR(BILLSEC)", "CDR(DURATION)"):
            end = self.clock()
            if compact == "CDR(DURATION)":
                return str(int(end - ch.created))
            return str(int(end - ch.answered)) if ch.answered else "0"
        if compact == "TIMEOUT(ABSOLUTE)":
            return f"{max(0.0, ch.timeout_at - self.clock()):.3f}" if ch.timeout_at else "0"
        if key.startswith("_"):
            return None
        return ch.variables.get(key)

    def _expand(self, ch: FakeChannel, expr: str) -> str:
        return re.sub(r"\$\{([^}]*)\}", lambda m: self._read_var(ch, m.group(1)) or "", expr)

    # ---------------------------------------------------------------- Dial

    def _routes_fail(self, call: FakeCall, a: FakeChannel) -> bool:
        """The shipped dialplan's loop over BILLING_ROUTE_n: a route on a congested trunk (or
        one this channel technology cannot dial) fails with CONGESTION / CHANUNAVAIL and the next
        is tried; busy or no answer would end the loop. True when every route failed (the call
        then ends with the last failure's cause)."""
        for route in call.routes:
            tech, _, peer = route.partition("/")
            if tech != self.tech or not peer:
                call.attempts.append((route, "CHANUNAVAIL"))
                self._varset(a, "DIALSTATUS", "CHANUNAVAIL")
                continue
            if peer not in self.congested_trunks:
                call.trunk = peer
                return False
            b = self._new_channel(call, "B", peer, linkedid=a.linkedid)
            call.b_uniqueids.append(b.uniqueid)
            b.context, b.exten, b.call_id = CARRIER_CONTEXT, "s", self._call_id("B")
            self._chan_event("Newchannel", b)
            self._emit("DialBegin", "call", a.snapshot() + b.snapshot("Dest") +
                       [("DialString", f"{peer}/{call.destination}")])
            self._dial_event("DialEnd", a, b, ("DialStatus", "CONGESTION"))
            self._hangup_event(b, 34)
            call.attempts.append((route, "CONGESTION"))
            self._varset(a, "DIALSTATUS", "CONGESTION")
        call.outcome = "refused"
        call.dial_status = "CONGESTION" if call.attempts and call.attempts[-1][1] == "CONGESTION" else "CHANUNAVAIL"
        self._end_unanswered(a, None, "34", "Hangup", "FAILED")
        return True

    def _dial(self, call: FakeCall, a: FakeChannel) -> None:
        if call.routes and self._routes_fail(call, a):
            return
        limit = call.limit_ms
        warn = call.warn_ms
        # L(x) (no warning): the callee's whentohangup at its answer; the warn branch: L(limit:warn),
        # bridge timers that cannot move.
        option = f"L({call.backstop_raw})" if warn is None else f"L({limit if limit is not None else ''}:{warn})"
        targets = [f"{self.tech}/{self._trunk_name(i, call)}/{call.destination}" for i in range(call.forks)]
        dial_data = f"{'&'.join(targets)},{DIAL_TIMEOUT_S},{option}"
        trunk = f"{self.tech}/{self._trunk_name(0, call)}"
        dial = (f"PJSIP/{call.destination}@{self._trunk_name(0, call)}" if self.tech == "PJSIP"
                else f"{trunk}/{call.destination}")
        self._newexten(a, 4, "Set", f"BILLING_DIAL={dial}")
        self._newexten(a, 5, "GotoIf", f"{1 if warn is not None else 0}?warn")
        self._newexten(a, 9 if warn is not None else 6, "Dial", dial_data)
        raw_limit = call.backstop_raw if warn is None else call.limit_raw
        if (_int_or_none(raw_limit) or 0) <= 0:
            # ast_bridge_timelimit: "Bridge does not accept L(x), hanging up." -> Dial returns -1
            call.outcome = "refused"
            call.dial_status = "INVALIDARGS"
            self._end_unanswered(a, None, "16", "Dial", "FAILED")
            return
        for name in ("DIALSTATUS", "DIALEDPEERNUMBER", "DIALEDPEERNAME", "ANSWEREDTIME", "ANSWEREDTIME_MS",
                     "DIALEDTIME", "DIALEDTIME_MS", "RINGTIME", "RINGTIME_MS", "PROGRESSTIME", "PROGRESSTIME_MS"):
            self._varset(a, name, "")
        legs: list[FakeChannel] = []
        for index in range(call.forks):
            trunk = self._trunk_name(index, call)
            b = self._new_channel(call, "B", trunk, linkedid=a.linkedid)
            call.b_uniqueids.append(b.uniqueid)
            b.context, b.exten, b.call_id = CARRIER_CONTEXT, "s", self._call_id("B")
            legs.append(b)
            self._chan_event("Newchannel", b)
            if self.tech == "SIP":
                self._varset(b, "SIPCALLID", b.call_id)
            b.exten = ""
            self._varset(b, "DIALEDPEERNUMBER", f"{trunk}/{call.destination}")
            b.caller_num, b.conn_num, b.accountcode, b.exten = call.destination, call.caller, call.account, \
                call.destination
            self._newexten(b, 1, "AppDial", "(Outgoing Line)")
            self._chan_event("NewCallerid", b, [("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")])
            self._chan_event("NewAccountCode", b, [("OldAccountCode", "")])
            self._chan_event("NewConnectedLine", b)
            self._emit("DialBegin", "call", a.snapshot() + b.snapshot("Dest") +
                       [("DialString", f"{trunk}/{call.destination}")])
        dial_started = self.clock()
        if call.ring:
            if call._stop.wait(min(0.02, call.answer_after_ms / 2000)):
                self._cancel_dial(call, a, legs, dial_data)
                return
            for b in legs:
                self._newstate(b, 5)
                self._dial_event("DialState", a, b, ("DialStatus", "RINGING"))
        waited = self.clock() - dial_started
        if call._stop.wait(max(0.0, call.answer_after_ms / 1000 - waited)):
            self._cancel_dial(call, a, legs, dial_data)
            return
        if call.busy or call.no_answer:
            status, cause = ("BUSY", 17) if call.busy else ("NOANSWER", 0)
            for b in legs:
                self._dial_event("DialEnd", a, b, ("DialStatus", status))
                self._hangup_event(b, cause)
            call.dial_status = status
            self._varset(a, "DIALSTATUS", status)
            call.outcome = "busy" if call.busy else "no_answer"
            a_cause = 17 if call.busy else 16  # Dial copies the callee's busy cause to the caller
            self._newexten(a, 10 if warn is not None else 7, "Hangup", "")
            self._end_unanswered(a, legs[0], str(a_cause), "Dial", "BUSY" if call.busy else "NO ANSWER",
                                 cdr_data=dial_data)
            return
        self._answered(call, a, legs, dial_data)

    def _cancel_dial(self, call: FakeCall, a: FakeChannel, legs: list[FakeChannel], dial_data: str) -> None:
        """The caller hung up (or was hung up) while the callee rang: DialEnd CANCEL, Dial returns -1."""
        cause = call._stop_cause
        if call._stop_leg == "caller":
            self._chan_event("HangupRequest", a, [("Cause", str(cause))])
        for b in legs:
            self._dial_event("DialEnd", a, b, ("DialStatus", "CANCEL"))
            self._hangup_event(b, cause)
        call.dial_status = "CANCEL"
        self._varset(a, "DIALSTATUS", "CANCEL")
        call.outcome = "cancelled"
        self._end_unanswered(a, legs[0], str(cause), "Dial", "NO ANSWER", cdr_data=dial_data)

    def _end_unanswered(self, a: FakeChannel, dest: FakeChannel | None, cause: str, app: str, disposition: str,
                        *, cdr_data: str = "") -> None:
        """The end of a call that never bridged (ami-4's order): SoftHangupRequest, Cdr, Hangup."""
        end = self.clock()
        self._chan_event("SoftHangupRequest", a, [("Cause", str(SOFTHANGUP_APPUNLOAD))])
        self._cdr(a, dest, app, cdr_data or a.appdata, a.created, 0.0, end, disposition)
        if app != a.app and dest is not None:
            self._cdr(a, None, a.app, a.appdata, end, 0.0, end, disposition)
        a.call.hangup_cause = _int_or_none(cause) or 16
        a.call.ended_ms = end * 1000
        self._hangup_event(a, a.call.hangup_cause)
        self._device_state(a)

    def _answered(self, call: FakeCall, a: FakeChannel, legs: list[FakeChannel], dial_data: str) -> None:
        b = legs[0]
        losers = legs[1:]
        now = self.clock()
        b.answered = now
        call.answered_ms = now * 1000
        self._newstate(b, 6)
        if call.warn_ms is None:  # L(x) with no warning: app_dial sets the callee's whentohangup
            backstop_ms = _int_or_none(call.backstop_raw) or 0
            self._set_timeout(b, f"{backstop_ms // 1000}.{backstop_ms % 1000:03d}", rearm=False)
        self._varset(a, "DIALSTATUS", "ANSWER")
        self._varset(a, "DIALEDPEERNAME", b.name)
        self._varset(a, "DIALEDPEERNUMBER", f"{self._trunk_name(0, call)}/{call.destination}")
        b.exten = ""
        call.dial_status = "ANSWER"
        self._dial_event("DialEnd", a, b, ("DialStatus", "ANSWER"))
        for loser in losers:
            self._dial_event("DialEnd", a, loser, ("DialStatus", "CANCEL"))
        for loser in losers:
            self._hangup_event(loser, 26)
        a.answered = now
        self._newstate(a, 6)
        self._device_state(a)
        bridge_id = str(uuidlib.UUID(int=self._rng.getrandbits(128), version=4))
        a.bridge_id = b.bridge_id = bridge_id
        self._emit("BridgeCreate", "call", self._bridge_fields(bridge_id, 0, "simple_bridge"))
        self._newexten(b, 1, "AppDial", "(Outgoing Line)")
        self._emit("BridgeEnter", "call", self._bridge_fields(bridge_id, 1, "simple_bridge") + b.snapshot())
        self._emit("BridgeEnter", "call", self._bridge_fields(bridge_id, 2, "simple_bridge") + a.snapshot())
        for _ in range(3):  # the bridge sets them at each technology change (simple_bridge -> native_rtp)
            self._varset(a, "BRIDGEPEER", b.name)
            self._varset(a, "BRIDGEPVTCALLID", b.call_id)
            self._varset(b, "BRIDGEPEER", a.name)
            self._varset(b, "BRIDGEPVTCALLID", a.call_id)
        call.outcome = "answered"
        limit_at = None  # L(limit:warn): the bridge's own limit (the warn branch only)
        if call.warn_ms is not None and call.limit_ms:
            limit_at = now + call.limit_ms / 1000
            if 0 < call.warn_ms <= call.limit_ms:
                self.group.add(gevent.spawn_later(max(0.0, call.limit_ms / 1000 - call.warn_ms / 1000),
                                                  self._warn, call, b))
        talk_end = now + call.talk_ms / 1000
        how, cause = call.hangup_by, 16
        while True:
            ends = [(talk_end, "talk")]
            if limit_at is not None:
                ends.append((limit_at, "limit"))
            if b.timeout_at:
                ends.append((b.timeout_at, "backstop"))
            end_at, why = min(ends)
            call._rearmed.clear()
            wait_s = max(0.0, end_at - self.clock())
            if wait_s > 0:
                gevent.wait([call._stop, call._rearmed], timeout=wait_s, count=1)
            if call._stop.is_set():
                leg, cause = call._stop_leg, call._stop_cause
                how = "callee" if leg == "callee" or leg is b else "caller"
                if isinstance(leg, FakeChannel):
                    call.cut_by = "ami"
                    call.outcome = "cut"
                break
            if call._rearmed.is_set():
                continue  # TIMEOUT(absolute) moved (AMI Setvar): wait for the new instant
            if self.clock() + 0.0005 < end_at:
                continue
            if why == "talk":
                how, cause = call.hangup_by, 16
            else:  # L() or the callee's TIMEOUT(absolute): Asterisk hangs the callee up
                how, cause = "limit", 16
                call.cut_by = why
                call.outcome = "cut"
            break
        stopped = call._stop.is_set()
        self._end_bridge(call, a, b, how, cause, dial_data, ami=isinstance(call._stop_leg, FakeChannel) and stopped)

    def _warn(self, call: FakeCall, b: FakeChannel) -> None:
        if not b.hungup:
            call.warned_ms = self.clock() * 1000
            call.warnings += 1

    def _end_bridge(self, call: FakeCall, a: FakeChannel, b: FakeChannel, how: str, cause: int, dial_data: str,
                    *, ami: bool) -> None:
        """The orders of ami-1 (callee leaves first), ami-2 (the caller's BYE) and ami-3 (AMI Hangup)."""
        bridge_id = a.bridge_id
        if how == "callee" and not ami:
            self._chan_event("HangupRequest", b, [("Cause", str(cause))])
        if how == "caller" and not ami:
            self._chan_event("HangupRequest", a, [("Cause", str(cause))])
        first, second = (b, a) if how in ("callee", "limit") else (a, b)
        for ch in (first, second):
            self._varset(ch, "BRIDGEPEER", "")
            self._varset(ch, "BRIDGEPVTCALLID", "")
        end = self.clock()
        self._emit("BridgeLeave", "call", self._bridge_fields(bridge_id, 1, "native_rtp") + first.snapshot())
        self._emit("BridgeLeave", "call", self._bridge_fields(bridge_id, 0, "native_rtp") + second.snapshot())
        a.bridge_id = b.bridge_id = ""
        answered_ms = int((end - a.answered) * 1000)
        dialed_ms = int((end - a.created) * 1000)
        times = [("ANSWEREDTIME", str(answered_ms // 1000)), ("ANSWEREDTIME_MS", str(answered_ms)),
                 ("DIALEDTIME", str(dialed_ms // 1000)), ("DIALEDTIME_MS", str(dialed_ms))]
        call.billsec = int(end - b.answered)
        b_cause = cause if (how == "callee" or ami) else 16
        a_cause = cause if ami else 16
        if how == "caller" and not ami:  # ami-2
            self._hangup_event(b, b_cause)
            self._cdr(a, b, "Dial", dial_data, a.created, a.answered, end, "ANSWERED")
            self._emit("BridgeDestroy", "call", self._bridge_fields(bridge_id, 0, "native_rtp"))
            for name, value in times:
                self._varset(a, name, value)
            self._varset(a, "DIALSTATUS", "ANSWER")
            self._chan_event("SoftHangupRequest", a, [("Cause", str(SOFTHANGUP_APPUNLOAD))])
        elif ami and first is a:  # ami-3
            for name, value in times:
                self._varset(a, name, value)
            self._emit("BridgeDestroy", "call", self._bridge_fields(bridge_id, 0, "native_rtp"))
            self._varset(a, "DIALSTATUS", "ANSWER")
            self._chan_event("SoftHangupRequest", a, [("Cause", str(SOFTHANGUP_APPUNLOAD))])
            self._cdr(a, b, "Dial", dial_data, a.created, a.answered, end, "ANSWERED")
            self._hangup_event(b, b_cause)
        else:  # ami-1: the callee left first (L(), its BYE, or an AMI Hangup of the callee)
            for name, value in times:
                self._varset(a, name, value)
            self._varset(a, "DIALSTATUS", "ANSWER")
            self._chan_event("SoftHangupRequest", a, [("Cause", str(SOFTHANGUP_APPUNLOAD))])
            self._cdr(a, b, "Dial", dial_data, a.created, a.answered, end, "ANSWERED")
            self._emit("BridgeDestroy", "call", self._bridge_fields(bridge_id, 0, "native_rtp"))
            self._hangup_event(b, b_cause)
        call.b_hangup_cause = b_cause
        call.hangup_cause = a_cause
        call.ended_ms = self.clock() * 1000
        self._hangup_event(a, a_cause)
        self._device_state(a)

    # ---------------------------------------------------------------- AMI server

    def _serve(self, sock: socket.socket, address: Any) -> None:
        session = _AmiSession(sock, address)
        self._sessions.add(session)
        try:
            if not self._stalled():
                session.send(AMI_BANNER)
            buf = b""
            while session.alive:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                while session.alive:
                    match = re.search(rb"\r?\n\r?\n", buf)
                    if match is None:
                        break
                    raw, buf = buf[:match.start()], buf[match.end():]
                    fields = _parse_message(raw.decode("utf-8", "replace"))
                    if not fields:
                        continue
                    self.actions.append(dict(fields))
                    if not self._stalled():
                        self._action(session, fields)
        except OSError:
            pass
        finally:
            self._close(session)

    def _close(self, session: _AmiSession) -> None:
        session.alive = False
        self._sessions.discard(session)
        try:
            session.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        session.sock.close()

    def _respond(self, session: _AmiSession, action_id: str | None, response: str,
                 fields: list[tuple[str, str]]) -> None:
        head = [("Response", response)]
        if action_id is not None:
            head.append(("ActionID", action_id))
        session.send(encode_message(head + fields))

    def _action(self, session: _AmiSession, fields: list[tuple[str, str]]) -> None:
        headers: dict[str, str] = {}
        for key, value in fields:
            headers.setdefault(key.lower(), value)
        action = headers.get("action", "")
        action_id = headers.get("actionid")

        def error(message: str) -> None:
            self._respond(session, action_id, "Error", [("Message", message)])

        if not action:
            error("Missing action in request")
            return
        verb = action.lower()
        if verb == "login":
            self._login(session, headers, action_id)
            return
        if verb == "logoff":
            self._respond(session, action_id, "Goodbye", [("Message", "Thanks for all the fish.")])
            self._close(session)
            return
        if not session.authed:
            error("Permission denied")
            return
        handler = _ACTIONS.get(verb)
        if handler is None:
            error(f"Invalid/unknown command: {action}. Use Action: ListCommands to show available commands.")
            return
        handler(self, session, headers, action_id)

    def _login(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        if (self._refuse_logins or headers.get("username", "") != self.ami_username
                or headers.get("secret", "") != self.ami_secret):
            self.logins_refused += 1
            gevent.sleep(self.login_failure_delay_s)  # manager.c: sleep(1) before the error
            self._respond(session, action_id, "Error", [("Message", "Authentication failed")])
            self._close(session)
            return
        self.logins_accepted += 1
        session.authed = True
        session.username = headers.get("username", "")
        session.read = self.ami_read
        if "events" in headers:
            session.classes = _event_mask(headers["events"])
        self._respond(session, action_id, "Success", [("Message", "Authentication accepted")])
        if session.wants("system"):
            uptime = str(int(time.monotonic() - self._started))
            session.send(encode_message([("Event", "FullyBooted"), ("Privilege", "system,all"), ("Uptime", uptime),
                                         ("LastReload", uptime), ("Status", "Fully Booted")]))
        if session.wants("security"):
            now = self.clock()
            tv = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}+0000"
            local = session.sock.getsockname()
            session.send(encode_message([
                ("Event", "SuccessfulAuth"), ("Privilege", "security,all"), ("Timestamp", self._timestamp()),
                ("EventTV", tv), ("Severity", "Informational"), ("Service", "AMI"), ("EventVersion", "1"),
                ("AccountID", session.username), ("SessionID", f"0x{id(session) & 0xFFFFFFFFFFFF:x}"),
                ("LocalAddress", f"IPV4/TCP/{local[0]}/{local[1]}"),
                ("RemoteAddress", f"IPV4/TCP/{session.address[0]}/{session.address[1]}"),
                ("UsingPassword", "0"), ("SessionTV", tv)]))

    def _act_ping(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        self._respond(session, action_id, "Success", [("Ping", "Pong"), ("Timestamp", f"{self.clock():.6f}")])

    def _act_events(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        session.classes = _event_mask(headers.get("eventmask", "off"))
        self._respond(session, action_id, "Success", [("Events", "On" if session.classes else "Off")])

    def _list_head(self, session: _AmiSession, action_id: str | None, message: str) -> None:
        self._respond(session, action_id, "Success", [("EventList", "start"), ("Message", message)])

    def _act_core_show_channels(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        self._list_head(session, action_id, "Channels will follow")
        aid = [("ActionID", action_id)] if action_id is not None else []
        now = self.clock()
        channels = sorted(self.channels.values(), key=lambda ch: (ch.role, ch.name), reverse=False)
        for ch in channels:
            elapsed = int(now - ch.created)
            duration = f"{elapsed // 3600:02d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}"
            session.send(encode_message([("Event", "CoreShowChannel"), *aid, *ch.snapshot(),
                                         ("Application", ch.app), ("ApplicationData", ch.appdata),
                                         ("Duration", duration), ("BridgeId", ch.bridge_id)]))
        session.send(encode_message([("Event", "CoreShowChannelsComplete"), *aid, ("EventList", "Complete"),
                                     ("ListItems", str(len(channels)))]))

    def _act_status(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        wanted = headers.get("channel", "")
        if wanted and wanted.lower() != "all":
            found = self.find_channel(wanted)
            if found is None:
                self._respond(session, action_id, "Error", [("Message", "No such channel")])
                return
            channels = [found]
        else:
            channels = sorted(self.channels.values(), key=lambda ch: (ch.role, ch.name))
        self._list_head(session, action_id, "Channel status will follow")
        aid = [("ActionID", action_id)] if action_id is not None else []
        now = self.clock()
        for ch in channels:
            session.send(encode_message([
                ("Event", "Status"), ("Privilege", "Call"), *ch.snapshot(), ("Type", ch.tech),
                ("DNID", ch.dnid), ("EffectiveConnectedLineNum", ch.conn_num),
                ("EffectiveConnectedLineName", ch.conn_name), ("TimeToHangup", str(ch.time_to_hangup)),
                ("BridgeID", ch.bridge_id), ("Application", ch.app), ("Data", ch.appdata),
                ("Nativeformats", "(ulaw)"), ("Readformat", "ulaw"), ("Readtrans", ""), ("Writeformat", "ulaw"),
                ("Writetrans", ""), ("Callgroup", "0"), ("Pickupgroup", "0"),
                ("Seconds", str(int(now - ch.created))), *aid]))
        session.send(encode_message([("Event", "StatusComplete"), *aid, ("EventList", "Complete"),
                                     ("ListItems", str(len(channels))), ("Items", str(len(channels)))]))

    def _act_getvar(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        variable = headers.get("variable", "")
        if not variable:
            self._respond(session, action_id, "Error", [("Message", "No variable specified")])
            return
        value: str | None = ""
        if headers.get("channel"):
            ch = self.find_channel(headers["channel"])
            if ch is None:
                self._respond(session, action_id, "Error", [("Message", "No such channel")])
                return
            value = self._read_var(ch, variable)
        self._respond(session, action_id, "Success", [("Variable", variable), ("Value", value or "")])

    def _act_setvar(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        variable = headers.get("variable", "")
        if not variable:
            self._respond(session, action_id, "Error", [("Message", "No variable specified")])
            return
        if headers.get("channel"):
            ch = self.find_channel(headers["channel"])
            if ch is None:
                self._respond(session, action_id, "Error", [("Message", "No such channel")])
                return
            self._set_var(ch, variable, headers.get("value", ""))
        self._respond(session, action_id, "Success", [("Message", "Variable Set")])

    def _act_hangup(self, session: _AmiSession, headers: dict[str, str], action_id: str | None) -> None:
        name = headers.get("channel", "")
        if not name:
            self._respond(session, action_id, "Error", [("Message", "No channel specified")])
            return
        cause_text = headers.get("cause", "").strip()
        cause = int(cause_text) if cause_text.isdigit() else 0
        ch = self.find_channel(name)
        if ch is None or ch.hungup:
            self._respond(session, action_id, "Error", [("Message", "No such channel")])
            return
        self._respond(session, action_id, "Success", [("Message", "Channel Hungup")])
        if not ch.call.ignore_ami_hangup:
            self._request_stop(ch.call, ch, cause or 16)


_ACTIONS: dict[str, Callable[[FakeAsterisk, _AmiSession, dict[str, str], str | None], None]] = {
    "ping": FakeAsterisk._act_ping,
    "events": FakeAsterisk._act_events,
    "coreshowchannels": FakeAsterisk._act_core_show_channels,
    "status": FakeAsterisk._act_status,
    "getvar": FakeAsterisk._act_getvar,
    "setvar": FakeAsterisk._act_setvar,
    "hangup": FakeAsterisk._act_hangup,
}


def _parse_message(text: str) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n", text):
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields.append((key.strip(), value.strip()))
    return fields


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


# ------------------------------------------------------------------------------------ standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake Asterisk 20 (AMI server + FastAGI client) for manual tests.")
    parser.add_argument("--agi-host", default="127.0.0.1")
    parser.add_argument("--agi-port", type=int, default=4573)
    parser.add_argument("--ami-host", default="127.0.0.1")
    parser.add_argument("--ami-port", type=int, default=5038)
    parser.add_argument("--username", default="billing")
    parser.add_argument("--secret", default="secret")
    parser.add_argument("--tech", choices=("PJSIP", "SIP"), default="PJSIP")
    parser.add_argument("--calls", type=int, default=3, help="calls to place once an AMI client is logged in")
    parser.add_argument("--account", default="1001")
    parser.add_argument("--destination", default="33612345678")
    parser.add_argument("--talk-ms", type=int, default=3000)
    parser.add_argument("--no-wait", action="store_true", help="place the calls without waiting for an AMI login")
    parser.add_argument("--serve", action="store_true", help="keep serving AMI after the calls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    fake = FakeAsterisk(args.agi_host, args.agi_port, ami_host=args.ami_host, ami_port=args.ami_port,
                        ami_username=args.username, ami_secret=args.secret, tech=args.tech)
    fake.start()
    print(json.dumps({"ami_port": fake.ami_port, "agi": f"{args.agi_host}:{args.agi_port}"}), flush=True)
    try:
        if not args.no_wait:
            while fake.live_sessions() == 0:
                gevent.sleep(0.05)
            gevent.sleep(0.3)
        calls = [fake.place_call(args.account, args.destination, talk_ms=args.talk_ms) for _ in range(args.calls)]
        fake.wait_idle(args.talk_ms / 1000 + 120)
        for call in calls:
            print(json.dumps({"uniqueid": call.a_uniqueid, "outcome": call.outcome, "decision": call.decision,
                              "limit_ms": call.limit_ms, "reason": call.reason, "cause": call.hangup_cause,
                              "billsec": call.billsec, "warnings": call.warnings}), flush=True)
        if args.serve:
            gevent.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
