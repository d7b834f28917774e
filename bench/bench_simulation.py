"""Deterministic simulation at scale: ≥ 100,000 calls, every invariant checked (issues 5, 16).

    python bench/bench_simulation.py --calls 100000 --runs 3 [--bundle-share 0.35]

About a third of the accounts hold free-minute bundles (DESIGN §9) by default; ``--bundle-share
0`` runs the traffic without them. Prints one JSON line per run and a summary (median wall
time, bundle figures). Exits non-zero on any violation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from agent.sim.simulation import SimConfig, run

BUNDLE_FIELDS = ("bundle_accounts", "bundle_grants", "bundle_periods", "bundle_rollovers", "bundle_calls",
                 "bundle_seconds", "bundle_then_money")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nibble-seconds", type=int, default=6)
    parser.add_argument("--bundle-share", type=float, default=SimConfig.bundle_share,
                        help="share of the accounts holding bundles (0: none)")
    args = parser.parse_args()
    walls = []
    ok = True
    violations = 0
    for seed in range(1, args.runs + 1):
        report = run(SimConfig(seed=seed, calls=args.calls, nibble_seconds=args.nibble_seconds,
                               bundle_share=args.bundle_share))
        walls.append(report.wall_seconds)
        ok = ok and report.ok
        violations += len(report.violations)
        print(json.dumps({"seed": seed, "calls": report.calls_offered, "authorized": report.calls_authorized,
                          "dispositions": report.dispositions, "nibbles": report.nibbles,
                          "escalations": report.escalations, "worst_cut_lateness_ms": report.worst_cut_lateness_ms,
                          **{name: getattr(report, name) for name in BUNDLE_FIELDS},
                          "wall_s": report.wall_seconds, "violations": len(report.violations),
                          "first_violations": report.violations[:5]}), flush=True)
    print(json.dumps({"calls_per_run": args.calls, "runs": args.runs, "bundle_share": args.bundle_share,
                      "median_wall_s": statistics.median(walls),
                      "calls_per_s": round(args.calls / statistics.median(walls)), "violations": violations,
                      "all_invariants_ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
