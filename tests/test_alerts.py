"""The alert service (agent/services/alerts.py) and its spools, low balance and balance exhausted
(agent/services/balance_alerts.py), thresholds per account over plan, and CEL's hour in the
account's timezone. Driven step by step (``flush_once``, ``check_once``): no sleeps but the one
real cut of a call that runs out of money."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import gevent
import pytest
from sqlalchemy import Engine, func, select

from agent.adapters.alert_spool import AlertSpool, LineSpool
from agent.adapters.redis.alert_stream import AlertStream
from agent.adapters.sql import accounts as accounts_repo
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.fraud import SqlAlerts, list_alerts
from agent.adapters.sql.low_balance import (
    LowBalanceThresholds,
    ThresholdUnavailable,
    set_account_threshold,
    set_plan_threshold,
)
from agent.adapters.sql.models import FraudAlert
from agent.adapters.sql.plans import create_plan
from agent.core.balance import AccountState
from agent.core.cdr import CallRecord, Disposition
from agent.core.events import AuthorizeRequest, Direction, LegAnswered, LegCreated
from agent.core.fraud import BALANCE_EXHAUSTED, LOW_BALANCE, AlertRecord, CallFacts, evaluate, local_hour_weekday
from agent.core.fraud_rules import RuleSet
from agent.core.low_balance import Crossings, Level, level_of
from agent.services.alerts import Alerts, MemoryAlertQueue
from agent.services.balance_alerts import BalanceWatch
from agent.services.clock import SystemClock
from agent.services.engine import Engine as CallEngine
from agent.services.engine import EngineSettings
from agent.services.fraud import FraudGuard
from agent.services.metrics import Metrics
from agent.sim.memory_store import MemoryStore
from tests.cdr_builders import T0, make_record
from tests.test_engine import Cdrs, FakeSwitch, Rater
from tests.test_fraud_guard import Actions, rules

ROOT = Path(__file__).resolve().parents[1]


class Sink:
    """The alerts table in memory; ``down`` fails every write as a database away would."""

    def __init__(self) -> None:
        self.rows: list[AlertRecord] = []
        self.down = False

    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        if self.down:
            raise OSError("database away")
        self.rows.extend(alerts)


class Deliveries:
    def __init__(self) -> None:
        self.got: list[AlertRecord] = []

    def enqueue(self, alert: AlertRecord) -> None:
        self.got.append(alert)


def alert(n: int, rule: str = "irsf_parallel", account: str = "victim") -> AlertRecord:
    return AlertRecord(T0 + n * 1000 + 123, "n1", account, rule, "live_calls", 4, 3, 0, "suspend", f"n1-c{n}",
                       "88212", "live_calls to high_risk = 4 > 3")


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(FraudAlert)) or 0)


# ---------------------------------------------------------------- the service and its spool


def test_alerts_are_throttled_named_counted_and_handed_to_every_delivery(tmp_path: Path) -> None:
    sink, hook = Sink(), Deliveries()
    metrics = Metrics()
    alerts = Alerts(sink, node="n1", clock=SystemClock(), metrics=metrics, queue=AlertSpool(tmp_path / "sql.jsonl"),
                    period_ms=60_000)
    alerts.deliveries.append(hook)
    assert alerts.submit(alert(0))
    assert not alerts.submit(alert(30))  # the same account and rule 30 s later: throttled
    assert alerts.submit(alert(0, rule="number_scan"))
    assert alerts.submit(alert(61))  # a period later
    low = AlertRecord(T0, "n1", "victim", LOW_BALANCE, LOW_BALANCE, 4_000_000, 5_000_000, 0, "alert")
    assert alerts.submit(low)
    assert [a.rule for a in hook.got] == ["irsf_parallel", "number_scan", "irsf_parallel", LOW_BALANCE]
    assert len({a.event_id for a in hook.got}) == 4 and all(len(a.event_id) == 32 for a in hook.got)
    assert metrics.fraud_alerts.labels("irsf_parallel", "suspend")._value.get() == 2
    assert metrics.alerts.labels(LOW_BALANCE)._value.get() == 1
    assert alerts.queued() == 4 and alerts.flush_once()
    assert sink.rows == hook.got and alerts.queued() == 0  # the same alerts, event ids and all
    assert (tmp_path / "sql.jsonl").stat().st_size == 0  # trimmed once written
    alerts.stop(1)


def test_queued_alerts_survive_a_restart_while_the_database_is_down(tmp_path: Path) -> None:
    sink = Sink()
    sink.down = True
    spool = tmp_path / "alerts" / "sql.jsonl"
    first = Alerts(sink, node="n1", clock=SystemClock(), queue=AlertSpool(spool))
    first.start()
    for n in range(3):
        first.submit(alert(n, account=f"a{n}"))
    assert not first.flush_once() and first.queued() == 3
    first.stop(0.2)  # the database still away: nothing written, the spool keeps them
    assert sink.rows == []

    again = Alerts(sink, node="n1", clock=SystemClock(), queue=AlertSpool(spool))  # the next start
    assert again.queued() == 3
    assert not again.flush_once()  # still down: kept, retried
    sink.down = False
    again.start()  # the worker writes what the earlier run left
    with gevent.Timeout(5):
        while again.queued():
            gevent.sleep(0.01)
    assert [a.account_id for a in sink.rows] == ["a0", "a1", "a2"]
    again.stop(1)
    assert Alerts(sink, node="n1", clock=SystemClock(), queue=AlertSpool(spool)).queued() == 0


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from agent.adapters.alert_spool import AlertSpool
    from agent.core.fraud import AlertRecord
    from agent.services.alerts import Alerts
    from agent.services.clock import SystemClock

    class Away:
        def record_alerts(self, alerts):
            raise OSError("database away")

    alerts = Alerts(Away(), node="n1", clock=SystemClock(), queue=AlertSpool(Path(sys.argv[1])))
    for n in range(3):
        alerts.submit(AlertRecord(1_767_225_600_000 + n, "n1", f"acct{n}", "low_balance", "low_balance", 1, 5, 0,
                                  "alert", f"c{n}"))
    alerts.flush_once()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_alerts_survive_a_kill_9_while_the_database_is_away(tmp_path: Path, sqlite_engine: Engine) -> None:
    spool = tmp_path / "sql.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(spool)], check=False, cwd=ROOT, capture_output=True,
                            timeout=60)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    alerts = Alerts(SqlAlerts(sqlite_engine), node="n1", clock=SystemClock(), queue=AlertSpool(spool))
    assert alerts.queued() == 3 and alerts.flush_once()
    assert [(a.account_id, a.rule, a.figure, a.call_id) for a in list_alerts(sqlite_engine)] == [
        ("acct0", "low_balance", 1, "c0"), ("acct1", "low_balance", 1, "c1"), ("acct2", "low_balance", 1, "c2")]


def test_a_batch_written_just_before_a_crash_is_not_written_twice(tmp_path: Path, engine: Engine) -> None:
    """SQL took the batch, the agent died before trimming the spool: the replay adds nothing
    (PostgreSQL, MariaDB, SQLite: the instant is kept to the millisecond)."""
    spool = tmp_path / "sql.jsonl"
    queue = AlertSpool(spool)
    for n in range(3):
        queue.append(alert(n).with_event_id(f"e{n}"))
    batch = queue.take(10)
    SqlAlerts(engine).record_alerts(batch.records)  # written, then the crash: ``done`` never ran
    queue.close()
    assert rows(engine) == 3
    queue = AlertSpool(spool)
    queue.append(alert(9).with_event_id("e9"))  # a new alert after the restart
    alerts = Alerts(SqlAlerts(engine), node="n1", clock=SystemClock(), queue=queue)
    assert alerts.queued() == 4 and alerts.flush_once()
    assert rows(engine) == 4
    assert [a.call_id for a in list_alerts(engine)] == ["n1-c0", "n1-c1", "n1-c2", "n1-c9"]


def test_a_torn_last_line_is_cut_off_and_an_unreadable_one_skipped(tmp_path: Path) -> None:
    path = tmp_path / "sql.jsonl"
    queue = AlertSpool(path)
    queue.append(alert(0))
    queue.close()
    with open(path, "ab") as spool:
        spool.write(b"not json\n")
        spool.write(b'{"at_ms": 17672256')  # a power loss mid-write
    queue = AlertSpool(path)
    assert len(queue) == 2  # the alert and the unreadable line; the torn tail is gone
    queue.append(alert(1))
    batch = queue.take(10)
    assert [a.call_id for a in batch.records] == ["n1-c0", "n1-c1"]
    queue.done(batch)
    assert len(queue) == 0 and path.stat().st_size == 0


def test_the_spool_is_fsynced_in_groups(tmp_path: Path) -> None:
    spool = LineSpool(tmp_path / "x.jsonl")
    spool.sync()
    assert spool.syncs == 0  # nothing appended: no fsync
    for n in range(50):
        spool.append(b"line %d" % n)
    spool.sync()
    spool.sync()
    assert spool.syncs == 1 and len(spool) == 50
    lines, end = spool.read(20)
    assert lines[0] == b"line 0" and len(lines) == 20
    spool.advance(end, 20)
    assert len(LineSpool(tmp_path / "x.jsonl")) == 30  # the offset is kept across a reopen


def test_the_stream_queue_survives_a_restart_while_redis_is_away(tmp_path: Path, redis_client: object,
                                                                 redis_prefix: str) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,  # nothing listens on port 1
                       retry=Retry(NoBackoff(), 0))
    spool = tmp_path / "stream.jsonl"
    stream = AlertStream(away, key_prefix=redis_prefix, queue=AlertSpool(spool))
    stream.enqueue(alert(0).with_event_id("e0"))
    stream.enqueue(alert(1, rule="wangiri").with_event_id("e1"))
    with pytest.raises(redis.ConnectionError):
        stream.send_once()
    stream.stop()
    again = AlertStream(redis_client, key_prefix=redis_prefix, queue=AlertSpool(spool))  # restarted, Redis back
    assert again.pending() == 2 and again.send_once() == 2 and again.pending() == 0
    entries = redis_client.xrange(f"{redis_prefix}fraud:alerts")  # type: ignore[attr-defined]
    fields = [{k.decode(): v.decode() for k, v in entry.items()} for _, entry in entries]
    assert [(f["event_id"], f["rule"], f["type"]) for f in fields] == [("e0", "irsf_parallel", "fraud_alert"),
                                                                       ("e1", "wangiri", "fraud_alert")]


def test_fraud_alerts_go_through_the_alert_service(tmp_path: Path) -> None:
    """FraudGuard keeps no queue of its own: its alerts reach the service's deliveries and queue."""
    sink, hook = Sink(), Deliveries()
    alerts = Alerts(sink, node="n1", clock=SystemClock(), queue=MemoryAlertQueue())
    alerts.deliveries.append(hook)
    guard = FraudGuard(rules(tmp_path), node="n1", actions=Actions(), clock=SystemClock(), alerts=alerts)
    request = AuthorizeRequest("asterisk", "A1", "victim", "+88212345", T0)
    for n in range(4):
        guard.screen(replace(request, leg_id=f"A{n}"), f"n1-A{n}", T0 + n)
    (got,) = hook.got
    assert (got.rule, got.figure, got.action, got.call_id) == ("irsf_parallel", 4, "suspend", "n1-A3")
    assert alerts.flush_once() and sink.rows == [got]


# ---------------------------------------------------------------- low balance and balance exhausted


class Balances:
    def __init__(self) -> None:
        self.available: dict[str, int] = {}
        self.reads = 0

    def state(self, account_id: str) -> AccountState:
        self.reads += 1
        if account_id not in self.available:
            raise LookupError(f"unknown account {account_id}")
        return AccountState(account_id, "active", self.available[account_id], 0, 0, None, 0)


def watch_rig(thresholds: dict[str, int | None], period_ms: int = 0) -> tuple[BalanceWatch, Balances, Sink]:
    sink, balances = Sink(), Balances()
    alerts = Alerts(sink, node="n1", clock=SystemClock(), period_ms=period_ms)
    watch = BalanceWatch(alerts, threshold_of=thresholds.get, account_state=balances.state, node="n1",
                         clock=SystemClock(), nibble_seconds=6)
    return watch, balances, sink


def settle(watch: BalanceWatch, n: int, account: str = "a", **changes: object) -> None:
    watch.finished(make_record(n, account_id=account, **changes))  # type: ignore[arg-type]
    watch.check_once()


def test_low_balance_once_per_crossing(tmp_path: Path) -> None:
    watch, balances, sink = watch_rig({"a": 5_000_000})
    alerts = watch.alerts
    for n, available in enumerate([9_000_000, 4_000_000, 3_000_000, 2_500_000]):
        balances.available["a"] = available
        settle(watch, n)
    assert [(a.kind, a.figure, a.threshold, a.call_id) for a in alerts.queue.take(10).records] == [
        (LOW_BALANCE, 4_000_000, 5_000_000, "call-000001")]  # one alert, at the call that crossed
    balances.available["a"] = 20_000_000  # topped up: above again at its next call
    settle(watch, 4)
    balances.available["a"] = 4_900_000
    settle(watch, 5)  # a new crossing
    balances.available["a"] = -100_000
    settle(watch, 6)  # and down to nothing
    balances.available["a"] = 1_000_000
    settle(watch, 7)  # a small top-up: still below, no new alert
    got = [(a.kind, a.figure, a.call_id, a.detail) for a in alerts.queue.take(10).records]
    assert got == [(LOW_BALANCE, 4_000_000, "call-000001", "available 4.000000 < 5.000000"),
                   (LOW_BALANCE, 4_900_000, "call-000005", "available 4.900000 < 5.000000"),
                   (BALANCE_EXHAUSTED, -100_000, "call-000006", "available -0.100000 <= 0")]
    assert watch.raised == 3 and watch.checks == 8


def test_the_throttle_holds_back_a_crossing_that_comes_again_too_soon() -> None:
    watch, balances, sink = watch_rig({"a": 5_000_000}, period_ms=60_000)
    for n, available in enumerate([4_000_000, 9_000_000, 4_000_000]):  # calls one minute apart (make_record)
        balances.available["a"] = available
        watch.finished(make_record(n, account_id="a", settled_ms=T0 + n * 20_000))
        watch.check_once()
    assert watch.raised == 1  # the second crossing, 40 s after the first, is throttled


def test_accounts_without_a_threshold_cost_no_balance_read_and_free_calls_none() -> None:
    watch, balances, sink = watch_rig({"watched": 1_000_000})
    balances.available.update(unwatched=0, watched=0)
    settle(watch, 0, account="unwatched")
    settle(watch, 1, account="watched", cost_micros=0)  # a free call (grace, bundle) is not checked
    assert balances.reads == 0 and watch.raised == 0
    settle(watch, 2, account="watched")
    assert balances.reads == 1 and watch.raised == 1


def test_a_resellers_own_account_is_watched_through_its_customers_calls() -> None:
    """DESIGN §11: each call of a reseller's customer charges the reseller's account its parent's
    price; that account's low balance is alerted at the customer's call that crossed it."""
    watch, balances, sink = watch_rig({"tenant:acme": 5_000_000, "c1": 1_000_000})
    balances.available.update({"c1": 50_000_000, "tenant:acme": 9_000_000})
    record = make_record(0, account_id="c1")
    upper = replace(record.rating, level=1, tenant="default", account_id="tenant:acme", cost_micros=80_000)
    watch.finished(replace(record, upper=(upper,)))
    watch.check_once()
    assert watch.raised == 0 and balances.reads == 2  # both accounts read, both above
    balances.available["tenant:acme"] = 4_000_000
    cut = replace(make_record(1, account_id="c1"), disposition=Disposition.CUT)
    watch.finished(replace(cut, upper=(upper, replace(upper, account_id="", cost_micros=0))))  # a free level: skipped
    watch.check_once()
    got = [(a.kind, a.account_id, a.figure, a.call_id) for a in watch.alerts.queue.take(10).records]
    assert got == [(LOW_BALANCE, "tenant:acme", 4_000_000, "call-000001")]  # the customer's cut is its own
    assert balances.reads == 4


def test_exhausted_when_the_call_was_cut_because_the_money_ran_out() -> None:
    watch, balances, sink = watch_rig({"a": 0, "b": 0, "c": 10_000_000})
    # 0.12/min: one 6 s nibble costs 0.012; 0.005 left cannot pay it.
    balances.available.update(a=5_000, b=50_000_000, c=8_000_000)
    settle(watch, 0, account="a", disposition=Disposition.CUT)
    settle(watch, 1, account="b", disposition=Disposition.CUT)  # cut for another reason (cap, fraud, max duration)
    settle(watch, 2, account="c", disposition=Disposition.CUT)
    got = [(a.account_id, a.kind, a.figure, a.detail) for a in watch.alerts.queue.take(10).records]
    assert got == [("a", BALANCE_EXHAUSTED, 5_000, "available 0.005000: the call was cut when the money ran out"),
                   ("c", LOW_BALANCE, 8_000_000, "available 8.000000 < 10.000000")]


def test_several_settles_waiting_together_are_one_check_and_a_cut_among_them_counts() -> None:
    watch, balances, sink = watch_rig({"a": 1_000_000})
    balances.available["a"] = 5_000
    watch.finished(make_record(0, account_id="a", disposition=Disposition.CUT))
    watch.finished(make_record(1, account_id="a"))
    watch.check_once()
    assert balances.reads == 1
    (got,) = watch.alerts.queue.take(10).records
    assert (got.kind, got.call_id) == (BALANCE_EXHAUSTED, "call-000000")


def test_an_unreadable_balance_skips_the_check_and_the_next_settle_checks_again() -> None:
    watch, balances, sink = watch_rig({"gone": 1_000_000})
    settle(watch, 0, account="gone")  # the store does not know it (deleted, or away)
    assert watch.skipped == 1 and watch.raised == 0
    balances.available["gone"] = 10
    settle(watch, 1, account="gone")
    assert watch.raised == 1


def test_crossings_levels() -> None:
    assert level_of(0, 0) is Level.EXHAUSTED and level_of(1, 0) is Level.ABOVE
    assert level_of(999, 1000) is Level.LOW and level_of(1000, 1000) is Level.ABOVE
    assert level_of(500, 0, cut=True, next_nibble_micros=600) is Level.EXHAUSTED
    assert level_of(600, 0, cut=True, next_nibble_micros=600) is Level.ABOVE
    crossings = Crossings(max_tracked=2)
    assert crossings.observe("a", Level.LOW) is Level.LOW
    assert crossings.observe("b", Level.EXHAUSTED) is Level.EXHAUSTED
    assert crossings.observe("c", Level.LOW) is Level.LOW  # "a" is forgotten (bounded)
    assert len(crossings) == 2 and crossings.level("a") is Level.ABOVE


def test_a_call_cut_when_the_money_runs_out_raises_balance_exhausted_through_the_engine() -> None:
    """The real engine and in-memory store: 1.5 s of money at 1.00/min with 1 s nibbles; the cut
    call settles with 0.0005 left, less than a nibble: balance exhausted, once."""
    clock = SystemClock()
    store = MemoryStore()
    store.add_account("alice", 1_500)
    engine = CallEngine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                        rater=Rater(), clock=clock, cdr=Cdrs())
    engine.add_switch(FakeSwitch(engine, clock))
    sink = Sink()
    alerts = Alerts(sink, node="n1", clock=clock)

    def state(account_id: str) -> AccountState:
        mem = store.accounts[account_id]
        return AccountState(account_id, mem.status, mem.balance_micros, mem.reserved_micros,
                            mem.credit_limit_micros, None, 0)

    watch = BalanceWatch(alerts, threshold_of=lambda a: 0, account_state=state, node="n1", clock=clock,
                         nibble_seconds=1)
    records: list[CallRecord] = []
    engine.on_finished.extend([watch.finished, records.append])
    engine.start()
    watch.start()
    alerts.start()
    try:
        assert engine.authorize(AuthorizeRequest("asterisk", "A1", "alice", "33123", clock.now_ms())).allowed
        engine.on_event(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
        engine.on_event(LegAnswered("B1", clock.now_ms()))
        with gevent.Timeout(5):
            while not sink.rows:
                gevent.sleep(0.02)
        (record,) = records
        assert record.disposition is Disposition.CUT and record.rating.cost_micros == 1_000
        (got,) = sink.rows
        assert (got.kind, got.account_id, got.figure, got.call_id) == (BALANCE_EXHAUSTED, "alice", 500,
                                                                       record.call_id)
    finally:
        watch.stop()
        alerts.stop(1)
        engine.stop(1)


# ---------------------------------------------------------------- thresholds per account over plan


def test_thresholds_the_account_s_own_over_its_plan_s_cached(engine: Engine) -> None:
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        create_plan(s, "retail", currency="EUR")
        create_plan(s, "wholesale", currency="EUR")
        accounts_repo.create_account(s, "own", plan="retail")
        accounts_repo.create_account(s, "inherits", plan="retail")
        accounts_repo.create_account(s, "other", plan="wholesale")
        assert set_plan_threshold(s, "retail", 2_000_000) == ("retail", 2_000_000, 2)
        view = set_account_threshold(s, "own", 5_000_000)
        assert (view.in_force_micros, view.source) == (5_000_000, "account")
    now = [T0]
    cache = LowBalanceThresholds(engine, lambda: now[0], ttl_ms=30_000)
    assert [cache.threshold_of(a) for a in ("own", "inherits", "other", "ghost")] == [5_000_000, 2_000_000, None,
                                                                                      None]
    with transaction(sessions) as s:
        set_account_threshold(s, "own", None)  # back to the plan's
        set_plan_threshold(s, "wholesale", 0)
    reads = cache.reads
    assert cache.threshold_of("own") == 5_000_000 and cache.reads == reads  # cached for 30 s
    now[0] += 30_000
    assert cache.threshold_of("own") == 2_000_000 and cache.threshold_of("other") == 0
    engine.dispose()


def test_thresholds_serve_the_last_known_while_the_database_is_away(sqlite_engine: Engine) -> None:
    sessions = session_factory(sqlite_engine)
    with transaction(sessions) as s:
        create_plan(s, "retail", currency="EUR")
        accounts_repo.create_account(s, "a", plan="retail")
        set_account_threshold(s, "a", 1_000_000)
    now = [T0]
    cache = LowBalanceThresholds(sqlite_engine, lambda: now[0], ttl_ms=1_000)
    assert cache.threshold_of("a") == 1_000_000
    cache.engine = _broken_engine()  # the database goes away
    now[0] += 5_000
    assert cache.threshold_of("a") == 1_000_000  # the last known one
    with pytest.raises(ThresholdUnavailable):
        cache.threshold_of("never-seen")


def _broken_engine() -> Engine:
    from sqlalchemy import create_engine

    return create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1})


# ---------------------------------------------------------------- CEL time in the account's timezone


NIGHT_RULES = """
groups:
  premium: {prefixes: ["882"]}
rules:
  - {name: night, kind: new_calls, group: premium, window_s: 3600, threshold: 0, action: alert, when: 'hour < 6'}
"""


def test_cel_hour_and_weekday_are_read_in_the_account_s_timezone(tmp_path: Path) -> None:
    at = 1_767_290_400_000  # 2026-01-01T18:00:00Z, a Thursday: 03:00 on Friday in Tokyo
    assert local_hour_weekday(at, "UTC") == (18, 4)
    assert local_hour_weekday(at, "Asia/Tokyo") == (3, 5)
    assert local_hour_weekday(at, "America/New_York") == (13, 4)
    assert local_hour_weekday(at, "No/Such_Zone") == (18, 4)  # a safety net: read as UTC
    rule_set: RuleSet = rules(tmp_path, NIGHT_RULES)
    assert rule_set.reads_local_time
    facts = CallFacts("a", "c1", "88212345", frozenset({"premium"}), at)
    assert evaluate(rule_set, {"night": 1}, facts).hits == ()  # 18:00 UTC: not night
    tokyo = replace(facts, timezone="Asia/Tokyo")
    assert [h.rule.name for h in evaluate(rule_set, {"night": 1}, tokyo).hits] == ["night"]

    asked: list[tuple[str, str]] = []

    def timezone_of(account_id: str, plan: str) -> str:
        asked.append((account_id, plan))
        return {"tokyo": "Asia/Tokyo"}.get(account_id, "UTC")

    sink = Sink()
    alerts = Alerts(sink, node="n1", clock=SystemClock(), period_ms=0)
    guard = FraudGuard(rule_set, node="n1", actions=Actions(), clock=SystemClock(), alerts=alerts,
                       timezone_of=timezone_of)
    for account in ("tokyo", "london"):
        guard.screen(AuthorizeRequest("asterisk", f"L-{account}", account, "+88212345", at), f"n1-{account}", at)
    assert [a.account_id for a in alerts.queue.take(10).records] == ["tokyo"]
    assert asked == [("tokyo", ""), ("london", "")]
    plain = FraudGuard(rules(tmp_path, "rules:\n  - {name: x, kind: new_calls, window_s: 1, threshold: 9, "
                                       "action: alert, when: 'figure > 1'}\n"),
                       node="n1", actions=Actions(), clock=SystemClock(), alerts=alerts, timezone_of=timezone_of)
    plain.screen(AuthorizeRequest("asterisk", "L9", "tokyo", "+3314", at), "n1-L9", at)
    assert len(asked) == 2  # no condition reads the time: the timezone is not looked up
    calm = FraudGuard(rules(tmp_path, NIGHT_RULES.replace("threshold: 0", "threshold: 5")), node="n1",
                      actions=Actions(), clock=SystemClock(), alerts=alerts, timezone_of=timezone_of)
    calm.screen(AuthorizeRequest("asterisk", "L10", "tokyo", "+88212345", at), "n1-L10", at)
    assert len(asked) == 2  # the time rule's figure (1) is under its threshold: not looked up either
