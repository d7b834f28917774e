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
