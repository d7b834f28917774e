#!/usr/bin/env python3
"""Benchmark: import a 1,000,000-row rate deck into PostgreSQL (goal: <= 60 s, bounded memory).

    python bench/bench_rate_import.py                      # generates the deck, 3 runs of each kind
    python bench/bench_rate_import.py --deck big.csv --runs 5

It creates a throw-away database on the server (as tests/conftest.py does) and drops it at the
end. Every import runs in a fresh child process so that its peak RSS (getrusage ru_maxrss) is
the import's own, not the generator's or an earlier run's. Two kinds of run:

* ``empty``: the rates table is emptied first, the deck goes into an empty plan;
* ``replace``: ``--replace`` over the plan's 1,000,000 rates (delete + insert, one transaction).

The machine is 2 shared cores: read medians, not single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PLAN = "bench"


def child(url: str, deck: str, replace: bool) -> None:
    """Run one import and print its figures as JSON (the parent parses the last line)."""
    from agent.adapters.sql.engine import make_engine, session_factory
    from agent.adapters.sql.rate_import import import_deck

    engine = make_engine(url)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phases: dict[str, float] = {}
    started = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        phases.setdefault(phase, time.perf_counter() - started)

    result = import_deck(session_factory(engine), deck, PLAN, replace=replace, progress=progress)
    engine.dispose()
    print(json.dumps({
        "seconds": result.seconds,
        "validate_seconds": phases.get("write", result.seconds),
        "rows": result.rows_imported,
        "replaced": result.rows_replaced,
        "version": result.version,
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def run_child(url: str, deck: Path, replace: bool) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", url, str(deck)] + (["--replace"] if replace else [])
    wall_started = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=ROOT)
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    figures["wall_seconds"] = time.perf_counter() - wall_started
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--deck", type=Path, help="an existing deck (default: generate one)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--child", nargs=2, metavar=("URL", "DECK"), help=argparse.SUPPRESS)
    parser.add_argument("--replace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.replace)
        return

    from agent.adapters.sql.engine import make_engine, session_factory, transaction
    from agent.adapters.sql.migrate import upgrade
    from agent.adapters.sql.plans import create_plan

    with tempfile.TemporaryDirectory() as tmp:
        deck = args.deck
        if deck is None:
            deck = Path(tmp) / f"deck-{args.rows}.csv"
            started = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "rates" / "generate_world_deck.py"), "--rows", str(args.rows),
                            "--out", str(deck)], check=True)
            print(f"generated {deck.name} in {time.perf_counter() - started:.1f} s")
        print(f"deck: {deck} ({deck.stat().st_size / 2**20:.1f} MiB)")

        admin = make_engine(args.admin_url).execution_options(isolation_level="AUTOCOMMIT")
        name = f"ba_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        try:
            engine = make_engine(url)
            upgrade(engine)
            with transaction(session_factory(engine)) as session:
                create_plan(session, PLAN)
            results: dict[str, list[dict[str, float]]] = {"empty": [], "replace": []}
            for _ in range(args.runs):
                with engine.begin() as conn:
                    conn.execute(text("TRUNCATE rates"))
                results["empty"].append(run_child(url, deck, replace=False))
                print("empty  ", json.dumps(results["empty"][-1]))
                results["replace"].append(run_child(url, deck, replace=True))
                print("replace", json.dumps(results["replace"][-1]))
            engine.dispose()
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            admin.dispose()

    print(f"\n{'kind':<8} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'validate s':>10} "
          f"{'rows/s':>8} {'peak RSS MB':>11} {'(baseline)':>10}")
    for kind, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        median = statistics.median(seconds)
        print(f"{kind:<8} {len(runs):>4} {median:>9.1f} {min(seconds):>7.1f} {max(seconds):>7.1f} "
              f"{statistics.median(r['validate_seconds'] for r in runs):>10.1f} "
              f"{runs[0]['rows'] / median:>8.0f} {statistics.median(r['peak_rss_mb'] for r in runs):>11.0f} "
              f"{statistics.median(r['baseline_rss_mb'] for r in runs):>10.0f}")


if __name__ == "__main__":
    main()
