"""Free-minute bundles (DESIGN §9, issue 16): what they cost, and one bundle shared by 5 processes.

    python bench/bench_bundles.py cost  [--stores sqlite,postgresql,redis] [--runs 5] [--calls 600] [--batch 100]
    python bench/bench_bundles.py share [--store sql|redis] [--calls 200] [--processes 5] [--speed N]
    python bench/bench_bundles.py all   (cost, then share on the SQL store and on Redis)

**cost**: authorizations and nibble batches through the daemon's own path: ``decide`` (agent/
services/authorize.py) with ``PlanRater`` over the rate cache, the account plans and the
``BundleBook``, and the real balance store behind ``EngineStoreAdapter`` (SQLite and PostgreSQL
with the SQL store; Redis with a PostgreSQL ledger). Three kinds of account, interleaved call by
call and batch by batch in each run: ``none`` (no bundle), ``open`` (a bundle that covers every
call: each nibble draws the next slice's seconds) and ``spent`` (a bundle used up: the call
pays money, the store still looks at the period at authorize). For each run: p50 and p99 of one
authorization and of one nibble batch (``--batch`` nibbles of as many calls, one store call), the
microseconds a bundle adds at p99 (open - none), nibbles per second of one process; then the
median of each figure over the runs. No timed assertion: a machine's figures, printed.

**share**: ``--calls`` calls on one account spread over ``--processes`` OS processes (each with
its own store and connections), all drawing on one 600-second bundle and a small balance (money
for about 300 s, part of it credit). Every call runs through the real session (agent/core/
session.py, via the call registry) and the real store, on a fake clock paced to ``--speed``
times real time so that the processes' calls are live at the same moments: authorize, answer,
nibble, be cut when the grant runs out or hang up, settle. A monitor process polls the account
and the bundle period as fast as it can. Afterwards: the period's used seconds <= 600 and equal
to the sum of what the calls committed (their ``bundle_usage`` rows and their CDRs' bundle
seconds), the balance never below -credit_limit, the CDRs written and the ledger check (money
and bundles, as ``billing-agent ledger check``) OK.

Services: PostgreSQL on 127.0.0.1:5432 (database ``test``, trust: a throw-away database is made
per store and dropped), Redis on 127.0.0.1:6379 (keys under a random prefix, deleted after).
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import multiprocessing as mp
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
PLAN = "bench-bundles"
PREFIX = "33"
# 0.06 per minute (1,000 micro-units a second), 0.01 connect fee, per-second billing.
DECK = "prefix,rate,connect_fee,initial_increment,increment\n33,0.06,0.01,1,1\n44,0.12,0,60,60\n"
RATE_PER_S = 1_000
TTL_MS = 600_000


# ------------------------------------------------------------------------------ databases


@contextmanager
def scratch_database(backend: str) -> Iterator[str]:
    """A throw-away database: a SQLite file, or a new PostgreSQL database (dropped after)."""
    from agent.adapters.sql.engine import make_engine

    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-bundles-") as folder:
            yield f"sqlite:///{Path(folder) / 'bench.db'}"
        return
    name = f"ba_bench_bundles_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def prepare(url: str, accounts: list[tuple[str, int, int, str | None]], bundles: list[tuple[str, int]]) -> None:
    """Schema, the plan's rates, the bundles (name, seconds: one period, the grant's
    validity) and the accounts (id, balance, credit limit, bundle granted or None)."""
    from agent.adapters.sql import accounts as repo
    from agent.adapters.sql.bundles_admin import create_bundle, grant_bundle
    from agent.adapters.sql.engine import make_engine, session_factory, transaction
    from agent.adapters.sql.migrate import upgrade
    from agent.adapters.sql.rate_import import import_deck
    from agent.core.bundles import BundleDef, PeriodKind

    engine = make_engine(url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        with tempfile.TemporaryDirectory() as folder:
            deck = Path(folder) / "deck.csv"
            deck.write_text(DECK)
            import_deck(sessions, deck, PLAN, create_missing_plan=True)
        valid_from = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        with transaction(sessions) as s:
            for name, seconds in bundles:
                create_bundle(s, BundleDef(name, seconds, (PREFIX,), PeriodKind.ONCE))
            for account_id, balance, credit, bundle in accounts:
                repo.create_account(s, account_id, plan=PLAN, balance_micros=balance, credit_limit_micros=credit)
                if bundle is not None:
                    grant_bundle(s, account_id, bundle, valid_from=valid_from, reference=f"{account_id}:{bundle}")
    finally:
        engine.dispose()


@dataclass
class Wiring:
    """The daemon's authorization path on one store (one per process)."""

    engine: Engine
    store: Any  # BalanceStore
    adapter: Any  # EngineStoreAdapter
    rater: Any  # PlanRater
    cleanup: Callable[[], None]


def wire(kind: str, url: str, key_prefix: str, now_ms: Callable[[], int]) -> Wiring:
    from agent.adapters.sql.account_plans import AccountPlans
    from agent.adapters.sql.balance_store import SqlBalanceStore
    from agent.adapters.sql.bundle_book import BundleBook
    from agent.adapters.sql.engine import make_engine, session_factory
    from agent.adapters.sql.rate_repository import RatePlanCache
    from agent.services.rater import PlanRater
    from agent.services.store_port import EngineStoreAdapter

    engine = make_engine(url, pool_size=4)
    sessions = session_factory(engine)
    store: Any
    if kind == "redis":
        from agent.adapters.redis.store import RedisBalanceStore, make_client

        store = RedisBalanceStore(make_client(REDIS_URL, 2_000), sessions, key_prefix=key_prefix)
    else:
        store = SqlBalanceStore(sessions)
    # As in the daemon (background=True): an entry gone stale is served and read again by a
    # greenlet of its own, never by the authorization. This bench does not yield to gevent, so
    # the re-reads wait; the authorization path is what the daemon runs.
    plans = AccountPlans(engine, now_ms, background=True)
    book = BundleBook(engine, now_ms, background=True)
    rates = RatePlanCache(engine, check_interval_seconds=3_600)
    rater = PlanRater(plans.plan_of, rates, book.grants_of)

    def cleanup() -> None:
        plans.close()
        book.close()
        store.close()
        engine.dispose()

    return Wiring(engine, store, EngineStoreAdapter(store, node="bench", ttl_ms=TTL_MS), rater, cleanup)


def drop_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*", count=1_000):
        client.delete(key)
    client.close()


def redis_supports_bundles() -> bool:
    """The Redis store implements bundles (it did not when this bench was written)."""
    import inspect

    from agent.adapters.redis.store import RedisBalanceStore

    return "bundle_slots" in inspect.signature(RedisBalanceStore.authorize).parameters


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# ------------------------------------------------------------------------------------ cost


KINDS = ("none", "open", "spent")


def cost_accounts(per_kind: int) -> list[tuple[str, int, int, str | None]]:
    bundle = {"none": None, "open": "bench-open", "spent": "bench-spent"}
    return [(f"{kind}-{j}", 10**12, 0, bundle[kind]) for kind in KINDS for j in range(per_kind)]


class _TimedRater:
    def __init__(self, rater: Any, times: list[float]) -> None:
        self.rater = rater
        self.times = times

    def rate(self, account_id: str, destination: str, at_ms: int) -> Any:
        began = time.perf_counter_ns()
        try:
            return self.rater.rate(account_id, destination, at_ms)
        finally:
            self.times.append((time.perf_counter_ns() - began) / 1_000)


def cost_run(wiring: Wiring, *, run: int, calls: int, batch: int, rounds: int, per_kind: int,
             nibble_s: int) -> dict[str, dict[str, float]]:
    """One run: ``calls`` authorizations per kind interleaved, then ``rounds`` nibbles of every
    call in batches of ``batch`` (kinds interleaved), then the settles. Times in µs."""
    from agent.core.events import AuthorizeRequest, DialBegin, Direction, LegAnswered, LegCreated, LegHungUp
    from agent.core.registry import CallRegistry
    from agent.core.session import NibbleStep, SessionSettings, SettleStep
    from agent.services.authorize import decide

    settings = SessionSettings(nibble_ms=nibble_s * 1_000)
    registry = CallRegistry()
    now = int(time.time() * 1000)
    auth: dict[str, list[float]] = {kind: [] for kind in KINDS}
    # The two parts of an authorization: rating (plan, rate table, bundle grants and their
    # periods; a SQL read when a cache entry expired) and the store's atomic reserve.
    rating: dict[str, list[float]] = {kind: [] for kind in KINDS}
    reserving: dict[str, list[float]] = {kind: [] for kind in KINDS}
    kind_of: dict[str, str] = {}
    for i in range(calls):
        for kind in KINDS:
            leg = f"r{run}-{kind}-{i}"
            account = f"{kind}-{i % per_kind}"
            request = AuthorizeRequest("bench", leg, account, f"{PREFIX}1{i:07d}", now, group_id=leg)
            call_id = f"c-{leg}"

            def store_authorize(account_id: str, want: int, minimum: int, slots: Any, want_s: int,
                                call_id: str = call_id, kind: str = kind) -> Any:
                began = time.perf_counter_ns()
                try:
                    return wiring.adapter.authorize(account_id, call_id, want, minimum, now, bundle_slots=slots,
                                                    bundle_want_s=want_s)
                finally:
                    reserving[kind].append((time.perf_counter_ns() - began) / 1_000)

            rater = _TimedRater(wiring.rater, rating[kind])
            began = time.perf_counter_ns()
            outcome = decide(request, call_id=call_id, node="bench", rater=rater,
                             store_authorize=store_authorize, settings=settings, max_call_seconds=14_400, now_ms=now)
            auth[kind].append((time.perf_counter_ns() - began) / 1_000)
            if outcome.session is None:
                raise SystemExit(f"{kind} call {i} denied: {outcome.decision}")
            registry.add(outcome.session)
            kind_of[call_id] = kind
            b_leg = f"{leg}-B"
            registry.feed(LegCreated(b_leg, now, Direction.OUTBOUND, group_id=leg, parent_leg_id=leg))
            registry.feed(DialBegin(leg, b_leg, now))
            registry.feed(LegAnswered(b_leg, now))
    answer = now
    batches: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for k in range(1, rounds + 1):
        now = answer + k * settings.nibble_ms
        steps = [e for e in registry.fire_due(now) if isinstance(e, NibbleStep)]
        by_kind = {kind: [s for s in steps if kind_of[s.call_id] == kind] for kind in KINDS}
        chunks = {kind: [by_kind[kind][n:n + batch] for n in range(0, len(by_kind[kind]), batch)] for kind in KINDS}
        for n in range(max(len(c) for c in chunks.values())):
            for kind in KINDS:
                if n >= len(chunks[kind]):
                    continue
                chunk = chunks[kind][n]
                began = time.perf_counter_ns()
                results = wiring.adapter.nibbles(chunk, now)
                elapsed = (time.perf_counter_ns() - began) / 1_000
                if len(chunk) == batch:
                    batches[kind].append(elapsed)
                for step, result in zip(chunk, results, strict=True):
                    if not result.ok:
                        raise SystemExit(f"nibble refused: {step} {result}")
                    session = registry.sessions[step.call_id]
                    registry.schedule(session.on_nibble_result(step.seq, result.granted_micros,
                                                               result.debited_micros, now, store_ok=True,
                                                               bundle_granted_s=result.bundle_granted_s))
    end = now + 1_500
    settles: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for session in list(registry.sessions.values()):
        for leg_id in session.leg_ids():
            for effect in registry.feed(LegHungUp(leg_id, end)):
                if isinstance(effect, SettleStep):
                    began = time.perf_counter_ns()
                    wiring.adapter.settle(effect.call_id, effect.seq, effect.cost_micros, end, effect.account_id,
                                          effect.bundle)
                    settles[kind_of[effect.call_id]].append((time.perf_counter_ns() - began) / 1_000)
    figures: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        figures[kind] = {
            "authorize_p50_us": percentile(auth[kind], 50), "authorize_p99_us": percentile(auth[kind], 99),
            "rate_p50_us": percentile(rating[kind], 50), "rate_p99_us": percentile(rating[kind], 99),
            "store_authorize_p50_us": percentile(reserving[kind], 50),
            "store_authorize_p99_us": percentile(reserving[kind], 99),
            "batch_p50_us": percentile(batches[kind], 50), "batch_p99_us": percentile(batches[kind], 99),
            "nibble_p50_us": percentile(batches[kind], 50) / batch,
            "nibble_p99_us": percentile(batches[kind], 99) / batch,
            "nibbles_per_s": batch / (percentile(batches[kind], 50) / 1e6) if batches[kind] else 0.0,
            "settle_p50_us": percentile(settles[kind], 50), "settle_p99_us": percentile(settles[kind], 99),
        }
    return figures


def bench_cost(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for store in args.stores.split(","):
        if store == "redis" and not redis_supports_bundles():
            out[store] = "skipped: the Redis store does not implement bundles yet"
            print(json.dumps({"store": store, "skipped": out[store]}), flush=True)
            continue
        backend = "sqlite" if store == "sqlite" else "postgresql"
        key_prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        with scratch_database(backend) as url:
            prepare(url, cost_accounts(args.accounts), [("bench-open", 10**9), ("bench-spent", 1)])
            wiring = wire("redis" if store == "redis" else "sql", url, key_prefix, lambda: int(time.time() * 1000))
            try:
                # Warm-up (not timed): caches filled, connections opened, the spent bundles used up.
                cost_run(wiring, run=0, calls=args.accounts, batch=max(1, args.accounts // 2), rounds=1,
                         per_kind=args.accounts, nibble_s=args.nibble_seconds)
                runs = []
                for run in range(1, args.runs + 1):
                    figures = cost_run(wiring, run=run, calls=args.calls, batch=args.batch, rounds=args.rounds,
                                       per_kind=args.accounts, nibble_s=args.nibble_seconds)
                    runs.append(figures)
                    print(json.dumps({"store": store, "run": run, **{
                        kind: {k: round(v, 1) for k, v in f.items()} for kind, f in figures.items()}}), flush=True)
            finally:
                wiring.cleanup()
                if store == "redis":
                    drop_redis_keys(key_prefix)
        medians = {kind: {name: statistics.median(r[kind][name] for r in runs) for name in runs[0][kind]}
                   for kind in KINDS}
        summary = {
            "runs": args.runs, "authorizations_per_kind_per_run": args.calls,
            "nibble_batches_per_kind_per_run": args.calls * args.rounds // args.batch, "batch": args.batch,
            **{kind: {k: round(v, 1) for k, v in medians[kind].items()} for kind in KINDS},
            "added_by_bundle_at_p99_us": {
                "authorize": round(medians["open"]["authorize_p99_us"] - medians["none"]["authorize_p99_us"], 1),
                "authorize_store_part": round(medians["open"]["store_authorize_p99_us"]
                                              - medians["none"]["store_authorize_p99_us"], 1),
                "authorize_rating_part": round(medians["open"]["rate_p99_us"] - medians["none"]["rate_p99_us"], 1),
                "authorize_spent": round(medians["spent"]["authorize_p99_us"]
                                         - medians["none"]["authorize_p99_us"], 1),
                "nibble": round(medians["open"]["nibble_p99_us"] - medians["none"]["nibble_p99_us"], 1),
                "nibble_spent": round(medians["spent"]["nibble_p99_us"] - medians["none"]["nibble_p99_us"], 1),
            },
            "added_by_bundle_at_p50_us": {
                "authorize": round(medians["open"]["authorize_p50_us"] - medians["none"]["authorize_p50_us"], 1),
                "authorize_store_part": round(medians["open"]["store_authorize_p50_us"]
                                              - medians["none"]["store_authorize_p50_us"], 1),
                "nibble": round(medians["open"]["nibble_p50_us"] - medians["none"]["nibble_p50_us"], 1),
            },
            "ratio_open_over_none": {
                "authorize_p99": round(medians["open"]["authorize_p99_us"] / medians["none"]["authorize_p99_us"], 2),
                "nibbles_per_s": round(medians["open"]["nibbles_per_s"] / medians["none"]["nibbles_per_s"], 2),
            },
        }
        out[store] = summary
        print(json.dumps({"store": store, "median_of_runs": summary}), flush=True)
    return out


# ------------------------------------------------------------------------------------ share


SHARE_ACCOUNT = "shared-bundle"
SHARE_BUNDLE = "shared-600"
SHARE_SECONDS = 600


@dataclass
class NodeStats:
    authorized: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    nibbles: int = 0
    settled: int = 0
    bundle_seconds: int = 0
    money_micros: int = 0
    bundle_then_money: int = 0
    bundle_only: int = 0
    lags_ms: list[float] = field(default_factory=list)  # how late each step ran against the paced clock
    max_live: int = 0  # calls of this process authorized and not yet settled, at most
    records: list[Any] = field(default_factory=list)


class Node:
    """One PBX node's calls on a fake clock paced to ``speed`` times real time."""

    def __init__(self, index: int, args: argparse.Namespace, wiring: Wiring, clock: list[int]) -> None:
        from agent.core.registry import CallRegistry
        from agent.core.session import SessionSettings

        self.index = index
        self.args = args
        self.wiring = wiring
        self.clock = clock  # [now_ms], shared with the rater's caches
        nibble_s = (1, 2, 3, 4, 6)[index % 5]
        self.settings = SessionSettings(nibble_ms=nibble_s * 1_000, verify_ms=3_000)
        self.registry = CallRegistry()
        self.events: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        self.live_legs: set[str] = set()
        self.stats = NodeStats()

    @property
    def now(self) -> int:
        return self.clock[0]

    def at(self, when: int, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, action))

    def offer(self, n: int, rng: random.Random) -> None:
        from agent.core.events import AuthorizeRequest, DialBegin, Direction, LegAnswered, LegCreated
        from agent.services.authorize import decide

        leg = f"n{self.index}-c{n}"
        call_id = f"share-{leg}"
        request = AuthorizeRequest("bench", leg, SHARE_ACCOUNT, f"{PREFIX}6{n:07d}", self.now, group_id=leg)
        now = self.now

        def store_authorize(account_id: str, want: int, minimum: int, slots: Any, want_s: int) -> Any:
            return self.wiring.adapter.authorize(account_id, call_id, want, minimum, now, bundle_slots=slots,
                                                 bundle_want_s=want_s)

        outcome = decide(request, call_id=call_id, node=f"node{self.index}", rater=self.wiring.rater,
                         store_authorize=store_authorize, settings=self.settings, max_call_seconds=14_400,
                         now_ms=now)
        if outcome.release_reservation:
            self.wiring.adapter.release(call_id, 1, now, SHARE_ACCOUNT)
        if outcome.session is None:
            reason = str(outcome.decision.reason)
            self.stats.denied[reason] = self.stats.denied.get(reason, 0) + 1
            return
        self.stats.authorized += 1
        self.live_legs.add(leg)
        self.execute(self.registry.add(outcome.session))
        self.stats.max_live = max(self.stats.max_live, len(self.registry.sessions))
        b_leg = f"{leg}-B"
        ring = rng.randint(500, 5_000)
        talk = min(max(1_000, int(rng.expovariate(1 / 60_000))), 400_000)

        def create() -> None:
            if leg in self.live_legs:
                self.live_legs.add(b_leg)
                self.emit(LegCreated(b_leg, self.now, Direction.OUTBOUND, group_id=leg, parent_leg_id=leg))
                self.emit(DialBegin(leg, b_leg, self.now))

        def answer() -> None:
            if leg in self.live_legs and b_leg in self.live_legs:
                self.emit(LegAnswered(b_leg, self.now))

        self.at(now + 20, create)
        self.at(now + 20 + ring, answer)
        end = now + 20 + ring + talk
        self.at(end, lambda: self.hangup(b_leg))
        self.at(end + 10, lambda: self.hangup(leg))

    def emit(self, event: Any) -> None:
        self.execute(self.registry.feed(event))

    def hangup(self, leg_id: str) -> None:
        from agent.core.events import LegHungUp

        if leg_id in self.live_legs:
            self.live_legs.discard(leg_id)
            self.emit(LegHungUp(leg_id, self.now, cause="NORMAL_CLEARING"))

    def execute(self, effects: list[Any]) -> None:
        from agent.core.events import HangupLeg
        from agent.core.session import Command, Finished, NibbleStep, ReleaseStep, SettleStep

        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, NibbleStep):
                (result,) = self.wiring.adapter.nibbles([effect], self.now)
                self.stats.nibbles += 1
                session = self.registry.sessions.get(effect.call_id)
                if session is not None:
                    queue += self.registry.schedule(session.on_nibble_result(
                        effect.seq, result.granted_micros, result.debited_micros, self.now, store_ok=result.ok,
                        why=result.why, bundle_granted_s=result.bundle_granted_s))
            elif isinstance(effect, SettleStep):
                self.wiring.adapter.settle(effect.call_id, effect.seq, effect.cost_micros, self.now,
                                           effect.account_id, effect.bundle)
                self.stats.settled += 1
                queue += self._settled(effect.call_id, effect.cost_micros)
            elif isinstance(effect, ReleaseStep):
                self.wiring.adapter.release(effect.call_id, effect.seq, self.now, effect.account_id)
                queue += self._settled(effect.call_id, 0)
            elif isinstance(effect, Command) and isinstance(effect.command, HangupLeg):
                if not effect.command.escalate:
                    self.stats.cut += effect.command.leg_id.endswith("-B")
                leg_id = effect.command.leg_id
                self.at(self.now + 50, lambda leg_id=leg_id: self.hangup(leg_id))  # type: ignore[misc]
            elif isinstance(effect, Finished):
                record = effect.record
                self.registry.remove(record.call_id)
                self.stats.records.append(record)
                self.stats.bundle_seconds += record.rating.bundle_seconds
                self.stats.money_micros += record.rating.cost_micros
                if record.rating.bundle_seconds:
                    if record.rating.cost_micros:
                        self.stats.bundle_then_money += 1
                    else:
                        self.stats.bundle_only += 1

    def _settled(self, call_id: str, cost: int) -> list[Any]:
        session = self.registry.sessions.get(call_id)
        return session.on_settled(self.now, cost) if session is not None else []

    def run(self, start_ms: int, calls: int, rng: random.Random) -> None:
        for n in range(calls):
            offset = rng.randint(0, self.args.spread_seconds * 1_000)
            self.at(start_ms + offset, lambda n=n: self.offer(n, rng))  # type: ignore[misc]
        real0 = time.monotonic()
        while self.events or self.registry.timers:
            next_event = self.events[0][0] if self.events else None
            next_timer = self.registry.next_timer_ms()
            due = min(t for t in (next_event, next_timer) if t is not None)
            # Pace the fake clock: logical ms run ``speed`` times faster than real ones.
            real_due = real0 + (due - start_ms) / 1_000 / self.args.speed
            lag = time.monotonic() - real_due
            if lag < 0:
                time.sleep(-lag)
            self.stats.lags_ms.append(max(lag, 0) * 1_000)
            self.clock[0] = max(self.clock[0], due)
            if next_timer is not None and (next_event is None or next_timer <= next_event):
                self.execute(self.registry.fire_due(self.now))
            else:
                _, _, action = heapq.heappop(self.events)
                action()


def share_node(index: int, args: argparse.Namespace, url: str, key_prefix: str, start_ms: int, start: Any,
               results: Any) -> None:
    logging.basicConfig(level=logging.ERROR)
    clock = [start_ms]
    wiring = wire(args.store, url, key_prefix, lambda: clock[0])
    node = Node(index, args, wiring, clock)
    rng = random.Random(args.seed * 1_000 + index)
    calls = args.calls // args.processes + (1 if index < args.calls % args.processes else 0)
    # Warm the caches the daemon has warm (rate table, account plan, bundle grants) and the pool.
    wiring.rater.rate(SHARE_ACCOUNT, f"{PREFIX}0000000", start_ms)
    wiring.store.account_state(SHARE_ACCOUNT)
    start.wait()
    began = time.monotonic()
    try:
        node.run(start_ms, calls, rng)
    finally:
        wiring.cleanup()
    stats = node.stats
    results.put({"index": index, "seconds": time.monotonic() - began, "authorized": stats.authorized,
                 "denied": stats.denied, "cut": stats.cut, "nibbles": stats.nibbles, "settled": stats.settled,
                 "bundle_seconds": stats.bundle_seconds, "money_micros": stats.money_micros,
                 "bundle_then_money": stats.bundle_then_money, "bundle_only": stats.bundle_only,
                 "max_live": stats.max_live, "lag_p50_ms": round(percentile(stats.lags_ms, 50), 1),
                 "lag_p99_ms": round(percentile(stats.lags_ms, 99), 1),
                 "max_lag_ms": round(max(stats.lags_ms, default=0.0), 1), "nibble_s": node.settings.nibble_ms // 1_000,
                 "records": stats.records})


def share_monitor(args: argparse.Namespace, url: str, key_prefix: str, stop: Any, results: Any) -> None:
    logging.basicConfig(level=logging.ERROR)
    wiring = wire(args.store, url, key_prefix, lambda: int(time.time() * 1000))
    lowest_balance: int | None = None
    lowest_available: int | None = None
    most_held = 0  # used + reserved of the bundle period: never above what it granted
    granted = 0
    samples = 0
    while not stop.is_set():
        state = wiring.store.account_state(SHARE_ACCOUNT)
        periods = wiring.store.bundle_periods(SHARE_ACCOUNT)
        samples += 1
        lowest_balance = state.balance_micros if lowest_balance is None else min(lowest_balance, state.balance_micros)
        lowest_available = (state.available_micros if lowest_available is None
                            else min(lowest_available, state.available_micros))
        for period in periods.values():
            most_held = max(most_held, period.used_s + period.reserved_s)
            granted = max(granted, period.granted_s)
    wiring.cleanup()
    results.put({"samples": samples, "lowest_balance_seen": lowest_balance, "lowest_available_seen": lowest_available,
                 "most_bundle_used_plus_reserved_seen": most_held, "bundle_granted_seen": granted})


def bench_share(args: argparse.Namespace) -> dict[str, Any]:
    if args.store == "redis" and not redis_supports_bundles():
        print(json.dumps({"store": "redis", "skipped": "the Redis store does not implement bundles yet"}))
        return {"skipped": "redis store without bundles"}
    key_prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    with scratch_database("postgresql") as url:
        prepare(url, [(SHARE_ACCOUNT, args.balance_micros, args.credit_micros, SHARE_BUNDLE)],
                [(SHARE_BUNDLE, SHARE_SECONDS)])
        try:
            report = share_run(args, url, key_prefix)
            report.update(share_verify(args, url, key_prefix, report.pop("records")))
            # What the monitor saw while the calls ran, not only the end state.
            checks = report["checks"]
            checks["monitor_bundle_never_above_grant"] = report["most_bundle_used_plus_reserved_seen"] <= SHARE_SECONDS
            lowest = report["lowest_balance_seen"]
            checks["monitor_balance_never_below_credit_limit"] = lowest is None or lowest >= -args.credit_micros
            report["all_ok"] = all(checks.values())
        finally:
            if args.store == "redis":
                drop_redis_keys(key_prefix)
    print(json.dumps(report, indent=2), flush=True)
    return report


def share_run(args: argparse.Namespace, url: str, key_prefix: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    start, stop, results, watch = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    start_ms = int(time.time() * 1000) + 5_000
    nodes = [ctx.Process(target=share_node, args=(i, args, url, key_prefix, start_ms, start, results))
             for i in range(args.processes)]
    monitor = ctx.Process(target=share_monitor, args=(args, url, key_prefix, stop, watch))
    for process in [*nodes, monitor]:
        process.start()
    time.sleep(4)  # every process imported and connected
    began = time.monotonic()
    start.set()
    per_node = [results.get(timeout=900) for _ in nodes]
    elapsed = time.monotonic() - began
    stop.set()
    seen = watch.get(timeout=60)
    for process in [*nodes, monitor]:
        process.join(timeout=60)
    records = [record for node in per_node for record in node.pop("records")]
    totals: dict[str, Any] = {"denied": {}}
    for node in per_node:
        for key in ("authorized", "cut", "nibbles", "settled", "bundle_seconds", "money_micros",
                    "bundle_then_money", "bundle_only"):
            totals[key] = totals.get(key, 0) + node[key]
        for reason, count in node["denied"].items():
            totals["denied"][reason] = totals["denied"].get(reason, 0) + count
    return {"store": args.store, "calls": args.calls, "processes": args.processes, "speed": args.speed,
            "seconds": round(elapsed, 2), "bundle_s": SHARE_SECONDS, "balance_micros": args.balance_micros,
            "credit_limit_micros": args.credit_micros, **totals,
            "max_live_calls_per_process": [node["max_live"] for node in sorted(per_node, key=lambda n: n["index"])],
            "lag_p50_ms_per_process": [node["lag_p50_ms"] for node in sorted(per_node, key=lambda n: n["index"])],
            "lag_p99_ms_per_process": [node["lag_p99_ms"] for node in sorted(per_node, key=lambda n: n["index"])],
            "max_lag_ms": max(node["max_lag_ms"] for node in per_node),
            "nibble_seconds_per_process": [node["nibble_s"] for node in sorted(per_node, key=lambda n: n["index"])],
            **seen, "records": records}


def share_verify(args: argparse.Namespace, url: str, key_prefix: str, records: list[Any]) -> dict[str, Any]:
    from agent.adapters.sql import accounts as repo
    from agent.adapters.sql.bundles_admin import check_bundles
    from agent.adapters.sql.cdr_writer import SqlCdrStore
    from agent.adapters.sql.engine import make_engine, session_factory, transaction
    from agent.adapters.sql.models import BundleUsage, LedgerEntry
    from agent.adapters.sql.reconcile import check_ledger

    wiring = wire(args.store, url, key_prefix, lambda: int(time.time() * 1000))
    try:
        swept = wiring.store.expire(int(time.time() * 1000) + 10 * TTL_MS)  # nothing should be left
        state = wiring.store.account_state(SHARE_ACCOUNT)
        periods = wiring.store.bundle_periods(SHARE_ACCOUNT)
        live = wiring.store.live_calls()
    finally:
        wiring.cleanup()
    engine = make_engine(url)
    try:
        written = SqlCdrStore(engine).write(records)  # what the CDR writer does for every settled call
        sessions = session_factory(engine)
        with transaction(sessions) as s:
            view = repo.view_account(s, SHARE_ACCOUNT)
            charges = int(s.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0))
                                   .where(LedgerEntry.account_id == SHARE_ACCOUNT,
                                          LedgerEntry.call_id.is_not(None))) or 0)
            used_rows = -int(s.scalar(select(func.coalesce(func.sum(BundleUsage.seconds), 0))
                                      .where(BundleUsage.account_id == SHARE_ACCOUNT,
                                             BundleUsage.kind.in_(("use", "adjust")))) or 0)
            calls_with_usage = int(s.scalar(select(func.count(func.distinct(BundleUsage.call_id)))
                                            .where(BundleUsage.call_id.is_not(None))) or 0)
        with transaction(sessions) as s:
            ledger = check_ledger(s, now=datetime.now(UTC), grace=timedelta(0))
            bundles = check_bundles(s, ledger, embedded=args.store == "sql")
    finally:
        engine.dispose()
    (period,) = periods.values() if len(periods) == 1 else (None,)
    used = period.used_s if period is not None else -1
    committed_by_cdrs = sum(r.rating.bundle_seconds for r in records)
    lowest_allowed = -args.credit_micros
    checks = {
        "bundle_used_within_grant": period is not None and 0 <= used <= SHARE_SECONDS,
        "bundle_used_equals_usage_rows": used == used_rows,
        "bundle_used_equals_cdr_bundle_seconds": used == committed_by_cdrs,
        "bundle_nothing_left_reserved": period is not None and period.reserved_s == 0,
        "money_never_below_credit_limit": min(state.balance_micros, view.balance_micros) >= lowest_allowed,
        "charges_equal_delta_balance": charges == view.balance_micros - args.balance_micros,
        "no_reservation_left": not live and state.reserved_micros == 0 and not swept.expired,
        "every_settled_call_has_a_cdr": written.written == len(records),
        "ledger_check_ok": ledger.ok,
    }
    return {
        "bundle_period": None if period is None else {"granted_s": period.granted_s, "used_s": period.used_s,
                                                      "reserved_s": period.reserved_s},
        "bundle_usage_rows_s": used_rows, "calls_with_bundle_usage": calls_with_usage,
        "cdr_bundle_seconds": committed_by_cdrs, "final_balance_micros": view.balance_micros,
        "final_balance_store_micros": state.balance_micros, "lowest_balance_allowed": lowest_allowed,
        "sum_charges_micros": charges, "cdrs_written": written.written,
        "ledger_check": {"ok": ledger.ok, "problems": [p.problem for p in ledger.problems][:5],
                         "bundle_periods": bundles.periods, "bundle_usage_rows": bundles.usage_rows,
                         "bundle_calls": bundles.calls},
        "checks": checks, "all_ok": all(checks.values()),
    }


# ------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cost", "share", "all"])
    parser.add_argument("--stores", default="sqlite,postgresql,redis", help="cost: comma-separated stores")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=None,
                        help="cost: authorizations per kind per run (600); share: calls in all (200)")
    parser.add_argument("--batch", type=int, default=100, help="cost: nibbles per store call")
    parser.add_argument("--rounds", type=int, default=3, help="cost: nibbles of every call per run")
    parser.add_argument("--accounts", type=int, default=20, help="cost: accounts per kind")
    parser.add_argument("--nibble-seconds", type=int, default=6, help="cost: the nibble")
    parser.add_argument("--store", choices=["sql", "redis"], default="sql", help="share: the balance store")
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--speed", type=float, default=None,
                        help="share: fake seconds per real second (default 2 on the SQL store, 10 on Redis: "
                             "the pace each keeps up with on a 2-core machine, lag printed)")
    parser.add_argument("--spread-seconds", type=int, default=240, help="share: calls start within this")
    parser.add_argument("--balance-micros", type=int, default=250_000, help="share: 250 s of money")
    parser.add_argument("--credit-micros", type=int, default=50_000, help="share: 50 s more on credit")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ok = True
    if args.what in ("cost", "all"):
        cost_args = argparse.Namespace(**vars(args))
        cost_args.calls = args.calls or 600
        bench_cost(cost_args)
    if args.what in ("share", "all"):
        stores = [args.store] if args.what == "share" else ["sql", "redis"]
        for store in stores:
            share_args = argparse.Namespace(**vars(args))
            share_args.calls = args.calls or 200
            share_args.store = store
            share_args.speed = args.speed or (10.0 if store == "redis" else 2.0)
            report = bench_share(share_args)
            ok = ok and report.get("all_ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
