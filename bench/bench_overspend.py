"""Zero overspend: many calls of one account on five nodes draw on one balance (issue 4 figure).

    python bench/bench_overspend.py [--store redis|sql] [--calls 200] [--nodes 5] [--seed 1]

One postpaid account, ``--calls`` concurrent calls spread over ``--nodes`` separate OS
processes, each with its own store instance and connections (five PBX nodes). Every call is
driven as the charger drives it, in logical time (no sleeping): authorize the first slice,
nibble every 1-6 s (per call), hang up at a random instant or be cut when a partial grant runs
out, then settle the exact cost of the time used. A few calls are abandoned (their node
"crashes") and are swept by expiry at the end. Demand is several times the money.

A monitor process polls the account as fast as it can. The report gives the lowest balance
seen against ``-credit_limit``, the overrun recorded (a debit or settle beyond what a call
held), Σ charges against Δ balance in the SQL ledger, reservations left, and the SQL ledger
check. The ledger is a throw-away PostgreSQL database (``--ledger-url`` to use another);
``--store sql`` runs the embedded SQL store on that PostgreSQL instead of Redis.

Spend caps (DESIGN §8, issue 15): ``--daily-cap`` (and ``--monthly-cap``, ``--max-call-cost``),
in micro-units, set on the account before the calls; with a daily cap below the money the cap
binds instead of the balance. The monitor then also watches what the day's counter says is used
(spent + held, the store's own figures), and the report gives, per local day of the plan (UTC
here), the sum of the charges of the calls that started that day (from the ledger and the call
ids' days) against the cap, the spend past the cap (must be 0), what the store's counters and
SQL's ``spend_periods`` say was spent and is still held, and the refusals that said
``spend_limit``::

    python bench/bench_overspend.py --store redis --daily-cap 5000000
    python bench/bench_overspend.py --store sql --daily-cap 5000000
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import multiprocessing as mp
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.models import Call, LedgerEntry, SpendPeriod
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.reconcile import check_ledger
from agent.core.budgets import SpendPeriods, spend_periods
from agent.core.events import DenyReason
from agent.ports import BalanceStore

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
ACCOUNT = "corp"
RATE_MICROS_PER_S = 1_000  # 0.06 per minute
TTL_MS = 600_000  # long: only the abandoned calls may expire, and only in the final sweep
TIMEZONE = "UTC"  # the bench plan's timezone: the days and months of the spend caps


def open_store(args: argparse.Namespace, ledger_url: str, prefix: str) -> BalanceStore:
    sessions = session_factory(make_engine(ledger_url, pool_size=2))
    if args.store == "redis":
        from agent.adapters.redis.store import RedisBalanceStore, make_client

        return RedisBalanceStore(make_client(REDIS_URL, 2000), sessions, key_prefix=prefix)
    return SqlBalanceStore(sessions)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class SimCall:
    call_id: str
    start_s: int
    nibble_s: int
    duration_s: int
    abandon_after: int | None  # nibbles after which its node "crashes"
    seq: int = 0
    debited: int = 0
    budget: int = 0
    end_s: int | None = None  # set once the call is cut or hangs up

    @property
    def slice_micros(self) -> int:
        return RATE_MICROS_PER_S * self.nibble_s


def node_main(index: int, args: argparse.Namespace, ledger_url: str, prefix: str, start: Any,
              results: Any) -> None:
    store = open_store(args, ledger_url, prefix)
    rng = random.Random(args.seed * 1000 + index)
    calls = []
    for n in range(args.calls // args.nodes):
        abandon = rng.randint(0, 5) if rng.random() < args.abandon_share else None
        calls.append(SimCall(f"n{index}-c{n}", rng.randint(0, 20), rng.randint(1, 6), rng.randint(1, 400), abandon))
    stats = {"authorized": 0, "denied": 0, "denied_spend_limit": 0, "cut": 0, "settled": 0, "abandoned": 0,
             "nibbles": 0, "cost": 0}
    events: list[tuple[int, int, SimCall]] = [(c.start_s, i, c) for i, c in enumerate(calls)]
    heapq.heapify(events)
    days: dict[str, int] = {}  # call id -> the local day it counts on (what the store computes too)
    start.wait()
    while events:
        t, i, call = heapq.heappop(events)
        nxt = step(store, call, t, stats, days)
        if nxt is not None:
            heapq.heappush(events, (nxt, i, call))
    store.close()
    results.put({**stats, "days": days})


def step(store: BalanceStore, call: SimCall, t: int, stats: dict[str, int], days: dict[str, int]) -> int | None:
    """Run the call's event at logical second ``t``; return when its next event is due."""
    if call.seq == 0 and call.budget == 0 and call.end_s is None:
        at = now_ms()
        days[call.call_id] = spend_periods(TIMEZONE, at).day_start_ms
        out = store.authorize(ACCOUNT, call.call_id, "node", call.slice_micros, call.slice_micros, at, TTL_MS)
        if not out.allowed:
            stats["denied"] += 1
            stats["denied_spend_limit"] += out.reason is DenyReason.SPEND_LIMIT
            return None
        stats["authorized"] += 1
        call.budget = out.granted_micros
        return call.start_s + min(call.nibble_s, call.duration_s)
    elapsed = t - call.start_s
    if call.end_s is not None or elapsed >= call.duration_s:
        # Hang-up (or the cut): the exact cost of the time used, never more than the budget.
        cost = min(RATE_MICROS_PER_S * min(elapsed, call.duration_s), call.budget)
        store.settle(call.call_id, call.seq + 1, cost, now_ms())
        stats["settled"] += 1
        stats["cost"] += cost
        return None
    if call.abandon_after is not None and call.seq >= call.abandon_after:
        stats["abandoned"] += 1  # the node crashed: no more steps, expiry will sweep it
        return None
    call.seq += 1
    out = store.debit_and_reserve(call.call_id, call.seq, call.slice_micros, call.slice_micros, now_ms(), TTL_MS)
    stats["nibbles"] += 1
    call.debited += call.slice_micros
    call.budget = call.debited + out.granted_micros
    if out.granted_micros < call.slice_micros:  # exhausted: cut when the budget runs out
        stats["cut"] += 1
        call.end_s = call.start_s + call.budget // RATE_MICROS_PER_S
        return max(t, call.end_s)
    return min(t + call.nibble_s, call.start_s + call.duration_s)


def day_used(store: BalanceStore, sessions: Any, periods: SpendPeriods) -> int:
    """What the store's day counter says the day uses now: spent + held (Redis: its live counter;
    the SQL store: its spend_periods row)."""
    counters = getattr(store, "spend_counters", None)
    if counters is not None:
        spent, held = counters(ACCOUNT, periods)["day"]
        return int(spent + held)
    with transaction(sessions) as s:
        row = s.get(SpendPeriod, (ACCOUNT, "day", periods.day_start_ms))
        return 0 if row is None else row.spent_micros + row.held_micros


def monitor_main(args: argparse.Namespace, ledger_url: str, prefix: str, stop: Any, results: Any) -> None:
    store = open_store(args, ledger_url, prefix)
    sessions = session_factory(make_engine(ledger_url, pool_size=1))
    lowest_balance = lowest_available = None
    highest_day_used = 0
    samples = 0
    while not stop.is_set():
        state = store.account_state(ACCOUNT)
        samples += 1
        lowest_balance = state.balance_micros if lowest_balance is None else min(lowest_balance, state.balance_micros)
        lowest_available = (state.available_micros if lowest_available is None
                            else min(lowest_available, state.available_micros))
        if args.daily_cap is not None:
            highest_day_used = max(highest_day_used, day_used(store, sessions, spend_periods(TIMEZONE, now_ms())))
    store.close()
    seen: dict[str, Any] = {"lowest_balance": lowest_balance, "lowest_available": lowest_available,
                            "samples": samples}
    if args.daily_cap is not None:
        seen["highest_day_used_seen"] = highest_day_used  # spent + held, never above the cap
    results.put(seen)


def scratch_database() -> tuple[str, Any]:
    name = f"ba_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    return admin.url.set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=["redis", "sql"], default="redis")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--balance-micros", type=int, default=8_000_000)
    parser.add_argument("--credit-micros", type=int, default=2_000_000)
    parser.add_argument("--abandon-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ledger-url", help="SQL ledger (default: a throw-away PostgreSQL database)")
    parser.add_argument("--daily-cap", type=int, help="the account's daily spend cap, micro-units")
    parser.add_argument("--monthly-cap", type=int, help="the account's monthly spend cap, micro-units")
    parser.add_argument("--max-call-cost", type=int, help="the account's max call cost, micro-units")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the expected expiry warnings of the abandoned calls

    drop = None
    ledger_url = args.ledger_url
    if ledger_url is None:
        ledger_url, drop = scratch_database()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    engine = make_engine(ledger_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        with transaction(sessions) as s:
            create_plan(s, "bench", timezone=TIMEZONE)
            repo.create_account(s, ACCOUNT, plan="bench", balance_micros=args.balance_micros,
                                credit_limit_micros=args.credit_micros)
            repo.set_limits(s, ACCOUNT, max_call_cost_micros=args.max_call_cost, daily_micros=args.daily_cap,
                            monthly_micros=args.monthly_cap)
        report = run(args, ledger_url, prefix)
        report.update(verify(args, ledger_url, prefix, sessions))
        print(json.dumps(report, indent=2))
    finally:
        engine.dispose()
        if args.store == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
            client.close()
        if drop is not None:
            drop()


def run(args: argparse.Namespace, ledger_url: str, prefix: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    start, stop, results, watch = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    nodes = [ctx.Process(target=node_main, args=(i, args, ledger_url, prefix, start, results))
             for i in range(args.nodes)]
    monitor = ctx.Process(target=monitor_main, args=(args, ledger_url, prefix, stop, watch))
    for p in [*nodes, monitor]:
        p.start()
    time.sleep(3)  # every process imported and connected
    started = time.monotonic()
    start.set()
    totals: dict[str, int] = {}
    days: dict[str, int] = {}
    for _ in nodes:
        for key, value in results.get(timeout=600).items():
            if key == "days":
                days.update(value)
            else:
                totals[key] = totals.get(key, 0) + value
    elapsed = time.monotonic() - started
    stop.set()
    seen = watch.get(timeout=60)
    for p in [*nodes, monitor]:
        p.join(timeout=60)
    args.call_days = days
    return {"store": args.store, "calls": args.calls, "nodes": args.nodes, "seconds": round(elapsed, 2),
            "balance": args.balance_micros, "credit_limit": args.credit_micros, **totals, **seen}


def verify(args: argparse.Namespace, ledger_url: str, prefix: str, sessions: Any) -> dict[str, Any]:
    store = open_store(args, ledger_url, prefix)
    swept = store.expire(now_ms() + TTL_MS + 1)  # the abandoned calls, as any node's sweeper would
    state = store.account_state(ACCOUNT)
    live = store.live_calls()
    store.close()
    with transaction(sessions) as s:
        sql_balance = repo.view_account(s, ACCOUNT).balance_micros
        reserved_sql = repo.view_account(s, ACCOUNT).reserved_micros
        charges = int(s.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0))
                               .where(LedgerEntry.call_id.is_not(None))) or 0)
        charged_calls = s.execute(select(LedgerEntry.call_id).where(LedgerEntry.kind == "charge")).scalars().all()
        now = datetime.now(UTC)
        for call_id in charged_calls:  # what the CDR path writes for every settled call
            s.add(Call(id=call_id, node="bench", account_id=ACCOUNT, caller="", destination="33", started_at=now,
                       duration_ms=0, disposition="ANSWERED", hangup_cause="", pbx="bench", settled_at=now))
    with transaction(sessions) as s:
        ledger = check_ledger(s, now=datetime.now(UTC), grace=timedelta(0))
    caps = verify_caps(args, ledger_url, prefix, sessions) if args.daily_cap is not None else {}
    lowest_allowed = -args.credit_micros
    return {
        "expired_by_sweep": len(swept.expired),
        "lowest_balance_allowed": lowest_allowed,
        "overspend_micros": max(0, lowest_allowed - min(state.balance_micros, sql_balance)),
        "overrun_recorded": state.overrun_micros,
        "final_balance_sql": sql_balance,
        "final_balance_store": state.balance_micros,
        "sum_charges": charges,
        "delta_balance": sql_balance - args.balance_micros,
        "charges_equal_delta": charges == sql_balance - args.balance_micros,
        "reservations_left": {"live_calls": len(live), "reserved_store": state.reserved_micros,
                              "reserved_sql": reserved_sql},
        "charged_calls": len(charged_calls),
        "ledger_check_ok": ledger.ok,
        "ledger_problems": [p.problem for p in ledger.problems][:5],
        **caps,
    }


def verify_caps(args: argparse.Namespace, ledger_url: str, prefix: str, sessions: Any) -> dict[str, Any]:
    """Per local day: the charges of the calls that started that day (the ledger, by call) against
    the daily cap, and what the store's counters and SQL's spend_periods say."""
    with transaction(sessions) as s:
        charged = {str(call_id): -int(total) for call_id, total in s.execute(
            select(LedgerEntry.call_id, func.sum(LedgerEntry.amount_micros))
            .where(LedgerEntry.call_id.is_not(None)).group_by(LedgerEntry.call_id))}
        rows = {(r.kind, r.start_ms): (r.spent_micros, r.held_micros)
                for r in s.scalars(select(SpendPeriod).where(SpendPeriod.account_id == ACCOUNT))}
    per_day: dict[int, int] = {}
    for call_id, total in charged.items():
        day = args.call_days[call_id]
        per_day[day] = per_day.get(day, 0) + total
    store = open_store(args, ledger_url, prefix)
    counters = getattr(store, "spend_counters", None)
    days = []
    for day, total in sorted(per_day.items()):
        periods = spend_periods(TIMEZONE, day)
        in_sql = rows.get(("day", day), (0, 0))
        live = counters(ACCOUNT, periods)["day"] if counters is not None else in_sql
        days.append({
            "day": datetime.fromtimestamp(day / 1000, UTC).date().isoformat(), "cap": args.daily_cap,
            "sum_charges": total, "spend_past_cap": max(0, total - args.daily_cap),
            "store_counter_spent_held": list(live), "sql_spend_periods_spent_held": list(in_sql),
            "counters_equal_charges": live == (total, 0) and in_sql[0] == total,
        })
    store.close()
    report: dict[str, Any] = {
        "caps": {"daily": args.daily_cap, "monthly": args.monthly_cap, "max_call_cost": args.max_call_cost},
        "days": days, "spend_past_daily_cap_micros": sum(d["spend_past_cap"] for d in days),
    }
    if args.monthly_cap is not None:
        per_month: dict[int, int] = {}
        for call_id, total in charged.items():
            month = spend_periods(TIMEZONE, args.call_days[call_id]).month_start_ms
            per_month[month] = per_month.get(month, 0) + total
        report["spend_past_monthly_cap_micros"] = sum(max(0, total - args.monthly_cap)
                                                      for total in per_month.values())
    if args.max_call_cost is not None:
        report["most_one_call_cost"] = max(charged.values(), default=0)
    return report


if __name__ == "__main__":
    main()
