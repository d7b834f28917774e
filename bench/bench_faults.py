#!/usr/bin/env python3
"""Fault injection (issue 14): money and CDRs through agent crashes, Redis lost, the database gone
and a hung store, under both failure policies.

    python bench/bench_faults.py --calls 1000 --seed 7 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

One process holds the simulated PBX (the fake Asterisk: FastAGI client, AMI server, the shipped
dialplan's behaviour, ``L()`` backstops that end calls by themselves), a Redis of its own
(``redis-server`` on a free port, nothing on disk) and two TCP proxies (one before PostgreSQL, one
before that Redis) that can refuse or hang connections; ``billing-agent run`` is a child process
reaching PostgreSQL and Redis through the proxies. Seeded random traffic (``--rate`` calls/s, talk
1-20 s, 40 accounts of which 10 hold a few seconds of money and one call at a time) runs through
two parts:

1. ``fail_closed``, ``--calls`` × 60 %: kill -9 of the agent at random instants (restarted 1-3 s
   later), Redis killed and restarted empty, the database unreachable for ``--db-outage`` seconds
   (connections cut, new ones refused), the store hung for ``--hang`` seconds (connections open,
   no reply);
2. ``fail_open``, the rest: the agent restarted with ``billing.failure_policy: fail_open``, a kill
   -9, the store hung again.

Then every call is over, the agent runs until every reservation has been settled or has expired,
and the report compares, call by call, the money charged (the CDR's rating decision) with §4 of
the call's real duration as the PBX saw it (answer to hangup; 0.60/min in 1 s increments, so one
started second costs 10,000 micro-units; a call cut for money: the time paid for), counts CDRs
(none missing, none twice), runs ``ledger check``, and gives the cut delay of the calls the agent
cut for money (the PBX's end minus the answer plus the limit the agent set) and, apart, of those
the PBX's own limit ended while no agent ran. The simulated Asterisk writes its CDR file as the
shipped cdr_custom.conf does and the agent reads it (``--no-pbx-cdr``: not). Prints a JSON
report; ``--json FILE`` writes it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from decimal import Decimal  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
from gevent import socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.session import SessionSettings  # noqa: E402
from agent.sim.asterisk import FakeAsterisk, FakeCall  # noqa: E402
from bench.bench_realpbx import fresh_database  # noqa: E402
from tests.realpbx.lab import Agent, free_port, stop_process, wait_port  # noqa: E402

DECK = ("prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace,effective_from,"
        "effective_to,weekdays,time_from,time_to,blocked\n33,France,0.60,0,1,1,0,0,,,,,,no\n")
MICROS_PER_STARTED_SECOND = 10_000  # 0.60 per minute, 1/1 increments
AMI_SECRET = "bench-secret"


def cost_micros(talk_ms: float) -> int:
    """§4 of the deck: every started second (a call of 0 ms costs nothing)."""
    return math.ceil(max(0.0, talk_ms) / 1000 - 1e-9) * MICROS_PER_STARTED_SECOND


# ------------------------------------------------------------------------------------ the faults


class Proxy:
    """A TCP relay before a service that can ``refuse`` (cut every connection, refuse new ones:
    the service is unreachable) or ``hang`` (connections stay open, nothing goes through: a
    hung service) and ``pass`` again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self.flowing = gevent.event.Event()
        self.flowing.set()
        self.links: set[socket.socket] = set()
        self.server = StreamServer(("127.0.0.1", 0), self._serve, spawn=gevent.pool.Pool(2000))
        self.server.start()
        self.port = int(self.server.server_port)

    def set(self, mode: str) -> None:
        self.mode = mode
        if mode == "pass":
            self.flowing.set()
            return
        self.flowing.clear()
        if mode == "refuse":
            for sock in list(self.links):
                try:
                    sock.close()
                except OSError:
                    pass
            self.links.clear()

    def _serve(self, client: socket.socket, _address: object) -> None:
        if self.mode == "refuse":
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        self.links |= {client, upstream}
        pumps = [gevent.spawn(self._pump, client, upstream), gevent.spawn(self._pump, upstream, client)]
        gevent.joinall(pumps, count=1)
        for sock in (client, upstream):
            self.links.discard(sock)
            try:
                sock.close()
            except OSError:
                pass
        gevent.killall(pumps, block=False)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    return
                self.flowing.wait()  # a hung service: bytes wait here until it comes back
                if self.mode == "refuse":
                    return
                sink.sendall(data)
        except OSError:
            return

    def stop(self) -> None:
        self.set("refuse")
        self.server.stop(timeout=1)


class PrivateRedis:
    """A ``redis-server`` of the bench's own, nothing on disk: killing it loses every key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 10, self.process, "redis-server")

    def kill(self) -> None:
        stop_process(self.process, signal.SIGKILL, 5)


# ------------------------------------------------------------------------------------ the traffic


@dataclass
class Placed:
    part: str
    account: str
    poor: bool
    call: FakeCall
    placed_at: float


@dataclass
class Timeline:
    began: float = field(default_factory=time.monotonic)
    wall_began: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)

    def note(self, what: str) -> None:
        at = time.monotonic() - self.began
        self.events.append((round(at, 1), what))
        print(f"  {at:7.1f} s  {what}", flush=True)


def run_part(name: str, calls: int, args: argparse.Namespace, rng: random.Random, pbx: FakeAsterisk,
             agent: Agent, redis: PrivateRedis, db_proxy: Proxy, redis_proxy: Proxy, timeline: Timeline,
             rich: list[str], poor: list[str]) -> list[Placed]:
    """``calls`` calls at ``args.rate`` calls/s while the part's faults happen at seeded instants."""
    span_s = calls / args.rate
    faults: list[tuple[float, str]] = []
    kills = 3 if name == "fail_closed" else 1
    for _ in range(kills):
        faults.append((rng.uniform(0.05, 0.95) * span_s, "kill"))
    if name == "fail_closed":
        faults.append((0.30 * span_s, "redis"))
        faults.append((0.45 * span_s, "db"))
        faults.append((0.80 * span_s, "hang"))
    else:
        faults.append((0.55 * span_s, "hang"))
    faults.sort()
    busy_until = 0.0
    spaced: list[tuple[float, str]] = []
    for wanted_at, what in faults:  # one fault at a time: a kill inside an outage waits for its end
        at = max(wanted_at, busy_until)
        spaced.append((at, what))
        busy_until = at + {"kill": 4.0, "redis": 2.0, "db": args.db_outage + 2.0, "hang": args.hang + 2.0}[what]

    def inject() -> None:
        start = time.monotonic()
        for at, what in spaced:
            gevent.sleep(max(0.0, start + at - time.monotonic()))
            if what == "kill":
                timeline.note(f"{name}: kill -9 of the agent")
                agent.kill()
                down_s = rng.uniform(1.0, 3.0)
                gevent.sleep(down_s)
                timeline.note(f"{name}: agent restarted after {down_s:.1f} s")
                agent.start(wait_pbx=False)
            elif what == "redis":
                timeline.note(f"{name}: Redis killed; restarted empty")
                redis.kill()
                gevent.sleep(0.5)
                redis.start()
            elif what == "db":
                timeline.note(f"{name}: database unreachable for {args.db_outage:.0f} s")
                db_proxy.set("refuse")
                gevent.sleep(args.db_outage)
                db_proxy.set("pass")
                timeline.note(f"{name}: database back")
            elif what == "hang":
                timeline.note(f"{name}: store hung for {args.hang:.0f} s")
                redis_proxy.set("hang")
                gevent.sleep(args.hang)
                redis_proxy.set("pass")
                timeline.note(f"{name}: store answers again")

    injector = gevent.spawn(inject)
    placed: list[Placed] = []
    start = time.monotonic()
    for i in range(calls):
        gevent.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        is_poor = rng.random() < 0.2
        account = rng.choice(poor if is_poor else rich)
        talk_ms = rng.randint(1_000, 20_000)
        call = pbx.place_call(account, f"33{rng.randrange(10**8):08d}", caller=f"{1000 + i}",
                              answer_after_ms=rng.randint(50, 500), talk_ms=talk_ms,
                              hangup_by=rng.choice(("caller", "callee")))
        placed.append(Placed(name, account, is_poor, call, time.monotonic()))
    injector.join()
    return placed


# ------------------------------------------------------------------------------------ the report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def report(placed: list[Placed], agent: Agent, timeline: Timeline) -> dict[str, Any]:
    cdrs = agent.cdrs()
    by_leg: dict[str, list[dict[str, Any]]] = {}
    for cdr in cdrs:
        for leg in cdr.get("legs", []):
            by_leg.setdefault(str(leg.get("pbx_unique_id", "")), []).append(cdr)
    ids = Counter(cdr["call_id"] for cdr in cdrs)
    outcomes = Counter(p.call.outcome or "unfinished" for p in placed)
    answered = [p for p in placed if p.call.answered_ms]
    missing: list[dict[str, Any]] = []
    cut_delays: list[float] = []  # real end minus the billed end, calls the agent cut
    rows: list[dict[str, Any]] = []
    for p in answered:
        found = by_leg.get(p.call.a_uniqueid) or []
        unique = {c["call_id"]: c for c in found}
        if not unique:
            missing.append({"part": p.part, "a_uniqueid": p.call.a_uniqueid, "account": p.account,
                            "answered_s": round(p.call.answered_ms / 1000 - timeline.wall_began, 1),
                            "ended_s": round(p.call.ended_ms / 1000 - timeline.wall_began, 1),
                            "outcome": p.call.outcome})
            continue
        (cdr,) = unique.values()
        talk_ms = p.call.ended_ms - p.call.answered_ms
        if p.call.cut_by == "ami":
            # Cut by the agent (money out, or the store gone under fail_closed): billed up to the
            # cut instant, not the few ms the PBX took to carry the hangup out (a started second
            # the account could not pay would overdraw it), nor a cut late within the backstop
            # margin (agent/core/session.py ``cut_lateness_free_ms``). Checked: the cut came
            # within it (the delay is reported apart).
            delay_ms = talk_ms - cdr["duration_ms"]
            cut_delays.append(delay_ms)
            if 0 <= delay_ms <= SessionSettings(nibble_ms=1000).cut_lateness_free_ms:
                talk_ms = cdr["duration_ms"]
        charged = int(Decimal(cdr["rating"]["cost"]) * 1_000_000) if cdr.get("rating") else 0
        rows.append({"part": p.part, "cause": cdr.get("hangup_cause", ""), "talk_ms": talk_ms,
                     "expected": cost_micros(talk_ms), "charged": charged, "call_id": cdr["call_id"]})
    by_cause: dict[str, dict[str, int]] = {}
    for row in rows:
        kind = row["cause"] if row["cause"] in ("ENDED_WHILE_AGENT_DOWN", "ENDED_DURING_PBX_OUTAGE") else "supervised"
        entry = by_cause.setdefault(kind, {"calls": 0, "expected_micros": 0, "charged_micros": 0, "differ": 0,
                                           "max_over_micros": 0, "max_under_micros": 0})
        entry["calls"] += 1
        entry["expected_micros"] += row["expected"]
        entry["charged_micros"] += row["charged"]
        diff = row["charged"] - row["expected"]
        if diff:
            entry["differ"] += 1
            entry["max_over_micros"] = max(entry["max_over_micros"], diff)
            entry["max_under_micros"] = max(entry["max_under_micros"], -diff)
    differing = [row for row in rows if row["charged"] != row["expected"]][:10]
    by_agent = [(p.call.ended_ms - p.call.answered_ms) - p.call.limit_ms for p in answered
                if p.poor and p.call.cut_by == "ami" and p.call.limit_ms is not None]
    by_pbx = [(p.call.ended_ms - p.call.answered_ms) - p.call.limit_ms for p in answered
              if p.poor and p.call.outcome == "cut" and p.call.cut_by != "ami" and p.call.limit_ms is not None]
    ok, ledger = agent.ledger_check()
    return {
        "calls": len(placed), "outcomes": dict(outcomes), "answered": len(answered), "cdrs": len(cdrs),
        "cdrs_twice": sum(1 for n in ids.values() if n > 1), "answered_without_cdr": len(missing),
        "answered_without_cdr_examples": missing[:10],
        "money": by_cause,
        "charged_minus_expected_micros": sum(r["charged"] - r["expected"] for r in rows),
        "differing_examples": differing,
        "agent_cuts": len(cut_delays),
        "agent_cut_pbx_lag_ms": {"p50": pct(cut_delays, 0.5), "p99": pct(cut_delays, 0.99),
                                 "max": max(cut_delays) if cut_delays else float("nan")},
        "cut_by_agent": len(by_agent), "cut_late_ms": {"p50": pct(by_agent, 0.5), "p99": pct(by_agent, 0.99),
                                                       "max": max(by_agent) if by_agent else float("nan")},
        # Money that ran out while no agent ran: the PBX's own limit (backstop) ended the call.
        "cut_by_pbx_backstop": len(by_pbx), "backstop_late_ms_max": max(by_pbx) if by_pbx else float("nan"),
        "ledger_check_ok": ok, "ledger_check": ledger.strip()[-2000:], "timeline": timeline.events,
    }


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=4.0, help="calls per second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--db-outage", type=float, default=30.0, help="seconds the database is unreachable")
    parser.add_argument("--hang", type=float, default=10.0, help="seconds the store hangs (each part)")
    parser.add_argument("--nibble-seconds", type=int, default=2)
    parser.add_argument("--no-pbx-cdr", action="store_true",
                        help="no PBX CDR file for the agent: calls that end while it is down are billed from the store")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("bench_faults: needs redis-server on PATH")
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    print(f"working folder {folder}", flush=True)
    from sqlalchemy.engine import make_url

    database_url = fresh_database(args.database_url, "faults")
    parsed = make_url(database_url)
    db_proxy = Proxy(parsed.port or 5432)
    proxied_url = parsed.set(host="127.0.0.1", port=db_proxy.port).render_as_string(hide_password=False)
    redis = PrivateRedis(folder)
    redis.start()
    redis_proxy = Proxy(redis.port)
    cdr_file = "" if args.no_pbx_cdr else str(folder / "pbx-cdr.csv")  # Asterisk's cdr_custom, as shipped
    pbx = FakeAsterisk("127.0.0.1", free_port(), ami_port=0, ami_username="billing", ami_secret=AMI_SECRET,
                       seed=args.seed, cdr_file=cdr_file).start()
    pbx_settings = {"asterisk": {"enabled": True, "agi_host": "127.0.0.1", "agi_port": pbx.agi_port,
                                 "ami_host": "127.0.0.1", "ami_port": int(pbx.ami_port), "ami_username": "billing",
                                 "ami_secret": AMI_SECRET, "ami_ping_seconds": 2, "cdr_file": cdr_file}}
    rich = [f"70{i:02d}" for i in range(30)]
    poor = [f"80{i:02d}" for i in range(10)]
    timeline = Timeline()
    placed: list[Placed] = []
    agent: Agent | None = None
    try:
        for part, share in (("fail_closed", 0.6), ("fail_open", 0.4)):
            # One node and one key prefix for both parts: the second run adopts what the first left.
            extra = {"billing": {"failure_policy": part, "offline_credit": "0.50"},
                     "redis": {"key_prefix": "faults:"}}
            if agent is not None:
                agent.stop()
            (folder / part).mkdir(exist_ok=True)
            agent = Agent(folder / part, pbx_settings, database_url=proxied_url,
                          redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0", nibble_seconds=args.nibble_seconds,
                          extra=extra)
            if part == "fail_closed":
                agent.prepare(DECK, [(a, "1000") for a in rich], plan="bench")
                for account in poor:
                    agent.cli("accounts", "create", account, "--plan", "bench", "--balance", "0.05",
                              "--max-calls", "1")
            agent.start()
            timeline.note(f"{part}: agent up")
            n = round(args.calls * share) if part == "fail_closed" else args.calls - len(placed)
            placed += run_part(part, n, args, rng, pbx, agent, redis, db_proxy, redis_proxy, timeline, rich, poor)
            for account in poor:  # money for the next part's poor calls
                agent.cli("accounts", "topup", account, "0.05", "--reference", f"{part}-{account}", check=False)
        assert agent is not None
        timeline.note("traffic over; waiting for every call to end")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(p.call.done.is_set() for p in placed):
            gevent.sleep(0.5)
        ttl_s = 30
        timeline.note(f"every call over; {ttl_s + 5} s for reservations to settle or expire")
        gevent.sleep(ttl_s + 5)
        result = report(placed, agent, timeline)
    finally:
        if agent is not None:
            agent.stop()
        pbx.stop()
        redis_proxy.stop()
        db_proxy.stop()
        redis.kill()
    result["settings"] = {"calls": args.calls, "rate": args.rate, "seed": args.seed, "db_outage_s": args.db_outage,
                          "hang_s": args.hang, "nibble_s": args.nibble_seconds, "pbx_cdr_file": bool(cdr_file),
                          "folder": str(folder)}
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if not args.keep and result["ledger_check_ok"]:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{len(placed)} calls; CDRs {result['cdrs']}; answered without CDR {result['answered_without_cdr']}; "
          f"charged - expected {result['charged_minus_expected_micros']} micro-units; ledger check "
          f"{'OK' if result['ledger_check_ok'] else 'FAILED'}; cut by the agent: delay p50 "
          f"{result['cut_late_ms']['p50']:.0f} ms, max {result['cut_late_ms']['max']:.0f} ms")


if __name__ == "__main__":
    main()
