"""Deterministic simulation at scale: ≥ 100,000 calls, every invariant checked (issue 5).

    python bench/bench_simulation.py --calls 100000 --runs 3

Prints one JSON line per run and a summary (median wall time). Exits non-zero on any violation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from agent.sim.simulation import SimConfig, run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nibble-seconds", type=int, default=6)
    args = parser.parse_args()
    walls = []
    ok = True
    for seed in range(1, args.runs + 1):
        report = run(SimConfig(seed=seed, calls=args.calls, nibble_seconds=args.nibble_seconds))
        walls.append(report.wall_seconds)
        ok = ok and report.ok
        print(json.dumps({"seed": seed, "calls": report.calls_offered, "authorized": report.calls_authorized,
                          "dispositions": report.dispositions, "nibbles": report.nibbles,
                          "escalations": report.escalations, "worst_cut_lateness_ms": report.worst_cut_lateness_ms,
                          "wall_s": report.wall_seconds, "violations": report.violations[:5]}))
    print(json.dumps({"calls_per_run": args.calls, "median_wall_s": statistics.median(walls),
                      "calls_per_s": round(args.calls / statistics.median(walls)), "all_invariants_ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
