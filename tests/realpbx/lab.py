"""A real PBX on loopback, real SIP calls, the real agent: the harness of tests/realpbx and
bench/bench_realpbx.py.

* The PBX is an installed Asterisk (``ASTERISK_HOME``: one prefix or several separated by ``:``,
  each holding ``sbin/asterisk``; chan_sip and/or chan_pjsip are used when their module is
  there) or FreeSWITCH (``FREESWITCH_HOME``: ``bin/freeswitch``). Nothing is installed or
  downloaded: the lab writes a minimal private configuration in a temporary folder (ports of
  its own, 127.0.0.1 only) that includes the shipped ``dialplan/`` files as an admin would.
* A carrier is a ``sipp`` UAS that answers at once (numbers starting 486 get 486 Busy, 503 get
  503, 408 ring until cancelled); customers are ``sipp`` UACs whose calls come from the account
  (the From user) to a number, held for a while, hung up by the caller unless the PBX hangs
  up first; one scenario transfers the answered call (SIP REFER) to extension 2000.
* The agent is ``billing-agent run`` in a subprocess with its own YAML; rates, accounts, CDRs
  and the ledger check go through the ``billing-agent`` CLI, as an operator's would.

Everything a test needs to say what happened is read back from the agent's CDRs, sipp's logs
and the PBX's own records; nothing here asserts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DIALPLAN = REPO / "dialplan"
AMI_USER = "billing"
AMI_SECRET = "lab-secret-0123456789"
RECORDER_USER = "recorder"  # read = all: tests/realpbx/record.py records transcripts with it
RECORDER_SECRET = "recorder-secret-0123456789"
ESL_PASSWORD = "lab-ClueCon"
TRANSFER_TARGET = "2000"  # an extension that answers and waits: where the REFER scenario sends the call
STATIC_PREFIX = "0000"  # numbers behind it are dialled without the agent (the post-dial-delay baseline)
NO_ACCOUNT_PREFIX = "0001"  # numbers behind it enter billing-outbound without an account code


class LabError(Exception):
    """The lab could not be set up (the message says what to fix)."""


# ------------------------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class PbxBuild:
    kind: str  # "asterisk" | "freeswitch"
    home: Path
    version: str
    driver: str  # "SIP" | "PJSIP" (Asterisk channel drivers) | "sofia"

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.version}-{self.driver}"

    def has_module(self, name: str) -> bool:
        """A loadable module of this build (``mod_cdr_csv``, ``cdr_custom``...): a build made with
        only some modules lacks the others, and a test that needs one says so instead of failing
        on a missing file."""
        folder = (self.home / "lib" / "freeswitch" / "mod" if self.kind == "freeswitch"
                  else self.home / "lib" / "asterisk" / "modules")
        return (folder / f"{name}.so").is_file()


def _version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else ""


def discover() -> tuple[list[PbxBuild], list[str]]:
    """The PBX builds the environment points at, and why others were left out."""
    builds: list[PbxBuild] = []
    notes: list[str] = []
    if shutil.which("sipp") is None:
        return [], ["sipp is not installed (Debian package sip-tester)"]
    for raw in filter(None, os.environ.get("ASTERISK_HOME", "").split(":")):
        home = Path(raw)
        binary = home / "sbin" / "asterisk"
        if not binary.is_file():
            notes.append(f"ASTERISK_HOME entry {home}: no sbin/asterisk")
            continue
        version = _version([str(binary), "-V"])
        modules = home / "lib" / "asterisk" / "modules"
        drivers = [name for name, module in (("SIP", "chan_sip.so"), ("PJSIP", "chan_pjsip.so"))
                   if (modules / module).is_file()]
        if not drivers:
            notes.append(f"Asterisk {version} at {home}: neither chan_sip nor chan_pjsip is built")
        builds += [PbxBuild("asterisk", home, version, driver) for driver in drivers]
    raw_fs = os.environ.get("FREESWITCH_HOME", "")
    if raw_fs:
        home = Path(raw_fs)
        binary = home / "bin" / "freeswitch"
        if binary.is_file():
            builds.append(PbxBuild("freeswitch", home, _version([str(binary), "-version"]), "sofia"))
        else:
            notes.append(f"FREESWITCH_HOME {home}: no bin/freeswitch")
    if not builds and not notes:
        notes.append("no PBX: set ASTERISK_HOME (an Asterisk 20/22 prefix, several joined by ':') and/or "
                     "FREESWITCH_HOME (a FreeSWITCH prefix) to run the real-PBX suite")
    return builds, notes


# ------------------------------------------------------------------------------------ ports


_taken: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free for TCP and UDP, never handed out twice by this process."""
    while True:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as check:
                check.bind(("127.0.0.1", port))
        except OSError:
            continue
        if port not in _taken and port + 1 not in _taken:
            _taken.add(port)
            return port


def rtp_base() -> int:
    """The start of an even RTP range of 4,000 ports (200 calls at once need 800 or more)."""
    import random

    return random.Random().randrange(20_000, 50_000, 2)


def wait_port(port: int, timeout_s: float, process: subprocess.Popen[Any] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LabError(f"{what or 'the process'} exited with {process.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise LabError(f"{what or 'nothing'} listening on 127.0.0.1:{port} after {timeout_s}s")


def stop_process(process: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# ------------------------------------------------------------------------------------ sipp


SDP = """v=0
o=user1 53655765 2353687637 IN IP4 [local_ip]
s=-
c=IN IP4 [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""
FAILURE_CODES = (403, 404, 480, 484, 486, 487, 488, 500, 502, 503, 603, 408, 410, 500)


def _msg(text: str) -> str:
    """A SIP message block of a scenario (sipp fills [len] and the line ends)."""
    return "<![CDATA[\n" + "\n".join(line.strip() for line in text.strip().splitlines()) + "\n\n]]>"


def _msg_sdp(text: str) -> str:
    return "<![CDATA[\n" + "\n".join(line.strip() for line in text.strip().splitlines()) + "\n\n" + SDP + "]]>"


def customer_scenario(hold_ms: int, *, refer_after_ms: int = 0) -> str:
    """The customer's UAC: INVITE sip:<number> from <account>, then hold ``hold_ms`` and BYE
    unless the PBX hangs up first (the agent's cut). With ``refer_after_ms``: REFER the answered
    call to extension 2000 after that long (a blind transfer) and leave. Log lines (one per
    event, ``tick`` = sipp's ms clock): ``invite``, ``answered``, ``final <code>``, ``bye_in``,
    ``bye_out``, ``refer <code>``."""
    head = """Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
              From: "[field0]" <sip:[field0]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
              To: <sip:[field1]@[remote_ip]:[remote_port]>[peer_tag_param]
              Call-ID: [call_id]"""
    failures = "\n".join(
        f'  <recv response="{code}" optional="true" next="failed"><action>'
        f'<log message="final [call_number] {code} [clock_tick]"/></action></recv>' for code in FAILURE_CODES)
    if refer_after_ms:
        talk = f"""
  <pause milliseconds="{refer_after_ms}"/>
  <send retrans="500">{_msg(f'''
      REFER sip:[field1]@[remote_ip]:[remote_port] SIP/2.0
      {head}
      CSeq: 3 REFER
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Refer-To: <sip:{TRANSFER_TARGET}@[remote_ip]:[remote_port]>
      Referred-By: <sip:[field0]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0''')}</send>
  <recv response="202" optional="true" next="referred"/>
  <recv response="200" optional="true" next="referred"/>
  <recv response="403" next="hangup"><action><log message="refer [call_number] 403 [clock_tick]"/></action></recv>
  <label id="referred"/>
  <nop><action><log message="refer [call_number] 202 [clock_tick]"/></action></nop>
  <label id="notify"/>
  <recv request="BYE" optional="true" next="byein"/>
  <recv request="NOTIFY" timeout="4000" ontimeout="hangup"/>
  <send>{_msg('''
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0''')}</send>
  <nop next="notify"/>"""
    else:
        talk = f"""
  <recv request="BYE" timeout="{hold_ms}" ontimeout="hangup" next="byein"/>"""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="billing customer">
  <nop><action><log message="invite [call_number] [call_id] [field0] [field1] [clock_tick]"/></action></nop>
  <send retrans="500">{_msg_sdp(f'''
      INVITE sip:[field1]@[remote_ip]:[remote_port] SIP/2.0
      {head.replace("[peer_tag_param]", "")}
      CSeq: 1 INVITE
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]''')}</send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
{failures}
  <recv response="200" rrs="true"><action><log message="answered [call_number] [clock_tick]"/></action></recv>
  <send>{_msg('''
      ACK sip:[field1]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "[field0]" <sip:[field0]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field1]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0''')}</send>
{talk}
  <label id="hangup"/>
  <nop><action><log message="bye_out [call_number] [clock_tick]"/></action></nop>
  <send retrans="500">{_msg(f'''
      BYE sip:[field1]@[remote_ip]:[remote_port] SIP/2.0
      {head}
      CSeq: 2 BYE
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0''')}</send>
  <recv response="200" optional="true" next="end"/>
  <recv response="481" next="end"/>
  <label id="byein"/>
  <nop><action><log message="bye_in [call_number] [clock_tick]"/></action></nop>
  <send>{_msg('''
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0''')}</send>
  <nop next="end"/>
  <label id="failed"/>
  <send>{_msg('''
      ACK sip:[field1]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      From: "[field0]" <sip:[field0]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0''')}</send>
  <label id="end"/>
  <timewait milliseconds="200"/>
</scenario>
"""


def congested_carrier_scenario() -> str:
    """A carrier that is down or full: every INVITE is answered 503 (the PBX tries the next route)."""
    reply = _msg('''
        SIP/2.0 503 Service Unavailable
        [last_Via:]
        [last_From:]
        [last_To:];tag=[pid]SIPpTag01[call_number]
        [last_Call-ID:]
        [last_CSeq:]
        Content-Length: 0''')
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="congested carrier">
  <recv request="INVITE" crlf="true">
    <action><log message="invite [call_id] [clock_tick]"/></action>
  </recv>
  <send>{reply}</send>
  <recv request="ACK"/>
</scenario>
"""


def carrier_scenario() -> str:
    """The carrier's UAS: answers at once; 486..., 503..., 408... numbers fail as named. It
    never hangs up itself (the caller, the PBX or the agent do); re-INVITEs are accepted."""
    ok = _msg('''
        SIP/2.0 200 OK
        [last_Via:]
        [last_From:]
        [last_To:]
        [last_Call-ID:]
        [last_CSeq:]
        Content-Length: 0''')

    def fail(code: int, text: str) -> str:
        return _msg(f'''
            SIP/2.0 {code} {text}
            [last_Via:]
            [last_From:]
            [last_To:];tag=[pid]SIPpTag01[call_number]
            [last_Call-ID:]
            [last_CSeq:]
            Content-Length: 0''')

    answer = _msg_sdp('''
        SIP/2.0 200 OK
        [last_Via:]
        [last_From:]
        [last_To:];tag=[pid]SIPpTag01[call_number]
        [last_Call-ID:]
        [last_CSeq:]
        Contact: <sip:carrier@[local_ip]:[local_port];transport=[transport]>
        Content-Type: application/sdp
        Content-Length: [len]''')
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="carrier">
  <recv request="INVITE" crlf="true">
    <action>
      <ereg regexp="^INVITE sip:486" search_in="msg" check_it="false" assign_to="busy"/>
      <ereg regexp="^INVITE sip:503" search_in="msg" check_it="false" assign_to="congested"/>
      <ereg regexp="^INVITE sip:408" search_in="msg" check_it="false" assign_to="silent"/>
      <log message="invite [call_id] [clock_tick]"/>
    </action>
  </recv>
  <nop next="busy" test="busy"/>
  <nop next="congested" test="congested"/>
  <nop next="silent" test="silent"/>
  <send>{answer}</send>
  <recv request="ACK"/>
  <label id="up"/>
  <recv request="INVITE" optional="true" next="reinvite"/>
  <recv request="BYE" timeout="3600000"/>
  <send>{ok}</send>
  <nop next="end"><action><log message="bye [call_id] [clock_tick]"/></action></nop>
  <label id="reinvite"/>
  <send>{answer}</send>
  <recv request="ACK"/>
  <nop next="up"/>
  <label id="busy"/>
  <send>{fail(486, "Busy Here")}</send>
  <recv request="ACK"/>
  <nop next="end"/>
  <label id="congested"/>
  <send>{fail(503, "Service Unavailable")}</send>
  <recv request="ACK"/>
  <nop next="end"/>
  <label id="silent"/>
  <send>{fail(180, "Ringing")}</send>
  <recv request="CANCEL" timeout="120000"/>
  <send>{ok}</send>
  <send>{fail(487, "Request Terminated")}</send>
  <recv request="ACK"/>
  <label id="end"/>
</scenario>
"""


@dataclass
class SippCall:
    number: int
    call_id: str = ""
    account: str = ""
    destination: str = ""
    invite_tick: int = 0
    answered_tick: int | None = None
    final_code: int | None = None
    bye_in_tick: int | None = None
    bye_out_tick: int | None = None
    refer_code: int | None = None

    @property
    def post_dial_delay_ms(self) -> int | None:
        return None if self.answered_tick is None else self.answered_tick - self.invite_tick

    @property
    def hung_up_by_pbx(self) -> bool:
        return self.bye_in_tick is not None


def parse_customer_log(path: Path) -> dict[int, SippCall]:
    calls: dict[int, SippCall] = {}
    if not path.exists():
        return calls
    for line in path.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) < 3 or not words[1].isdigit():
            continue
        tag, number = words[0], int(words[1])
        call = calls.setdefault(number, SippCall(number))
        tick = int(words[-1]) if words[-1].isdigit() else 0
        if tag == "invite" and len(words) >= 6:
            call.call_id, call.account, call.destination, call.invite_tick = words[2], words[3], words[4], tick
        elif tag == "answered":
            call.answered_tick = tick
        elif tag == "final":
            call.final_code = int(words[2])
        elif tag == "bye_in":
            call.bye_in_tick = tick
        elif tag == "bye_out":
            call.bye_out_tick = tick
        elif tag == "refer":
            call.refer_code = int(words[2])
    return calls


class Carrier:
    """A sipp UAS on a port of its own, for as long as the lab runs."""

    def __init__(self, folder: Path, name: str = "carrier", *, congested: bool = False) -> None:
        self.folder = folder
        self.name = name  # the PBX's trunk (endpoint, peer, gateway) to this carrier
        self.congested = congested  # every INVITE answered 503
        self.port = free_port(socket.SOCK_DGRAM)
        self.media_port = free_port(socket.SOCK_DGRAM)
        self.scenario = folder / f"{name}.xml"
        self.log = folder / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Carrier:
        self.scenario.write_text(congested_carrier_scenario() if self.congested else carrier_scenario())
        self.process = subprocess.Popen(
            ["sipp", "-sf", str(self.scenario), "-i", "127.0.0.1", "-p", str(self.port), "-mi", "127.0.0.1",
             "-mp", str(self.media_port), "-nostdin", "-aa", "-trace_logs", "-log_file", str(self.log),
             "-trace_err", "-error_file", str(self.folder / f"{self.name}-errors.log"), "-max_recv_loops", "10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.folder)
        time.sleep(0.3)
        if self.process.poll() is not None:
            raise LabError(f"sipp carrier exited with {self.process.returncode}")
        return self

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, 5)

    def invited_call_ids(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line.split()[1] for line in self.log.read_text(errors="replace").splitlines()
                if line.startswith("invite ") and len(line.split()) >= 3]


def run_customers(folder: Path, pbx_port: int, calls: Sequence[tuple[str, str]], *, hold_ms: int,
                  rate_per_s: float = 10.0, refer_after_ms: int = 0, name: str = "customers",
                  timeout_s: float = 300.0, wait: bool = True) -> CustomerRun:
    """Place ``calls`` ((account, number) each) through the PBX with one sipp UAC process."""
    run = CustomerRun(folder, name, pbx_port, list(calls), hold_ms, rate_per_s, refer_after_ms, timeout_s)
    run.start()
    if wait:
        run.wait()
    return run


@dataclass
class CustomerRun:
    folder: Path
    name: str
    pbx_port: int
    calls: list[tuple[str, str]]
    hold_ms: int
    rate_per_s: float
    refer_after_ms: int
    timeout_s: float
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    result: dict[int, SippCall] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def stderr_path(self) -> Path:
        return self.folder / f"{self.name}-stderr.log"

    @property
    def errors_path(self) -> Path:
        return self.folder / f"{self.name}-errors.log"

    def start(self) -> None:
        scenario = self.folder / f"{self.name}.xml"
        scenario.write_text(customer_scenario(self.hold_ms, refer_after_ms=self.refer_after_ms))
        injection = self.folder / f"{self.name}.csv"
        injection.write_text("SEQUENTIAL\n" + "".join(f"{account};{number};\n" for account, number in self.calls))
        port, media_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        rate_per_min = max(1, round(self.rate_per_s * 60))  # -r N -rp 60000: fractional rates too
        self.started_at = time.monotonic()
        with self.stderr_path.open("wb") as stderr:  # sipp's own copy stays open; ours closes here
            self.process = subprocess.Popen(
                ["sipp", f"127.0.0.1:{self.pbx_port}", "-sf", str(scenario), "-inf", str(injection), "-i", "127.0.0.1",
                 "-p", str(port), "-mi", "127.0.0.1", "-mp", str(media_port), "-m", str(len(self.calls)),
                 "-r", str(rate_per_min), "-rp", "60000", "-l", "10000", "-nostdin", "-aa", "-trace_logs", "-log_file",
                 str(self.log), "-trace_err", "-error_file", str(self.errors_path),
                 "-timeout", f"{int(self.timeout_s)}s", "-timeout_error", "-max_recv_loops", "10000"],
                stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.folder)

    def wait(self) -> dict[int, SippCall]:
        assert self.process is not None
        try:
            self.process.wait(self.timeout_s + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.result = parse_customer_log(self.log)
        # sipp that places no call at all (it could not bind, read its files...) says why only
        # in its own files: put that in the failure instead of a count of 0 further on.
        assert self.result or not self.calls, f"sipp {self.name} placed no call: {self.diagnosis()}"
        return self.result

    def diagnosis(self) -> str:
        assert self.process is not None
        tails = []
        for path in (self.stderr_path, self.errors_path):
            text = path.read_text(errors="replace").strip() if path.exists() else ""
            tails.append(f"{path.name}: {text[-800:] or '(empty)'}")
        return f"exit code {self.process.returncode}; " + "; ".join(tails)

    def answered_seen(self) -> int:
        return sum(1 for call in parse_customer_log(self.log).values() if call.answered_tick is not None)


# ------------------------------------------------------------------------------------ the PBXes


class Pbx:
    """One PBX process with a private configuration in ``folder``."""

    build: PbxBuild
    folder: Path
    sip_port: int
    process: subprocess.Popen[bytes] | None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def agent_settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def live_channels(self) -> int:
        raise NotImplementedError

    def trunk_of(self, name: str) -> str:
        """The trunk a carrier of that name is dialled by (``billing-agent carriers create --trunk``)."""
        raise NotImplementedError


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class AsteriskPbx(Pbx):
    def __init__(self, build: PbxBuild, folder: Path, carrier_port: int, agi_port: int, *,
                 ami_read: str = "", ami_write: str = "", extra_trunks: dict[str, int] | None = None) -> None:
        self.build = build
        self.folder = folder
        self.carrier_port = carrier_port
        self.extra_trunks = extra_trunks or {}  # trunk name -> the port of its carrier (routing tests)
        self.agi_port = agi_port
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.ami_port = free_port()
        self.rtp_start = rtp_base()
        self.ami_read = ami_read  # override the shipped rights (the "missing rights" tests)
        self.ami_write = ami_write
        self.process = None
        self.etc = folder / "etc"
        self._configure()

    @property
    def trunk(self) -> str:
        return f"{self.build.driver}/carrier"

    def trunk_of(self, name: str) -> str:
        return f"{self.build.driver}/{name}"

    def _configure(self) -> None:
        home, f = self.build.home, self.folder
        _write(self.etc / "asterisk.conf", f"""[directories]
astetcdir => {self.etc}
astmoddir => {home}/lib/asterisk/modules
astvarlibdir => {f}/var
astdbdir => {f}/var
astkeydir => {f}/var
astdatadir => {home}/var/lib/asterisk
astagidir => {f}/agi
astspooldir => {f}/spool
astrundir => {f}/run
astlogdir => {f}/log
astsbindir => {home}/sbin
[options]
nocolor = yes
verbose = 3
runuser = root
rungroup = root
""")
        skip_driver = "chan_pjsip.so" if self.build.driver == "SIP" else "chan_sip.so"
        noload = ["chan_alsa.so", "chan_oss.so", "chan_console.so", "chan_mgcp.so", "chan_skinny.so",
                  "chan_unistim.so", "chan_iax2.so", "chan_dahdi.so", "res_hep.so", "res_hep_rtcp.so",
                  "res_hep_pjsip.so", "cdr_radius.so", "cel_radius.so", "res_phoneprov.so",
                  "res_pjsip_phoneprov_provider.so", "res_stun_monitor.so", "res_pjsip_outbound_publish.so",
                  "res_xmpp.so", "chan_motif.so", skip_driver]
        if self.build.driver == "SIP":
            noload += ["res_pjsip.so"]
        _write(self.etc / "modules.conf", "[modules]\nautoload = yes\n" + "".join(f"noload => {m}\n" for m in noload))
        _write(self.etc / "logger.conf", "[general]\ndateformat = %F %T.%3q\n[logfiles]\n"
                                         "messages.log => notice,warning,error,verbose\n")
        _write(self.etc / "rtp.conf", f"[general]\nrtpstart = {self.rtp_start}\nrtpend = {self.rtp_start + 4000}\n")
        _write(self.etc / "cdr.conf", "[general]\nenable = yes\nunanswered = yes\n[csv]\nusegmtime = yes\n"
                                      "loguniqueid = yes\nloguserfield = yes\naccountlogs = no\n")
        shutil.copy(DIALPLAN / "asterisk" / "cdr_custom.conf", self.etc / "cdr_custom.conf")  # as shipped
        # The AMI user exactly as shipped, with the admin's secret (and, for a test, other rights).
        shipped = (DIALPLAN / "asterisk" / "manager_billing.conf").read_text()
        shipped = shipped.replace("secret = change-me-to-a-long-random-secret", f"secret = {AMI_SECRET}")
        if self.ami_read:
            shipped = re.sub(r"(?m)^read = .*$", f"read = {self.ami_read}", shipped)
        if self.ami_write:
            shipped = re.sub(r"(?m)^write = .*$", f"write = {self.ami_write}", shipped)
        _write(self.etc / "manager_billing.conf", shipped)
        _write(self.etc / "manager.conf", f"""[general]
enabled = yes
port = {self.ami_port}
bindaddr = 127.0.0.1
timestampevents = yes
#include manager_billing.conf

[{RECORDER_USER}]
secret = {RECORDER_SECRET}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = all
write = all
""")
        shutil.copy(DIALPLAN / "asterisk" / "extensions_billing.conf", self.etc / "extensions_billing.conf")
        dial_static = (f"PJSIP/${{EXTEN:{len(STATIC_PREFIX)}}}@carrier" if self.build.driver == "PJSIP"
                       else f"SIP/carrier/${{EXTEN:{len(STATIC_PREFIX)}}}")
        _write(self.etc / "extensions.conf", f"""[general]
static = yes
writeprotect = yes

[globals]
BILLING_AGENT=127.0.0.1:{self.agi_port}
BILLING_TRUNK={self.trunk}

[from-customer]
exten => _X.,1,Set(CHANNEL(accountcode)=${{CALLERID(num)}})
 same => n,Goto(billing-outbound,${{EXTEN}},1)
exten => _{STATIC_PREFIX}X.,1,Dial({dial_static},60)
 same => n,Hangup()
exten => _{NO_ACCOUNT_PREFIX}X.,1,Goto(billing-outbound,${{EXTEN:{len(NO_ACCOUNT_PREFIX)}}},1)
exten => {TRANSFER_TARGET},1,Answer()
 same => n,Wait(3600)
 same => n,Hangup()

[from-carrier]
exten => _X.,1,Hangup(21)

#include extensions_billing.conf
""")
        if self.build.driver == "SIP":
            _write(self.etc / "sip.conf", f"""[general]
context = from-customer
udpbindaddr = 127.0.0.1:{self.sip_port}
tcpenable = no
allowguest = yes
disallow = all
allow = ulaw
directmedia = no
sendrpid = no
trustrpid = no
rtptimeout = 0
allowtransfer = yes

[carrier]
type = peer
host = 127.0.0.1
port = {self.carrier_port}
context = from-carrier
insecure = invite
disallow = all
allow = ulaw
directmedia = no
""" + "".join(f"""
[{name}]
type = peer
host = 127.0.0.1
port = {port}
context = from-carrier
insecure = invite
disallow = all
allow = ulaw
directmedia = no
""" for name, port in self.extra_trunks.items()))
        else:
            _write(self.etc / "pjsip.conf", f"""[global]
type = global
endpoint_identifier_order = ip,anonymous

[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{self.sip_port}

[anonymous]
type = endpoint
context = from-customer
disallow = all
allow = ulaw
transport = transport-udp
direct_media = no
send_connected_line = no
allow_transfer = yes

[carrier]
type = endpoint
context = from-carrier
disallow = all
allow = ulaw
transport = transport-udp
aors = carrier
direct_media = no
send_connected_line = no

[carrier]
type = aor
contact = sip:127.0.0.1:{self.carrier_port}
""" + "".join(f"""
[{name}]
type = endpoint
context = from-carrier
disallow = all
allow = ulaw
transport = transport-udp
aors = {name}
direct_media = no
send_connected_line = no

[{name}]
type = aor
contact = sip:127.0.0.1:{port}
""" for name, port in self.extra_trunks.items()))

    def start(self) -> None:
        for sub in ("var/keys", "agi", "spool", "run", "log/cdr-csv", "log/cdr-custom"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        out = open(self.folder / "asterisk.out", "ab")
        self.process = subprocess.Popen(
            [str(self.build.home / "sbin" / "asterisk"), "-f", "-n", "-C", str(self.etc / "asterisk.conf")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.folder)
        wait_port(self.ami_port, 30, self.process, f"Asterisk {self.build.version} AMI")
        self._wait_fully_booted()

    def _wait_fully_booted(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = self.cli("core waitfullybooted")
            if "fully booted" in out.lower():
                return
            time.sleep(0.2)
        raise LabError(f"Asterisk {self.build.version} did not finish booting")

    def cli(self, command: str, timeout_s: float = 15.0) -> str:
        result = subprocess.run(
            [str(self.build.home / "sbin" / "asterisk"), "-C", str(self.etc / "asterisk.conf"), "-rx", command],
            capture_output=True, text=True, timeout=timeout_s, check=False)
        return result.stdout + result.stderr

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.cli("core stop now", timeout_s=10)
        stop_process(self.process, signal.SIGTERM, 10)

    def kill(self) -> None:
        stop_process(self.process, signal.SIGKILL, 5)

    def agent_settings(self) -> dict[str, Any]:
        return {"asterisk": {"enabled": True, "agi_host": "127.0.0.1", "agi_port": self.agi_port,
                             "ami_host": "127.0.0.1", "ami_port": self.ami_port, "ami_username": AMI_USER,
                             "ami_secret": AMI_SECRET, "ami_ping_seconds": 5,
                             "cdr_file": str(self.folder / "log" / "cdr-custom" / "billing.csv")}}

    def live_channels(self) -> int:
        out = self.cli("core show channels count")
        match = re.search(r"(\d+) active channel", out)
        return int(match.group(1)) if match else -1

    def cdr_rows(self) -> list[list[str]]:
        """Asterisk's own CDRs (cdr_csv Master.csv)."""
        import csv

        path = self.folder / "log" / "cdr-csv" / "Master.csv"
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            return list(csv.reader(handle))


FS_CDR_TEMPLATE = ",".join(f'"${{{name}}}"' for name in (
    "uuid", "accountcode", "destination_number", "start_epoch", "answer_uepoch", "end_uepoch", "billsec",
    "hangup_cause", "sip_call_id"))


class FreeswitchPbx(Pbx):
    def __init__(self, build: PbxBuild, folder: Path, carrier_port: int, *,
                 extra_trunks: dict[str, int] | None = None) -> None:
        self.build = build
        self.folder = folder
        self.carrier_port = carrier_port
        self.extra_trunks = extra_trunks or {}  # gateway name -> the port of its carrier (routing tests)
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.esl_port = free_port()
        self.authorize_port = free_port()  # the agent's listener for billing.xml's socket application
        self.rtp_start = rtp_base()
        self.process = None
        self.conf = folder / "conf"
        self._configure()

    def trunk_of(self, name: str) -> str:
        return f"sofia/gateway/{name}"

    def _configure(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        extra_gateways = "".join(f"""
            <gateway name="{name}">
              <param name="proxy" value="127.0.0.1:{port}"/>
              <param name="register" value="false"/>
              <param name="caller-id-in-from" value="true"/>
            </gateway>""" for name, port in self.extra_trunks.items())
        shutil.copy(DIALPLAN / "freeswitch" / "billing.xml", self.folder / "billing.xml")
        socket_conf = (DIALPLAN / "freeswitch" / "event_socket.conf.xml").read_text()
        socket_conf = re.sub(r"<!--.*?-->", "", socket_conf, flags=re.S)
        socket_conf = socket_conf.replace('value="8021"', f'value="{self.esl_port}"')
        socket_conf = socket_conf.replace('name="password" value="ClueCon"', f'name="password" value="{ESL_PASSWORD}"')
        static = f"^{STATIC_PREFIX}(\\d+)$"
        no_account = f"^{NO_ACCOUNT_PREFIX}(\\d+)$"
        _write(self.conf / "freeswitch.xml", f"""<?xml version="1.0"?>
<document type="freeswitch/xml">
  <X-PRE-PROCESS cmd="set" data="billing_trunk=sofia/gateway/carrier"/>
  <X-PRE-PROCESS cmd="set" data="billing_transfer_context=from-customer"/>
  <X-PRE-PROCESS cmd="set" data="billing_agent=127.0.0.1:{self.authorize_port}"/>
  <section name="configuration">
    <configuration name="switch.conf">
      <settings>
        <param name="colorize-console" value="false"/>
        <param name="max-sessions" value="2000"/>
        <param name="sessions-per-second" value="200"/>
        <param name="loglevel" value="info"/>
        <param name="rtp-start-port" value="{self.rtp_start}"/>
        <param name="rtp-end-port" value="{self.rtp_start + 4000}"/>
        <param name="dump-cores" value="no"/>
      </settings>
    </configuration>
    <configuration name="modules.conf">
      <modules>
        <load module="mod_console"/>
        <load module="mod_logfile"/>
        <load module="mod_event_socket"/>
        <load module="mod_cdr_csv"/>
        <load module="mod_sofia"/>
        <load module="mod_commands"/>
        <load module="mod_dptools"/>
        <load module="mod_dialplan_xml"/>
        <load module="mod_sndfile"/>
        <load module="mod_tone_stream"/>
      </modules>
    </configuration>
    <configuration name="console.conf">
      <mappings><map name="all" value="console,debug,info,notice,warning,err,crit,alert"/></mappings>
      <settings><param name="colorize" value="false"/><param name="loglevel" value="warning"/></settings>
    </configuration>
    <configuration name="logfile.conf">
      <profiles><profile name="default">
        <settings><param name="rollover" value="104857600"/></settings>
        <mappings><map name="all" value="info,notice,warning,err,crit,alert"/></mappings>
      </profile></profiles>
    </configuration>
    {socket_conf}
    <configuration name="acl.conf">
      <network-lists>
        <list name="loopback_only" default="deny"><node type="allow" cidr="127.0.0.0/8"/></list>
      </network-lists>
    </configuration>
    <configuration name="cdr_csv.conf">
      <settings>
        <param name="default-template" value="lab"/>
        <param name="legs" value="ab"/>
      </settings>
      <templates>
        <template name="lab">{FS_CDR_TEMPLATE}</template>
      </templates>
    </configuration>
    <configuration name="sofia.conf">
      <global_settings><param name="log-level" value="0"/></global_settings>
      <profiles>
        <profile name="lab">
          <gateways>
            <gateway name="carrier">
              <param name="proxy" value="127.0.0.1:{self.carrier_port}"/>
              <param name="register" value="false"/>
              <param name="caller-id-in-from" value="true"/>
            </gateway>{extra_gateways}
          </gateways>
          <domains/>
          <settings>
            <param name="sip-ip" value="127.0.0.1"/>
            <param name="sip-port" value="{self.sip_port}"/>
            <param name="rtp-ip" value="127.0.0.1"/>
            <param name="ext-rtp-ip" value="127.0.0.1"/>
            <param name="ext-sip-ip" value="127.0.0.1"/>
            <param name="context" value="from-customer"/>
            <param name="dialplan" value="XML"/>
            <param name="auth-calls" value="false"/>
            <param name="apply-inbound-acl" value="loopback_only"/>
            <param name="inbound-codec-prefs" value="PCMU"/>
            <param name="outbound-codec-prefs" value="PCMU"/>
            <param name="manage-presence" value="false"/>
            <param name="send-display-update" value="false"/>
            <param name="rtp-timeout-sec" value="0"/>
            <param name="rtp-hold-timeout-sec" value="0"/>
          </settings>
        </profile>
      </profiles>
    </configuration>
  </section>
  <section name="dialplan">
    <context name="from-customer">
      <extension name="static-baseline">
        <condition field="destination_number" expression="{static}">
          <action application="bridge" data="sofia/gateway/carrier/$1"/>
        </condition>
      </extension>
      <extension name="forgot-the-account">
        <condition field="destination_number" expression="{no_account}">
          <action application="transfer" data="$1 XML billing-outbound"/>
        </condition>
      </extension>
      <extension name="transfer-target">
        <condition field="destination_number" expression="^{TRANSFER_TARGET}$">
          <action application="answer"/>
          <action application="sleep" data="3600000"/>
        </condition>
      </extension>
      <extension name="outbound">
        <condition field="destination_number" expression="^(\\d+)$">
          <action application="set" data="accountcode=${{caller_id_number}}"/>
          <action application="transfer" data="$1 XML billing-outbound"/>
        </condition>
      </extension>
    </context>
    <X-PRE-PROCESS cmd="include" data="{self.folder}/billing.xml"/>
  </section>
</document>
""")

    def _dirs(self) -> list[str]:
        args: list[str] = []
        for name in ("log", "db", "run", "temp", "storage", "cache", "recordings", "sounds"):
            path = self.folder / name
            path.mkdir(parents=True, exist_ok=True)
            args += [f"-{name}", str(path)]
        return args

    def start(self) -> None:
        out = open(self.folder / "freeswitch.out", "ab")
        self.process = subprocess.Popen(
            [str(self.build.home / "bin" / "freeswitch"), "-nonat", "-nonatmap", "-nc", "-nf", "-conf", str(self.conf),
             *self._dirs()], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.folder)
        wait_port(self.esl_port, 60, self.process, f"FreeSWITCH {self.build.version} event socket")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the profile is up when sofia says so
            if re.search(r"\blab\s+profile\s+\S+\s+RUNNING", self.cli("sofia status")):
                return
            time.sleep(0.2)
        raise LabError("FreeSWITCH's sofia profile did not start")

    def cli(self, command: str, timeout_s: float = 15.0) -> str:
        result = subprocess.run(
            [str(self.build.home / "bin" / "fs_cli"), "-H", "127.0.0.1", "-P", str(self.esl_port), "-p", ESL_PASSWORD,
             "-x", command], capture_output=True, text=True, timeout=timeout_s, check=False)
        return result.stdout + result.stderr

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, 20)

    def kill(self) -> None:
        stop_process(self.process, signal.SIGKILL, 5)

    def agent_settings(self) -> dict[str, Any]:
        return {"freeswitch": {"enabled": True, "host": "127.0.0.1", "port": self.esl_port,
                               "password": ESL_PASSWORD, "authorize_port": self.authorize_port,
                               # mod_cdr_csv's Master.csv with the lab's template: uuid, answer_uepoch, end_uepoch
                               "cdr_file": str(self.folder / "log" / "cdr-csv" / "Master.csv"), "cdr_columns": "1,5,6"}}

    def live_channels(self) -> int:
        out = self.cli("show channels count")
        match = re.search(r"(\d+) total", out)
        return int(match.group(1)) if match else -1


# ------------------------------------------------------------------------------------ the agent


class Agent:
    """``billing-agent run`` with its own configuration, and the operator's CLI on it."""

    def __init__(self, folder: Path, pbx_settings: dict[str, Any], *, database_url: str = "",
                 redis_url: str = "", nibble_seconds: int = 2, extra: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.status_port = free_port()
        self.database_url = database_url or f"sqlite:///{folder / 'billing.db'}"
        self.config_path = folder / "agent.yaml"
        self.log_path = folder / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        config: dict[str, Any] = {
            "database": {"url": self.database_url},
            "node": {"id": "lab1"},
            "billing": {"nibble_seconds": nibble_seconds, "hangup_verify_seconds": 3.0},
            "daemon": {"drain_seconds": 2.0, "publish_seconds": 0.5, "sweep_seconds": 1.0},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": self.status_port},
            "logging": {"level": "info"},
            "cdr": {"spool_dir": str(folder / "spool"), "flush_interval_ms": 100},
            **pbx_settings,
        }
        if redis_url:
            config["redis"] = {"url": redis_url, "key_prefix": f"lab{os.getpid()}{int(time.time() * 1000) % 10**6}:"}
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        import yaml

        self.config_path.write_text(yaml.safe_dump(config))
        self.exe = [sys.executable, "-m", "agent.entry"] if not shutil.which("billing-agent") else ["billing-agent"]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.exe, "--config", str(self.config_path), *args], capture_output=True, text=True,
                                timeout=120, check=False, cwd=self.folder)
        if check and result.returncode != 0:
            raise LabError(f"billing-agent {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def prepare(self, deck_csv: str, accounts: Sequence[tuple[str, str]], *, plan: str = "lab") -> None:
        """Schema, one rate plan from ``deck_csv`` and accounts ((id, balance) each)."""
        self.cli("db", "upgrade")
        deck = self.folder / "deck.csv"
        deck.write_text(deck_csv)
        self.cli("rates", "import", str(deck), "--plan", plan, "--create-plan")
        for account_id, balance in accounts:
            self.cli("accounts", "create", account_id, "--plan", plan, "--balance", balance)

    def start(self, *, wait_pbx: bool = True) -> None:
        out = open(self.log_path, "ab")
        self.process = subprocess.Popen([*self.exe, "--config", str(self.config_path), "run"], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.folder)
        wait_port(self.status_port, 30, self.process, "billing-agent status port")
        if wait_pbx:
            self.wait_healthy()

    def health(self) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/health", timeout=2) as reply:
                data: dict[str, Any] = json.loads(reply.read())
                return data
        except urllib.error.HTTPError as exc:
            data = json.loads(exc.read() or b"{}")
            return data
        except OSError:
            return {}

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.health().get("status") == "ok":
                return
            if self.process is not None and self.process.poll() is not None:
                raise LabError(f"billing-agent exited with {self.process.returncode}: see {self.log_path}")
            time.sleep(0.1)
        raise LabError(f"billing-agent not healthy after {timeout_s}s: {self.health()} (log {self.log_path})")

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, 30)

    def kill(self) -> None:
        stop_process(self.process, signal.SIGKILL, 5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cdrs(self, account: str | None = None) -> list[dict[str, Any]]:
        args = ["cdrs", "list", "--jsonl", "--limit", "100000"]
        if account:
            args += ["--account", account]
        out = self.cli(*args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def cdr(self, call_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("cdrs", "show", call_id, "--json").stdout)
        return data

    def wait_cdrs(self, count: int, account: str | None = None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        rows = self.cdrs(account)
        while len(rows) < count and time.monotonic() < deadline:
            time.sleep(0.3)
            rows = self.cdrs(account)
        return rows

    def ledger_check(self) -> tuple[bool, str]:
        result = self.cli("ledger", "check", "--json", check=False)
        return result.returncode == 0, result.stdout + result.stderr

    def balance(self, account: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("accounts", "show", account, "--json").stdout)
        return data


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop every started thing (agent, PBX, carrier) at the end, last started first."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()


# ------------------------------------------------------------------------------------ packet timing


class SipCapture:
    """``tcpdump`` of the PBX's SIP port on loopback: the wire instants of each INVITE and of the
    200 OK the PBX sends back (sipp's own clock ticks in steps of a few ms)."""

    def __init__(self, folder: Path, port: int, name: str) -> None:
        self.path = folder / f"{name}.pcap"
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("tcpdump") is not None and shutil.which("tshark") is not None

    def start(self) -> SipCapture:
        self.process = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-n", "-w", str(self.path),
                                         f"udp port {self.port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return self

    def stop(self) -> None:
        time.sleep(0.3)
        stop_process(self.process, signal.SIGINT, 5)

    def post_dial_delays_ms(self) -> list[float]:
        """Per call: the customer's INVITE arriving at the PBX to the PBX's 200 OK for it."""
        out = subprocess.run(
            ["tshark", "-r", str(self.path), "-d", f"udp.port=={self.port},sip", "-Y", "sip", "-T", "fields",
             "-e", "frame.time_epoch", "-e", "udp.dstport", "-e", "sip.Call-ID", "-e", "sip.Method",
             "-e", "sip.Status-Code", "-e", "sip.CSeq.method"],
            capture_output=True, text=True, timeout=120, check=False).stdout
        invites: dict[str, float] = {}
        answers: dict[str, float] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) < 6:
                continue
            at, dstport, call_id, method, status, cseq_method = parts[:6]
            if method == "INVITE" and dstport == str(self.port):
                invites.setdefault(call_id, float(at))
            elif status == "200" and cseq_method == "INVITE" and dstport != str(self.port):
                answers.setdefault(call_id, float(at))
        return [(answers[c] - invites[c]) * 1000 for c in invites if c in answers]
