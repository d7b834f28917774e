"""The plan rater: the account's plan, then the plan's table; every failure is a refusal with a reason."""

from __future__ import annotations

import pytest

from agent.core.errors import NotFound
from agent.core.events import DenyReason
from agent.core.ratetable import RateTable, RateTableBuilder
from agent.core.rating import RateRow
from agent.core.session import RatingRefused
from agent.services.rater import PlanRater

FRANCE = RateRow(prefix="33", destination="France", rate_micros=60_000)


class Tables:
    def __init__(self, tables: dict[str, RateTable], *, down: bool = False) -> None:
        self.tables = tables
        self.down = down

    def table_for(self, plan_name: str) -> RateTable:
        if self.down:
            raise ConnectionError("database unreachable")
        if plan_name not in self.tables:
            raise NotFound(f"rate plan {plan_name!r} does not exist")
        return self.tables[plan_name]


def _table() -> RateTable:
    builder = RateTableBuilder("retail")
    builder.add(FRANCE)
    return builder.build()


def test_rates_through_the_accounts_plan() -> None:
    rater = PlanRater({"alice": "retail"}.get, Tables({"retail": _table()}))
    rated = rater.rate("alice", "33123456", 0)
    assert rated.info.plan_name == "retail"
    assert rated.info.prefix == "33"
    assert rated.tariff.cost_micros(60_000) == 60_000


@pytest.mark.parametrize(("plan_of", "tables", "number", "reason"), [
    ({}.get, Tables({}), "33123", DenyReason.UNKNOWN_ACCOUNT),
    ({"alice": "gone"}.get, Tables({}), "33123", DenyReason.NO_RATE),
    ({"alice": "retail"}.get, Tables({}, down=True), "33123", DenyReason.STORE_UNAVAILABLE),
    ({"alice": "retail"}.get, Tables({"retail": _table()}), "44123", DenyReason.NO_RATE),
])
def test_every_failure_is_a_refusal_with_its_reason(plan_of, tables, number, reason) -> None:
    with pytest.raises(RatingRefused) as refused:
        PlanRater(plan_of, tables).rate("alice", number, 0)
    assert refused.value.reason is reason


def test_live_calls_to_one_destination_share_its_row_and_rating_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every live call keeps its row and rating info (per level of a reseller chain) until it
    ends: equal ones are handed out once, so calls keep nothing of their own for them (fewer
    objects for the garbage collector's young collections); a different row is its own; the
    memory is bounded."""
    builder = RateTableBuilder("retail")
    builder.add(FRANCE)
    builder.add(RateRow(prefix="336", destination="France mobile", rate_micros=90_000))
    builder.add(RateRow(prefix="34", destination="Spain", rate_micros=70_000))
    rater = PlanRater({"alice": "retail", "bob": "retail"}.get, Tables({"retail": builder.build()}))
    first, second = rater.rate("alice", "33123456", 0), rater.rate("bob", "33987654", 5_000)
    assert first.tariff is second.tariff and first.info is second.info
    assert first.tariff == FRANCE
    mobile = rater.rate("alice", "33612345", 0)
    assert mobile.tariff is not first.tariff and mobile.info.prefix == "336" and mobile.info.rate_micros == 90_000
    monkeypatch.setattr("agent.services.rater.SHARED_MAX", 4)  # full: France's and the mobile's row and info
    assert rater.rate("alice", "33123456", 0).tariff is first.tariff  # found: nothing forgotten
    assert rater.rate("alice", "34123456", 0).info.prefix == "34"  # a new one: the memory starts again
    again = rater.rate("alice", "33123456", 0).tariff
    assert again == first.tariff and again is not first.tariff


def test_reading_ahead_reads_what_rating_the_call_reads() -> None:
    """A starting node's warm-up (agent/adapters/sql/warm_up.py) reads through the rater: the
    same look-ups, of every level, as rating a call of the account and the levels above it."""
    from collections import namedtuple

    from agent.core.fx import Conversion

    plan = namedtuple("plan", "plan plan_currency currency")
    level = namedtuple("level", "tenant parent account_id")
    plans = {"zoe": plan("retail", "EUR", "EUR"), "tenant:globex": plan("wholesale", "USD", "EUR")}

    def rater(read: list[tuple[str, ...]]) -> PlanRater:
        def plan_of(account_id: str) -> object:
            read.append(("plan", account_id))
            return plans.get(account_id)

        def grants_of(account_id: str) -> tuple[()]:
            read.append(("grants", account_id))
            return ()

        def fx_of(plan_currency: str, currency: str, at_ms: int) -> Conversion:
            read.append(("fx", plan_currency, currency))
            return Conversion(plan_currency, currency, 9_000_000_000)

        def chain_of(account_id: str) -> list[object]:
            read.append(("chain", account_id))
            return [level("globex", "operator", "tenant:globex")] if account_id == "zoe" else []

        return PlanRater(plan_of, Tables({"retail": _table(), "wholesale": _table()}),  # type: ignore[arg-type]
                         grants_of, fx_of=fx_of, chain_of=chain_of)  # type: ignore[arg-type]

    rated: list[tuple[str, ...]] = []
    rating = rater(rated)
    rating.rate("zoe", "33123456", 0)
    rating.rate_chain("zoe", "33123456", 0)
    ahead: list[tuple[str, ...]] = []
    rater(ahead).read_ahead("zoe", 0)
    assert set(ahead) == set(rated) == {("plan", "zoe"), ("grants", "zoe"), ("chain", "zoe"),
                                        ("plan", "tenant:globex"), ("grants", "tenant:globex"),
                                        ("fx", "USD", "EUR")}
