"""A database blip does not refuse the calls of accounts the node knows (issue 14.5)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine

from agent.adapters.sql.account_plans import AccountPlans, PlanLookupUnavailable
from agent.adapters.sql.accounts import create_account
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.plans import create_plan


class Now:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.ms


def test_the_last_known_plan_serves_while_the_database_is_down(sqlite_engine: Engine) -> None:
    with transaction(session_factory(sqlite_engine)) as s:
        create_plan(s, "retail", currency="EUR")
        create_account(s, "alice", plan="retail", balance_micros=0)
    now = Now()
    plans = AccountPlans(sqlite_engine, now, ttl_ms=30_000, retry_ms=2_000)
    assert plans.plan_of("alice") == "retail"
    now.ms += 60_000  # the cache entry is old: the database would be asked
    plans.engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_seconds=1)
    assert plans.plan_of("alice") == "retail"  # the last known plan, not a refusal
    assert plans.stale_since_ms == now.ms and plans.stale_served == 1
    started = time.monotonic()
    with pytest.raises(PlanLookupUnavailable, match="'bob' was never seen"):
        plans.plan_of("bob")
    assert time.monotonic() - started < 0.2  # not asked again for retry_ms: no connect timeout per call
    now.ms += 2_500
    plans.engine = sqlite_engine  # the database is back
    assert plans.plan_of("alice") == "retail" and plans.stale_since_ms is None


def test_a_stale_plan_is_served_at_once_and_read_again_off_the_authorization_path(sqlite_engine: Engine) -> None:
    """With ``background`` (the daemon) an authorization never waits on SQL for an account seen
    before: the stale entry answers and a greenlet reads the new one."""
    import gevent

    from agent.adapters.sql.models import Account, RatePlan

    with transaction(session_factory(sqlite_engine)) as s:
        create_plan(s, "retail", currency="EUR")
        create_plan(s, "gold", currency="EUR")
        create_account(s, "alice", plan="retail", balance_micros=0)
    now = Now()
    plans = AccountPlans(sqlite_engine, now, ttl_ms=30_000, background=True)
    assert plans.plan_of("alice") == "retail"
    with transaction(session_factory(sqlite_engine)) as s:
        gold = s.query(RatePlan).filter_by(name="gold").one()
        s.query(Account).filter_by(id="alice").update({"rate_plan_id": gold.id})
    now.ms += 60_000
    reads: list[str] = []
    load = plans.lookup.load
    plans.lookup.load = lambda key: reads.append(key) or load(key)  # type: ignore[func-returns-value]
    assert plans.plan_of("alice") == "retail" and reads == []  # served stale, nothing read in line
    gevent.sleep(0)  # the refresh greenlet runs
    gevent.sleep(0.05)
    assert reads == ["alice"] and plans.plan_of("alice") == "gold"
