"""Nibble debits per second from N processes: a 3-master Redis Cluster against one Redis, same run.

    python bench/bench_cluster.py [--processes 5] [--calls 2000] [--rounds 5] [--batch 250] [--runs 3]
    python bench/bench_cluster.py --compare --runs 4     # nibbles.lua against the pipeline, in turn

Both deployments are started here from the installed ``redis-server`` (free loopback ports,
nothing on disk; the cluster has 3 masters + 3 replicas, as in the tests) and stopped at the end.
Each process opens its own store (``make_client`` of the URL, as a daemon would), authorizes
``--calls`` calls on its share of the accounts, waits for the others at a barrier, then sends
``--rounds`` rounds of one nibble per call in pipelines of ``--batch`` (the engine's chunk).
The rate of a run is all nibbles over the time from the first start to the last finish; each
figure is the median of ``--runs`` runs (2 shared cores: the runs vary). The ledger is a SQLite
file, read only while the accounts are loaded (before the timed part).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from multiprocessing.synchronize import Barrier
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.redis_servers starts the servers

from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.plans import create_plan
from agent.core.balance import NibbleRequest, NibbleStatus
from tests.redis_servers import start_cluster, start_server

TTL_MS = 600_000
SLICE = 6_000  # micro-units per nibble
BARRIER_TIMEOUT_S = 120


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def worker(url: str, ledger: str, prefix: str, index: int, args: argparse.Namespace, barrier: Barrier,
           results: multiprocessing.Queue[tuple[int, float, float]]) -> None:
    engine = make_engine(ledger)
    store = RedisBalanceStore(make_client(url, 2000), session_factory(engine), key_prefix=prefix)
    store._batched = not args.pipeline  # --pipeline: one nibble.lua per nibble, as before nibbles.lua
    calls = [(f"p{index}-c{i}", f"acct{(index * args.calls + i) % args.accounts}") for i in range(args.calls)]
    for call_id, account in calls:
        assert store.authorize(account, call_id, "bench", SLICE, SLICE, now_ms(), TTL_MS).allowed
    barrier.wait(timeout=BARRIER_TIMEOUT_S)
    started = time.perf_counter()
    done = 0
    for seq in range(1, args.rounds + 1):
        t = now_ms()
        for start in range(0, len(calls), args.batch):
            chunk = calls[start:start + args.batch]
            requests = [NibbleRequest(c, seq, SLICE, SLICE, t, TTL_MS, a) for c, a in chunk]
            outcomes = store.debit_and_reserve_many(requests)
            assert all(o.status is NibbleStatus.GRANTED for o in outcomes), outcomes[0]
            done += len(chunk)
    finished = time.perf_counter()
    for call_id, account in calls:
        store.settle(call_id, args.rounds + 1, args.rounds * SLICE, now_ms(), account_id=account)
    store.close()
    engine.dispose()
    results.put((done, started, finished))


def one_run(url: str, ledger: str, args: argparse.Namespace) -> float:
    """Nibble debits per second of all processes together against ``url``."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    loader = RedisBalanceStore(make_client(url, 2000), session_factory(make_engine(ledger)), key_prefix=prefix)
    for i in range(args.accounts):  # load every account once, so the processes never wait on SQLite
        loader.account_state(f"acct{i}")
    loader.close()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(args.processes)
    results: multiprocessing.Queue[tuple[int, float, float]] = context.Queue()
    processes = [context.Process(target=worker, args=(url, ledger, prefix, i, args, barrier, results))
                 for i in range(args.processes)]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=BARRIER_TIMEOUT_S * 2) for _ in processes]
    for p in processes:
        p.join(timeout=30)
        if p.exitcode != 0:
            raise RuntimeError(f"a worker failed (exit code {p.exitcode})")
    total = sum(done for done, _, _ in outcomes)
    return total / (max(f for _, _, f in outcomes) - min(s for _, s, _ in outcomes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="live calls per process")
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="nibbles per call per run")
    parser.add_argument("--batch", type=int, default=250, help="nibbles per pipeline (the engine's chunk)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pipeline", action="store_true",
                        help="one script per nibble in a pipeline (the store's fallback) instead of nibbles.lua")
    parser.add_argument("--compare", action="store_true",
                        help="each run both ways (nibbles.lua and the pipeline, in turn) on both deployments: "
                             "the ratio of the two in the same moments of the machine")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    ledger = f"sqlite:///{tmp / 'ledger.db'}"
    engine = make_engine(ledger)
    upgrade(engine)
    with transaction(session_factory(engine)) as s:
        create_plan(s, "bench")
        for i in range(args.accounts):
            repo.create_account(s, f"acct{i}", plan="bench", balance_micros=10**12)
    engine.dispose()
    single = start_server(tmp / "single")
    cluster = start_cluster(tmp / "cluster")
    try:
        single_url, rates_single, rates_cluster = f"redis://127.0.0.1:{single.port}/0", [], []
        if args.compare:
            compare(args, ledger, {"single": single_url, "cluster": cluster.url})
            return
        for _ in range(args.runs):  # interleaved: both see the same moments of the shared machine
            rates_single.append(one_run(single_url, ledger, args))
            rates_cluster.append(one_run(cluster.url, ledger, args))
        median_single, median_cluster = statistics.median(rates_single), statistics.median(rates_cluster)
        print(json.dumps({
            "processes": args.processes, "calls_per_process": args.calls, "batch": args.batch,
            "nibbles": "pipeline of nibble.lua" if args.pipeline else "nibbles.lua runs",
            "rounds": args.rounds, "runs": args.runs,
            "single_redis_nibbles_per_s_median": round(median_single),
            "single_redis_runs": [round(r) for r in rates_single],
            "cluster_3_masters_nibbles_per_s_median": round(median_cluster),
            "cluster_runs": [round(r) for r in rates_cluster],
            "cluster_to_single_ratio": round(median_cluster / median_single, 2),
        }, indent=2))
    finally:
        cluster.stop()
        single.stop()


def compare(args: argparse.Namespace, ledger: str, urls: dict[str, str]) -> None:
    """Each run: on each deployment, nibbles.lua and the pipeline one after the other (the order
    alternates from run to run); medians and the batched / pipeline ratio per deployment."""
    rates: dict[tuple[str, bool], list[float]] = {}
    for run in range(args.runs):
        for name, url in urls.items():
            for pipeline in ((False, True) if run % 2 == 0 else (True, False)):
                way = argparse.Namespace(**{**vars(args), "pipeline": pipeline})
                rates.setdefault((name, pipeline), []).append(one_run(url, ledger, way))
    report: dict[str, object] = {"processes": args.processes, "calls_per_process": args.calls, "batch": args.batch,
                                 "rounds": args.rounds, "runs": args.runs}
    for name in urls:
        batched, piped = statistics.median(rates[(name, False)]), statistics.median(rates[(name, True)])
        report[name] = {"nibbles_lua_per_s_median": round(batched), "pipeline_per_s_median": round(piped),
                        "nibbles_lua_runs": [round(r) for r in rates[(name, False)]],
                        "pipeline_runs": [round(r) for r in rates[(name, True)]],
                        "ratio": round(batched / piped, 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
