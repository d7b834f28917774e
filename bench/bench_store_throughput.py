"""Redis balance store throughput from one process (issue 4 figures).

    python bench/bench_store_throughput.py [--calls 5000] [--batch 1000] [--runs 5] [--gevent]

* nibble debits per second: every live call nibbles once per round, sent as pipelines of
  ``--batch`` nibble scripts (one round trip each), as the daemon does once per tick;
* authorize latency of the store path (hint + script in one round trip), one call at a time:
  p50 / p99 / p99.9 over ``--authorizes`` calls (accounts already loaded from SQL).

Real Redis on loopback; the ledger is a throw-away SQLite file (not on this path). Each figure
is the median of ``--runs`` runs: the machine is 2 shared cores. ``--gevent`` monkey-patches
first, as the daemon does. Keys use a unique prefix, deleted at the end.
"""

from __future__ import annotations

import sys

if "--gevent" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis
import redis.utils

from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.plans import create_plan
from agent.core.balance import NibbleRequest, NibbleStatus

TTL_MS = 600_000
SLICE = 6_000  # micro-units per nibble


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def nibble_run(store: RedisBalanceStore, call_ids: list[str], seq: int, batch: int) -> float:
    t = now_ms()
    started = time.perf_counter()
    for start in range(0, len(call_ids), batch):
        requests = [NibbleRequest(c, seq, SLICE, SLICE, t, TTL_MS) for c in call_ids[start:start + batch]]
        outcomes = store.debit_and_reserve_many(requests)
        assert all(o.status is NibbleStatus.GRANTED for o in outcomes), outcomes[0]
    return len(call_ids) / (time.perf_counter() - started)


def ping_run(client: redis.Redis, count: int) -> list[float]:
    """The floor under any store call: one round trip to Redis, same client, same moment."""
    latencies_ms = []
    for _ in range(count):
        started = time.perf_counter_ns()
        client.ping()
        latencies_ms.append((time.perf_counter_ns() - started) / 1e6)
    return latencies_ms


def authorize_run(store: RedisBalanceStore, accounts: int, count: int, tag: str) -> list[float]:
    latencies_ms = []
    for i in range(count):
        call_id = f"auth-{tag}-{i}"
        t = now_ms()
        started = time.perf_counter_ns()
        out = store.authorize(f"acct{i % accounts}", call_id, "bench", SLICE, SLICE, t, TTL_MS)
        latencies_ms.append((time.perf_counter_ns() - started) / 1e6)
        assert out.allowed
    for i in range(count):
        store.release(f"auth-{tag}-{i}", 1, now_ms())
    return latencies_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4, help="nibble rounds per run")
    parser.add_argument("--authorizes", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--gevent", action="store_true")
    args = parser.parse_args()

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    tmp = Path(tempfile.mkdtemp())
    engine = make_engine(f"sqlite:///{tmp / 'ledger.db'}")
    upgrade(engine)
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        create_plan(s, "bench")
        for i in range(args.accounts):
            repo.create_account(s, f"acct{i}", plan="bench", balance_micros=10**15)
    store = RedisBalanceStore(make_client(args.redis_url, 2000), sessions, key_prefix=prefix)
    try:
        call_ids = [f"call{i}" for i in range(args.calls)]
        for i, call_id in enumerate(call_ids):  # also loads every account from SQL
            assert store.authorize(f"acct{i % args.accounts}", call_id, "bench", SLICE, SLICE, now_ms(), TTL_MS).allowed
        nibble_rates, p50s, p99s, p999s, ping_p50s, ping_p99s = [], [], [], [], [], []
        ping_client = make_client(args.redis_url, 2000)
        seq = 0
        for run in range(args.runs):
            rates = []
            for _ in range(args.rounds):
                seq += 1
                rates.append(nibble_run(store, call_ids, seq, args.batch))
            nibble_rates.append(statistics.median(rates))
            latencies = authorize_run(store, args.accounts, args.authorizes, str(run))
            p50s.append(percentile(latencies, 0.50))
            p99s.append(percentile(latencies, 0.99))
            p999s.append(percentile(latencies, 0.999))
            pings = ping_run(ping_client, args.authorizes)
            ping_p50s.append(percentile(pings, 0.50))
            ping_p99s.append(percentile(pings, 0.99))
        for call_id in call_ids:
            store.settle(call_id, seq + 1, 0, now_ms())
        print(json.dumps({
            "gevent": args.gevent,
            "live_calls": args.calls,
            "batch": args.batch,
            "runs": args.runs,
            "nibble_debits_per_s_median": round(statistics.median(nibble_rates)),
            "nibble_debits_per_s_runs": [round(r) for r in nibble_rates],
            "authorize_ms_p50_median": round(statistics.median(p50s), 3),
            "authorize_ms_p99_median": round(statistics.median(p99s), 3),
            "authorize_ms_p999_median": round(statistics.median(p999s), 3),
            "authorize_ms_p99_runs": [round(p, 3) for p in p99s],
            "ping_ms_p50_median": round(statistics.median(ping_p50s), 3),
            "ping_ms_p99_median": round(statistics.median(ping_p99s), 3),
            "hiredis": redis.utils.HIREDIS_AVAILABLE,
        }, indent=2))
    finally:
        store.close()
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
        engine.dispose()


if __name__ == "__main__":
    main()
