"""The fake Asterisk writes what a real Asterisk 20 writes (shared/captures/asterisk).

Each test drives the fake over real sockets: a tiny scripted FastAGI server plays the agent, a raw
AMI socket reads the events. What the fake writes is compared with the capture transcripts: the
same lines, header names in the same order, the same events in the same order; only values that
must differ are ignored (timestamps, uniqueids, ports, thread ids, Call-IDs, bridge ids).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import gevent
import gevent.queue
import pytest
from gevent import socket
from gevent.server import StreamServer

from agent.sim.asterisk import AMI_BANNER, FakeAsterisk, FakeCall
from tests.captures import captures_dir

CAPTURES = captures_dir("asterisk")
if not CAPTURES.is_dir():  # the fixtures live outside the repository
    pytest.skip("captures/asterisk not available", allow_module_level=True)

Message = list[tuple[str, str]]

# Events whose presence and place depend on the capture box's dialplan, not on the call.
DIALPLAN_NOISE = {"VarSet", "Newexten", "AGIExecStart", "AGIExecEnd", "DeviceStateChange"}


# ------------------------------------------------------------------------------------ helpers


def parse_ami(data: bytes) -> list[Message]:
    """Split an AMI byte stream (after the banner) into messages of (key, value) pairs."""
    text = data.decode()
    assert "\r\n" in text and not re.search(r"(?<!\r)\n", text), "AMI lines end in CRLF"
    messages = []
    for block in text.split("\r\n\r\n"):
        if not block:
            continue
        messages.append([tuple(line.split(": ", 1)) if ": " in line else (line.rstrip(":"), "")  # type: ignore[misc]
                         for line in block.split("\r\n")])
    return messages


def capture_ami(name: str) -> list[Message]:
    raw = (CAPTURES / name).read_bytes()
    assert raw.startswith(AMI_BANNER)
    return parse_ami(raw[len(AMI_BANNER):])


def capture_agi(name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(env lines without the blank one, [(command, reply)]) of an agi-*.txt transcript."""
    env: list[str] = []
    exchanges: list[tuple[str, str]] = []
    in_env = True
    command = ""
    for line in (CAPTURES / name).read_text().splitlines():
        direction, text = line[:2], line[3:]
        if in_env:
            if text == "":
                in_env = False
            else:
                env.append(text)
        elif direction == ">>":
            command = text
        else:
            exchanges.append((command, text))
    return env, exchanges


def get(msg: Message, key: str) -> str:
    return next((value for name, value in msg if name == key), "")


def keys(msg: Message) -> list[str]:
    return [name for name, _ in msg]


class AgiAgent:
    """A scripted FastAGI server playing the billing agent: records the env block and the replies."""

    def __init__(self, script: Callable[[AgiAgent, socket.socket], None] | None = None,
                 commands: Iterable[str] = ()) -> None:
        self.commands = list(commands)
        self.script = script
        self.env_raw = b""
        self.replies: list[str] = []
        self.done = gevent.event.Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.buf = b""

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def read_line(self, sock: socket.socket, timeout: float = 3.0) -> str:
        with gevent.Timeout(timeout):
            while b"\n" not in self.buf:
                data = sock.recv(4096)
                if not data:
                    line, self.buf = self.buf, b""
                    return line.decode()
                self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"

    def send(self, sock: socket.socket, command: str) -> str:
        sock.sendall(command.encode() + b"\n")
        reply = self.read_line(sock)
        self.replies.append(reply)
        return reply

    def _handle(self, sock: socket.socket, address: object) -> None:
        try:
            with gevent.Timeout(3):
                while b"\n\n" not in self.buf:
                    data = sock.recv(4096)
                    if not data:
                        self.env_raw, self.buf = self.buf, b""
                        return
                    self.buf += data
            self.env_raw, _, self.buf = self.buf.partition(b"\n\n")
            self.env_raw += b"\n\n"
            for command in self.commands:
                self.send(sock, command)
            if self.script is not None:
                self.script(self, sock)
        finally:
            sock.close()
            self.done.set()

    def stop(self) -> None:
        self.server.stop(timeout=1)


class AmiReader:
    """A raw AMI client socket: everything it reads is kept, parsed on demand."""

    def __init__(self, port: int, *, login: bool = True, events: str | None = None, action_id: str = "1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.data = b""
        self.closed = gevent.event.Event()
        self.greenlet = gevent.spawn(self._read)
        if login:
            extra = f"Events: {events}\r\n" if events is not None else ""
            self.send(f"Action: Login\r\nActionID: {action_id}\r\nUsername: billing\r\nSecret: secret\r\n{extra}\r\n")
            self.wait_for(lambda msgs: any(get(m, "Response") for m in msgs))

    def _read(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.data += chunk
        except OSError:
            pass
        finally:
            self.closed.set()

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def messages(self) -> list[Message]:
        assert self.data.startswith(AMI_BANNER)
        body = self.data[len(AMI_BANNER):]
        complete = body[: body.rfind(b"\r\n\r\n") + 4] if b"\r\n\r\n" in body else b""
        return parse_ami(complete)

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 3.0) -> list[Message]:
        with gevent.Timeout(timeout):
            while True:
                if self.data.startswith(AMI_BANNER):
                    msgs = self.messages()
                    if predicate(msgs):
                        return msgs
                gevent.sleep(0.01)

    def response(self, action_id: str, timeout: float = 3.0) -> Message:
        msgs = self.wait_for(lambda ms: any(get(m, "ActionID") == action_id and get(m, "Response") for m in ms),
                             timeout)
        return next(m for m in msgs if get(m, "ActionID") == action_id and get(m, "Response"))

    def close(self) -> None:
        self.sock.close()
        self.greenlet.kill()


@pytest.fixture
def make() -> Iterable[Callable[..., tuple[FakeAsterisk, AgiAgent]]]:
    started: list[tuple[FakeAsterisk, AgiAgent]] = []

    def factory(commands: Iterable[str] = (), script: Callable[[AgiAgent, socket.socket], None] | None = None,
                **kw: object) -> tuple[FakeAsterisk, AgiAgent]:
        agent = AgiAgent(script, commands)
        kw.setdefault("login_failure_delay_s", 0.05)
        fake = FakeAsterisk("127.0.0.1", agent.port, **kw).start()  # type: ignore[arg-type]
        started.append((fake, agent))
        return fake, agent

    yield factory
    for fake, agent in started:
        fake.stop()
        agent.stop()


def allow(limit_ms: int, warn_ms: int | None = None) -> list[str]:
    """The agent's variables as single commands (the backstop is the limit: Dial's L(x) sets the
    callee's hangup time at its answer)."""
    commands = ["GET VARIABLE CHANNEL(accountcode)", 'SET VARIABLE BILLING_DECISION "allow"',
                f"SET VARIABLE BILLING_LIMIT_MS {limit_ms}",
                f"SET VARIABLE BILLING_BACKSTOP_MS {limit_ms}"]
    if warn_ms is not None:
        commands.append(f"SET VARIABLE BILLING_WARN_MS {warn_ms}")
    return commands


def ended(reader: AmiReader, *calls: FakeCall) -> list[Message]:
    """Wait until the reader has the Hangup event of every call's A leg."""
    def seen(msgs: list[Message]) -> bool:
        gone = {get(m, "Uniqueid") for m in msgs if get(m, "Event") == "Hangup"}
        return all(call.a_uniqueid in gone for call in calls)
    return reader.wait_for(seen)


def call_events(msgs: list[Message], call: FakeCall) -> list[Message]:
    """The channel, bridge and CDR events of one call (by Linkedid, bridges and Cdr by the A Uniqueid)."""
    out = []
    bridges: set[str] = set()
    for m in msgs:
        if not get(m, "Event") or get(m, "ActionID"):
            continue
        if get(m, "Linkedid") == call.a_uniqueid or get(m, "UniqueID") == call.a_uniqueid:
            out.append(m)
            if get(m, "BridgeUniqueid"):
                bridges.add(get(m, "BridgeUniqueid"))
        elif get(m, "BridgeUniqueid") in bridges or (get(m, "Event") == "BridgeCreate" and out):
            bridges.add(get(m, "BridgeUniqueid"))
            out.append(m)
    return out


def shape(events: list[Message], a_name: str, b_names: Iterable[str],
          ignore: set[str] = DIALPLAN_NOISE) -> list[tuple[str, ...]]:
    """Each event as (name, role of its channel, header names..., key values) for comparison."""
    roles = {a_name: "A", **{b: "B" for b in b_names}}
    out = []
    for m in events:
        name = get(m, "Event")
        if name in ignore:
            continue
        values = tuple(f"{k}={get(m, k)}" for k in ("ChannelStateDesc", "Cause", "Cause-txt", "DialStatus",
                                                    "BridgeNumChannels", "BridgeTechnology", "Disposition")
                       if get(m, k))
        out.append((name, roles.get(get(m, "Channel"), "-"), *keys(m), *values))
    return out


def capture_shape(name: str, ignore: set[str] = DIALPLAN_NOISE) -> list[tuple[str, ...]]:
    msgs = capture_ami(name)
    a = next(get(m, "Channel") for m in msgs if get(m, "Event") == "Newchannel")
    bs = {get(m, "Channel") for m in msgs if get(m, "Event") == "Newchannel" and "carrier" in get(m, "Channel")}
    linked = [m for m in msgs if get(m, "Event") and get(m, "Event") not in ("FullyBooted", "SuccessfulAuth")
              and not get(m, "ActionID")]
    return shape(linked, a, bs, ignore)


def fake_shape(reader: AmiReader, call: FakeCall, ignore: set[str] = DIALPLAN_NOISE) -> list[tuple[str, ...]]:
    events = call_events(reader.messages(), call)
    a = next(get(m, "Channel") for m in events if get(m, "Uniqueid") == call.a_uniqueid)
    bs = {get(m, "Channel") for m in events if get(m, "Uniqueid") in call.b_uniqueids}
    return shape(events, a, bs, ignore)


# ------------------------------------------------------------------------------------ FastAGI


def test_env_block_has_the_captured_lines_in_order(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, agent = make(allow(60000), tech="SIP")
    call = fake.place_call("1001", "12125551234", caller="1001", talk_ms=10)
    assert call.done.wait(5)
    env, _ = capture_agi("agi-1-authorize-01.txt")
    lines = agent.env_raw.decode().split("\n")
    assert agent.env_raw.endswith(b"\n\n") and b"\r" not in agent.env_raw
    got = lines[:-2]
    assert [line.split(": ")[0] for line in got] == [line.split(": ")[0] for line in env]
    differ = {"agi_request", "agi_channel", "agi_uniqueid", "agi_threadid", "agi_context", "agi_priority"}
    assert [line for line in got if line.split(": ")[0] not in differ] == \
        [line for line in env if line.split(": ")[0] not in differ]
    fields = dict(line.split(": ", 1) for line in got)
    assert fields["agi_request"] == f"agi://127.0.0.1:{agent.port}/authorize"
    assert fields["agi_context"] == "billing-outbound"
    assert re.fullmatch(r"SIP/127\.0\.0\.1-[0-9a-f]{8}", fields["agi_channel"])
    assert fields["agi_uniqueid"] == call.a_uniqueid and re.fullmatch(r"\d+\.\d+", call.a_uniqueid)


def test_pjsip_env_block_names_the_endpoint(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, agent = make(["GET VARIABLE CHANNEL(pjsip,call-id)", "GET VARIABLE SIPCALLID", *allow(1000)])
    call = fake.place_call("acct-7", "4420", caller="1002", talk_ms=10)
    assert call.done.wait(5)
    fields = dict(line.split(": ", 1) for line in agent.env_raw.decode().strip().split("\n"))
    assert fields["agi_type"] == "PJSIP" and fields["agi_channel"].startswith("PJSIP/1002-")
    assert fields["agi_accountcode"] == "acct-7" and fields["agi_arg_1"] == "acct-7"
    assert re.fullmatch(r"200 result=1 \([0-9a-f-]{36}\)\n", agent.replies[0])
    assert agent.replies[1] == "200 result=0\n"  # no SIPCALLID on a PJSIP channel


def test_replies_match_the_capture(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    _, exchanges = capture_agi("agi-1-authorize-01.txt")
    fake, agent = make([command for command, _ in exchanges], tech="SIP")
    call = fake.place_call("1001", "12125551234", caller="1001", talk_ms=10)
    assert call.done.wait(5)
    for (command, expected), got in zip(exchanges, agent.replies, strict=True):
        if command == "GET VARIABLE SIPCALLID":
            assert re.fullmatch(r"200 result=1 \(1-\d+@127\.0\.0\.1\)\n", got)
        else:
            assert got == expected + "\n", command
    assert call.decision == "allow" and call.limit_ms == 4000
    assert call.agi_commands == [command for command, _ in exchanges]


def test_get_and_set_variable_replies(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, agent = make([
        "GET VARIABLE NOT_SET", "SET VARIABLE BILLING_REASON insufficient_funds", "GET VARIABLE BILLING_REASON",
        'SET VARIABLE BILLING_REASON "two words"', "GET FULL VARIABLE ${BILLING_REASON}/${CALLERID(num)}",
        "SET VARIABLE ONLY_NAME", 'VERBOSE "hello" 1', "NOOP", "STREAM FILE beep \"\"", "CHANNEL STATUS",
        'SET VARIABLE BILLING_DECISION "deny"'])
    call = fake.place_call("1001", "3312", caller="1005")
    assert call.done.wait(5)
    assert agent.replies[:5] == ["200 result=0\n", "200 result=1\n", "200 result=1 (insufficient_funds)\n",
                                 "200 result=1\n", "200 result=1 (two words/1005)\n"]
    assert agent.replies[5].startswith("520-Invalid command syntax.  Proper usage follows:")
    rest = agent.replies[5:]
    while not rest[0].startswith("520 "):  # the multi-line usage ends with "520 End of proper usage."
        rest = rest[1:]
    assert call.reason == "two words" and call.outcome == "denied" and call.hangup_cause == 21


def test_hangup_during_a_command_then_511(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    seen: list[str] = []

    def script(agent: AgiAgent, sock: socket.socket) -> None:
        seen.append(agent.read_line(sock))  # HANGUP, out of band, after the reply to command 1
        for command in ("STREAM FILE beep \"\"", "GET VARIABLE CHANNEL(accountcode)", "NOT A COMMAND", "ANSWER"):
            agent.send(sock, command)

    fake, agent = make(["GET VARIABLE CHANNEL(accountcode)"], script)
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "3312", agi_hangup_at_command=1)
    assert call.done.wait(5)
    assert agent.replies[0] == "200 result=1 (1001)\n"
    assert seen == ["HANGUP\n"]
    assert agent.replies[1:] == ["511 Command Not Permitted on a dead channel or intercept routine\n",
                                 "200 result=1 (1001)\n", "510 Invalid or unknown command\n",
                                 "511 Command Not Permitted on a dead channel or intercept routine\n"]
    assert call.agi_status == "HANGUP" and call.outcome == "cancelled" and not call.b_uniqueids
    events = [get(m, "Event") for m in call_events(ended(reader, call), call)
              if get(m, "Event") not in DIALPLAN_NOISE]
    assert events[-4:] == ["HangupRequest", "SoftHangupRequest", "Cdr", "Hangup"]
    reader.close()


def test_hangup_while_idle_comes_at_once(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    calls: list[FakeCall] = []
    seen: list[str] = []

    def script(agent: AgiAgent, sock: socket.socket) -> None:
        fake.hangup(calls[0], "caller")
        seen.append(agent.read_line(sock))
        agent.send(sock, "GET VARIABLE BILLING_DECISION")

    fake, agent = make([], script)
    calls.append(fake.place_call("1001", "3312"))
    assert calls[0].done.wait(5)
    assert seen == ["HANGUP\n"] and agent.replies == ["200 result=1 ()\n"]
    assert calls[0].outcome == "cancelled"


def test_env_block_cut_short_refuses_the_call(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, agent = make([])
    call = fake.place_call("1001", "3312", agi_truncate=True)
    assert call.done.wait(5) and agent.done.wait(2)
    assert agent.env_raw.startswith(b"agi_network: yes\n") and not agent.env_raw.endswith(b"\n\n")
    assert call.outcome == "refused" and call.hangup_cause == 21


def test_unreachable_agent_fails_closed(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, agent = make([])
    agent.stop()  # nothing listens on the AGI port any more
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "3312")
    assert call.done.wait(5)
    assert call.agi_status == "FAILURE" and call.outcome == "refused" and call.hangup_cause == 21
    events = call_events(ended(reader, call), call)
    agistatus = [get(m, "Value") for m in events if get(m, "Variable") == "AGISTATUS"]
    assert agistatus == ["FAILURE"]
    hangup = [m for m in events if get(m, "Event") == "Hangup"]
    assert [(get(m, "Cause"), get(m, "Cause-txt"), get(m, "ChannelStateDesc")) for m in hangup] == \
        [("21", "Call Rejected", "Ring")]
    reader.close()


def test_deny_uses_the_agents_cause(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(['SET VARIABLE BILLING_DECISION "deny"', "SET VARIABLE BILLING_REASON insufficient_funds",
                    "SET VARIABLE BILLING_CAUSE 34"])
    call = fake.place_call("1001", "3312")
    assert call.done.wait(5)
    assert (call.outcome, call.decision, call.reason, call.hangup_cause) == ("denied", "deny", "insufficient_funds", 34)


# ------------------------------------------------------------------------------------ AMI


def test_banner_login_and_boot_events_match_the_capture(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make()
    reader = AmiReader(fake.ami_port)
    msgs = reader.wait_for(lambda ms: len(ms) >= 3)
    expected = capture_ami("ami-1-cut-by-limit.txt")[:3]
    assert reader.data.startswith(b"Asterisk Call Manager/9.0.0\r\nResponse: Success\r\nActionID: 1\r\n"
                                  b"Message: Authentication accepted\r\n\r\n")
    assert [keys(m) for m in msgs[:3]] == [keys(m) for m in expected]
    assert get(msgs[2], "AccountID") == "billing" and get(msgs[2], "LocalAddress").endswith(f"/{fake.ami_port}")
    reader.close()


def test_wrong_secret_and_refused_logins(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make()
    reader = AmiReader(fake.ami_port, login=False)
    reader.send("Action: Ping\r\nActionID: p\r\n\r\n")
    assert reader.response("p") == [("Response", "Error"), ("ActionID", "p"), ("Message", "Permission denied")]
    reader.send("Action: Login\r\nActionID: 9\r\nUsername: billing\r\nSecret: nope\r\n\r\n")
    assert reader.closed.wait(3)
    assert reader.data.endswith(b"Response: Error\r\nActionID: 9\r\nMessage: Authentication failed\r\n\r\n")
    fake.refuse_logins(True)
    refused = AmiReader(fake.ami_port, login=False)
    refused.send("Action: Login\r\nActionID: 1\r\nUsername: billing\r\nSecret: secret\r\n\r\n")
    assert refused.closed.wait(3) and b"Authentication failed" in refused.data
    assert fake.logins_refused == 2


def test_ping_unknown_action_events_logoff(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make()
    reader = AmiReader(fake.ami_port, action_id="login-1")
    reader.send("Action: Ping\r\nActionID: p-1\r\n\r\n")
    pong = reader.response("p-1")
    captured = next(m for m in capture_ami("ami-3-actions-live-call.txt") if get(m, "ActionID") == "p-1")
    assert keys(pong) == keys(captured) and get(pong, "Ping") == "Pong"
    reader.send("Action: QueueStatus\r\nActionID: q\r\n\r\n")
    assert reader.response("q") == [("Response", "Error"), ("ActionID", "q"), (
        "Message", "Invalid/unknown command: QueueStatus. Use Action: ListCommands to show available commands.")]
    reader.send("Action: Events\r\nActionID: e\r\nEventMask: off\r\n\r\n")
    assert reader.response("e") == [("Response", "Success"), ("ActionID", "e"), ("Events", "Off")]
    reader.send("Action: Logoff\r\nActionID: lo-1\r\n\r\n")
    assert reader.closed.wait(3)
    assert reader.data.endswith(b"Response: Goodbye\r\nActionID: lo-1\r\nMessage: Thanks for all the fish.\r\n\r\n")


def test_event_mask_of_the_login(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(100))
    reader = AmiReader(fake.ami_port, events="call,cdr")
    call = fake.place_call("1001", "3312", talk_ms=10)
    assert call.done.wait(5)
    ended(reader, call)
    names = {get(m, "Event") for m in reader.messages()}
    assert "Hangup" in names and "Cdr" in names
    assert not names & {"VarSet", "Newexten", "AGIExecStart", "FullyBooted", "SuccessfulAuth"}
    reader.close()


# ------------------------------------------------------------------------------------ calls against the captures


def test_cut_by_limit_matches_ami_1(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(300), tech="SIP")
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "12125551234", caller="1001", ring=False, talk_ms=5000)
    assert call.done.wait(5)
    ended(reader, call)
    assert fake_shape(reader, call) == capture_shape("ami-1-cut-by-limit.txt")
    # Ended by the callee's hangup time (Dial's L(x) without a warning), in the order of ami-1 and of
    # fixtures/captures/asterisk-*/ami-backstop.txt: the callee leaves first, both cause 16.
    assert (call.outcome, call.cut_by, call.hangup_cause, call.b_hangup_cause) == ("cut", "backstop", 16, 16)
    assert 0.29 <= call.talk_s < 1.0 and call.billsec == 0
    reader.close()


def test_caller_hangup_matches_ami_2(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000), tech="SIP")
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1002", "442071234567", caller="1002", ring=False, talk_ms=100)
    assert call.done.wait(5)
    ended(reader, call)
    assert fake_shape(reader, call) == capture_shape("ami-2-caller-hangs-up.txt")
    assert call.outcome == "answered" and call.hangup_cause == 16
    reader.close()


def test_busy_matches_ami_4(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000), tech="SIP")
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1004", "13105551234", caller="1004", ring=False, busy=True)
    assert call.done.wait(5)
    ended(reader, call)
    assert fake_shape(reader, call) == capture_shape("ami-4-busy.txt")
    assert (call.outcome, call.dial_status, call.hangup_cause, call.billsec) == ("busy", "BUSY", 17, 0)
    reader.close()


def test_captured_events_keep_their_header_order_with_dialplan_events(
        make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    """Every event type the fake shares with the captures has the captured header names, in order."""
    fake, _ = make(allow(200), tech="SIP")
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "12125551234", caller="1001", ring=False, talk_ms=5000)
    busy = fake.place_call("1004", "13105551234", caller="1004", ring=False, busy=True)
    assert call.done.wait(5) and busy.done.wait(5)
    ended(reader, call, busy)
    captured: dict[str, list[str]] = {}
    for name in ("ami-1-cut-by-limit.txt", "ami-4-busy.txt", "ami-5-exec-dial-in-agi.txt"):
        for m in capture_ami(name):
            captured.setdefault(get(m, "Event"), keys(m))
    seen = set()
    for m in reader.messages():
        name = get(m, "Event")
        if name in captured:
            assert keys(m) == captured[name], name
            seen.add(name)
    assert seen >= {"Newchannel", "VarSet", "Newexten", "AGIExecStart", "AGIExecEnd", "DialBegin", "DialEnd",
                    "BridgeEnter", "BridgeLeave", "Hangup", "Cdr", "SoftHangupRequest", "DeviceStateChange"}
    reader.close()


def test_actions_on_a_live_call_match_ami_3(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000), tech="SIP")
    reader = AmiReader(fake.ami_port, action_id="login-1")
    call = fake.place_call("1003", "33612345678", caller="1003", ring=False, talk_ms=5000)
    reader.wait_for(lambda ms: sum(get(m, "Event") == "BridgeEnter" for m in ms) == 2)
    captured = capture_ami("ami-3-actions-live-call.txt")

    def captured_for(action_id: str) -> list[Message]:
        return [m for m in captured if get(m, "ActionID") == action_id]

    a = fake.find_channel(call.a_uniqueid)
    b = fake.find_channel(call.b_uniqueids[0])
    assert a is not None and b is not None
    reader.send("Action: CoreShowChannels\r\nActionID: csc-1\r\n\r\n")
    msgs = reader.wait_for(lambda ms: any(get(m, "Event") == "CoreShowChannelsComplete" for m in ms))
    listing = [m for m in msgs if get(m, "ActionID") == "csc-1"]
    expected = captured_for("csc-1")
    assert [keys(m) for m in listing] == [keys(m) for m in expected[:3]] + [keys(m) for m in expected[5:]]
    assert [get(m, "Application") for m in listing[1:3]] == ["Dial", "AppDial"]
    assert get(listing[1], "BridgeId") == get(listing[2], "BridgeId") != ""
    assert get(listing[-1], "ListItems") == "2"

    reader.send(f"Action: Getvar\r\nActionID: gv-1\r\nChannel: {a.name}\r\nVariable: SIPCALLID\r\n\r\n"
                f"Action: Getvar\r\nActionID: gv-2\r\nChannel: {b.uniqueid}\r\nVariable: SIPCALLID\r\n\r\n")
    for action_id in ("gv-1", "gv-2"):
        got = reader.response(action_id)
        assert keys(got) == keys(captured_for(action_id)[0]) and get(got, "Value")
    assert get(reader.response("gv-1"), "Value") == a.call_id

    reader.send("Action: Status\r\nActionID: st-1\r\n\r\n")
    msgs = reader.wait_for(lambda ms: any(get(m, "Event") == "StatusComplete" for m in ms))
    status = [m for m in msgs if get(m, "ActionID") == "st-1"]
    expected = captured_for("st-1")
    assert [keys(m) for m in status] == [keys(m) for m in expected[:3]] + [keys(m) for m in expected[5:]]
    assert int(get(status[2], "TimeToHangup")) > 0 and get(status[1], "TimeToHangup") == "0"

    before = len(reader.messages())
    reader.send(f"Action: Hangup\r\nActionID: hu-1\r\nChannel: {a.name}\r\nCause: 16\r\n\r\n")
    assert reader.response("hu-1") == captured_for("hu-1")[0]
    assert call.done.wait(3)
    ended(reader, call)
    after = [m for m in reader.messages()[before:] if get(m, "Event")]
    start = next(i for i, m in enumerate(captured) if get(m, "ActionID") == "hu-1")
    stop = next(i for i, m in enumerate(captured) if get(m, "ActionID") == "hu-2")
    a_name, b_name = "SIP/127.0.0.1-0000000a", "SIP/carrier-0000000b"
    assert shape(after, a.name, [b.name]) == shape(captured[start + 1:stop], a_name, [b_name])
    assert (call.outcome, call.cut_by, call.hangup_cause) == ("cut", "ami", 16)

    reader.send("Action: Hangup\r\nActionID: hu-2\r\nChannel: SIP/nobody-00000000\r\n\r\n")
    assert reader.response("hu-2") == captured_for("hu-2")[0]
    reader.close()


def test_hangup_by_uniqueid_with_a_cause(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000))
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "3312", talk_ms=5000)
    reader.wait_for(lambda ms: sum(get(m, "Event") == "BridgeEnter" for m in ms) == 2)
    b = fake.find_channel(call.b_uniqueids[0])
    assert b is not None and b.name.startswith("PJSIP/carrier-")
    reader.send(f"Action: Getvar\r\nActionID: g1\r\nChannel: {b.name}\r\nVariable: CHANNEL(pjsip,call-id)\r\n\r\n"
                "Action: Getvar\r\nActionID: g2\r\nChannel: PJSIP/gone-00000001\r\nVariable: SIPCALLID\r\n\r\n")
    assert reader.response("g1") == [("Response", "Success"), ("ActionID", "g1"),
                                     ("Variable", "CHANNEL(pjsip,call-id)"), ("Value", b.call_id)]
    assert reader.response("g2") == [("Response", "Error"), ("ActionID", "g2"), ("Message", "No such channel")]
    reader.send(f"Action: Hangup\r\nActionID: h\r\nChannel: {call.a_uniqueid}\r\nCause: 17\r\n\r\n")
    assert get(reader.response("h"), "Message") == "Channel Hungup"
    assert call.done.wait(3)
    ended(reader, call)
    hangups = {get(m, "Uniqueid"): get(m, "Cause") for m in reader.messages() if get(m, "Event") == "Hangup"}
    assert hangups == {call.a_uniqueid: "17", call.b_uniqueids[0]: "17"}
    assert (call.outcome, call.cut_by, call.hangup_cause) == ("cut", "ami", 17)
    assert fake.live_channels() == []
    reader.close()


def test_ignored_hangups_leave_the_call_up(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000))
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "3312", talk_ms=400, ignore_ami_hangup=True)
    reader.wait_for(lambda ms: sum(get(m, "Event") == "BridgeEnter" for m in ms) == 2)
    reader.send(f"Action: Hangup\r\nActionID: h\r\nChannel: {call.b_uniqueids[0]}\r\n\r\n")
    assert get(reader.response("h"), "Message") == "Channel Hungup"
    assert len(fake.live_channels()) == 2
    assert call.done.wait(3)
    assert call.outcome == "answered" and call.talk_s >= 0.39
    reader.close()


def test_forks_first_answer_wins(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000))
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "3312", forks=2, talk_ms=50)
    assert call.done.wait(5)
    ended(reader, call)
    events = call_events(reader.messages(), call)
    winner, loser = call.b_uniqueids
    dial = [(get(m, "Event"), get(m, "DestUniqueid"), get(m, "DialStatus")) for m in events
            if get(m, "Event") in ("DialBegin", "DialState", "DialEnd")]
    assert dial == [("DialBegin", winner, ""), ("DialBegin", loser, ""), ("DialState", winner, "RINGING"),
                    ("DialState", loser, "RINGING"), ("DialEnd", winner, "ANSWER"), ("DialEnd", loser, "CANCEL")]
    hangups = [(get(m, "Uniqueid"), get(m, "Cause"), get(m, "Cause-txt"))
               for m in events if get(m, "Event") == "Hangup"]
    assert hangups[0] == (loser, "26", "Answered elsewhere")
    entered = [get(m, "Uniqueid") for m in events if get(m, "Event") == "BridgeEnter"]
    assert entered == [winner, call.a_uniqueid]
    assert {get(m, "Linkedid") for m in events if get(m, "Linkedid")} == {call.a_uniqueid}
    assert call.outcome == "answered"
    reader.close()


def test_no_answer_callee_hangup_and_warning(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(300, warn_ms=100))
    reader = AmiReader(fake.ami_port)
    unanswered = fake.place_call("1001", "3312", no_answer=True, answer_after_ms=60)
    by_callee = fake.place_call("1001", "3313", hangup_by="callee", talk_ms=50)
    warned = fake.place_call("1001", "3314", talk_ms=5000)
    assert fake.wait_idle(5)
    ended(reader, *fake.calls)
    assert (unanswered.outcome, unanswered.dial_status) == ("no_answer", "NOANSWER")
    assert by_callee.outcome == "answered" and by_callee.warnings == 0
    first = [get(m, "Event") for m in call_events(reader.messages(), by_callee)
             if get(m, "Event") in ("HangupRequest", "BridgeLeave")]
    assert first[0] == "HangupRequest"
    assert warned.outcome == "cut" and warned.warnings == 1
    assert 180 <= warned.warned_ms - warned.answered_ms < 300
    reader.close()


def test_zero_limit_fails_the_dial(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    """``L(0)``: "Bridge does not accept L(0), hanging up" (features.c): Dial fails, nothing rings.
    The agent never sends it (agent/adapters/asterisk/adapter.py: at least 1 ms)."""
    fake, _ = make(allow(0))
    call = fake.place_call("1001", "3312")
    assert call.done.wait(5)
    assert call.outcome == "refused" and not call.b_uniqueids


# ------------------------------------------------------------------------------------ faults


def test_dropped_ami_and_injected_garbage(make: Callable[..., tuple[FakeAsterisk, AgiAgent]]) -> None:
    fake, _ = make(allow(60000))
    reader = AmiReader(fake.ami_port)
    fake.inject_ami(b"garbage without a colon\r\n\r\n")
    reader.wait_for(lambda ms: any(keys(m) == ["garbage without a colon"] for m in ms))
    call = fake.place_call("1001", "3312", talk_ms=200)
    reader.wait_for(lambda ms: any(get(m, "Event") == "BridgeEnter" for m in ms))
    fake.drop_ami_connections()
    assert reader.closed.wait(2)
    assert call.done.wait(3) and call.outcome == "answered"
    again = AmiReader(fake.ami_port)
    assert fake.live_sessions() == 1
    fake.stall_ami(0.3)
    again.send("Action: Ping\r\nActionID: p\r\n\r\n")
    gevent.sleep(0.1)
    assert not any(get(m, "ActionID") == "p" for m in again.messages())  # a stalled link answers nothing
    again.close()


# ------------------------------------------------------------------------------------ the new real captures

RECORDED = Path(__file__).resolve().parent / "fixtures" / "captures"


def recorded_shape(folder: str, name: str) -> list[tuple[str, ...]]:
    raw = (RECORDED / folder / name).read_bytes()
    msgs = parse_ami(raw[raw.index(b"\r\n") + 2:])
    a = next(get(m, "Channel") for m in msgs if get(m, "Event") == "Newchannel")
    bs = {get(m, "Channel") for m in msgs if get(m, "Event") == "Newchannel" and "carrier" in get(m, "Channel")}
    linked = [m for m in msgs if get(m, "Event") and get(m, "Event") not in (
        "FullyBooted", "SuccessfulAuth", "CEL", "NewConnectedLine", "NewCallerid", "RTCPSent", "RTCPReceived")
        and not get(m, "ActionID")]
    return [item for item in shape(linked, a, bs) if item[0] != "Cdr"]


@pytest.mark.parametrize(("folder", "tech"), [("asterisk-22.10.1-pjsip", "PJSIP"), ("asterisk-20.20.1-pjsip", "PJSIP")])
def test_a_call_ended_by_its_backstop_matches_the_real_asterisk(
        make: Callable[..., tuple[FakeAsterisk, AgiAgent]], folder: str, tech: str) -> None:
    """Recorded from a real Asterisk (tests/realpbx/record.py): the callee's hangup time, set by
    Dial's L(x) at its answer, ends the call; the fake writes the same events in the same order."""
    fake, agent = make(allow(300), tech=tech)
    reader = AmiReader(fake.ami_port)
    call = fake.place_call("1001", "12125551234", caller="1001", ring=False, talk_ms=5000)
    assert call.done.wait(5)
    ended(reader, call)
    # BridgeDestroy races the callee's Hangup (20.20 and 22.10 differ): where it falls says nothing.
    skip = {"Cdr", "NewConnectedLine", "NewCallerid", "BridgeDestroy"}
    got = [item for item in fake_shape(reader, call) if item[0] not in skip]
    want = [item for item in recorded_shape(folder, "ami-backstop.txt") if item[0] not in skip]
    assert [(e[0], e[1]) for e in got] == [(e[0], e[1]) for e in want]
    assert call.cut_by == "backstop" and 0.29 <= call.talk_s < 1.0
    reader.close()
