"""Bundles through the daemon's SQL path: grants read by the BundleBook, slots from the plan's
timezone, the embedded SQL store drawing and committing seconds, the usage ledger adding up."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import sessionmaker

from agent.adapters.sql.accounts import create_account
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.bundle_book import BundleBook
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import Bundle, BundleGrant, BundlePeriod, BundlePrefix, BundleUsage
from agent.adapters.sql.plans import create_plan
from agent.core.ratetable import Refusal
from agent.core.rating import RateRow
from agent.services.rater import PlanRater
from agent.services.store_port import EngineStoreAdapter
from tests.test_bundles import run_call

ROW = RateRow("33", "FR", 1_200_000, connect_fee_micros=100_000, initial_increment=30, increment=6, rate_id=1)
NOW = int(datetime(2027, 3, 10, 12, tzinfo=UTC).timestamp() * 1000)


class Table:
    timezone = "Europe/Paris"

    def lookup(self, number: str, at_ms: int) -> RateRow | Refusal:
        return ROW

    def normalise(self, number: str) -> str:
        return number.removeprefix("+")


class Tables:
    def table_for(self, plan_name: str) -> Table:
        return Table()


def setup(engine: Engine, seconds: int, balance: int) -> None:
    sessions = sessionmaker(engine)
    with transaction(sessions) as s:
        create_plan(s, "retail", timezone="Europe/Paris")
        create_account(s, "alice", plan="retail", balance_micros=balance)
        bundle = Bundle(name="fr-mobiles", seconds=seconds, period="month", anchor=1, rollover=False)
        s.add(bundle)
        s.flush()
        s.add(BundlePrefix(bundle_id=bundle.id, prefix="336"))
        s.add(BundleGrant(account_id="alice", bundle_id=bundle.id, valid_from=datetime(2027, 1, 1, tzinfo=UTC),
                          reference="g1"))


def test_a_call_draws_on_the_grant_the_book_reads_and_the_usage_ledger_adds_up(engine: Engine) -> None:
    setup(engine, seconds=60, balance=1_000_000)
    book = BundleBook(engine, lambda: NOW)
    rater = PlanRater(lambda account: "retail", Tables(), book.grants_of)
    rated = rater.rate("alice", "+33612345678", NOW)
    (slot,) = rated.bundles
    assert slot.seconds == 60
    assert slot.period_start_ms == int(datetime(2027, 3, 1, tzinfo=UTC).timestamp() * 1000) - 3_600_000  # Paris
    assert rater.rate("alice", "33123", NOW).bundles == ()  # a fixed line: not in the bundle

    store = EngineStoreAdapter(SqlBalanceStore(sessionmaker(engine)), node="n1", ttl_ms=60_000)

    class Rater:
        def rate(self, account_id: str, destination: str, at_ms: int):  # type: ignore[no-untyped-def]
            return rater.rate(account_id, "33612345678", NOW)

    cost, finished = run_call(store, Rater(), talk_s=100, at_ms=NOW)  # type: ignore[arg-type]
    assert cost == 840_000  # 60 s from the bundle, 42 s of money, no connect fee
    with engine.connect() as conn:
        period = conn.execute(select(BundlePeriod)).one()
        assert (period.granted_s, period.used_s, period.reserved_s) == (60, 60, 0)
        usage = {row.kind: row.seconds for row in conn.execute(select(BundleUsage))}
        assert usage == {"grant": 60, "use": -60}
        assert conn.scalar(select(func.sum(BundleUsage.seconds))) == period.granted_s - period.used_s
    assert finished.record.rating is not None and finished.record.rating.bundle_seconds == 60


def test_a_second_call_finds_the_period_used_and_pays_money_with_its_connect_fee(engine: Engine) -> None:
    setup(engine, seconds=60, balance=10_000_000)
    book = BundleBook(engine, lambda: NOW)
    rater = PlanRater(lambda account: "retail", Tables(), book.grants_of)
    store = EngineStoreAdapter(SqlBalanceStore(sessionmaker(engine)), node="n1", ttl_ms=60_000)

    class Rater:
        def rate(self, account_id: str, destination: str, at_ms: int):  # type: ignore[no-untyped-def]
            return rater.rate(account_id, "33612345678", NOW)

    assert run_call(store, Rater(), talk_s=40, at_ms=NOW, leg="A1")[0] == 0  # 42 billed, in the bundle
    cost, finished = run_call(store, Rater(), talk_s=40, at_ms=NOW + 60_000, leg="A2")  # type: ignore[arg-type]
    # 18 bundle seconds left: the first slice (30 billed seconds) only partly covered, so R = 18
    # for the whole call: 42 billed - 18 = 24 s of money, no connect fee.
    assert cost == 480_000
    assert finished.record.rating is not None and finished.record.rating.bundle_seconds == 18
    with engine.connect() as conn:
        period = conn.execute(select(BundlePeriod)).one()
        assert (period.used_s, period.reserved_s) == (60, 0)
