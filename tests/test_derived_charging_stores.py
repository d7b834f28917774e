"""Derived charging (DESIGN §11) on the real stores: a three-level tree, operator (plan wholesale,
USD) > reseller acme (USD, its account ``tenant:acme``) > customer c1 (EUR, on acme's plan),
rated through the SQL look-ups (TenantChains, AccountPlans, FxBook), charged by the gevent
engine on the SQL balance store (SQLite, PostgreSQL, MariaDB), Redis and a Redis Cluster, the
CDRs written, ``ledger check`` and ``cdrs margin`` read back. Each level is its own store call
(``call^1``), so no Lua script touches two accounts' slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import gevent
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from agent.adapters.sql.account_plans import AccountPlans
from agent.adapters.sql.accounts import create_account
from agent.adapters.sql.cached_lookup import TenantChains
from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.fx_rates import FxBook
from agent.adapters.sql.models import RatingDecision
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.rate_repository import RatePlanCache
from agent.adapters.sql.reconcile import check_ledger
from agent.adapters.sql.tenants import create_tenant
from agent.cli.main import cli
from agent.core.cdr import Disposition
from agent.core.events import (
    AuthorizeRequest,
    DenyReason,
    Direction,
    LegAnswered,
    LegCreated,
    LegHungUp,
    LiveLeg,
    PbxConnected,
)
from agent.core.session import level_call_id
from agent.services.clock import SystemClock
from agent.services.engine import Engine, EngineSettings
from agent.services.rater import PlanRater
from agent.services.store_port import EngineStoreAdapter
from tests.balance_helpers import REDIS_KINDS, STORE_KINDS, Engines, World, world_for
from tests.engine_fakes import Cdrs, Switch

RESELLER = "tenant:acme"
WHOLESALE = "prefix,destination,rate\n49,Germany,0.06\n"  # 1000 USD micro-units a second
RETAIL = "prefix,destination,rate\n49,Germany,0.12\n"  # 2000 USD micro-units a second


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("derived"))
    yield found
    found.dispose()


@pytest.fixture(params=STORE_KINDS)
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def _cli(w: World, *args: str) -> str:
    url = w.engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _tree(w: World, tmp: Path, *, reseller_micros: int, customer_micros: int) -> None:
    with transaction(w.sessions) as s:
        create_plan(s, "wholesale", currency="USD")
        create_tenant(s, "acme", parent="default", currency="USD", plan="wholesale", balance_micros=reseller_micros)
        create_plan(s, "acme-retail", currency="USD", tenant="acme")
        create_account(s, "c1", plan="acme-retail", currency="EUR", tenant="acme", balance_micros=customer_micros)
        create_account(s, "direct", plan="wholesale", currency="USD", balance_micros=customer_micros)
    for plan, deck in (("wholesale", WHOLESALE), ("acme-retail", RETAIL)):
        path = tmp / f"{plan}.csv"
        path.write_text(deck)
        _cli(w, "rates", "import", str(path), "--plan", plan)
    _cli(w, "fx", "set", "USD", "EUR", "0.9", "--from", "2026-01-01")



def _engine(w: World, clock: SystemClock, cdrs: Cdrs) -> tuple[Engine, Switch]:
    plans = AccountPlans(w.engine, clock.now_ms)
    rater = PlanRater(plans.rating_of, RatePlanCache(w.engine), fx_of=FxBook(w.engine, clock.now_ms).conversion,
                      chain_of=TenantChains(w.engine, clock.now_ms).chain_of)
    store = EngineStoreAdapter(w.store(), node="n1", ttl_ms=30_000)
    engine = Engine(settings=EngineSettings(node="n1", nibble_seconds=1, hangup_verify_ms=400), store=store,
                    rater=rater, clock=clock, cdr=cdrs)
    switch = Switch(engine, clock)
    engine.add_switch(switch)
    engine.start()
    return engine, switch


def _wait(predicate, timeout: float = 8.0) -> None:  # type: ignore[no-untyped-def]
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.01)


def _ledger_ok(w: World) -> None:
    with transaction(w.sessions) as s:
        report = check_ledger(s, now=datetime.now(UTC) + timedelta(hours=1), grace=timedelta(0))
    assert report.problems == [], report.problems


def test_a_reseller_whose_money_is_the_limit_cuts_its_customers_call_and_every_level_adds_up(
        w: World, tmp_path: Path) -> None:
    _tree(w, tmp_path, reseller_micros=3_500, customer_micros=1_000_000)
    clock, cdrs = SystemClock(), Cdrs()
    engine, switch = _engine(w, clock, cdrs)
    try:
        decision = engine.authorize(AuthorizeRequest("asterisk", "A1", "c1", "4930123", clock.now_ms()))
        assert decision.allowed and decision.limit_ms == 3_000, decision  # the reseller's 3.5 s at 1000/s
        engine.on_event(LegCreated("B1", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A1"))
        answered = clock.now_ms()
        engine.on_event(LegAnswered("B1", answered))
        _wait(lambda: switch.hangups)
        assert 3_000 <= switch.hangups[0][1] - answered <= 3_200  # at the reseller's instant
        _wait(lambda: cdrs.records)
        refused = engine.authorize(AuthorizeRequest("asterisk", "A2", "c1", "4930123", clock.now_ms()))
        assert not refused.allowed and refused.reason is DenyReason.INSUFFICIENT_FUNDS and "acme" in refused.detail
        _wait(lambda: len(cdrs.records) == 1 and engine.live_calls() == 0)
        gevent.sleep(0.2)
    finally:
        engine.stop(2)
    (record,) = cdrs.records
    call_id = engine.call_id_of_leg("A1")
    assert record.disposition is Disposition.CUT
    # The customer: acme's price of 3 s (6000 USD micro-units) at USD->EUR 0.9: 5400 EUR.
    assert (record.rating.cost_micros, record.rating.plan_cost_micros, record.rating.currency,
            record.rating.tenant) == (5_400, 6_000, "EUR", "acme")
    (level,) = record.upper
    assert (level.level, level.account_id, level.tenant, level.cost_micros, level.currency) == \
        (1, RESELLER, "default", 3_000, "USD")
    assert w.entries(call_id) == [("charge", -5_400, f"charge:{call_id}")]
    assert w.entries(level_call_id(call_id, 1)) == [("charge", -3_000, f"charge:{level_call_id(call_id, 1)}")]
    assert w.sql_balance("c1") == 1_000_000 - 5_400
    assert w.sql_balance(RESELLER) == 500
    SqlCdrStore(w.engine).write(cdrs.records)
    with w.engine.connect() as conn:
        rows = conn.execute(select(RatingDecision.call_id, RatingDecision.level, RatingDecision.cost_micros,
                                   RatingDecision.of_call_id).order_by(RatingDecision.level)).all()
    assert [tuple(r) for r in rows] == [(call_id, 0, 5_400, None), (level_call_id(call_id, 1), 1, 3_000, call_id)]
    _ledger_ok(w)
    margin = json.loads(_cli(w, "cdrs", "margin", "--by", "tenant", "--json"))
    assert margin == [{"tenant": "acme", "currency": "USD", "calls": 1, "seconds": 3, "minutes": "0.050000",
                       "revenue": "0.006000",
                       "cost": "0.003000", "margin": "0.003000"}]
    # The operator's view of the call shows every level (the customer's current rating, then the reseller's).
    shown = json.loads(_cli(w, "cdrs", "show", call_id, "--json"))
    assert (shown["rating"]["cost"], shown["rating"]["currency"]) == ("0.005400", "EUR")
    assert [(lv["level"], lv["account_id"], lv["seller"], lv["cost"], lv["currency"], lv["billed_seconds"])
            for lv in shown["levels"]] == [(1, RESELLER, "default", "0.003000", "USD", 3)]
    assert f"level 1 {RESELLER} pays default: plan wholesale" in _cli(w, "cdrs", "show", call_id)


def test_a_crash_between_two_levels_and_a_restart_adopt_every_level_and_charge_each_once(
        w: World, tmp_path: Path) -> None:
    """The first agent dies with the call live (its reservations open at both levels); the next
    one adopts both levels from the store and bills on: each level is charged its own price of
    the real duration once, and the ledger adds up."""
    _tree(w, tmp_path, reseller_micros=1_000_000, customer_micros=1_000_000)
    clock, cdrs = SystemClock(), Cdrs()
    first, _ = _engine(w, clock, cdrs)
    assert first.authorize(AuthorizeRequest("asterisk", "A3", "c1", "4930123", clock.now_ms())).allowed
    first.on_event(LegCreated("B3", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A3"))
    answered = clock.now_ms()
    first.on_event(LegAnswered("B3", answered))
    gevent.sleep(1.5)
    first._running = False  # the agent dies: no settle, no record (kill -9)
    first._group.kill(timeout=1)
    call_id = first.call_id_of_leg("A3")
    store = w.store()
    held = {c.call_id: c for c in store.live_calls()}
    assert set(held) == {call_id, level_call_id(call_id, 1)}  # every level left its own reservation
    second, _ = _engine(w, clock, cdrs)
    second.adoptable = held
    try:
        second.on_event(PbxConnected("asterisk", clock.now_ms(), (
            LiveLeg("A3", Direction.INBOUND, callee="4930123", created_ms=answered - 50),
            LiveLeg("B3", Direction.OUTBOUND, parent_leg_id="A3", answered=True, created_ms=answered - 20,
                    answered_ms=answered))))
        _wait(lambda: call_id in second.registry.sessions)
        gevent.sleep(0.8)
        end = clock.now_ms()
        second.on_event(LegHungUp("B3", end, cause="NORMAL_CLEARING"))
        second.on_event(LegHungUp("A3", end, cause="NORMAL_CLEARING"))
        _wait(lambda: cdrs.records)
        gevent.sleep(0.2)
    finally:
        second.stop(2)
    seconds = -(-(end - answered) // 1000)
    (record,) = cdrs.records
    customer_cost = -(-2_000 * seconds * 9 // 10)
    assert (record.rating.cost_micros, record.upper[0].cost_micros) == (customer_cost, 1_000 * seconds)
    assert w.entries(call_id) == [("charge", -customer_cost, f"charge:{call_id}")]
    level_id = level_call_id(call_id, 1)
    assert w.entries(level_id) == [("charge", -1_000 * seconds, f"charge:{level_id}")]
    assert w.sql_balance("c1") == 1_000_000 - customer_cost
    assert w.sql_balance(RESELLER) == 1_000_000 - 1_000 * seconds
    assert store.live_calls() == []
    SqlCdrStore(w.engine).write(cdrs.records)
    _ledger_ok(w)


def test_a_reservation_left_by_a_crash_before_the_upper_level_expires_with_no_charge(
        w: World, tmp_path: Path) -> None:
    """The agent reserved the customer and died before the reseller's step: no call ran (the PBX
    had no answer), the customer's reservation expires with nothing charged, the reseller was
    never touched."""
    _tree(w, tmp_path, reseller_micros=1_000_000, customer_micros=1_000_000)
    store = w.store()
    now = SystemClock().now_ms()
    outcome = store.authorize("c1", "n1-A4", "n1", 1_800, 1_800, now, 30_000)
    assert outcome.allowed
    store.expire(now + 31_000)
    assert store.live_calls() == []
    assert w.sql_balance("c1") == 1_000_000 and w.sql_balance(RESELLER) == 1_000_000
    assert store.account_state("c1").reserved_micros == 0
    assert store.account_state(RESELLER).reserved_micros == 0


def test_a_direct_customer_of_the_operator_is_charged_alone(w: World, tmp_path: Path) -> None:
    _tree(w, tmp_path, reseller_micros=0, customer_micros=2_500)
    clock, cdrs = SystemClock(), Cdrs()
    engine, switch = _engine(w, clock, cdrs)
    try:
        decision = engine.authorize(AuthorizeRequest("asterisk", "A5", "direct", "4930123", clock.now_ms()))
        assert decision.allowed and decision.limit_ms == 2_000
        engine.on_event(LegCreated("B5", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A5"))
        engine.on_event(LegAnswered("B5", clock.now_ms()))
        _wait(lambda: cdrs.records)
    finally:
        engine.stop(2)
    assert cdrs.records[0].upper == () and cdrs.records[0].rating.cost_micros == 2_000
    assert w.sql_balance(RESELLER) == 0


def test_a_reseller_suspended_with_a_live_customer_call_refuses_new_calls_and_drains_the_live_one(
        w: World, tmp_path: Path) -> None:
    """Drain (README, Currencies and tenants): the live call goes on, paid by what the reseller's
    account has, and is cut when that runs out; new calls of its customers are refused."""
    _tree(w, tmp_path, reseller_micros=2_500, customer_micros=1_000_000)
    clock, cdrs = SystemClock(), Cdrs()
    engine, switch = _engine(w, clock, cdrs)
    try:
        assert engine.authorize(AuthorizeRequest("asterisk", "A6", "c1", "4930123", clock.now_ms())).allowed
        engine.on_event(LegCreated("B6", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A6"))
        answered = clock.now_ms()
        engine.on_event(LegAnswered("B6", answered))
        _cli(w, "accounts", "suspend", RESELLER)
        if w.kind in REDIS_KINDS:  # what the command does itself with redis.url configured
            w.store().refresh(RESELLER)  # type: ignore[attr-defined]
        refused = engine.authorize(AuthorizeRequest("asterisk", "A7", "c1", "4930123", clock.now_ms()))
        assert not refused.allowed and refused.reason is DenyReason.SUSPENDED and "acme" in refused.detail
        _wait(lambda: switch.hangups)
        assert 2_000 <= switch.hangups[0][1] - answered <= 2_200  # drained to the reseller's last second
        _wait(lambda: cdrs.records)
    finally:
        engine.stop(2)
    assert cdrs.records[0].upper[0].cost_micros == 2_000
    assert w.sql_balance(RESELLER) == 500


def test_a_daily_cap_on_a_reseller_limits_and_cuts_every_call_of_its_customers(w: World, tmp_path: Path) -> None:
    """Spend caps at tenant scope (DESIGN §8 with §11): a cap set on the reseller's own account
    (``limits set tenant:acme``) is drawn on by its level's store step of every customer call, so
    the reseller's day cannot spend past it whatever its money and its customers' money."""
    _tree(w, tmp_path, reseller_micros=1_000_000, customer_micros=1_000_000)
    _cli(w, "limits", "set", RESELLER, "--daily", "0.0035")  # 3.5 s of acme's cost (1000 USD micro-units/s)
    clock, cdrs = SystemClock(), Cdrs()
    engine, switch = _engine(w, clock, cdrs)
    try:
        decision = engine.authorize(AuthorizeRequest("asterisk", "A7", "c1", "4930123", clock.now_ms()))
        assert decision.allowed and decision.limit_ms == 3_000, decision
        engine.on_event(LegCreated("B7", clock.now_ms(), Direction.OUTBOUND, parent_leg_id="A7"))
        answered = clock.now_ms()
        engine.on_event(LegAnswered("B7", answered))
        _wait(lambda: switch.hangups)
        assert 3_000 <= switch.hangups[0][1] - answered <= 3_200  # at the reseller's cap, not its money
        _wait(lambda: len(cdrs.records) == 1 and engine.live_calls() == 0)
        refused = engine.authorize(AuthorizeRequest("asterisk", "A8", "c1", "4930123", clock.now_ms()))
        assert not refused.allowed and refused.reason is DenyReason.SPEND_LIMIT, refused
        gevent.sleep(0.2)
    finally:
        engine.stop(2)
    (record,) = cdrs.records
    assert record.disposition is Disposition.CUT and record.upper[0].cost_micros == 3_000
    assert w.sql_balance(RESELLER) == 1_000_000 - 3_000
    SqlCdrStore(w.engine).write(cdrs.records)
    _ledger_ok(w)
