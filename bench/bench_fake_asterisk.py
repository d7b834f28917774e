"""How many calls per second the fake Asterisk can play (so that daemon benchmarks measure the daemon).

One process: a minimal FastAGI agent (allow, 60 s limit, then close) and one raw AMI reader that
counts the bytes and events it gets. Each run places CALLS calls at once (talk 0 ms) and waits for
all of them. Prints the median of RUNS runs: calls/s, AMI events/s, mean event size.

    /work/venv/bin/python bench/bench_fake_asterisk.py [CALLS] [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import time

import gevent
from gevent import socket
from gevent.server import StreamServer

from agent.sim.asterisk import FakeAsterisk

REPLY = b"SET VARIABLE BILLING_DECISION allow\nSET VARIABLE BILLING_LIMIT_MS 60000\n"


def agent(sock: socket.socket, address: object) -> None:
    buf = b""
    while b"\n\n" not in buf:
        data = sock.recv(4096)
        if not data:
            return
        buf += data
    sock.sendall(REPLY)
    replies = 0
    while replies < 2:
        data = sock.recv(4096)
        if not data:
            return
        replies += data.count(b"\n")
    sock.close()


def one_run(calls: int) -> tuple[float, float, float]:
    server = StreamServer(("127.0.0.1", 0), agent)
    server.start()
    fake = FakeAsterisk("127.0.0.1", int(server.server_port)).start()
    ami = socket.create_connection(("127.0.0.1", fake.ami_port))
    ami.sendall(b"Action: Login\r\nUsername: billing\r\nSecret: secret\r\n\r\n")
    counted = {"bytes": 0, "events": 0}

    def read() -> None:
        while True:
            data = ami.recv(262144)
            if not data:
                return
            counted["bytes"] += len(data)
            counted["events"] += data.count(b"Event: ")

    reader = gevent.spawn(read)
    gevent.sleep(0.1)
    counted["bytes"] = counted["events"] = 0
    started = time.perf_counter()
    placed = [fake.place_call(f"acct{i % 50}", f"3314{i:06d}", answer_after_ms=0, talk_ms=0, ring=False)
              for i in range(calls)]
    assert fake.wait_idle(120)
    elapsed = time.perf_counter() - started
    assert all(call.outcome == "answered" for call in placed), {call.outcome for call in placed}
    gevent.sleep(0.2)
    events, size = counted["events"], counted["bytes"] / max(1, counted["events"])
    reader.kill()
    ami.close()
    fake.stop()
    server.stop()
    return calls / elapsed, events / elapsed, size


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    results = [one_run(calls) for _ in range(runs)]
    print(f"fake Asterisk, {calls} concurrent calls x {runs} runs (median)")
    print(f"  calls/s          {statistics.median(r[0] for r in results):10.0f}")
    print(f"  AMI events/s     {statistics.median(r[1] for r in results):10.0f}")
    print(f"  bytes per event  {statistics.median(r[2] for r in results):10.0f}")


if __name__ == "__main__":
    main()
