#!/usr/bin/env python3
"""Benchmark: the in-memory rate table on a 1,000,000-prefix plan.

Goals (issue "Rating engine"): >= 200,000 lookups per second on one core; loading the plan into
memory in <= 10 s and <= 300 MB resident.

    python bench/bench_rating.py                          # generate the deck, memory + SQLite + PostgreSQL
    python bench/bench_rating.py --deck deck.csv --backends sqlite --runs 5
    python bench/bench_rating.py --backends none          # in-memory build and lookups only

The deck is ``rates/generate_world_deck.py --rows N`` (real country codes, peak/off-peak windows,
scheduled price changes, blocked premium ranges, padded with 8-11 digit ranges). Every
measurement runs in a fresh child process, so its RSS is its own:

* ``memory``: stream the CSV through ``agent.core.ratedeck`` into a ``RateTableBuilder``
  (the time of the builder alone is reported beside the total, which includes CSV parsing),
  then time lookups of numbers made from the deck's prefixes (90 %, completed to 11-13
  digits, written with ``+``, ``00`` or bare) and random numbers (10 %, some match nothing).
  Lookups/s is reported in wall time and in CPU time of the process (``time.process_time``):
  on 2 shared, noisy cores the CPU figure is the one that says what one core does.
* ``sqlite`` / ``postgresql`` / ``mysql``: the deck is imported once with the real importer
  (``rates import``), then each child loads the plan with ``load_table`` (what the daemon
  does) and reports the time, the peak RSS (VmHWM: everything the process ever held,
  interpreter, SQLAlchemy and driver included) and the RSS once loaded.

Medians of ``--runs`` runs; the machine is 2 shared cores: read medians and ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLAN = "bench"
AT = "2026-03-04T10:30:00Z"  # a Wednesday morning: inside the peak windows of the deck
SERVER_URLS = {
    "postgresql": os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def make_numbers(prefixes: list[str], count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    numbers = []
    for _ in range(count):
        if rng.random() < 0.9:
            prefix = rng.choice(prefixes)
            total = max(len(prefix) + 1, rng.randint(11, 13))
            digits = prefix + "".join(rng.choices("0123456789", k=total - len(prefix)))
        else:
            digits = str(rng.randint(10**10, 10**12))
        numbers.append(rng.choice(("+", "00", "")) + digits)
    return numbers


def time_lookups(table: Any, numbers: list[str], at_ms: int, runs: int) -> dict[str, Any]:
    from agent.core.rating import RateRow

    wall, cpu = [], []
    found = 0
    for _ in range(runs):
        found = 0
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        for number in numbers:
            if table.lookup(number, at_ms).__class__ is RateRow:
                found += 1
        wall.append(len(numbers) / (time.perf_counter() - wall_start))
        cpu.append(len(numbers) / (time.process_time() - cpu_start))
    return {"lookups_per_s_wall": statistics.median(wall), "lookups_per_s_cpu": statistics.median(cpu),
            "lookups_per_s_cpu_runs": [round(x) for x in cpu], "hit_ratio": found / len(numbers)}


# ------------------------------------------------------------------------------ child processes


def child_memory(deck: str, lookups: int, runs: int) -> dict[str, Any]:
    from agent.core.clock import parse_iso8601
    from agent.core.ratedeck import RateRow as DeckRow
    from agent.core.ratedeck import parse_header, parse_row
    from agent.core.ratetable import RateTableBuilder, epoch_ms, epoch_ms_ceil

    rss_before, _ = rss_mb()
    builder = RateTableBuilder(PLAN)
    rng = random.Random(1)
    sample: list[str] = []
    builder_seconds = 0.0
    started = time.perf_counter()
    with open(deck, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = parse_header(next(reader))
        assert not isinstance(header, list), header
        batch: list[DeckRow] = []
        for line, cells in enumerate(reader, start=2):
            row = parse_row(header, cells, line)
            assert not isinstance(row, list), row
            batch.append(row)
            if len(sample) < 100_000:
                sample.append(row.prefix)
            elif rng.random() < 0.1:
                sample[rng.randrange(len(sample))] = row.prefix
            if len(batch) == 10_000:
                builder_seconds += add_batch(builder, batch, epoch_ms_ceil)
                batch = []
        builder_seconds += add_batch(builder, batch, epoch_ms_ceil)
    build_started = time.perf_counter()
    table = builder.build()
    builder_seconds += time.perf_counter() - build_started
    total_seconds = time.perf_counter() - started
    del batch
    rss_after, peak = rss_mb()
    numbers = make_numbers(sample, lookups)
    figures = {"rows": len(table), "prefixes": table.prefix_count, "total_seconds": total_seconds,
               "builder_seconds": builder_seconds, "rss_before_mb": rss_before, "rss_after_mb": rss_after,
               "peak_rss_mb": peak}
    figures.update(time_lookups(table, numbers, epoch_ms(parse_iso8601(AT)), runs))
    return figures


def add_batch(builder: Any, batch: list[Any], to_ms: Any) -> float:
    started = time.perf_counter()
    add = builder.add_fields
    for r in batch:
        add(r.prefix, r.destination, r.rate_micros, r.connect_fee_micros, r.initial_increment, r.increment,
            r.minimum_seconds, r.grace_seconds, to_ms(r.effective_from),
            None if r.effective_to is None else to_ms(r.effective_to), r.weekdays, r.time_from_minute,
            r.time_to_minute, r.blocked, None)
    return time.perf_counter() - started


def child_load(url: str, lookups: int, runs: int) -> dict[str, Any]:
    from agent.adapters.sql.engine import make_engine
    from agent.adapters.sql.rate_repository import load_table
    from agent.core.clock import parse_iso8601
    from agent.core.ratetable import epoch_ms

    engine = make_engine(url)
    rss_before, _ = rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    table = load_table(engine, PLAN)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    rss_after, peak = rss_mb()
    engine.dispose()
    with engine.connect() as conn:
        from sqlalchemy import text

        prefixes = [p for (p,) in conn.execute(text("SELECT prefix FROM rates ORDER BY id LIMIT 100000"))]
    numbers = make_numbers(prefixes, lookups)
    figures = {"rows": len(table), "seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before_mb": rss_before,
               "rss_after_mb": rss_after, "peak_rss_mb": peak}
    figures.update(time_lookups(table, numbers, epoch_ms(parse_iso8601(AT)), max(1, runs // 2)))
    return figures


def run_child(options: argparse.Namespace, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--runs", str(options.runs), "--lookups", str(options.lookups),
                          "--child", *args], check=True, capture_output=True, text=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------ parent


def import_into(url: str, deck: Path) -> float:
    from agent.adapters.sql.engine import make_engine, session_factory
    from agent.adapters.sql.migrate import upgrade
    from agent.adapters.sql.rate_import import import_deck

    engine = make_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    import_deck(session_factory(engine), deck, PLAN, create_missing_plan=True)
    engine.dispose()
    return time.perf_counter() - started


def server_database(backend: str) -> tuple[str, Any]:
    """Create a throw-away database on a server; return its URL and a function that drops it."""
    from sqlalchemy import text

    from agent.adapters.sql.engine import make_engine

    admin = make_engine(SERVER_URLS[backend]).execution_options(isolation_level="AUTOCOMMIT")
    name = f"ba_bench_rating_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()

    return admin.url.set(database=name).render_as_string(hide_password=False), drop


def summarise(kind: str, runs: list[dict[str, Any]]) -> str:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    seconds = med("seconds") if "seconds" in runs[0] else med("total_seconds")
    extra = f" (builder alone {med('builder_seconds'):.1f} s)" if "builder_seconds" in runs[0] else ""
    extra += f" (cpu {med('cpu_seconds'):.1f} s)" if "cpu_seconds" in runs[0] else ""
    return (f"{kind:<10} rows {runs[0]['rows']:>9,}  load {seconds:5.1f} s{extra}  "
            f"RSS loaded {med('rss_after_mb'):5.0f} MB (before {med('rss_before_mb'):3.0f}), "
            f"peak {med('peak_rss_mb'):4.0f} MB  "
            f"lookups/s cpu {med('lookups_per_s_cpu'):>9,.0f} wall {med('lookups_per_s_wall'):>9,.0f}  "
            f"hits {runs[0]['hit_ratio']:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--deck", type=Path, help="an existing deck (default: generate one)")
    parser.add_argument("--runs", type=int, default=5, help="lookup runs per child (median)")
    parser.add_argument("--load-runs", type=int, default=3, help="children per kind (median)")
    parser.add_argument("--lookups", type=int, default=200_000, help="numbers per lookup run")
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql, mysql, or none")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            print(json.dumps(child_memory(rest[0], args.lookups, args.runs)))
        else:
            print(json.dumps(child_load(rest[0], args.lookups, args.runs)))
        return

    backends = [b for b in args.backends.split(",") if b and b != "none"]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        deck = args.deck
        if deck is None:
            deck = Path(tmp) / f"deck-{args.rows}.csv"
            started = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "rates" / "generate_world_deck.py"), "--rows", str(args.rows),
                            "--out", str(deck)], check=True, cwd=ROOT)
            print(f"generated {deck.name} in {time.perf_counter() - started:.1f} s")
        runs = []
        for _ in range(args.load_runs):
            runs.append(run_child(args, "memory", str(deck)))
            print("memory", json.dumps(runs[-1]), flush=True)
        lines.append(summarise("memory", runs))
        for backend in backends:
            drop = None
            if backend == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            else:
                url, drop = server_database(backend)
            try:
                print(f"{backend}: imported in {import_into(url, deck):.1f} s", flush=True)
                runs = []
                for _ in range(args.load_runs):
                    runs.append(run_child(args, "load", url))
                    print(backend, json.dumps(runs[-1]), flush=True)
                lines.append(summarise(backend, runs))
            finally:
                if drop is not None:
                    drop()
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
