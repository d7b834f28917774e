"""Spend caps beside the balance (DESIGN §8): max call cost, daily and monthly spend, drawn on
exactly like the balance by the store (grant = the least room), reset by the calendar.

The store tests run on both balance stores: the embedded SQL store (counters in ``spend_periods``)
and the Redis store (counters on the account's slot, spent also written to ``spend_periods`` with
the ledger entries), on one Redis and on a Redis Cluster."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import SpendPeriod
from agent.core.budgets import SpendLimits, SpendUse, capped, check_limits, spend_periods
from agent.core.errors import InvalidInput
from agent.core.events import DenyReason
from tests.balance_helpers import REDIS_KINDS, UNIT, Engines, World, world_for

T0 = int(datetime(2027, 3, 10, 12, tzinfo=UTC).timestamp() * 1000)
DAY = 86_400_000
TTL = 60_000
CAP_KINDS = ["redis", "redis-cluster", "sqlite", "postgresql", "mysql"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("caps"))
    yield found
    found.dispose()


@pytest.fixture(params=CAP_KINDS)
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def sql_w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    """The embedded SQL store only (it keeps the live holds in spend_periods)."""
    yield from world_for(request, engines)


def caps(w: World, account_id: str, **limits: int | None) -> None:
    """What ``limits set`` does: the caps in SQL, then pushed into a shared store that has the
    account (``sync_account``)."""
    with transaction(w.sessions) as s:
        repo.set_limits(s, account_id, **limits)
    if w.kind in REDIS_KINDS:
        store = w.store()
        assert hasattr(store, "refresh")
        store.refresh(account_id)


@pytest.fixture(params=sorted(REDIS_KINDS.keys() - {"redis-sentinel"}))
def rw(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def spend_rows(w: World, account_id: str) -> dict[tuple[str, int], tuple[int, int]]:
    """The account's spend counters (kind, start) -> (spent, held), where the store keeps them."""
    if w.kind in REDIS_KINDS:
        return redis_counters(w, account_id)
    return sql_spend_rows(w, account_id)


def sql_spend_rows(w: World, account_id: str) -> dict[tuple[str, int], tuple[int, int]]:
    with transaction(w.sessions) as s:
        return {(r.kind, r.start_ms): (r.spent_micros, r.held_micros)
                for r in s.scalars(select(SpendPeriod).where(SpendPeriod.account_id == account_id))}


def redis_counters(w: World, account_id: str) -> dict[tuple[str, int], tuple[int, int]]:
    """Every spend counter of the account in Redis (a scan: on a cluster it visits every master)."""
    from agent.adapters.redis.keys import KeySpace
    from agent.adapters.redis.store import make_client

    assert w.redis_prefix is not None
    prefix = KeySpace(w.redis_prefix).of(account_id).spend_prefix
    client = make_client(w.redis_url, 2000)
    try:
        found = {}
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind, _, start = str(key).removeprefix(prefix).partition(":")
            spent, held = client.hmget(key, "spent", "held")
            found[("day" if kind == "d" else "month", int(start))] = (int(spent or 0), int(held or 0))
        return found
    finally:
        client.close()


def test_the_tightest_cap_binds() -> None:
    limits = SpendLimits(max_call_cost_micros=5 * UNIT, daily_micros=10 * UNIT, monthly_micros=100 * UNIT)
    assert capped(50 * UNIT, limits, SpendUse(day_micros=7 * UNIT)) == (3 * UNIT, "daily")
    assert capped(50 * UNIT, limits, SpendUse(call_micros=1 * UNIT)) == (4 * UNIT, "max_call_cost")
    assert capped(2 * UNIT, limits, SpendUse()) == (2 * UNIT, "")  # the balance binds
    with pytest.raises(InvalidInput, match="daily cap -1"):
        check_limits(SpendLimits(daily_micros=-1))


def test_days_and_months_are_local_to_the_plans_timezone() -> None:
    late = int(datetime(2027, 3, 31, 22, 30, tzinfo=UTC).timestamp() * 1000)  # 00:30 on 1 April in Paris
    periods = spend_periods("Europe/Paris", late)
    assert periods.day_start_ms == int(datetime(2027, 3, 31, 22, tzinfo=UTC).timestamp() * 1000)
    assert periods.month_start_ms == periods.day_start_ms


def test_a_daily_cap_limits_what_the_days_calls_may_spend_then_resets(w: World) -> None:
    a = w.account("capped", balance=100 * UNIT)
    caps(w, a, daily_micros=UNIT)
    store = w.store()
    assert store.authorize(a, "c1", "n1", 300_000, 10_000, T0, TTL).granted_micros == 300_000
    store.settle("c1", 1, 700_000, T0 + 60_000)
    second = store.authorize(a, "c2", "n1", 500_000, 10_000, T0 + 70_000, TTL)
    # 1.00 a day, 0.70 spent: 0.30 is all the day has left, whatever the balance.
    assert second.allowed and second.granted_micros == 300_000 and second.available_micros == 300_000
    refused = store.authorize(a, "c3", "n1", 50_000, 10_000, T0 + 80_000, TTL)
    assert not refused.allowed and refused.reason is DenyReason.SPEND_LIMIT
    store.release("c2", 1, T0 + 90_000)
    tomorrow = store.authorize(a, "c4", "n1", 2 * UNIT, 10_000, T0 + DAY, TTL)
    assert tomorrow.allowed and tomorrow.granted_micros == UNIT and tomorrow.available_micros == UNIT
    rows = spend_rows(w, a)
    day0 = spend_periods("UTC", T0).day_start_ms
    assert rows[("day", day0)] == (700_000, 0)
    assert rows[("day", day0 + DAY)] == (0, UNIT)


def test_a_cap_reached_mid_call_gives_a_partial_grant(w: World) -> None:
    a = w.account("percall", balance=100 * UNIT)
    caps(w, a, max_call_cost_micros=250_000)
    store = w.store()
    assert store.authorize(a, "c1", "n1", 100_000, 10_000, T0, TTL).granted_micros == 100_000
    first = store.debit_and_reserve("c1", 1, 100_000, 100_000, T0 + 10_000, TTL)
    assert first.granted_micros == 100_000
    # Debited 0.20 with 0.10 held: 0.05 is all the call may still spend.
    second = store.debit_and_reserve("c1", 2, 100_000, 100_000, T0 + 20_000, TTL)
    assert second.granted_micros == 50_000
    third = store.debit_and_reserve("c1", 3, 50_000, 100_000, T0 + 30_000, TTL)
    assert third.granted_micros == 0
    store.settle("c1", 4, 250_000, T0 + 30_000)
    assert w.sql_balance(a) == 100 * UNIT - 250_000


def test_a_monthly_cap_counts_every_day_of_the_month(w: World) -> None:
    a = w.account("monthly", balance=100 * UNIT)
    caps(w, a, monthly_micros=2 * UNIT, daily_micros=UNIT)
    store = w.store()
    for day in range(3):
        at = T0 + day * DAY
        outcome = store.authorize(a, f"m{day}", "n1", UNIT, 10_000, at, TTL)
        assert outcome.allowed, day
        store.settle(f"m{day}", 1, min(outcome.available_micros, 900_000), at + 1000)
    # 0.90 + 0.90 + 0.20 (the month's rest): the fourth day has nothing left this month.
    refused = store.authorize(a, "m3", "n1", 100_000, 10_000, T0 + 3 * DAY, TTL)
    assert not refused.allowed and refused.reason is DenyReason.SPEND_LIMIT
    assert w.sql_balance(a) == 98 * UNIT


def test_an_account_without_caps_keeps_no_spend_counters(w: World) -> None:
    a = w.account("free", balance=10 * UNIT)
    store = w.store()
    store.authorize(a, "f1", "n1", 100_000, 10_000, T0, TTL)
    store.settle("f1", 1, 100_000, T0 + 1000)
    assert spend_rows(w, a) == {}


def test_a_call_expired_under_a_cap_counts_its_debits_as_spent(w: World) -> None:
    a = w.account("expiring", balance=10 * UNIT)
    caps(w, a, daily_micros=UNIT)
    store = w.store()
    store.authorize(a, "e1", "n1", 100_000, 10_000, T0, TTL)
    store.debit_and_reserve("e1", 1, 100_000, 100_000, T0 + 10_000, TTL)
    store.expire(T0 + 10_000 + TTL + 1)
    day0 = spend_periods("UTC", T0).day_start_ms
    assert spend_rows(w, a)[("day", day0)] == (100_000, 0)
    store.settle("e1", 2, 150_000, T0 + 200_000)  # a late settle charges the rest
    assert spend_rows(w, a)[("day", day0)] == (150_000, 0)


def test_a_daily_cap_reached_mid_call_by_the_days_other_calls_gives_a_partial_grant(w: World) -> None:
    a = w.account("shared", balance=100 * UNIT)
    caps(w, a, daily_micros=UNIT)
    node1, node2 = w.store(), w.store()
    assert node1.authorize(a, "s1", "n1", 400_000, 10_000, T0, TTL).granted_micros == 400_000
    assert node2.authorize(a, "s2", "n2", 400_000, 10_000, T0 + 1000, TTL).granted_micros == 400_000
    # s1 used its slice: 0.80 of the day is held (0.40 debited + 0.40 of s2): 0.20 is left for s1.
    assert node1.debit_and_reserve("s1", 1, 400_000, 400_000, T0 + 10_000, TTL).granted_micros == 200_000
    assert node2.debit_and_reserve("s2", 1, 400_000, 400_000, T0 + 11_000, TTL).granted_micros == 0
    node1.settle("s1", 2, 600_000, T0 + 20_000)
    node2.settle("s2", 2, 400_000, T0 + 20_000)
    day0 = spend_periods("UTC", T0).day_start_ms
    assert spend_rows(w, a)[("day", day0)] == (UNIT, 0)
    assert w.sql_balance(a) == 99 * UNIT


def test_max_call_cost_set_during_a_call_binds_it_at_its_next_nibble(w: World) -> None:
    a = w.account("late", balance=100 * UNIT)
    store = w.store()
    assert store.authorize(a, "l1", "n1", 100_000, 10_000, T0, TTL).granted_micros == 100_000
    caps(w, a, max_call_cost_micros=150_000)
    assert store.debit_and_reserve("l1", 1, 100_000, 100_000, T0 + 10_000, TTL).granted_micros == 50_000
    store.settle("l1", 2, 150_000, T0 + 15_000)
    assert spend_rows(w, a) == {}  # authorized without a cap: the call counts on no day


def test_replayed_steps_move_the_counters_once(w: World) -> None:
    a = w.account("replays", balance=100 * UNIT)
    caps(w, a, daily_micros=10 * UNIT)
    store, other = w.store(), w.store()
    first = store.authorize(a, "r1", "n1", 300_000, 10_000, T0, TTL)
    again = other.authorize(a, "r1", "n2", 300_000, 10_000, T0 + 5, TTL)
    assert again.replayed and again.granted_micros == first.granted_micros
    for node in (store, other):
        node.debit_and_reserve("r1", 1, 300_000, 200_000, T0 + 10_000, TTL)
    day0 = spend_periods("UTC", T0).day_start_ms
    assert spend_rows(w, a)[("day", day0)] == (0, 500_000)
    for node in (store, other):
        node.settle("r1", 2, 420_000, T0 + 12_000)
    store.release("r1", 3, T0 + 13_000)
    store.expire(T0 + 10 * TTL)
    rows = spend_rows(w, a)
    assert rows[("day", day0)] == rows[("month", spend_periods("UTC", T0).month_start_ms)] == (420_000, 0)


def test_a_call_wholly_in_bundle_seconds_is_counted_without_money(w: World) -> None:
    from agent.adapters.sql.models import Bundle, BundleGrant
    from agent.core.balance import BundleSettle
    from agent.core.bundles import BundleSlot

    a = w.account("bundled", balance=100 * UNIT)
    caps(w, a, daily_micros=0)  # nothing in money today
    with transaction(w.sessions) as s:
        bundle = Bundle(name="b", seconds=600, period="month", anchor=1, rollover=False)
        s.add(bundle)
        s.flush()
        grant = BundleGrant(account_id=a, bundle_id=bundle.id, valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                            valid_until=None, reference="g")
        s.add(grant)
        s.flush()
        slot = BundleSlot(int(grant.id), T0 - DAY, 600, T0 + 30 * DAY)
    store = w.store()
    out = store.authorize(a, "b1", "n1", 100_000, 10_000, T0, TTL, bundle_slots=(slot,), bundle_want_s=30)
    assert out.allowed and (out.granted_micros, out.bundle_granted_s) == (0, 30)
    money = store.authorize(a, "b2", "n1", 100_000, 10_000, T0, TTL)
    assert not money.allowed and money.reason is DenyReason.SPEND_LIMIT
    store.settle("b1", 1, 0, T0 + 20_000, bundle=BundleSettle(20, (slot,)))
    assert spend_rows(w, a).get(("day", spend_periods("UTC", T0).day_start_ms), (0, 0)) == (0, 0)


# ------------------------------------------------------------------------------- Redis only


def test_caps_and_what_was_spent_survive_losing_redis(rw: World) -> None:
    """Redis restarted empty: the caps come back with the account, the day's and the month's
    spent from SQL's spend_periods (written with the ledger entries); what open calls held went
    with Redis (no call is open there any more)."""
    a = rw.account("alice", balance=100 * UNIT)
    caps(rw, a, daily_micros=UNIT, monthly_micros=5 * UNIT, max_call_cost_micros=800_000)
    store = rw.store()
    store.authorize(a, "c1", "n1", 300_000, 10_000, T0, TTL)
    store.debit_and_reserve("c1", 1, 300_000, 300_000, T0 + 10_000, TTL)
    store.settle("c1", 2, 450_000, T0 + 15_000)
    store.authorize(a, "c2", "n1", 200_000, 10_000, T0 + 20_000, TTL)
    periods = spend_periods("UTC", T0)
    day, month = ("day", periods.day_start_ms), ("month", periods.month_start_ms)
    assert redis_counters(rw, a) == {day: (450_000, 200_000), month: (450_000, 200_000)}
    assert sql_spend_rows(rw, a) == {day: (450_000, 0), month: (450_000, 0)}  # SQL: spent only
    rw.wipe_redis()
    restarted = rw.store()  # a restarted agent: the account is loaded from SQL at its first call
    out = restarted.authorize(a, "c3", "n1", UNIT, 10_000, T0 + 30_000, TTL)
    assert (out.granted_micros, out.available_micros) == (550_000, 550_000)
    assert redis_counters(rw, a) == {day: (450_000, 550_000), month: (450_000, 550_000)}
    refused = restarted.authorize(a, "c4", "n1", 100_000, 10_000, T0 + 31_000, TTL)
    assert not refused.allowed and refused.reason is DenyReason.SPEND_LIMIT
    restarted.settle("c3", 1, 500_000, T0 + 40_000)
    assert redis_counters(rw, a) == {day: (950_000, 0), month: (950_000, 0)}
    assert sql_spend_rows(rw, a) == {day: (950_000, 0), month: (950_000, 0)}
    # The next day starts at zero; the month goes on.
    tomorrow = restarted.authorize(a, "c5", "n1", 2 * UNIT, 10_000, T0 + DAY, TTL)
    assert tomorrow.granted_micros == 800_000  # the max call cost binds first
    assert redis_counters(rw, a)[("day", periods.day_start_ms + DAY)] == (0, 800_000)


def test_a_rebuild_or_refresh_during_capped_calls_keeps_their_counters(rw: World, tmp_path: object) -> None:
    from agent.adapters.redis.store import RedisBalanceStore
    from agent.adapters.sql.engine import make_engine, session_factory

    a = rw.account("bob", balance=100 * UNIT)
    caps(rw, a, daily_micros=10 * UNIT)
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    store.authorize(a, "p1", "n1", UNIT, 10_000, T0, TTL)  # settled and posted
    store.settle("p1", 1, 700_000, T0 + 5_000)
    store.authorize(a, "o1", "n1", UNIT, 10_000, T0, TTL)  # open, with a debit
    store.debit_and_reserve("o1", 1, UNIT, 500_000, T0 + 10_000, TTL)
    store.authorize(a, "u1", "n1", UNIT, 10_000, T0, TTL)  # settled, its ledger write failed
    dead_sql = session_factory(make_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
    assert not rw.store(dead_sql).settle("u1", 1, 800_000, T0 + 11_000).ledger_posted
    before = redis_counters(rw, a)
    day = ("day", spend_periods("UTC", T0).day_start_ms)
    assert before[day] == (1_500_000, 1_500_000)
    store.rebuild(a)
    assert redis_counters(rw, a) == before
    assert store.refresh(a)
    assert redis_counters(rw, a) == before
    store.settle("o1", 2, 1_200_000, T0 + 20_000)
    assert store.expire(T0 + 30_000).posted == 1  # u1, by the sweeper
    assert redis_counters(rw, a)[day] == (2_700_000, 0)
    assert sql_spend_rows(rw, a)[day] == (2_700_000, 0)
    rw.wipe_redis()
    assert rw.store().rebuild(a).balance_micros == 100 * UNIT - 2_700_000
    assert redis_counters(rw, a)[day] == (2_700_000, 0)


def test_the_day_of_a_call_is_read_in_the_timezone_of_the_plan(rw: World) -> None:
    from agent.adapters.redis.store import RedisBalanceStore

    a = rw.account("paris", balance=100 * UNIT)
    with transaction(rw.sessions) as s:
        repo.get_plan(s, "retail").timezone = "Europe/Paris"
    caps(rw, a, daily_micros=UNIT)
    late = int(datetime(2027, 3, 31, 22, 30, tzinfo=UTC).timestamp() * 1000)  # 00:30 on 1 April in Paris
    store = rw.store()
    assert isinstance(store, RedisBalanceStore)
    store.authorize(a, "t1", "n1", 100_000, 10_000, late, TTL)
    paris = spend_periods("Europe/Paris", late)
    assert store.spend_counters(a, paris) == {"day": (0, 100_000), "month": (0, 100_000)}
    with transaction(rw.sessions) as s:  # the plan moves: the store learns it from the script
        repo.get_plan(s, "retail").timezone = "UTC"
    store.refresh(a)
    store.authorize(a, "t2", "n1", 100_000, 10_000, late, TTL)
    utc = spend_periods("UTC", late)
    assert store.spend_counters(a, utc) == {"day": (0, 100_000), "month": (0, 100_000)}


def test_limits_set_reaches_a_running_redis_store(tmp_path: Path, redis_client: object) -> None:
    from click.testing import CliRunner

    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.adapters.sql.engine import make_engine, session_factory
    from agent.cli.main import cli

    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'caps.db'}\n"
                      f"redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: '{prefix}'\n")

    def ok(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    ok("db", "upgrade")
    ok("plans", "create", "retail", "--timezone", "Europe/Paris")
    ok("accounts", "create", "alice", "--plan", "retail", "--balance", "50")
    engine = make_engine(f"sqlite:///{tmp_path / 'caps.db'}")
    node = RedisBalanceStore(make_client("redis://127.0.0.1:6379/0", 1000), session_factory(engine), key_prefix=prefix)
    now = int(datetime.now(UTC).timestamp() * 1000)
    try:
        assert node.authorize("alice", "r1", "n1", 5 * UNIT, 10_000, now, TTL).granted_micros == 5 * UNIT
        ok("limits", "set", "alice", "--daily", "2")
        capped_call = node.authorize("alice", "r2", "n1", 5 * UNIT, 10_000, now, TTL)
        assert (capped_call.granted_micros, capped_call.available_micros) == (2 * UNIT, 2 * UNIT)
        refused = node.authorize("alice", "r3", "n1", 5 * UNIT, 10_000, now, TTL)
        assert not refused.allowed and refused.reason is DenyReason.SPEND_LIMIT
        assert node.spend_counters("alice", spend_periods("Europe/Paris", now)) == {
            "day": (0, 2 * UNIT), "month": (0, 2 * UNIT)}
        shown = json.loads(ok("limits", "show", "alice", "--json"))  # every node's live holds, from Redis
        assert shown["source"] == "redis" and shown["daily"] == {"cap": "2.000000", "spent": "0.000000",
                                                                 "held": "2.000000", "left": "0.000000"}
        ok("limits", "set", "alice", "--daily", "none")
        assert node.authorize("alice", "r4", "n1", 5 * UNIT, 10_000, now, TTL).granted_micros == 5 * UNIT
    finally:
        node.close()
        engine.dispose()
        for key in redis_client.scan_iter(match=f"{prefix}*"):  # type: ignore[attr-defined]
            redis_client.delete(key)  # type: ignore[attr-defined]


def test_limits_set_and_show_from_the_command_line(sqlite_engine: Engine) -> None:
    from click.testing import CliRunner

    from agent.cli.main import cli

    url = sqlite_engine.url.render_as_string(hide_password=False)

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["--database-url", url, *args])
        return result.exit_code, result.output

    assert run("plans", "create", "retail", "--timezone", "Europe/Paris")[0] == 0
    assert run("accounts", "create", "alice", "--plan", "retail", "--balance", "50")[0] == 0
    code, out = run("limits", "set", "alice", "--daily", "5", "--max-call-cost", "1.50")
    assert code == 0 and "max call cost  1.500000" in out and "daily          5.000000" in out
    code, out = run("limits", "set", "alice", "--daily", "none", "--json")
    data = json.loads(out)
    assert code == 0 and data["daily"]["cap"] is None and data["max_call_cost"]["cap"] == "1.500000"
    code, out = run("limits", "set", "alice", "--monthly", "-3")
    assert code != 0 and "'-3'" in out and "negative" in out
    code, out = run("limits", "set", "bob", "--monthly", "3")
    assert code != 0 and "unknown account 'bob'" in out
    with transaction(sessionmaker(sqlite_engine)) as s:
        assert repo.view_account(s, "alice").limits == SpendLimits(max_call_cost_micros=1_500_000)


def test_ledger_check_proves_the_spend_counters_of_the_embedded_store(sql_w: World) -> None:
    from sqlalchemy import update

    from agent.adapters.sql.reconcile import Report, check_spend

    a = sql_w.account("checked", balance=10 * UNIT)
    caps(sql_w, a, daily_micros=5 * UNIT)
    store = sql_w.store()
    store.authorize(a, "k1", "n1", 100_000, 10_000, T0, TTL)
    store.debit_and_reserve("k1", 1, 100_000, 100_000, T0 + 10_000, TTL)
    store.authorize(a, "k2", "n1", 100_000, 10_000, T0, TTL)
    store.settle("k2", 1, 70_000, T0 + 20_000)
    with transaction(sql_w.sessions) as s:
        report = Report()
        assert check_spend(s, report, 10) == 2 and report.ok, report.problems
        s.execute(update(SpendPeriod).where(SpendPeriod.kind == "day").values(spent_micros=1))
    with transaction(sql_w.sessions) as s:
        report = Report()
        check_spend(s, report, 10)
        (problem,) = report.problems
        assert problem.problem == "day spend counter differs from its calls"
        assert problem.detail["charged_micros"] == 70_000 and problem.detail["open_reservations_micros"] == 200_000
