"""Rate plans from SQL into memory, on every backend; reloads without a gap."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import gevent
import pytest
from sqlalchemy import Engine, delete, insert, select, update

from agent.adapters.sql.models import Rate, RatePlan
from agent.adapters.sql.rate_repository import RatePlanCache, load_table, reading
from agent.core.errors import NotFound
from agent.core.events import DenyReason
from agent.core.ratetable import RateTable, Refusal, epoch_ms
from agent.core.rating import RateRow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CHANGE = datetime(2026, 7, 1, 0, 0, 0, 250_000, tzinfo=UTC)  # with a fraction of a second
WEDNESDAY_10H = epoch_ms(datetime(2026, 3, 4, 10, 0, tzinfo=UTC))


def make_plan(engine: Engine, name: str = "retail", **settings: Any) -> int:
    with engine.begin() as conn:
        plan_id: int = conn.execute(insert(RatePlan).values(
            name=name, currency="EUR", timezone=settings.get("timezone", "UTC"),
            international_prefix=settings.get("international_prefix", "00"), version=1,
            created_at=EPOCH, updated_at=EPOCH)).inserted_primary_key[0]  # type: ignore[index]
    return plan_id


def rate_values(plan_id: int, prefix: str, rate_micros: int, **fields: Any) -> dict[str, Any]:
    values = {"plan_id": plan_id, "prefix": prefix, "destination": f"dest {prefix}", "rate_micros": rate_micros,
              "connect_fee_micros": 0, "initial_increment": 1, "increment": 1, "minimum_seconds": 0,
              "grace_seconds": 0, "effective_from": EPOCH, "effective_to": None, "weekdays": "",
              "time_from_minute": 0, "time_to_minute": 1440, "blocked": False}
    values.update(fields)
    return values


def add_rates(engine: Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Rate), rows)


def found(result: RateRow | Refusal) -> RateRow:
    assert isinstance(result, RateRow), result
    return result


@pytest.fixture
def retail(engine: Engine) -> int:
    plan_id = make_plan(engine, timezone="Europe/Paris")
    add_rates(engine, [
        rate_values(plan_id, "33", 12_000, destination="France", connect_fee_micros=10_000,
                    initial_increment=60, increment=60, minimum_seconds=5, grace_seconds=3),
        rate_values(plan_id, "336", 45_000, destination="France Mobile", effective_to=CHANGE),
        rate_values(plan_id, "336", 40_000, destination="France Mobile", effective_from=CHANGE),
        rate_values(plan_id, "44", 20_000, weekdays="12345", time_from_minute=8 * 60, time_to_minute=20 * 60,
                    destination="UK peak"),
        rate_values(plan_id, "44", 5_000, destination="UK off-peak"),
        rate_values(plan_id, "4490", 0, blocked=True, destination="UK Premium"),
        rate_values(plan_id, "044", 1, destination="zero-led"),
    ])
    return plan_id


def test_load_a_plan_and_rate_from_it(engine: Engine, retail: int) -> None:
    table = load_table(engine, "retail")
    assert (table.plan_name, table.currency, table.timezone, table.version, len(table)) == (
        "retail", "EUR", "Europe/Paris", 1, 7)
    france = found(table.lookup("+33140000000", WEDNESDAY_10H))
    assert france == RateRow("33", "France", 12_000, 10_000, 60, 60, 5, 3, 0, france.effective_to_ms, "", 0, 1440,
                             False, france.rate_id)
    assert france.rate_id is not None and france.cost_micros(61_000) == 10_000 + 24_000


def test_effective_bounds_survive_the_round_trip(engine: Engine, retail: int) -> None:
    table = load_table(engine, "retail")
    change_ms = epoch_ms(CHANGE)
    assert found(table.lookup("33612345678", change_ms - 1)).rate_micros == 45_000
    assert found(table.lookup("33612345678", change_ms)).rate_micros == 40_000


def test_windows_blocked_and_leading_zeros(engine: Engine, retail: int) -> None:
    table = load_table(engine, "retail")
    paris_0830 = epoch_ms(datetime(2026, 1, 14, 7, 30, tzinfo=UTC))
    assert found(table.lookup("00441234567", paris_0830)).destination == "UK peak"
    assert found(table.lookup("00441234567", paris_0830 - 3_600_000)).destination == "UK off-peak"
    blocked = table.lookup("+449012345", WEDNESDAY_10H)
    assert isinstance(blocked, Refusal) and blocked.reason is DenyReason.BLOCKED
    assert blocked.detail == "destination 4490 (UK Premium) is blocked"
    assert found(table.lookup("0441", WEDNESDAY_10H)).destination == "zero-led"  # not the international prefix


def test_load_only_the_rows_a_number_needs(engine: Engine, retail: int) -> None:
    table = load_table(engine, "retail", for_number="+33612345678")
    assert len(table) == 3  # 33 and both 336 rows
    assert found(table.lookup("+33612345678", WEDNESDAY_10H)).prefix == "336"
    assert len(load_table(engine, "retail", for_number="12ab")) == 0


def test_destination_names_come_back_verbatim(engine: Engine) -> None:
    plan_id = make_plan(engine)
    name = "Côte d'Ivoire \x1f mobile, «Orange» | 1"  # the unit separator packs MySQL rows
    add_rates(engine, [rate_values(plan_id, "225", 7, destination=name, weekdays="67")])
    row = found(load_table(engine, "retail").lookup("+2250123", epoch_ms(datetime(2026, 3, 7, tzinfo=UTC))))
    assert (row.destination, row.weekdays, row.rate_micros) == (name, "67", 7)


def test_unknown_plan(engine: Engine, retail: int) -> None:
    with pytest.raises(NotFound, match="unknown rate plan 'gold'"):
        load_table(engine, "gold")


def test_plans_do_not_mix(engine: Engine, retail: int) -> None:
    other = make_plan(engine, "wholesale")
    add_rates(engine, [rate_values(other, "33", 1)])
    assert found(load_table(engine, "wholesale").lookup("331", WEDNESDAY_10H)).rate_micros == 1
    assert found(load_table(engine, "retail").lookup("331", WEDNESDAY_10H)).rate_micros == 12_000


def test_a_long_load_on_sqlite_does_not_lock_out_writers(sqlite_engine: Engine) -> None:
    plan_id = make_plan(sqlite_engine)
    add_rates(sqlite_engine, [rate_values(plan_id, f"33{i}", 1) for i in range(10)])
    writes: list[float] = []

    def write_while_loading() -> None:  # the agent's engine takes the write lock at BEGIN
        with sqlite_engine.begin() as conn:
            conn.execute(update(RatePlan).where(RatePlan.id == plan_id).values(currency="USD"))
        writes.append(1)

    table = load_table(sqlite_engine, "retail", batch_rows=3, pause=write_while_loading)
    assert len(table) == 10 and len(writes) == 4


def test_sqlite_reads_reuse_one_reader_and_each_sees_the_latest_commit(sqlite_engine: Engine) -> None:
    """The plain reader of a SQLite file is made once and keeps its connections (a new engine
    per read cost ~1 ms of the loop for each tiny periodic read); an idle pooled connection
    holds no snapshot: every read sees what was committed before it, and writers never wait."""
    plan_id = make_plan(sqlite_engine)
    engines = []
    for currency in ("USD", "GBP", "CHF"):
        with reading(sqlite_engine) as connection:
            engines.append(connection.engine)
            seen = connection.execute(select(RatePlan.currency).where(RatePlan.id == plan_id)).scalar_one()
        with sqlite_engine.begin() as conn:  # BEGIN IMMEDIATE: would wait on a reader's open transaction
            conn.execute(update(RatePlan).where(RatePlan.id == plan_id).values(currency=currency))
        with reading(sqlite_engine) as connection:
            assert connection.execute(select(RatePlan.currency).where(RatePlan.id == plan_id)).scalar_one() == currency
        assert seen != currency
    assert engines[0] is engines[1] is engines[2] and engines[0] is not sqlite_engine
    pool = engines[0].pool
    assert pool.checkedin() >= 1  # type: ignore[attr-defined]  # kept for the next read
    sqlite_engine.dispose()
    assert pool.checkedin() == 0  # type: ignore[attr-defined]  # its connections closed with the engine


# ------------------------------------------------------------------------------ the cache


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def replace_rates(engine: Engine, plan_id: int, rate_micros: int, count: int) -> None:
    """What `rates import --replace` does: new rows and a new version, in one transaction."""
    with engine.begin() as conn:
        conn.execute(delete(Rate).where(Rate.plan_id == plan_id))
        conn.execute(insert(Rate), [rate_values(plan_id, f"33{i}", rate_micros) for i in range(count)])
        conn.execute(update(RatePlan).where(RatePlan.id == plan_id).values(version=RatePlan.version + 1))


@pytest.fixture
def cache(engine: Engine) -> Iterator[tuple[RatePlanCache, FakeMonotonic]]:
    clock = FakeMonotonic()
    cache = RatePlanCache(engine, check_interval_seconds=5.0, monotonic=clock, batch_rows=2)
    yield cache, clock
    cache.close()


def test_reload_on_a_new_version_without_a_gap(engine: Engine, cache: tuple[RatePlanCache, FakeMonotonic]) -> None:
    plans, clock = cache
    plan_id = make_plan(engine)
    replace_rates(engine, plan_id, 1_000, 20)
    old = plans.table_for("retail")
    replace_rates(engine, plan_id, 2_000, 20)
    assert plans.table_for("retail") is old  # checked less than 5 s ago: no query at all

    clock.now += 5
    seen: list[int | str] = []
    assert plans.table_for("retail") is old  # answers at once; the check runs in the background
    check = plans._checks["retail"]

    def caller() -> None:
        while not check.dead:
            result = plans.table_for("retail").lookup("+3315", WEDNESDAY_10H)
            seen.append(result.rate_micros if isinstance(result, RateRow) else result.detail)
            gevent.sleep(0)

    gevent.joinall([gevent.spawn(caller), check], timeout=30, raise_error=True)
    new = plans.table_for("retail")
    assert new is not old and new.version == old.version + 1
    assert found(new.lookup("+3315", WEDNESDAY_10H)).rate_micros == 2_000
    assert seen.count(1_000) >= 5, seen  # calls kept being rated while the new table was built ...
    assert set(seen) <= {1_000, 2_000}, seen  # ... and never saw an empty or half-built table


def test_unchanged_version_keeps_the_table(engine: Engine, cache: tuple[RatePlanCache, FakeMonotonic]) -> None:
    plans, clock = cache
    replace_rates(engine, make_plan(engine), 1_000, 3)
    first = plans.table_for("retail")
    clock.now += 60
    assert plans.refresh("retail") is False
    assert plans.table_for("retail") is first


def test_a_failed_reload_keeps_serving_the_old_table(engine: Engine,
                                                     cache: tuple[RatePlanCache, FakeMonotonic]) -> None:
    plans, _ = cache
    plan_id = make_plan(engine)
    replace_rates(engine, plan_id, 1_000, 3)
    first = plans.table_for("retail")
    with engine.begin() as conn:  # a plan setting the table cannot use
        conn.execute(update(RatePlan).where(RatePlan.id == plan_id).values(timezone="Mars/Olympus", version=7))
    assert plans.refresh("retail") is False
    assert plans.table_for("retail") is first


def test_first_use_loads_once_for_concurrent_callers(engine: Engine) -> None:
    replace_rates(engine, make_plan(engine), 1_000, 10)
    loads: list[str] = []

    class Counting(RatePlanCache):
        def _load(self, plan_name: str) -> RateTable:
            loads.append(plan_name)
            return super()._load(plan_name)

    plans = Counting(engine, batch_rows=2)
    callers = [gevent.spawn(plans.table_for, "retail") for _ in range(3)]
    gevent.joinall(callers, timeout=30, raise_error=True)
    assert loads == ["retail"]
    assert len({id(c.value) for c in callers}) == 1
    with pytest.raises(NotFound):
        plans.table_for("gold")
    plans.close()


def test_refresh_all_and_preload(engine: Engine) -> None:
    plan_id = make_plan(engine)
    replace_rates(engine, plan_id, 1_000, 2)
    plans = RatePlanCache(engine)
    plans.preload(["retail"])
    replace_rates(engine, plan_id, 3_000, 2)
    plans.refresh_all()
    assert found(plans.table_for("retail").lookup("330", WEDNESDAY_10H)).rate_micros == 3_000
    with engine.connect() as conn:
        assert conn.scalar(select(RatePlan.version).where(RatePlan.id == plan_id)) == 3
    plans.close()
