"""A starting node's warm-up (agent/adapters/sql/warm_up.py): the first calls after a start find
their look-ups read and every statement compiled, and the warm-up leaves nothing in the
database."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import default
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql import accounts as repo
from agent.adapters.sql import driver_statements
from agent.adapters.sql.account_plans import AccountPlans
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.bundle_book import BundleBook
from agent.adapters.sql.cached_lookup import TenantChains
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.fx_rates import FxBook
from agent.adapters.sql.models import LedgerEntry, Reservation
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.rate_repository import RatePlanCache
from agent.adapters.sql.warm_up import sample_accounts, warm_up
from agent.cli.demo import prepare_database
from agent.services.rater import PlanRater

T0 = 1_800_000_000_000
UNIT = 1_000_000


def _state(sessions: sessionmaker[Session], store: SqlBalanceStore, account_id: str) -> tuple[Any, ...]:
    state = store.account_state(account_id)
    with sessions() as s:
        entries = s.scalar(select(func.count()).select_from(LedgerEntry))
        calls = s.scalar(select(func.count()).select_from(Reservation))
    return state.balance_micros, state.reserved_micros, state.live_calls, entries, calls


def test_the_stores_made_up_call_leaves_nothing_behind(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        create_plan(s, "retail", currency="EUR")
        repo.create_account(s, "funded", plan="retail", balance_micros=10 * UNIT)
        repo.create_account(s, "empty", plan="retail", balance_micros=0)
    store = SqlBalanceStore(sessions)
    live = store.authorize("funded", "live-call", "n1", UNIT, UNIT, T0, 60_000)
    before = _state(sessions, store, "funded")

    assert store.warm_up("funded", "n1", T0 + 5) is True
    assert store.warm_up("empty", "n1", T0 + 5) is False  # refused: nothing to nibble or settle
    assert store.warm_up("nobody", "n1", T0 + 5) is False

    assert _state(sessions, store, "funded") == before
    # the live call goes on as if nothing happened
    assert store.settle("live-call", 1, live.granted_micros, T0 + 10).cost_micros == UNIT
    assert store.account_state("funded").balance_micros == 9 * UNIT


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Engine]:
    """The demo's database: accounts with bundles and caps, a reseller tenant in USD with a
    customer in EUR (an FX pair), on the embedded SQLite store."""
    url = f"sqlite:///{tmp_path}/demo.db"
    prepare_database(url, tmp_path).dispose()
    engine = make_engine(url)
    yield engine
    engine.dispose()


class _Compiles:
    """Statements SQLAlchemy compiled (cache misses) and statements the driver path compiled."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sqlalchemy: list[str] = []
        self.driver = 0
        event.listen(engine, "before_cursor_execute", self._seen)
        compiled = driver_statements._Compiled

        def counting(*args: Any) -> Any:
            self.driver += 1
            return compiled(*args)

        monkeypatch.setattr(driver_statements, "_Compiled", counting)

    def _seen(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if context is not None and context.cache_hit == default.CACHE_MISS:
            self.sqlalchemy.append(" ".join(statement.split())[:80])


def _rater(engine: Engine) -> PlanRater:
    """The daemon's rater over its look-ups, its sell plans loaded as at start."""
    clock = lambda: T0  # noqa: E731
    tables = RatePlanCache(engine)
    tables.preload(["demo", "globex-retail", "wholesale-usd"])
    return PlanRater(AccountPlans(engine, clock).rating_of, tables, BundleBook(engine, clock).grants_of,
                     fx_of=FxBook(engine, clock).conversion, chain_of=TenantChains(engine, clock).chain_of)


def test_after_the_warm_up_a_first_call_compiles_nothing(demo: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up reads one reseller's customer and one funded account; a first call of
    other accounts (a direct customer, another reseller customer) then runs only statements
    already compiled: its rating (the look-ups, the chain's levels, the FX pair) and the store's
    whole plain call (authorize, nibble, settle)."""
    rater = _rater(demo)
    store = SqlBalanceStore(session_factory(demo))
    report = warm_up(demo, rater=rater, store=store, node="n1", now_ms=T0)
    assert report is not None and report.store and report.accounts == report.of >= 2

    with transaction(session_factory(demo)) as s:  # accounts the warm-up never read
        repo.create_account(s, "newcomer", plan="demo", balance_micros=3 * UNIT)
        repo.create_account(s, "zed", plan="globex-retail", balance_micros=3 * UNIT, tenant="globex")
    compiles = _Compiles(demo, monkeypatch)
    for account_id in ("newcomer", "zed"):
        rater.rate(account_id, "33142685300", T0)
        levels = rater.rate_chain(account_id, "33142685300", T0)
    assert levels, "zed is a reseller's customer: its chain has a level"
    assert store.authorize("newcomer", "first-call", "n1", UNIT, UNIT, T0, 60_000).allowed
    assert store.debit_and_reserve("first-call", 1, UNIT // 2, UNIT // 2, T0 + 6_000, 60_000).applied
    store.settle("first-call", 2, UNIT, T0 + 12_000)
    assert compiles.sqlalchemy == [] and compiles.driver == 0, (compiles.sqlalchemy, compiles.driver)


def test_the_sample_puts_accounts_with_open_calls_first(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        create_plan(s, "retail", currency="EUR")
        for name in ("a", "b", "c"):
            repo.create_account(s, name, plan="retail", balance_micros=UNIT)
    store = SqlBalanceStore(sessions)
    store.authorize("c", "open-call", "n1", UNIT // 2, 1, T0, 60_000)
    sample = sample_accounts(sessions.kw["bind"])
    assert sample.accounts[0] == "c"
    assert sample.funded in ("a", "b", "c")


def test_a_database_that_fails_skips_the_warm_up_with_a_log_line(demo: Engine, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr("agent.adapters.sql.warm_up.sample_accounts", down)
    with caplog.at_level(logging.WARNING):
        assert warm_up(demo, rater=_rater(demo), store=SqlBalanceStore(session_factory(demo)), node="n1",
                       now_ms=T0) is None
    assert "warm-up skipped" in caplog.text and "OperationalError" in caplog.text


def test_the_warm_up_stops_at_its_time_budget(demo: Engine) -> None:
    ticks = iter(range(100))
    report = warm_up(demo, rater=_rater(demo), store=None, node="n1", now_ms=T0, budget_s=1.5,
                     monotonic=lambda: float(next(ticks)))
    assert report is not None and report.accounts == 1 and report.of >= 2 and not report.store
