#!/usr/bin/env python3
"""Daemon lifecycle figures (issue 8): start to ready, shutdown with many live calls, demo wall time.

    python bench/bench_daemon.py                          # 3 runs, 1,000 live calls, Asterisk
    python bench/bench_daemon.py --calls 1000 --runs 3 --pbx freeswitch --drain 20

Each run, in a fresh child process monkey-patched like ``billing-agent run``:

1. prepares a temporary SQLite database as the demo does (schema, demo deck, one account with
   money for every call), starts the simulated PBX (fake Asterisk: FastAGI + AMI; or fake
   FreeSWITCH) and the real daemon, and times ``Daemon.start()`` (status port, database, schema,
   store, rate plans, CDR spool, PBX listener) until ready, then until the PBX is connected;
2. places ``--calls`` calls that talk for ten minutes and waits until all are answered and
   supervised (1 s nibbles);
3. times ``Daemon.shutdown()`` as SIGTERM does: refuse new calls, drain for ``--drain`` seconds
   (``daemon.drain_seconds``; the calls do not end by themselves), stop the PBX connections, flush
   the CDRs, close the store. Then counts the reservations left open (handed over: they stay
   valid until they expire) and checks that a sweep after their TTL closes every one and that
   the ledger check passes.

Finally ``billing-agent demo`` is timed (wall clock, child process). Medians of ``--runs``; the
machine has 2 shared, noisy cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> dict[str, float]:
    from gevent import monkey

    monkey.patch_all()
    import logging
    from datetime import timedelta

    import gevent

    from agent.adapters.balance import make_balance_store
    from agent.adapters.sql.accounts import create_account
    from agent.adapters.sql.engine import make_engine, session_factory, transaction
    from agent.adapters.sql.models import utcnow
    from agent.adapters.sql.reconcile import check_ledger
    from agent.cli.demo import SimulatedPbx, demo_config, prepare_database
    from agent.daemon import Daemon

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent.daemon").setLevel(logging.INFO)
    folder = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    url = f"sqlite:///{folder / 'billing-agent.db'}"
    sql = prepare_database(url, folder)
    with transaction(session_factory(sql)) as session:
        create_account(session, "bulk", plan="demo", balance_micros=10_000 * 1_000_000)
    sql.dispose()
    pbx = SimulatedPbx(args.pbx)
    config = demo_config(folder, args.pbx, pbx.agi_port, pbx.port)
    from dataclasses import replace

    # The shipped nibble (6 s), not the demo's 1 s.
    config = replace(config, daemon=replace(config.daemon, drain_seconds=args.drain),
                     billing=replace(config.billing, nibble_seconds=args.nibble_seconds))
    daemon = Daemon(config)
    began = time.monotonic()
    daemon.start()
    ready_s = time.monotonic() - began
    with gevent.Timeout(30):
        while not all(a.connected() for a in daemon.adapters):
            gevent.sleep(0.01)
    connected_s = time.monotonic() - began

    handles = []
    for i in range(args.calls):
        handles.append(pbx.fake.place_call("bulk", f"3314{i:07d}", caller=f"{2000 + i}", answer_after_ms=100,
                                           talk_ms=600_000))
        if i % 50 == 49:
            gevent.sleep(0.05)  # 1,000 calls in about a second, as a busy PBX would send them
    placing_done = time.monotonic()
    with gevent.Timeout(120):
        while sum(1 for c in daemon.live_call_dicts() if c["phase"] == "answered") < args.calls:
            gevent.sleep(0.1)
    all_answered_s = time.monotonic() - placing_done
    gevent.sleep(3)  # a few nibbles on every call

    began = time.monotonic()
    daemon.shutdown()
    shutdown_s = time.monotonic() - began
    pbx.stop()

    sql = make_engine(url)
    store = make_balance_store(config, sql)  # the daemon's store: SQL reservations or Redis
    left_open = len(store.live_calls())
    later_ms = int(time.time() * 1000) + config.billing.reservation_ttl_seconds * 1000 + 1000
    while store.expire(later_ms).expired:
        pass
    after_sweep = len(store.live_calls())
    store.close()
    with transaction(session_factory(sql)) as session:
        report = check_ledger(session, now=utcnow(), grace=timedelta(hours=1))
    sql.dispose()
    return {"ready_s": ready_s, "connected_s": connected_s, "all_answered_s": all_answered_s,
            "shutdown_s": shutdown_s, "open_after_shutdown": float(left_open or 0),
            "open_after_ttl_sweep": float(after_sweep or 0), "ledger_ok": float(report.ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pbx", choices=["asterisk", "freeswitch"], default="asterisk")
    parser.add_argument("--drain", type=float, default=20.0, help="daemon.drain_seconds (default 20, as shipped)")
    parser.add_argument("--nibble-seconds", type=int, default=6, help="billing.nibble_seconds (default 6, as shipped)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-demo", action="store_true", help="skip timing billing-agent demo")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = []
    for i in range(args.runs):
        command = [sys.executable, __file__, "--child", "--calls", str(args.calls), "--pbx", args.pbx,
                   "--drain", str(args.drain), "--nibble-seconds", str(args.nibble_seconds)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(result)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    print(f"\nmedians over {args.runs} runs, {args.calls} live calls, {args.pbx}, drain {args.drain:.0f} s:")
    for key in runs[0]:
        print(f"  {key:<22} {statistics.median(r[key] for r in runs):8.2f}")
    if not args.no_demo:
        walls = []
        for _ in range(args.runs):
            began = time.monotonic()
            subprocess.run([sys.executable, "-m", "agent.entry", "demo"], capture_output=True, check=True)
            walls.append(time.monotonic() - began)
        each = ", ".join(f"{w:.1f}" for w in walls)
        print(f"  {'demo wall (s)':<22} {statistics.median(walls):8.2f}  (runs: {each})")


if __name__ == "__main__":
    main()
