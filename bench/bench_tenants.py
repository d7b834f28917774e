"""Derived charging (DESIGN §11, issue 18): no level overspends, and what a chain costs an authorization.

    python bench/bench_tenants.py overspend [--store redis|sql] [--calls 200] [--nodes 5] [--seed 1]
    python bench/bench_tenants.py auth [--calls 3000] [--runs 3]
    python bench/bench_tenants.py fastagi [--calls 2000] [--rate 200] [--runs 3]

``overspend``: 20 customers (prepaid, EUR-free: one currency here) of one reseller ``acme``
whose own prepaid account is the limit; ``--calls`` concurrent calls spread over ``--nodes``
OS processes, each with its own store instance and connections. Every call is driven as the
engine drives it (agent/core/session.py "Ordering"), in logical time: the customer's first slice
is reserved, then the reseller's under the level's own call id (``call^1``); a refusal at the
reseller releases the customer; each nibble debits and reserves both levels (each its own
step); a partial grant at either level cuts the call when the first of the two budgets runs out;
the settle charges each level its own price of the same seconds. A monitor process polls every
account. The report gives, per account, the lowest balance seen (never below 0), the overrun
recorded (0), Σ charges against Δ balance, reservations left, and the SQL ledger check (every
level's charge belongs to its settled call). The ledger is a throw-away PostgreSQL database.

``auth``: ``Engine.authorize`` in process (gevent, the real PlanRater over SQL look-ups:
AccountPlans, TenantChains, the rate cache; Redis balance store), a customer three levels deep
(operator > r1 > r2 > r3 > customer: four store authorizations) against a direct customer of the
operator (one), interleaved, p50/p99 of each and the difference.

``fastagi``: the same through real FastAGI, as Asterisk asks (bench_asterisk.py's AGI client in
its own process, our FastAGI server and Asterisk adapter, the engine, Redis, the SQL look-ups on
a scratch PostgreSQL ledger): 50 accounts that are direct customers in one run and customers three
levels deep in the other, runs interleaved; the agent's share of each AGI session (environment
read to close), medians of the runs' p50 and p99.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import multiprocessing as mp
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

if len(sys.argv) > 1 and sys.argv[1] in ("auth", "fastagi"):  # the engine runs under gevent, as in the daemon
    from gevent import monkey

    monkey.patch_all()

from bench_overspend import scratch_database  # a PostgreSQL database of its own, and its drop
from sqlalchemy import select

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.models import Call, LedgerEntry, RatingDecision
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.reconcile import check_ledger
from agent.adapters.sql.tenants import create_tenant
from agent.core.session import level_call_id
from agent.ports import BalanceStore

REDIS_URL = "redis://127.0.0.1:6379/0"
RESELLER = "tenant:acme"
CUSTOMERS = 20
CUSTOMER_RATE = 2_000  # micro-units a second: acme's price
RESELLER_RATE = 1_000  # the operator's price to acme
TTL_MS = 600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_store(store_kind: str, ledger_url: str, prefix: str) -> BalanceStore:
    sessions = session_factory(make_engine(ledger_url, pool_size=2))
    if store_kind == "redis":
        from agent.adapters.redis.store import RedisBalanceStore, make_client

        return RedisBalanceStore(make_client(REDIS_URL, 2000), sessions, key_prefix=prefix)
    return SqlBalanceStore(sessions)


# ------------------------------------------------------------------------------------ overspend


@dataclass
class Level:
    account: str
    call_id: str
    rate: int  # micro-units a second
    debited: int = 0
    budget: int = 0


@dataclass
class ChainCall:
    call_id: str
    start_s: int
    nibble_s: int
    duration_s: int
    levels: list[Level] = field(default_factory=list)
    seq: int = 0
    started: bool = False
    end_s: int | None = None

    def affordable_s(self) -> int:
        return min(level.budget // level.rate for level in self.levels)


def node_main(index: int, args: argparse.Namespace, ledger_url: str, prefix: str, start: Any, results: Any) -> None:
    store = open_store(args.store, ledger_url, prefix)
    rng = random.Random(args.seed * 1000 + index)
    calls = []
    for n in range(args.calls // args.nodes):
        call_id = f"n{index}-c{n}"
        customer = f"cust{(index * 7 + n) % CUSTOMERS:02d}"
        calls.append(ChainCall(call_id, rng.randint(0, 20), rng.randint(1, 6), rng.randint(1, 400), [
            Level(customer, call_id, CUSTOMER_RATE), Level(RESELLER, level_call_id(call_id, 1), RESELLER_RATE)]))
    stats = {"authorized": 0, "denied_customer": 0, "denied_reseller": 0, "cut": 0, "settled": 0, "nibble_steps": 0}
    events: list[tuple[int, int, ChainCall]] = [(c.start_s, i, c) for i, c in enumerate(calls)]
    heapq.heapify(events)
    start.wait()
    while events:
        t, i, call = heapq.heappop(events)
        nxt = step(store, call, t, stats)
        if nxt is not None:
            heapq.heappush(events, (nxt, i, call))
    store.close()
    results.put(stats)


def step(store: BalanceStore, call: ChainCall, t: int, stats: dict[str, int]) -> int | None:
    if not call.started:
        call.started = True
        for number, level in enumerate(call.levels):  # the customer first, then upward
            slice_micros = level.rate * call.nibble_s
            out = store.authorize(level.account, level.call_id, "node", slice_micros, level.rate, now_ms(), TTL_MS)
            if not out.allowed:
                stats["denied_customer" if number == 0 else "denied_reseller"] += 1
                for before in call.levels[:number]:  # released on failure
                    store.release(before.call_id, 1, now_ms(), account_id=before.account)
                return None
            level.budget = out.granted_micros
        stats["authorized"] += 1
        if call.affordable_s() < min(call.nibble_s, call.duration_s):
            call.end_s = call.start_s + call.affordable_s()
            stats["cut"] += 1
            return call.end_s
        return call.start_s + min(call.nibble_s, call.duration_s)
    elapsed = t - call.start_s
    if call.end_s is not None or elapsed >= call.duration_s:
        used_s = min(elapsed, call.duration_s)
        for level in call.levels:  # each level its own price of the same seconds
            store.settle(level.call_id, call.seq + 1, min(level.rate * used_s, level.budget), now_ms(),
                         account_id=level.account)
        stats["settled"] += 1
        return None
    call.seq += 1
    short = False
    k_s = elapsed
    for level in call.levels:
        debit = level.rate * k_s - level.debited
        out = store.debit_and_reserve(level.call_id, call.seq, debit, level.rate * call.nibble_s, now_ms(), TTL_MS,
                                      account_id=level.account)
        stats["nibble_steps"] += 1
        level.debited += debit
        level.budget = level.debited + out.granted_micros
        short = short or out.granted_micros < level.rate * call.nibble_s
    if short:  # a level runs out: the call is cut when the first budget is spent
        stats["cut"] += 1
        call.end_s = call.start_s + call.affordable_s()
        return max(t, call.end_s)
    return min(t + call.nibble_s, call.start_s + call.duration_s)


def monitor_main(args: argparse.Namespace, ledger_url: str, prefix: str, stop: Any, results: Any) -> None:
    store = open_store(args.store, ledger_url, prefix)
    accounts = [RESELLER, *(f"cust{n:02d}" for n in range(CUSTOMERS))]
    lowest = {a: 0 for a in accounts}
    first = True
    samples = 0
    while not stop.is_set():
        for account in accounts:
            balance = store.account_state(account).balance_micros
            lowest[account] = balance if first else min(lowest[account], balance)
        first = False
        samples += 1
    store.close()
    results.put({"lowest": lowest, "samples": samples})


def overspend(args: argparse.Namespace) -> dict[str, Any]:
    ledger_url, drop = scratch_database()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    engine = make_engine(ledger_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        with transaction(sessions) as s:
            create_plan(s, "wholesale", currency="EUR")
            create_tenant(s, "acme", parent="default", currency="EUR", plan="wholesale",
                          balance_micros=args.reseller_micros)
            create_plan(s, "acme-retail", currency="EUR", tenant="acme")
            for n in range(CUSTOMERS):
                repo.create_account(s, f"cust{n:02d}", plan="acme-retail", tenant="acme",
                                    balance_micros=args.customer_micros)
        opening = {RESELLER: args.reseller_micros, **{f"cust{n:02d}": args.customer_micros for n in range(CUSTOMERS)}}
        ctx = mp.get_context("spawn")
        start, stop, results, watch = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
        nodes = [ctx.Process(target=node_main, args=(i, args, ledger_url, prefix, start, results))
                 for i in range(args.nodes)]
        monitor = ctx.Process(target=monitor_main, args=(args, ledger_url, prefix, stop, watch))
        for p in [*nodes, monitor]:
            p.start()
        time.sleep(3)
        began = time.monotonic()
        start.set()
        totals: dict[str, int] = {}
        for _ in nodes:
            for key, value in results.get(timeout=600).items():
                totals[key] = totals.get(key, 0) + value
        elapsed = time.monotonic() - began
        stop.set()
        seen = watch.get(timeout=60)
        for p in [*nodes, monitor]:
            p.join(timeout=60)
        store = open_store(args.store, ledger_url, prefix)
        states = {a: store.account_state(a) for a in opening}
        live = store.live_calls()
        store.close()
        with transaction(sessions) as s:
            now = datetime.now(UTC)
            charged = s.execute(select(LedgerEntry.call_id, LedgerEntry.account_id, LedgerEntry.amount_micros)
                                .where(LedgerEntry.kind == "charge")).all()
            by_account: dict[str, int] = {}
            for call_id, account_id, amount in charged:
                by_account[account_id] = by_account.get(account_id, 0) + amount
                if "^" in call_id:  # a level's decision names the customer's call (the CDR path writes it)
                    base = call_id.split("^")[0]
                    s.add(RatingDecision(call_id=call_id, seq=1, decided_at=now, level=1, tenant="default",
                                         account_id=account_id, of_call_id=base, cost_micros=-amount))
                else:
                    s.add(Call(id=call_id, node="bench", account_id=account_id, caller="", destination="33",
                               started_at=now, answered_at=now, duration_ms=0, disposition="ANSWERED",
                               hangup_cause="", pbx="bench", settled_at=now))
            balances = {a: repo.view_account(s, a).balance_micros for a in opening}
        with transaction(sessions) as s:
            ledger = check_ledger(s, now=datetime.now(UTC), grace=timedelta(0))
        per_account = {a: {"lowest_seen": seen["lowest"][a], "final_sql": balances[a],
                           "overrun": states[a].overrun_micros, "reserved": states[a].reserved_micros,
                           "charges_equal_delta": by_account.get(a, 0) == balances[a] - opening[a]}
                       for a in opening}
        return {
            "store": args.store, "calls": args.calls, "nodes": args.nodes, "seconds": round(elapsed, 2),
            "reseller_opening": args.reseller_micros, **totals, "monitor_samples": seen["samples"],
            "reseller": per_account[RESELLER],
            "overspend_micros_every_level": sum(max(0, -min(v["lowest_seen"], v["final_sql"]))
                                                for v in per_account.values()),
            "overrun_micros_every_level": sum(v["overrun"] for v in per_account.values()),
            "charges_equal_delta_every_account": all(v["charges_equal_delta"] for v in per_account.values()),
            "reservations_left": len(live) + sum(v["reserved"] for v in per_account.values()),
            "reseller_charged": -by_account.get(RESELLER, 0),
            "customers_charged": -sum(v for k, v in by_account.items() if k != RESELLER),
            "ledger_check_ok": ledger.ok, "ledger_problems": [p.problem for p in ledger.problems][:5],
        }
    finally:
        engine.dispose()
        if args.store == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
            client.close()
        drop()


# ------------------------------------------------------------------------------------ auth


def auth(args: argparse.Namespace) -> dict[str, Any]:
    import gevent

    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.adapters.sql.account_plans import AccountPlans
    from agent.adapters.sql.cached_lookup import TenantChains
    from agent.adapters.sql.fx_rates import FxBook
    from agent.adapters.sql.rate_repository import RatePlanCache
    from agent.core.events import AuthorizeRequest
    from agent.services.clock import SystemClock
    from agent.services.engine import Engine, EngineSettings
    from agent.services.rater import PlanRater
    from agent.services.store_port import EngineStoreAdapter

    ledger_url, drop = scratch_database()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    engine = make_engine(ledger_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        _chain(sessions, "prefix,destination,rate\n33,France,0.06\n")
        with transaction(sessions) as s:
            repo.create_account(s, "deep", plan="p-r3", tenant="r3", balance_micros=10**12)
            repo.create_account(s, "direct", plan="p-default", balance_micros=10**12)
        clock = SystemClock()
        store = RedisBalanceStore(make_client(REDIS_URL, 2000), sessions, key_prefix=prefix)
        account_plans = AccountPlans(engine, clock.now_ms, background=True)
        rater = PlanRater(account_plans.rating_of, RatePlanCache(engine), fx_of=FxBook(engine, clock.now_ms).conversion,
                          chain_of=TenantChains(engine, clock.now_ms, background=True).chain_of)
        call_engine = Engine(settings=EngineSettings(node="bench", nibble_seconds=6, no_answer_guard_ms=0),
                             store=EngineStoreAdapter(store, node="bench", ttl_ms=60_000), rater=rater, clock=clock,
                             cdr=type("Null", (), {"submit": lambda self, r: None})())
        call_engine.start()
        timings: dict[str, list[float]] = {"direct": [], "deep": []}
        for run in range(args.runs):
            for n in range(args.calls):
                for account in ("direct", "deep") if n % 2 == 0 else ("deep", "direct"):
                    request = AuthorizeRequest("asterisk", f"{account}-{run}-{n}", account, "33123456", clock.now_ms())
                    began = time.perf_counter()
                    decision = call_engine.authorize(request)
                    timings[account].append((time.perf_counter() - began) * 1000)
                    assert decision.allowed, decision
            gevent.sleep(0)
        call_engine.stop(1)
        store.close()

        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values[len(values) // 10:])  # the first tenth warms the caches
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

        result = {account: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "n": len(v)}
                  for account, v in timings.items()}
        result["added_p50_ms"] = round(result["deep"]["p50_ms"] - result["direct"]["p50_ms"], 3)
        result["added_p99_ms"] = round(result["deep"]["p99_ms"] - result["direct"]["p99_ms"], 3)
        return result
    finally:
        engine.dispose()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
        drop()


def _chain(sessions: Any, deck: str) -> None:
    """The tree operator > r1 > r2 > r3 (each reseller paying its parent's plan with 10^12
    micro-units), a plan p-NAME per level priced by ``deck`` (CSV text)."""
    import tempfile
    from pathlib import Path

    from agent.adapters.sql.rate_import import import_deck

    folder = Path(tempfile.mkdtemp())
    parent = "default"
    with transaction(sessions) as s:
        create_plan(s, "p-default", currency="EUR")
    plans = ["p-default"]
    for name in ("r1", "r2", "r3"):
        with transaction(sessions) as s:
            create_tenant(s, name, parent=parent, plan=plans[-1], balance_micros=10**12)
            create_plan(s, f"p-{name}", currency="EUR", tenant=name)
        plans.append(f"p-{name}")
        parent = name
    for plan in plans:
        path = folder / f"{plan}.csv"
        path.write_text(deck)
        import_deck(sessions, path, plan)


def _deep_ledger(url: str, *, deep: bool, accounts: int, deck: str) -> Any:
    """A ledger: operator > r1 > r2 > r3, each with a plan; ``accounts`` customers acct0... of r3
    (``deep``) or of the operator."""
    sql = make_engine(url)
    upgrade(sql)
    sessions = session_factory(sql)
    _chain(sessions, deck)
    with transaction(sessions) as s:
        for index in range(accounts):
            if deep:
                repo.create_account(s, f"acct{index}", plan="p-r3", tenant="r3", balance_micros=10**12)
            else:
                repo.create_account(s, f"acct{index}", plan="p-default", balance_micros=10**12)
    return sql, sessions


def fastagi_run(args: argparse.Namespace, deep: bool) -> dict[str, Any]:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_asterisk as ast

    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.adapters.sql.account_plans import AccountPlans
    from agent.adapters.sql.cached_lookup import TenantChains
    from agent.adapters.sql.fx_rates import FxBook
    from agent.adapters.sql.rate_repository import RatePlanCache
    from agent.core.events import AuthorizeRequest
    from agent.daemon import freeze_startup_objects
    from agent.services.clock import SystemClock
    from agent.services.engine import Engine, EngineSettings
    from agent.services.rater import PlanRater
    from agent.services.store_port import EngineStoreAdapter
    from agent.sim.asterisk import FakeAsterisk

    # PostgreSQL, as the daemon with Redis runs (SQLite's reads, the 5 s plan checks among them,
    # would hold the gevent loop: the daemon refuses Redis over SQLite).
    ledger_url, drop = scratch_database()
    try:
        sql, sessions = _deep_ledger(ledger_url, deep=deep, accounts=ast.ACCOUNTS,
                                     deck="prefix,destination,rate\n1,North America,0.06\n")
        prefix = f"bench-ten:{uuid.uuid4().hex[:8]}:"
        clock = SystemClock()
        store = RedisBalanceStore(make_client(REDIS_URL, 2000), sessions, key_prefix=prefix)
        rater = PlanRater(AccountPlans(sql, clock.now_ms, background=True).rating_of, RatePlanCache(sql),
                          fx_of=FxBook(sql, clock.now_ms, background=True).conversion,
                          chain_of=TenantChains(sql, clock.now_ms, background=True).chain_of)
        engine = Engine(settings=EngineSettings(node="bench", nibble_seconds=6),
                        store=EngineStoreAdapter(store, node="bench", ttl_ms=600_000), rater=rater, clock=clock,
                        cdr=ast.Cdrs())
        engine.start()
        fake = FakeAsterisk("127.0.0.1", 1, ami_secret=ast.SECRET).start()
        adapter = ast.start_agent(engine, fake)
        # As the daemon does once started (agent/daemon.py freeze_startup_objects): without it a
        # full collection scans every module and pool and stops all greenlets for tens of ms,
        # which was most of this bench's p99 (the daemon's is not).
        freeze_startup_objects()
        try:
            for index in range(ast.ACCOUNTS):  # warm the caches: accounts and chains load on first use
                assert engine.authorize(AuthorizeRequest("asterisk", f"warm{index}", f"acct{index}", "12125551234",
                                                         clock.now_ms())).allowed
            process, result = ast.spawn("--agi-client", str(adapter.agi_port), "--rate", str(args.rate), "--calls",
                                        str(args.calls), "--concurrent", "1")
            process.wait()
            share = adapter.agent_ms[:args.calls]  # type: ignore[attr-defined]
            refused = sum(int(sample.value) for metric in engine.metrics.authorizations.collect()
                          for sample in metric.samples
                          if sample.name.endswith("_total") and sample.labels["result"] != "allowed")
            return {"agent_p50_ms": round(ast.percentile(share, 0.50), 3),
                    "agent_p99_ms": round(ast.percentile(share, 0.99), 3),
                    "client_p99_ms": result.get("p99_ms"), "refused": refused,
                    "agent_errors": adapter.agi.stats.errors + adapter.agi.stats.closed_early}
        finally:
            adapter.stop(2)
            fake.stop()
            engine.stop(2)
            store.close()
            sql.dispose()
            ast.cleanup_redis(prefix)
    finally:
        drop()


def fastagi(args: argparse.Namespace) -> dict[str, Any]:
    import statistics
    import subprocess

    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "deep": []}
    for _ in range(args.runs):  # each run in a process of its own (nothing left over from the one before)
        for kind in ("direct", "deep"):
            done = subprocess.run([sys.executable, __file__, "fastagi", "--only", kind, "--calls", str(args.calls),
                                   "--rate", str(args.rate)], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(done.stdout))

    def med(kind: str, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[kind]), 3)

    return {"calls": args.calls, "rate": args.rate, "runs": runs,
            "direct_p50_ms": med("direct", "agent_p50_ms"), "direct_p99_ms": med("direct", "agent_p99_ms"),
            "deep_p50_ms": med("deep", "agent_p50_ms"), "deep_p99_ms": med("deep", "agent_p99_ms"),
            "added_p50_ms": round(med("deep", "agent_p50_ms") - med("direct", "agent_p50_ms"), 3),
            "added_p99_ms": round(med("deep", "agent_p99_ms") - med("direct", "agent_p99_ms"), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["overspend", "auth", "fastagi"])
    parser.add_argument("--rate", type=float, default=200.0, help="fastagi: calls per second")
    parser.add_argument("--only", choices=["direct", "deep"], help=argparse.SUPPRESS)
    parser.add_argument("--store", choices=["redis", "sql"], default="redis")
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reseller-micros", type=int, default=4_000_000, help="the reseller's money: the limit")
    parser.add_argument("--customer-micros", type=int, default=2_000_000, help="each customer's money")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.mode == "overspend":
        args.calls = args.calls or 200
        print(json.dumps(overspend(args), indent=2))
    elif args.mode == "fastagi":
        args.calls = args.calls or 2000
        logging.disable(logging.WARNING)
        if args.only:
            print(json.dumps(fastagi_run(args, args.only == "deep")))
        else:
            print(json.dumps(fastagi(args), indent=2))
    else:
        args.calls = args.calls or 3000
        print(json.dumps(auth(args), indent=2))


if __name__ == "__main__":
    main()
