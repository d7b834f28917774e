#!/usr/bin/env python3
"""Benchmark the CDR pipeline on PostgreSQL: spool replay, visibility delay, sustained rate, export.

    python bench/bench_cdr.py                  # everything, 3 runs each (medians reported)
    python bench/bench_cdr.py --only replay,visible --runs 5
    python bench/bench_cdr.py --only export --export-rows 1000000

Parts (each run in a fresh child process, so that peak RSS is the part's own):

* ``replay``: 20 s of traffic at 5,000 CDR/s (100,000 calls) is spooled, then (a) read back and
  decoded from the spool alone, (b) replayed into PostgreSQL by the pipeline (COPY). The goal is
  replay >= 10x real time, i.e. >= 50,000 CDR/s. Also reports the cost of ``submit`` itself.
* ``visible``: the pipeline runs under gevent (monkey-patched, as in the daemon) with the default
  settings (batch 500, flush interval 500 ms) while a greenlet settles calls at a steady rate
  (5,000/s by default) for ``--seconds``; each call's delay from ``submit`` to its batch's commit
  is measured. Goals: p99 <= 2 s; the rate is sustained (the spool is empty at the end).
* ``export``: ``--export-rows`` calls (2 legs and a decision each) are generated server-side with
  ``generate_series``; ``billing-agent cdrs export`` writes them to a CSV file in a child
  process; also 1/10 of them, to show that peak memory does not grow with the row count. Goal:
  >= 50,000 rows/s with bounded memory.

It creates a throw-away database on the server and drops it at the end. The machine is 2 shared
cores: read medians, not single runs.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RATE_PER_S = 5_000
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _truncate(url: str) -> None:
    from sqlalchemy import text

    from agent.adapters.sql.engine import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE calls, call_legs, rating_decisions, cdr_quarantine"))
    engine.dispose()


# --------------------------------------------------------------------------- replay


def part_replay(url: str, count: int) -> dict[str, float]:
    from agent.adapters.cdr.spool import Spool
    from agent.adapters.sql.cdr_writer import SqlCdrStore
    from agent.adapters.sql.engine import make_engine
    from agent.services.cdr_pipeline import CdrPipeline, PipelineSettings, decode_record, spool_payload
    from tests.cdr_builders import make_record

    _truncate(url)
    folder = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    spool = Spool(folder, max_bytes=4 << 30)
    records = [make_record(i, call_id=f"bench-{i:08d}") for i in range(count)]
    started = time.perf_counter()
    for record in records:
        spool.append(spool_payload(record))  # what submit() does on the call path
    submit_s = time.perf_counter() - started
    spool.sync()
    spool.close()
    del records

    spool = Spool(folder, max_bytes=4 << 30)
    started = time.perf_counter()
    decoded = 0
    while entries := spool.read(500).entries:
        decoded += sum(1 for e in entries if decode_record(e.payload))
    read_s = time.perf_counter() - started
    spool.close()
    assert decoded == count

    engine = make_engine(url)
    pipeline = CdrPipeline(Spool(folder, max_bytes=4 << 30), SqlCdrStore(engine), PipelineSettings(batch_size=500))
    started = time.perf_counter()
    report = pipeline.replay_now()
    replay_s = time.perf_counter() - started
    pipeline.stop(5)
    engine.dispose()
    assert report.written == count and report.backlog_bytes == 0
    return {"count": count, "submit_us": submit_s / count * 1e6, "read_decode_per_s": count / read_s,
            "replay_per_s": count / replay_s, "replay_s": replay_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------- visibility


def part_visible(url: str, rate_per_s: int, seconds: float) -> dict[str, float]:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from agent.adapters.cdr.spool import Spool
    from agent.adapters.sql.cdr_writer import SqlCdrStore
    from agent.adapters.sql.engine import make_engine
    from agent.config import CdrConfig
    from agent.core.cdr import CallRecord
    from agent.services.cdr_pipeline import CdrPipeline, CdrWriteReport, PipelineSettings
    from tests.cdr_builders import make_record

    _truncate(url)
    delays_ms: list[float] = []
    submit_us: list[float] = []
    store = SqlCdrStore(make_engine(url))

    class Timed:
        """The SQL store, noting when each call's batch committed."""

        def write(self, records: list[CallRecord]) -> CdrWriteReport:
            report = store.write(records)
            now_ms = time.time() * 1000
            delays_ms.extend(now_ms - (r.settled_ms or 0) for r in records)
            return report

        def write_spooled(self, payloads: list[bytes], *, sending: Any = None) -> list[int] | None:
            settled = store.write_spooled(payloads, sending=sending)
            if settled is not None:
                now_ms = time.time() * 1000
                delays_ms.extend(now_ms - moment for moment in settled)
            return settled

        def quarantine(self, rejected: Any) -> None:
            store.quarantine(rejected)

    defaults = CdrConfig()
    folder = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    pipeline = CdrPipeline(Spool(folder, max_bytes=4 << 30), Timed(),
                           PipelineSettings(batch_size=defaults.batch_size,
                                            flush_interval_ms=defaults.flush_interval_ms))
    pipeline.start()
    total = int(rate_per_s * seconds)
    template = make_record(0)
    cpu_started, started = time.process_time(), time.monotonic()
    for n in range(total):
        due = started + n / rate_per_s
        wait = due - time.monotonic()
        if wait > 0.002:
            gevent.sleep(wait)
        record = replace(template, call_id=f"vis-{n:08d}", settled_ms=int(time.time() * 1000))
        t = time.perf_counter()
        pipeline.submit(record)
        submit_us.append((time.perf_counter() - t) * 1e6)
    submitted_s = time.monotonic() - started
    backlog_at_end = pipeline.spool.backlog_bytes()
    assert pipeline.flush(120), "the pipeline could not catch up"
    drained_s = time.monotonic() - started
    cpu_s = time.process_time() - cpu_started
    pipeline.stop(5)
    delays_ms.sort()
    submit_us.sort()
    return {"rate_target": rate_per_s, "count": total, "achieved_submit_per_s": total / submitted_s,
            "written_per_s": total / drained_s, "visible_p50_ms": _pct(delays_ms, 50),
            "visible_p99_ms": _pct(delays_ms, 99), "visible_max_ms": delays_ms[-1],
            "submit_p50_us": _pct(submit_us, 50), "submit_p99_us": _pct(submit_us, 99),
            "backlog_bytes_when_submits_ended": backlog_at_end, "process_cpu_share": cpu_s / drained_s}


def _pct(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(round(pct / 100 * len(sorted_values))) - 1))
    return sorted_values[index]


# --------------------------------------------------------------------------- export


GENERATE_SQL = [
    """INSERT INTO calls (id, node, account_id, caller, destination, started_at, answered_at, ended_at,
           duration_ms, disposition, hangup_cause, pbx, settled_at)
       SELECT 'exp-' || lpad(g::text, 9, '0'), 'node' || (g % 4), 'acct-' || (g % 1000), '100',
              '49' || (30000000 + g), t, t + interval '5 s', t + interval '66 s', 61000, 'ANSWERED',
              'NORMAL_CLEARING', 'asterisk', t + interval '66 s'
       FROM (SELECT g, timestamp '2026-01-01' + g * interval '1 s' AS t FROM generate_series(1, :n) g) s""",
    """INSERT INTO call_legs (call_id, pbx_unique_id, channel, direction, sip_call_id, peer, caller, callee,
           created_at, answered_at, ended_at, hangup_cause, billsec, billed)
       SELECT c.id, c.id || leg.suffix, 'PJSIP/trunk-' || c.id, leg.direction, 'sip-' || c.id || leg.suffix,
              leg.peer, '100', c.destination, c.started_at, c.answered_at, c.ended_at, 'NORMAL_CLEARING',
              leg.billsec, leg.billed
       FROM calls c CROSS JOIN (VALUES ('.a', 'inbound', '', 66, false), ('.b', 'outbound', 'carrier', 61, true))
            AS leg(suffix, direction, peer, billsec, billed)
       WHERE c.id LIKE 'exp-%'""",
    """INSERT INTO rating_decisions (call_id, seq, plan_name, rate_id, prefix, rate_micros, billed_seconds,
           cost_micros, decided_at, reason)
       SELECT id, 1, 'retail', 1, '49', 120000, 61, 122000, settled_at, 'settle' FROM calls WHERE id LIKE 'exp-%'""",
]


def generate_export_rows(url: str, rows: int) -> float:
    from sqlalchemy import text

    from agent.adapters.sql.engine import make_engine

    _truncate(url)
    engine = make_engine(url)
    started = time.perf_counter()
    with engine.begin() as conn:
        for statement in GENERATE_SQL:
            conn.execute(text(statement), {"n": rows})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE calls, call_legs, rating_decisions"))
    engine.dispose()
    return time.perf_counter() - started


def run_export(url: str, rows: int, total: int) -> dict[str, float]:
    """`billing-agent cdrs export` of the first ``rows`` calls, in a child process."""
    from datetime import UTC, datetime, timedelta

    code = "from agent.cli.main import main; main()"
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "cdrs.csv"
        args = [sys.executable, "-c", code, "--database-url", url, "cdrs", "export", "-o", str(target)]
        if rows < total:  # the calls start one second apart
            args += ["--until", (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rows + 1)).isoformat()]
        started = time.perf_counter()
        with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT) as child:
            # wait4: this child's own peak RSS (RUSAGE_CHILDREN is the largest of all children so far)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            stderr = child.stderr.read().decode() if child.stderr else ""
        seconds = time.perf_counter() - started
        assert child.returncode == 0, stderr
        with target.open() as handle:
            lines = sum(1 for _ in handle) - 1
        size_mb = target.stat().st_size / 1e6
    assert lines == rows, (lines, rows, stderr)
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "csv_mb": size_mb,
            "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


# --------------------------------------------------------------------------- driver


def child(part: str, url: str, args: list[str]) -> None:
    if part == "replay":
        result = part_replay(url, int(args[0]))
    else:
        result = part_visible(url, int(args[0]), float(args[1]))
    print(json.dumps(result))


def run_child(part: str, url: str, *args: Any) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", part, url, *map(str, args)], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def summarize(name: str, runs: list[dict[str, float]]) -> None:
    print(f"\n== {name}: {len(runs)} runs, median (min-max)")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key:<34} {statistics.median(values):>12.1f}   ({min(values):.1f} - {max(values):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="replay,visible,export")
    parser.add_argument("--replay-count", type=int, default=20 * RATE_PER_S)
    parser.add_argument("--rates", default=str(RATE_PER_S), help="submission rates of the visible part")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the visible part")
    parser.add_argument("--export-rows", type=int, default=1_000_000)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child[0], options.child[1], options.child[2:])
        return

    from sqlalchemy import text

    from agent.adapters.sql.engine import make_engine
    from agent.adapters.sql.migrate import upgrade

    admin = make_engine(options.admin_url).execution_options(isolation_level="AUTOCOMMIT")
    name = f"ba_bench_cdr_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    parts = options.only.split(",")
    print(f"database {name}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        if "replay" in parts:
            runs = [run_child("replay", url, options.replay_count) for _ in range(options.runs)]
            summarize(f"spool replay of {options.replay_count} CDRs (20 s at 5,000/s)", runs)
            median = statistics.median(r["replay_per_s"] for r in runs)
            print(f"  -> replay into PostgreSQL {median / RATE_PER_S:.1f}x real time; spool read+decode "
                  f"{statistics.median(r['read_decode_per_s'] for r in runs) / RATE_PER_S:.1f}x")
        if "visible" in parts:
            for rate in map(int, options.rates.split(",")):
                runs = [run_child("visible", url, rate, options.seconds) for _ in range(options.runs)]
                summarize(f"visibility at {rate}/s for {options.seconds:.0f} s (batch 500, flush 500 ms)", runs)
        if "export" in parts:
            generated = generate_export_rows(url, options.export_rows)
            print(f"\ngenerated {options.export_rows} calls, {2 * options.export_rows} legs, "
                  f"{options.export_rows} decisions in {generated:.1f} s")
            small = options.export_rows // 10
            runs = [run_export(url, options.export_rows, options.export_rows) for _ in range(options.runs)]
            summarize(f"export of {options.export_rows} CDRs to CSV", runs)
            runs = [run_export(url, small, options.export_rows) for _ in range(options.runs)]
            summarize(f"export of {small} CDRs to CSV (memory comparison)", runs)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    main()
