"""Record raw AMI and FastAGI transcripts from a real Asterisk for the test fixtures.

    ASTERISK_HOME=/opt/asterisk-22 python -m tests.realpbx.record tests/fixtures/captures

For each Asterisk build and channel driver found (lab.discover), in a private lab: a FastAGI
server plays the agent (one ``EXEC MSet`` per call, as the agent does), an AMI client logged in
with ``read = all`` records every byte, and sipp places the calls. Scenarios:

* ``backstop``: allowed with ``BILLING_BACKSTOP_MS=2000``; nobody cuts: the callee's hangup
  time (set by the shipped dialplan's ``Dial(...,L(2000))`` at the answer) ends the call at 2 s.
* ``rearm``: the same, and 1 s after the answer AMI ``Setvar TIMEOUT(absolute)=2.500`` on the
  callee moves its end to 3.5 s; ``Getvar`` of each leg's SIP Call-ID.
* ``caller-hangs-up``: a 60 s backstop; the caller's BYE after 1.5 s.

Files: ``<label>/ami-<scenario>.txt`` (every byte the AMI socket sent, banner first) and
``<label>/agi-<scenario>.txt`` (``<<`` lines from Asterisk, ``>>`` lines from the recorder).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from tests.realpbx.lab import (
    RECORDER_SECRET,
    RECORDER_USER,
    AsteriskPbx,
    Carrier,
    discover,
    free_port,
    run_customers,
)

NUMBER = "12125551234"


class AgiRecorder:
    """A FastAGI server that answers each session with one MSet and records the exchange."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.backstop = "2.000"
        self.transcripts: list[str] = []
        self.server = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        lines: list[str] = []
        buffer = b""
        with conn:
            while b"\n\n" not in buffer:
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
            env, _, buffer = buffer.partition(b"\n\n")
            lines += [f"<< {line}" for line in env.decode().split("\n")] + ["<< "]
            backstop_ms = int(float(self.backstop) * 1000)
            command = (f'EXEC MSet "BILLING_LIMIT_MS={backstop_ms},'
                       f'BILLING_BACKSTOP_MS={backstop_ms},BILLING_DECISION=allow"')
            conn.sendall(command.encode() + b"\n")
            lines.append(f">> {command}")
            while b"\n" not in buffer:
                buffer += conn.recv(4096)
            reply = buffer.split(b"\n", 1)[0].decode()
            lines.append(f"<< {reply}")
        self.transcripts.append("\n".join(lines) + "\n")


class AmiRecorder:
    def __init__(self, port: int, events: str = "on") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.raw = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(f"Action: Login\r\nActionID: login-1\r\nUsername: {RECORDER_USER}\r\n"
                  f"Secret: {RECORDER_SECRET}\r\nEvents: {events}\r\n\r\n")

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.raw += data

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def text(self) -> str:
        with self.lock:
            return self.raw.decode(errors="replace")

    def close(self) -> bytes:
        time.sleep(0.5)
        self.send("Action: Logoff\r\nActionID: logoff-1\r\n\r\n")
        time.sleep(0.3)
        self.sock.close()
        with self.lock:
            return bytes(self.raw)


def channel_of(text: str, role: str) -> str:
    """The uniqueid of the caller's ("A") or the carrier's ("B") channel in a transcript."""
    for block in text.split("\r\n\r\n"):
        if "Event: Newchannel" in block:
            fields = dict(line.split(": ", 1) for line in block.split("\r\n") if ": " in line)
            is_carrier = "carrier" in fields.get("Channel", "")
            if (role == "B") == is_carrier:
                return fields["Uniqueid"]
    return ""


def record(out: Path) -> int:
    builds, notes = discover()
    builds = [b for b in builds if b.kind == "asterisk"]
    if not builds:
        print("no Asterisk:", "; ".join(notes), file=sys.stderr)
        return 2
    for build in builds:
        target = out / f"asterisk-{build.version}-{build.driver.lower()}"
        target.mkdir(parents=True, exist_ok=True)
        folder = Path(f"/tmp/billing-record-{build.label}-{int(time.time())}")
        folder.mkdir(parents=True)
        carrier = Carrier(folder).start()
        agi = AgiRecorder(free_port())
        pbx = AsteriskPbx(build, folder / "pbx", carrier.port, agi.port)
        pbx.start()
        try:
            for scenario, backstop, hold_ms in (("backstop", "2.000", 8_000), ("rearm", "2.000", 8_000),
                                                ("caller-hangs-up", "60.000", 1_500)):
                agi.backstop = backstop
                ami = AmiRecorder(pbx.ami_port)
                time.sleep(0.3)
                done = threading.Event()

                def rearm(ami: AmiRecorder = ami, done: threading.Event = done, driver: str = build.driver) -> None:
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and "Event: BridgeEnter" not in ami.text():
                        time.sleep(0.01)
                    time.sleep(1.0)
                    a, b = channel_of(ami.text(), "A"), channel_of(ami.text(), "B")
                    variable = "SIPCALLID" if driver == "SIP" else "CHANNEL(pjsip,call-id)"
                    ami.send(f"Action: Getvar\r\nActionID: getvar-a\r\nChannel: {a}\r\nVariable: {variable}\r\n\r\n")
                    ami.send(f"Action: Getvar\r\nActionID: getvar-b\r\nChannel: {b}\r\nVariable: {variable}\r\n\r\n")
                    ami.send(f"Action: Setvar\r\nActionID: setvar-1\r\nChannel: {b}\r\n"
                             "Variable: TIMEOUT(absolute)\r\nValue: 2.500\r\n\r\n")
                    done.set()

                if scenario == "rearm":
                    threading.Thread(target=rearm, daemon=True).start()
                run_customers(folder, pbx.sip_port, [("1001", NUMBER)], hold_ms=hold_ms, name=scenario)
                time.sleep(1.0)
                raw = ami.close()
                (target / f"ami-{scenario}.txt").write_bytes(raw)
                if agi.transcripts:
                    (target / f"agi-{scenario}.txt").write_text(agi.transcripts[-1])
                print(f"{build.label} {scenario}: {len(raw)} AMI bytes")
        finally:
            pbx.stop()
            carrier.stop()
    return 0


if __name__ == "__main__":
    sys.exit(record(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/captures")))
