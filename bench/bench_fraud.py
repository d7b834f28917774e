#!/usr/bin/env python3
"""Benchmark: what the fraud rules add to one authorization.

    python bench/bench_fraud.py                        # the shipped fraud/rules.yaml, 5 runs
    python bench/bench_fraud.py --rules my.yaml --runs 7 --calls 20000 --accounts 500
    python bench/bench_fraud.py --redis redis://127.0.0.1:6379/0 --calls 5000   # counters in Redis
    python bench/bench_fraud.py --fastagi --rate 1000 --calls 5000 --runs 5     # through real FastAGI
    python bench/bench_fraud.py --fastagi --rate 200 --calls 3000 --alone-too  # and the observe on its own trip

``--fastagi``: the authorization as Asterisk sees it, through real FastAGI on loopback at
``--rate`` calls/s (bench/bench_asterisk.py's load generator in its own process, our FastAGI
server, the real engine and the real Redis balance store), without and with the fraud screen,
interleaved run by run: 10 rules (the shipped 8 plus ``new_country`` and
``distinct_destinations`` to the high-risk group: ``FASTAGI_EXTRA_RULES``), every action made an
alert so the traffic is the same, and 3 spend caps on every account that never bind (``--no-caps``:
the rules only), the counters in Redis (``BENCH_REDIS_URL``, default
127.0.0.1:6379), the alerts through the alert service on a disk spool as in the daemon, CEL time
fields in a plan timezone. Reported: p50/p99 from the client's connect() to the agent's
``SET VARIABLE BILLING_DECISION`` and of the agent's own share (environment read to close),
medians of ``--runs`` runs, the difference and the ratio, and the load (``uptime``).

The real ``Engine.authorize`` (in-memory balance store, a flat rate, no PBX) is timed call by call
with and without a ``FraudGuard`` on the same traffic, interleaved run by run: ``--accounts``
accounts, each with a history of ``--history`` earlier attempts and settled calls inside the
rules' windows (so each sliding window has entries to scan), dialling a mix of ordinary numbers and
numbers of the high-risk group (``--risky`` share). The rules use deny and alert only for this
bench (suspend would stop the traffic): every suspend rule is run as an alert. Reported: p50 and
p99 of the authorize time in microseconds with and without the rules, and the difference, medians
of ``--runs`` runs. The machine is 2 shared cores: read medians.
"""

from __future__ import annotations

import sys

if "--fastagi" in sys.argv:  # the FastAGI mode runs under gevent as the daemon does: patch first
    from gevent import monkey

    monkey.patch_all()

import argparse
import dataclasses
import logging
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any

from agent.adapters.fraud_rules_file import load_rules
from agent.adapters.redis.counters import RedisFraudCounters
from agent.core.events import AuthorizeRequest
from agent.core.fraud import AlertRecord, CallFacts
from agent.core.fraud_rules import Action, RuleSet
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo
from agent.ports import FraudCounters
from agent.services.engine import Engine, EngineSettings
from agent.services.fraud import FraudGuard
from agent.sim.memory_store import MemoryStore

ROOT = Path(__file__).resolve().parents[1]
RATE = RatedCall(RateRow(prefix="", destination="any", rate_micros=60_000), RatingInfo("bench", 1, "", 60_000))


class Rater:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        return RATE


class Clock:
    """A clock that moves 1 ms per reading: the windows slide as in real traffic."""

    def __init__(self) -> None:
        self.ms = 1_780_000_000_000

    def now_ms(self) -> int:
        self.ms += 1
        return self.ms

    def monotonic_ms(self) -> int:
        return self.ms


class NoActions:
    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        pass

    def suspend(self, account_id: str, rule: str, at_ms: int) -> bool:
        return True

    def cut_elsewhere(self, account_id: str, node: str, reason: str) -> list[str]:
        return []


class Cdrs:
    def submit(self, record: object) -> None:
        pass


def no_suspend(rules: RuleSet) -> RuleSet:
    return RuleSet(tuple(dataclasses.replace(r, action=Action.ALERT) if r.action is Action.SUSPEND else r
                         for r in rules.rules), rules.groups)


def make_counters(rules: RuleSet, args: argparse.Namespace, seed: int) -> FraudCounters | None:
    if not args.redis:
        return None
    import redis

    client = redis.Redis.from_url(args.redis, decode_responses=True)
    return RedisFraudCounters(client, key_prefix=f"bench-fraud:{os.getpid()}:{seed}:", rules=rules)


def drop_keys(counters: FraudCounters | None) -> None:
    if isinstance(counters, RedisFraudCounters):
        for key in counters.client.scan_iter(match=f"{counters.prefix}*", count=1000):
            counters.client.delete(key)


def one_run(rules: RuleSet | None, args: argparse.Namespace, seed: int) -> list[float]:
    rng = random.Random(seed)
    clock = Clock()
    store = MemoryStore()
    engine = Engine(settings=EngineSettings(node="bench"), store=store, rater=Rater(), clock=clock,  # type: ignore[arg-type]
                    cdr=Cdrs())
    accounts = [f"acct{i}" for i in range(args.accounts)]
    for account in accounts:
        store.add_account(account, 10**12)
    risky = sorted(rules.groups.get("high_risk", ())) if rules else ["882"]
    counters = make_counters(rules, args, seed) if rules is not None else None
    if rules is not None:
        guard = FraudGuard(rules, node="bench", actions=NoActions(), clock=clock,  # type: ignore[arg-type]
                           counters=counters)
        engine.screens.append(guard)
        history = sorted((clock.ms - rng.randrange(1, 250_000), account, k)
                         for account in accounts for k in range(args.history))
        for at, account, k in history:  # a history inside every window, oldest first
            facts = CallFacts(account, f"h{k}", f"331{rng.randrange(10**8)}", frozenset(), at)
            guard.counters.observe(facts)
            guard.counters.ended(account, f"h{k}", at, rng.randrange(0, 50_000), True, rng.randrange(1, 300_000))
    timings: list[float] = []
    for n in range(args.calls):
        account = accounts[rng.randrange(len(accounts))]
        if rng.random() < args.risky:
            number = f"+{rng.choice(risky)}{rng.randrange(10**7)}"
        else:
            number = f"+33{rng.randrange(10**9)}"
        request = AuthorizeRequest("asterisk", f"leg{n}", account, number, clock.ms)
        started = time.perf_counter_ns()
        engine.authorize(request)
        timings.append((time.perf_counter_ns() - started) / 1000)
        if rules is not None and n % 2 == 0:  # calls end as they come: live counts stay steady
            guard.counters.ended(account, engine.call_id_for(request), clock.ms, 1000, True, 30_000)
        if len(engine.registry.sessions) > 2000:  # keep the registry at a steady size
            engine.registry.sessions.clear()
    drop_keys(counters)
    return timings


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------ through real FastAGI

FASTAGI_EXTRA_RULES = """
  - name: new_country_high_risk
    kind: new_country
    group: high_risk
    window_s: 2592000
    threshold: 0
    action: alert
  - name: high_risk_numbers
    kind: distinct_destinations
    group: high_risk
    window_s: 3600
    threshold: 5
    action: alert
"""


def bench_rules(path: str, folder: Path) -> Path:
    """The shipped rules (every action an alert) plus ``FASTAGI_EXTRA_RULES``: 10 rules."""
    source = Path(path)
    text = source.read_text().rstrip() + "\n" + FASTAGI_EXTRA_RULES
    for action in ("suspend", "deny"):
        text = text.replace(f"action: {action}", "action: alert")
    target = folder / "rules.yaml"
    target.write_text(text.replace("deny: group", "description: deny group in production"))
    for group_file in source.parent.glob("*.txt"):
        (folder / group_file.name).write_text(group_file.read_text())
    return target


def fastagi_screen(engine: Engine, rules_path: Path, prefix: str, folder: Path, store: Any, alone: bool) -> Any:
    """The screen as the daemon builds it: Redis counters on the balance store's client (their
    observe rides in the store's authorize round trip), the alert service on a disk spool.
    ``alone``: the counters on a client of their own, so each observe makes its own round trip
    (as before 2026-12-04: the comparison)."""
    import bench_asterisk as ast

    from agent.adapters.alert_spool import AlertSpool
    from agent.adapters.redis.store import make_client
    from agent.services.alerts import Alerts
    from agent.services.clock import SystemClock

    rules = load_rules(rules_path)
    clock = SystemClock()
    alerts = Alerts(NoActions(), node="bench", clock=clock, queue=AlertSpool(folder / "alerts" / "sql.jsonl"))
    guard = FraudGuard(rules, node="bench", actions=NoActions(), clock=clock, alerts=alerts,
                       counters=RedisFraudCounters(make_client(ast.REDIS_URL, 2000) if alone else store.client,
                                                   key_prefix=prefix, rules=rules),
                       timezone_of=lambda account, plan: "Europe/Paris")
    engine.screens.append(guard)
    engine.on_finished.append(guard.finished)
    alerts.start()
    guard.start()
    return guard, alerts


def fastagi_run(args: argparse.Namespace, with_rules: bool, alone: bool = False) -> dict[str, Any]:
    import bench_asterisk as ast

    from agent.daemon import freeze_startup_objects
    from agent.sim.asterisk import FakeAsterisk

    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        engine, (store, prefix, sql) = ast.redis_engine(workdir)
        screen = fastagi_screen(engine, bench_rules(args.rules, folder), prefix, folder, store,
                                alone) if with_rules else None
        if with_rules and not args.no_caps:
            set_caps(sql, ast.ACCOUNTS)
        fake = FakeAsterisk("127.0.0.1", 1, ami_secret=ast.SECRET).start()
        adapter = ast.start_agent(engine, fake)
        try:
            for index in range(ast.ACCOUNTS):  # warm the caches: accounts load from SQL on first use
                engine.authorize(AuthorizeRequest("asterisk", f"warm{index}", f"acct{index}", "12125551234",
                                                  int(time.time() * 1000)))
            # As the daemon does once started (agent/daemon.py): without it full collections scan
            # every module (cel-python's parser, SQLAlchemy, redis...) and stop the loop 30-170 ms
            # (gc.callbacks, 2026-12-04): the p99 of one run in three, whichever variant it was.
            freeze_startup_objects()
            redis_cpu = redis_cpu_s()
            cpu = time.process_time()
            process, result = ast.spawn("--agi-client", str(adapter.agi_port), "--rate", str(args.rate), "--calls",
                                        str(args.calls), "--concurrent", "1")
            process.wait()
            # CPU per authorization: the agent process (with the fake AMI server, the same in both)
            # and the Redis server (every client's work: the bench's are the only steady ones).
            result["agent_cpu_us"] = round((time.process_time() - cpu) / args.calls * 1e6, 1)
            result["redis_cpu_us"] = round((redis_cpu_s() - redis_cpu) / args.calls * 1e6, 1)
            share = adapter.agent_ms[:args.calls]  # type: ignore[attr-defined]  # (the warm-up went around FastAGI)
            result["agent_p50_ms"] = round(ast.percentile(share, 0.50), 3)
            result["agent_p99_ms"] = round(ast.percentile(share, 0.99), 3)
            result["agent_errors"] = adapter.agi.stats.errors + adapter.agi.stats.closed_early
            result["refusals"] = {sample.labels["result"]: int(sample.value)
                                  for metric in engine.metrics.authorizations.collect() for sample in metric.samples
                                  if sample.name.endswith("_total") and sample.labels["result"] != "allowed"}
            if screen is not None:
                result["alerts"] = screen[1].submitted
            return result
        finally:
            adapter.stop(2)
            fake.stop()
            engine.stop(2)
            if screen is not None:
                screen[0].stop(1)
                screen[1].stop(1)
            store.close()
            sql.dispose()
            ast.cleanup_redis(prefix)


def set_caps(sql: Any, accounts: int) -> None:
    """3 spend caps on every account (max call cost, daily, monthly), high enough never to bind:
    the balance store draws on each at every step (loaded with the account at the warm-up)."""
    from agent.adapters.sql import accounts as repo
    from agent.adapters.sql.engine import session_factory, transaction

    with transaction(session_factory(sql)) as session:
        for index in range(accounts):
            repo.set_limits(session, f"acct{index}", max_call_cost_micros=10**12, daily_micros=10**13,
                            monthly_micros=10**14)


def redis_cpu_s() -> float:
    import bench_asterisk as ast
    import redis

    client = redis.Redis.from_url(ast.REDIS_URL)
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


def fastagi_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    logging.disable(logging.WARNING)  # one log line per alert would measure the logging
    load_before = uptime()
    variants = {"off": (False, False), "on": (True, False)}
    if args.alone_too:
        variants["on, observe alone"] = (True, True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    names = list(variants)
    for run in range(args.runs):
        # The order turns from run to run: the first of a round was seen to catch more of the
        # machine's stalls (the previous run's teardown), whichever variant it was.
        for name in names[run % len(names):] + names[:run % len(names)]:
            with_rules, alone = variants[name]
            runs[name].append(fastagi_run(args, with_rules, alone))
        print(f"run {run + 1}: " + "; ".join(
            f"{name} p50 {r[-1]['p50_ms']:.3f} p99 {r[-1]['p99_ms']:.3f} ms (agent {r[-1]['agent_p50_ms']:.3f} / "
            f"{r[-1]['agent_p99_ms']:.3f}), refused {r[-1]['refusals'] or 0}, errors {r[-1]['client_errors']}, "
            f"alerts {r[-1].get('alerts', 0)}, CPU per call agent {r[-1]['agent_cpu_us']} us, redis "
            f"{r[-1]['redis_cpu_us']} us" for name, r in runs.items()), flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(run[key] for run in runs))

    caps = "no spend caps" if args.no_caps else "3 spend caps (max call cost, daily, monthly) on every account"
    print(f"FastAGI at {args.rate:.0f}/s, {args.calls} calls per run, {args.runs} runs interleaved (medians); "
          f"on = 10 rules with the counters in Redis (their observe in the store's round trip; 'observe alone': "
          f"a round trip of their own) and {caps}")
    off = runs["off"]
    for name in [n for n in runs if n != "off"]:
        on = runs[name]
        print(f" {name}:")
        for key, what in (("p50_ms", "client p50"), ("p99_ms", "client p99"), ("agent_p50_ms", "agent p50"),
                          ("agent_p99_ms", "agent p99")):
            a, b = med(off, key), med(on, key)
            print(f"  {what:<10}  off {a:7.3f} ms  on {b:7.3f} ms  added {b - a:+7.3f} ms  "
                  f"ratio {b / a if a else 0:5.2f}")
        for key, what in (("agent_cpu_us", "agent CPU"), ("redis_cpu_us", "Redis CPU")):
            a, b = med(off, key), med(on, key)
            print(f"  {what:<10}  off {a:7.1f} us  on {b:7.1f} us  added {b - a:+7.1f} us per authorization "
                  f"({(b - a) * args.rate / 1e6:.0%} of a core at {args.rate:.0f}/s)")
    print(f"  load: before {load_before}; after {uptime()}")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        with open("/proc/loadavg") as loadavg:
            return "load average " + loadavg.read().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default=str(ROOT / "fraud" / "rules.yaml"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--history", type=int, default=50, help="earlier attempts and settled calls per account")
    parser.add_argument("--risky", type=float, default=0.02, help="share of calls to the high-risk group")
    parser.add_argument("--redis", default="", help="redis://... : the counters in Redis (shared by every node)")
    parser.add_argument("--fastagi", action="store_true", help="through real FastAGI with Redis (see above)")
    parser.add_argument("--rate", type=float, default=1000.0, help="--fastagi: calls per second")
    parser.add_argument("--no-caps", action="store_true", help="--fastagi: the rules only, no spend caps")
    parser.add_argument("--alone-too", action="store_true",
                        help="--fastagi: a third variant, the counters' observe on a round trip of its own")
    args = parser.parse_args()
    if args.fastagi:
        fastagi_main(args)
        return
    logging.disable(logging.WARNING)  # one log line per alert would measure the logging
    rules = no_suspend(load_rules(args.rules))
    rows = []
    for run in range(args.runs):
        off = one_run(None, args, run)
        on = one_run(rules, args, run)
        rows.append((pct(off, 0.5), pct(off, 0.99), pct(on, 0.5), pct(on, 0.99)))
        print(f"run {run + 1}: off p50 {rows[-1][0]:.1f} p99 {rows[-1][1]:.1f} us; "
              f"on p50 {rows[-1][2]:.1f} p99 {rows[-1][3]:.1f} us", flush=True)
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    where = "in Redis" if args.redis else "in memory"
    print(f"{len(rules.rules)} rules, counters {where}, {args.accounts} accounts, {args.history} history entries each, "
          f"{args.calls} calls per run, {args.runs} runs (medians):")
    print(f"  authorize without rules: p50 {med[0]:.1f} us, p99 {med[1]:.1f} us")
    print(f"  authorize with rules:    p50 {med[2]:.1f} us, p99 {med[3]:.1f} us")
    print(f"  added:                   p50 {med[2] - med[0]:+.1f} us, p99 {med[3] - med[1]:+.1f} us")


if __name__ == "__main__":
    main()
