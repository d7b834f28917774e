"""Spend caps beside the balance (DESIGN §8): max call cost, daily and monthly spend, drawn on
exactly like the balance by the store (grant = the least room), reset by the calendar."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import SpendPeriod
from agent.core.budgets import SpendLimits, SpendUse, capped, check_limits, spend_periods
from agent.core.errors import InvalidInput
from agent.core.events import DenyReason
from tests.balance_helpers import UNIT, Engines, World, world_for

T0 = int(datetime(2027, 3, 10, 12, tzinfo=UTC).timestamp() * 1000)
DAY = 86_400_000
TTL = 60_000
CAP_KINDS = ["sqlite", "postgresql", "mysql"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("caps"))
    yield found
    found.dispose()


@pytest.fixture(params=CAP_KINDS)
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def caps(w: World, account_id: str, **limits: int | None) -> None:
    with transaction(w.sessions) as s:
        repo.set_limits(s, account_id, **limits)


def spend_rows(w: World, account_id: str) -> dict[tuple[str, int], tuple[int, int]]:
    with transaction(w.sessions) as s:
        return {(r.kind, r.start_ms): (r.spent_micros, r.held_micros)
                for r in s.scalars(select(SpendPeriod).where(SpendPeriod.account_id == account_id))}


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
