#!/usr/bin/env python3
"""The IRSF scenario of issue 15 with the fraud rule and without, in the deterministic simulation.

    python bench/bench_irsf.py                 # 20 parallel calls to a premium range at 03:00, seeds 1-5
    python bench/bench_irsf.py --calls 20000 --irsf-calls 50 --threshold 3 --seeds 3

A hijacked account (1,000.00 of balance) opens ``--irsf-calls`` calls to a 3.00/min premium range,
one every 500 ms, answered at once, talking an hour, beside ``--calls`` calls of ordinary traffic.
The rule: more than ``--threshold`` live calls to the group suspends the account. Printed per seed
and as medians: calls allowed, money lost, when the rule fired (from the first attack call), how
long after the suspension the last cut call ended (the simulated PBX answers a hangup in 1-400 ms).
The agent's side of the cut is immediate here (no network); the daemon adds its switch round trip,
and ``daemon.publish_seconds`` for calls on other nodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.money import format_amount
from agent.sim.simulation import SimConfig, run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--irsf-calls", type=int, default=20)
    parser.add_argument("--threshold", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    rows = {True: [], False: []}  # type: dict[bool, list[tuple[int, int, int | None, int | None]]]
    ok = True
    for seed in range(1, args.seeds + 1):
        for rules in (True, False):
            report = run(SimConfig(seed=seed, calls=args.calls, irsf_calls=args.irsf_calls,
                                   irsf_threshold=args.threshold, irsf_rules=rules))
            ok = ok and report.ok
            rows[rules].append((report.irsf_allowed, report.irsf_loss_micros, report.irsf_fired_after_ms,
                                report.irsf_worst_cut_ms))
            print(f"seed {seed} rules {'on ' if rules else 'off'}: {report.irsf_allowed} attack calls allowed, "
                  f"lost {format_amount(report.irsf_loss_micros)}, fired after {report.irsf_fired_after_ms} ms, "
                  f"last cut call ended {report.irsf_worst_cut_ms} ms after the suspension, "
                  f"{len(report.violations)} violations")
    for rules in (True, False):
        r = rows[rules]
        loss = statistics.median(x[1] for x in r)
        print(f"rules {'on ' if rules else 'off'} (median of {len(r)}): {statistics.median(x[0] for x in r):.0f} "
              f"calls allowed, {format_amount(int(loss))} lost"
              + (f", fired after {statistics.median(x[2] or 0 for x in r):.0f} ms, cut within "
                 f"{max(x[3] or 0 for x in r)} ms (worst)" if rules else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
