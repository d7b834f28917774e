"""Real PBXes, real SIP calls (issue 13): the post-dial delay the agent adds, and 200 calls
billed and cut exactly.

    ASTERISK_HOME=/opt/asterisk-20:/opt/asterisk-22 FREESWITCH_HOME=/opt/freeswitch \\
        python bench/bench_realpbx.py --runs 3

For every PBX build found (tests/realpbx/lab.py: Asterisk with chan_sip and/or chan_pjsip,
FreeSWITCH), in a private lab on loopback (the PBX with the shipped dialplan, a sipp carrier that
answers at once, ``billing-agent run``):

1. **Post-dial delay**: ``--calls`` calls at ``--rate`` calls/s from a sipp customer, INVITE to
   200 OK on the wire (tcpdump + tshark; sipp's own clock when they are missing), through the
   billing dialplan, and the same number through a context
   that dials the trunk with no agent (the static-allow baseline), alternated ``--runs`` times.
   Reported: p50 and p99 of each, and the agent's addition (medians over the runs; each run's
   addition too), the calls not answered by final SIP code, and the 1-minute load average
   before each run and at the end (the machine may be shared: figures go with their load).
2. **Exact billing**: ``--calls`` calls at ``--rate`` calls/s, each held 4 s (plenty of money),
   then the same number on accounts that hold 3 s of money each, held 6 s (each is cut). Reported:
   CDRs found, calls billed differently from §4 of their real duration (0 expected), the ledger
   check, and how late the cut came after the money ran out (p50, p99, max; PBX timestamps).

Prints one JSON object per PBX and a summary table; ``--json`` writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.realpbx.lab import (
    STATIC_PREFIX,
    Agent,
    AsteriskPbx,
    Carrier,
    FreeswitchPbx,
    Pbx,
    PbxBuild,
    SipCapture,
    discover,
    free_port,
    run_customers,
)

DECK = ("prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace,effective_from,"
        "effective_to,weekdays,time_from,time_to,blocked\n1,US,0.60,0,1,1,0,0,,,,,,no\n")
NUMBER = "12125551234"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


def post_dial_delays(folder: Path, pbx: Pbx, calls: list[tuple[str, str]], rate: float, name: str,
                     failures: Counter[str]) -> list[float]:
    """INVITE to 200 OK per answered call: on the wire (tcpdump, microseconds) when tcpdump and
    tshark are installed, else as sipp's clock sees it (it ticks in steps of a few ms). Calls
    not answered are counted in ``failures`` by their final SIP code ("none": no final answer)."""
    capture = SipCapture(folder, pbx.sip_port, name).start() if SipCapture.available() else None
    run = run_customers(folder, pbx.sip_port, calls, hold_ms=500, rate_per_s=rate, name=name)
    failures.update(str(c.final_code or "none") for c in run.result.values() if c.answered_tick is None)
    if capture is not None:
        capture.stop()
        return capture.post_dial_delays_ms()
    return [float(c.post_dial_delay_ms) for c in run.result.values() if c.post_dial_delay_ms is not None]


def renice(pid: int, nice: int) -> None:
    """Every thread of the process (Linux: a priority is a thread's; threads started later
    inherit it from the thread that starts them)."""
    tasks = Path(f"/proc/{pid}/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            pass


def load_average() -> float:
    """The 1-minute load average (the machine is shared: figures go with it)."""
    return round(os.getloadavg()[0], 2)


def fresh_database(url: str, label: str) -> str:
    """A database of its own for each PBX's lab on a server (SQLite: a file in the lab folder)."""
    if not url or url.startswith("sqlite"):
        return url
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "bench_" + "".join(ch if ch.isalnum() else "_" for ch in label.lower())
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if "postgresql" in url else "")))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def bench_pbx(build: PbxBuild, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    folder = root / build.label
    folder.mkdir(parents=True)
    carrier = Carrier(folder).start()
    pbx: Pbx = (AsteriskPbx(build, folder / "pbx", carrier.port, free_port()) if build.kind == "asterisk"
                else FreeswitchPbx(build, folder / "pbx", carrier.port))
    agent = Agent(folder, pbx.agent_settings(), database_url=fresh_database(args.database_url, build.label),
                  redis_url=args.redis_url, nibble_seconds=args.nibble_seconds)
    n = args.calls
    result: dict[str, Any] = {"pbx": build.label, "calls": n, "rate": args.rate}
    try:
        pbx.start()
        cut_accounts = [] if args.pdd_only else [(f"6{i:04d}", "0.035") for i in range(n)]  # one CLI run each
        agent.prepare(DECK, [("5000", "100000"), *cut_accounts])
        agent.start()
        if args.nice:
            for process in (pbx.process, agent.process, carrier.process):
                if process is not None:
                    renice(process.pid, args.nice)
            result["nice"] = args.nice
        # 1. post-dial delay, alternating the baseline and the billed path
        billed: list[list[float]] = []
        static: list[list[float]] = []
        loads: list[float] = []
        failed: Counter[str] = Counter()
        failed_static: Counter[str] = Counter()
        for run in range(args.runs):
            loads.append(load_average())
            static.append(post_dial_delays(folder, pbx, [("5000", STATIC_PREFIX + NUMBER)] * n, args.rate,
                                           f"static{run}", failed_static))
            billed.append(post_dial_delays(folder, pbx, [("5000", NUMBER)] * n, args.rate, f"billed{run}", failed))
        loads.append(load_average())
        result["pdd"] = {
            "static_p50_ms": statistics.median(pct(r, 0.5) for r in static),
            "static_p99_ms": statistics.median(pct(r, 0.99) for r in static),
            "billed_p50_ms": statistics.median(pct(r, 0.5) for r in billed),
            "billed_p99_ms": statistics.median(pct(r, 0.99) for r in billed),
            "answered": [len(r) for r in billed], "answered_static": [len(r) for r in static],
            "unanswered_by_code": dict(failed), "unanswered_static_by_code": dict(failed_static),
            "runs_added_p50_ms": [pct(b, 0.5) - pct(s, 0.5) for b, s in zip(billed, static, strict=True)],
            "runs_added_p99_ms": [pct(b, 0.99) - pct(s, 0.99) for b, s in zip(billed, static, strict=True)],
            "load_1min": loads,
        }
        result["pdd"]["added_p50_ms"] = result["pdd"]["billed_p50_ms"] - result["pdd"]["static_p50_ms"]
        result["pdd"]["added_p99_ms"] = result["pdd"]["billed_p99_ms"] - result["pdd"]["static_p99_ms"]
        if args.pdd_only:
            return result
        agent.cli("accounts", "create", "5001", "--plan", "lab", "--balance", "100000")
        # 2. exact billing: held 4 s with plenty of money, then cut at 3 s of money
        talk = run_customers(folder, pbx.sip_port, [("5001", NUMBER)] * n, hold_ms=4_000, rate_per_s=args.rate,
                             name="talk")
        cut = run_customers(folder, pbx.sip_port, [(f"6{i:04d}", NUMBER) for i in range(n)], hold_ms=6_000,
                            rate_per_s=args.rate, name="cutload")
        time.sleep(3)
        cdrs = agent.cdrs()
        answered = [c for c in cdrs if c["account_id"] == "5001"]
        cutoff = [c for c in cdrs if c["account_id"].startswith("6")]
        wrong = [c["call_id"] for c in answered + cutoff
                 if int(round(float(c["rating"]["cost"]) * 1_000_000)) != math.ceil(c["duration_ms"] / 1000) * 10_000]
        lateness = []
        unanswered: Counter[str] = Counter()  # e.g. the carrier leg refused (seen once: 488, cause 88)
        for cdr in cutoff:
            billed_legs = [leg for leg in cdr["legs"] if leg["billed"]]
            if not billed_legs:  # never answered: billed 0 (checked above), no cut to time
                unanswered[f"{cdr['disposition']} {cdr.get('hangup_cause') or ''}".strip()] += 1
                continue
            (leg,) = billed_legs
            lateness.append(ms(leg["ended_at"]) - (ms(leg["answered_at"]) + 3_000))
        ok, report = agent.ledger_check()
        result["billing"] = {
            "talk_calls_answered_by_sipp": sum(1 for c in talk.result.values() if c.answered_tick is not None),
            "talk_cdrs": len(answered), "cut_cdrs": len(cutoff),
            "cut_calls_hung_up_by_pbx": sum(1 for c in cut.result.values() if c.hung_up_by_pbx),
            "billed_differently_from_duration": len(wrong),
            "cut_dispositions": sorted({c["disposition"] for c in cutoff}),
            "cut_load_unanswered": dict(unanswered),
            "cut_late_p50_ms": pct([float(x) for x in lateness], 0.5),
            "cut_late_p99_ms": pct([float(x) for x in lateness], 0.99),
            "cut_late_max_ms": max(lateness) if lateness else None,
            "cut_late_min_ms": min(lateness) if lateness else None,
            "ledger_check_ok": ok,
        }
        if not ok:
            result["billing"]["ledger_report"] = report
    finally:
        agent.stop()
        pbx.stop()
        carrier.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="calls per second")
    parser.add_argument("--runs", type=int, default=3, help="post-dial-delay runs (medians are reported)")
    parser.add_argument("--pbx", default="", help="only builds whose label contains this")
    parser.add_argument("--nibble-seconds", type=int, default=6)
    parser.add_argument("--database-url", default="", help="default: SQLite in the lab folder")
    parser.add_argument("--redis-url", default="", help="Redis as the balance store (with a server database)")
    parser.add_argument("--pdd-only", action="store_true", help="measure the post-dial delay only (no billing part)")
    parser.add_argument("--nice", type=int, default=0,
                        help="scheduling priority of the PBX, the agent and the carrier (e.g. -10, as root: "
                             "a PBX node gives both priority over batch work; 0: as started)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    builds, notes = discover()
    builds = [b for b in builds if args.pbx in b.label]
    if not builds:
        print("no PBX to measure: " + "; ".join(notes), file=sys.stderr)
        return 2
    root = Path(f"/tmp/bench-realpbx-{int(time.time())}")
    results = []
    for build in builds:
        result = bench_pbx(build, args, root)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(f"\n{'pbx':<28} {'static p50/p99':>15} {'billed p50/p99':>15} {'added p50/p99':>14} "
          f"{'wrong':>6} {'cut late p50/p99/max':>22} ledger  load")
    for r in results:
        p, b = r["pdd"], r.get("billing")
        if b is None:
            print(f"{r['pbx']:<28} {p['static_p50_ms']:>7.1f}/{p['static_p99_ms']:<7.1f} "
                  f"{p['billed_p50_ms']:>7.1f}/{p['billed_p99_ms']:<7.1f} "
                  f"{p['added_p50_ms']:>6.1f}/{p['added_p99_ms']:<7.1f} {'':>6} {'':>22} {'':>6}  "
                  f"{min(p['load_1min']):.1f}-{max(p['load_1min']):.1f}")
            continue
        print(f"{r['pbx']:<28} {p['static_p50_ms']:>7.1f}/{p['static_p99_ms']:<7.1f} "
              f"{p['billed_p50_ms']:>7.1f}/{p['billed_p99_ms']:<7.1f} "
              f"{p['added_p50_ms']:>6.1f}/{p['added_p99_ms']:<7.1f} "
              f"{b['billed_differently_from_duration']:>6} {b['cut_late_p50_ms']:>6.0f}/{b['cut_late_p99_ms']:.0f}/"
              f"{b['cut_late_max_ms']} ms  {'OK' if b['ledger_check_ok'] else 'FAILED'}  "
              f"{min(p['load_1min']):.1f}-{max(p['load_1min']):.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
