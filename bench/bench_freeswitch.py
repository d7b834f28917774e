"""FreeSWITCH edge figures (issue 7): authorization round trip and events applied per second.

    python bench/bench_freeswitch.py                      # 3 runs of each, medians
    python bench/bench_freeswitch.py --rate 200 --calls 3000 --events 60000 --runs 3

1. Authorization round trip through the event socket on loopback at ``--rate`` calls/s: the fake
   FreeSWITCH runs in its own process (``python -m agent.sim.freeswitch``), parks each call and
   measures, on its own clock, from writing CHANNEL_PARK to reading the ``uuid_transfer`` that
   resumes the call. In between: greenswitch's connection, our frame parser, the adapter, the
   real call engine (agent/services/engine.py, in-memory balance store, one rate) deciding, and
   one round trip of three pipelined commands (uuid_setvar_multi, sched_hangup, uuid_transfer). The calls
   then ring, answer, talk ``--talk-ms`` and hang up, so the events of ~rate x talk live calls
   flow while the latency is measured. Target: p99 <= 5 ms at 200 calls/s.
2. Events parsed and applied per second: the fake writes ``--events`` channel events (whole
   calls: create, progress, answer, bridge, unbridge, hangup-complete; ~6 KB each, as real
   FreeSWITCH events) as fast as the socket takes them; we time until the adapter has parsed,
   translated and handed every one to the engine (``on_event``), and until the engine loop has
   applied them. A second figure replays frames from memory (no socket) through the same path.
   Target: >= 5,000 events/s.

The machine has 2 shared, noisy cores: each figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from typing import Any

import gevent
import gevent.os
from gevent.socket import wait_read

from agent.adapters.freeswitch.adapter import FreeswitchAdapter, FreeswitchSettings
from agent.adapters.freeswitch.esl import EslSettings
from agent.adapters.freeswitch.esl_protocol import EVENT_PLAIN, Event, FrameReader, parse_event
from agent.core.events import AuthorizeDecision, AuthorizeRequest, LegEvent
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo
from agent.services.clock import SystemClock
from agent.services.engine import Engine, EngineSettings
from agent.sim.freeswitch import FakeFreeswitch, synthetic_call_frames
from agent.sim.memory_store import MemoryStore

RATE = RateRow(prefix="33", destination="France", rate_micros=60_000)


class OneRate:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        return RatedCall(RATE, RatingInfo("retail", 1, "33", RATE.rate_micros))


class Cdrs:
    def __init__(self) -> None:
        self.count = 0

    def submit(self, record: Any) -> None:
        self.count += 1


class CountingEngine:
    """The hand-off only (parse + translate + on_event), without the engine's own work."""

    def __init__(self) -> None:
        self.events = 0

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        return AuthorizeDecision(True, request.leg_id, limit_ms=3_600_000)

    def on_event(self, event: LegEvent) -> None:
        self.events += 1


def real_engine() -> Engine:
    store = MemoryStore()
    for index in range(50):
        store.add_account(f"acct{index}", 10**12)
    engine = Engine(settings=EngineSettings(node="bench", nibble_seconds=6), store=store, rater=OneRate(),
                    clock=SystemClock(), cdr=Cdrs())
    engine.start()
    return engine


def spawn_fake(*args: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, "-m", "agent.sim.freeswitch", "--port", "0", *args],
                               stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(json.loads(process.stdout.readline())["listening"])
    return process, port


def read_result(process: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait (cooperatively) for the fake's JSON result line."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    while not buffer.endswith(b"\n"):
        wait_read(fd)
        chunk = gevent.os.read(fd, 1 << 20)
        if not chunk:
            raise RuntimeError("the fake FreeSWITCH exited without a result")
        buffer += chunk
    return dict(json.loads(buffer.decode().strip().splitlines()[-1]))


class TimedAdapter(FreeswitchAdapter):
    """Notes, per call, when CHANNEL_PARK was read and when the decision's commands were written:
    the agent's own share of the round trip."""

    def __init__(self, engine: Any, settings: FreeswitchSettings) -> None:
        super().__init__(engine, settings)
        self.read_at: dict[str, float] = {}
        self.agent_ms: list[float] = []

    def _start_authorization(self, event: Event) -> None:
        self.read_at[event.get("Unique-ID")] = event.received_at
        super()._start_authorization(event)

    def _allow(self, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        read_at = self.read_at.pop(request.leg_id, 0.0)
        if read_at:
            self.agent_ms.append((time.perf_counter() - read_at) * 1000)
        super()._allow(request, decision)


def start_adapter(engine: Any, port: int) -> TimedAdapter:
    adapter = TimedAdapter(engine, FreeswitchSettings(esl=EslSettings(port=port, command_timeout_s=5.0)))
    if isinstance(engine, Engine):
        engine.add_switch(adapter)
    adapter.start()
    if not adapter.synced.wait(10):
        raise RuntimeError(f"no connection to the fake FreeSWITCH: {adapter.client.last_error}")
    return adapter


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def authorization_run(rate: float, calls: int, talk_ms: int) -> dict[str, Any]:
    process, port = spawn_fake("--load-rate", str(rate), "--load-calls", str(calls), "--talk-ms", str(talk_ms),
                               "--heartbeat", "20")
    engine = real_engine()
    adapter = start_adapter(engine, port)
    try:
        result = read_result(process)
    finally:
        adapter.stop()
        engine.stop(2)
        process.kill()
        process.wait()
    latencies = result["latencies_ms"]
    agent = sorted(adapter.agent_ms)
    return {
        "agent_p50_ms": round(percentile(agent, 0.50), 3), "agent_p99_ms": round(percentile(agent, 0.99), 3),
        "calls": calls, "rate": rate, "authorized": result["authorized"], "outcomes": result["outcomes"],
        "p50_ms": round(percentile(latencies, 0.50), 3), "p95_ms": round(percentile(latencies, 0.95), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3), "max_ms": round(latencies[-1], 3) if latencies else None,
        "offered_rate": round(result["offered_rate"], 1),
    }


class Timed:
    """Wraps an engine: counts the events handed over and notes when the first and last came."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        return self.inner.authorize(request)  # type: ignore[no-any-return]

    def on_event(self, event: LegEvent) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        self.inner.on_event(event)


def socket_events_run(events: int, engine_kind: str) -> dict[str, Any]:
    process, port = spawn_fake("--flood-events", str(events), "--heartbeat", "20")
    inner: Any = real_engine() if engine_kind == "real" else CountingEngine()
    timed = Timed(inner)
    adapter = start_adapter(timed, port)
    if isinstance(inner, Engine):
        inner.add_switch(adapter)
    timed.count = 0  # the resync's PbxConnected is not part of the flood
    base = adapter.stats.events
    try:
        flood = read_result(process)  # written; now wait until all of it is parsed and handed over
        while adapter.stats.events - base < events:
            gevent.sleep(0.001)
        handed_s = timed.last - timed.first
        applied_s = handed_s
        if isinstance(inner, Engine):
            inbox = inner._inbox  # the engine's queue: drained = every event applied
            while not inbox.empty():
                gevent.sleep(0.001)
            applied_s = time.perf_counter() - timed.first
    finally:
        assert process.stdin is not None
        process.stdin.write("\n")
        process.stdin.flush()
        adapter.stop()
        if isinstance(inner, Engine):
            inner.stop(2)
        process.kill()
        process.wait()
    return {"events": adapter.stats.events - base, "engine": engine_kind,
            "mean_event_bytes": flood["mean_event_bytes"], "fake_write_s": round(flood["flood_write_s"], 3),
            "client_s": round(handed_s, 3),
            "leg_events": timed.count, "handed_over_per_s": round(events / handed_s),
            "applied_per_s": round(events / applied_s), "frame_errors": adapter.stats.frame_errors,
            "bad_events": adapter.stats.bad_events}


def memory_events_run(events: int) -> dict[str, Any]:
    """Frames replayed from memory through parser + translation + hand-off (no socket, no greenlet hop)."""
    fake = FakeFreeswitch(seed=3, mode="park")  # the park path: park -> transfer latency
    pool = synthetic_call_frames(fake, 500)
    data = b"".join(pool[i % len(pool)] for i in range(events))
    engine = CountingEngine()
    adapter = FreeswitchAdapter(engine)  # not started: only its event path is used
    started = time.process_time()
    reader = FrameReader()
    for offset in range(0, len(data), 256 * 1024):
        for frame in reader.feed(data[offset:offset + 256 * 1024]):
            if frame.content_type == EVENT_PLAIN:
                adapter._on_event(parse_event(frame.body))
    cpu_s = time.process_time() - started
    return {"events": events, "cpu_s": round(cpu_s, 3), "events_per_cpu_s": round(events / cpu_s),
            "leg_events": engine.events}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--talk-ms", type=int, default=500)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    auth = [authorization_run(args.rate, args.calls, args.talk_ms) for _ in range(args.runs)]
    for run in auth:
        print(json.dumps({"authorization": run}))
    memory = [memory_events_run(args.events) for _ in range(args.runs)]
    for run in memory:
        print(json.dumps({"events_from_memory": run}))
    socket_counting = [socket_events_run(args.events, "counting") for _ in range(args.runs)]
    socket_real = [socket_events_run(args.events, "real") for _ in range(args.runs)]
    for run in socket_counting + socket_real:
        print(json.dumps({"events_over_socket": run}))

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(run[key] for run in runs))

    summary = {
        "auth_rate": args.rate, "auth_p50_ms": med(auth, "p50_ms"), "auth_p99_ms": med(auth, "p99_ms"),
        "auth_max_ms": med(auth, "max_ms"), "agent_share_p50_ms": med(auth, "agent_p50_ms"),
        "agent_share_p99_ms": med(auth, "agent_p99_ms"),
        "events_per_cpu_s_memory": med(memory, "events_per_cpu_s"),
        "events_per_s_socket_handed_over": med(socket_counting, "handed_over_per_s"),
        "events_per_s_socket_real_engine_applied": med(socket_real, "applied_per_s"),
    }
    summary["targets_met"] = (summary["auth_p99_ms"] <= 5.0
                              and summary["events_per_s_socket_real_engine_applied"] >= 5000)
    with open("/proc/loadavg") as loadavg:  # the machine is shared: say how busy it was
        summary["loadavg_1min"] = float(loadavg.read().split()[0])
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
