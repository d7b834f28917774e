"""`billing-agent ledger check` and the balance-cache commands, through the real CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, delete, select, text, update

from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.bundle_periods import post_use
from agent.adapters.sql.bundles_admin import account_grants
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.models import Account, BundlePeriod, BundleUsage, Call, LedgerEntry, RatingDecision
from agent.cli.main import cli
from agent.core.balance import BundleSettle
from agent.core.bundles import BundleSlot, slots_for

T0 = 1_800_000_000_000
UNIT = 1_000_000
REDIS_URL = "redis://127.0.0.1:6379/0"


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, Engine]]:
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'b.db'}\n")
    assert run(config, "db", "upgrade").exit_code == 0
    assert run(config, "plans", "create", "retail").exit_code == 0
    assert run(config, "accounts", "create", "alice", "--plan", "retail", "--balance", "10").exit_code == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    yield config, engine
    engine.dispose()


def settle_call(engine: Engine, call_id: str, cost: int, *, record: bool = True) -> None:
    store = SqlBalanceStore(session_factory(engine))
    store.authorize("alice", call_id, "n1", UNIT, 0, T0, 60_000)
    store.settle(call_id, 1, cost, T0 + 1)
    if record:
        add_call(engine, call_id, settled=True)


def add_call(engine: Engine, call_id: str, *, settled: bool, answered: bool = True) -> None:
    now = datetime.now(UTC)
    with transaction(session_factory(engine)) as s:
        s.add(Call(id=call_id, node="n1", account_id="alice", caller="", destination="100", started_at=now,
                   answered_at=now if answered else None, duration_ms=1000 if answered else 0,
                   disposition="ANSWERED" if answered else "BUSY", hangup_cause="", pbx="test",
                   settled_at=now if settled else None))


def check(config: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = run(config, "ledger", "check", "--json", "--grace-seconds", "0", *extra)
    return result.exit_code, json.loads(result.stdout)


def problems(report: dict[str, object]) -> list[tuple[object, object]]:
    return [(p["problem"], p.get("call") or p["account"]) for p in report["problems"]]  # type: ignore[attr-defined,index]


def test_a_clean_ledger_with_settled_calls_passes(db: tuple[Path, Engine]) -> None:
    config, engine = db
    settle_call(engine, "c1", 400_000)
    settle_call(engine, "c2", 0)
    code, report = check(config)
    assert code == 0 and report["ok"] is True
    assert (report["settled_calls"], report["charges"]) == (2, 2)
    result = run(config, "ledger", "check")
    assert result.exit_code == 0 and "2 settled calls, 2 charges, each call charged once" in result.stdout


def test_an_answered_call_without_a_charge_is_a_difference(db: tuple[Path, Engine]) -> None:
    config, engine = db
    add_call(engine, "lost", settled=True)
    add_call(engine, "busy", settled=True, answered=False)  # released, never charged: as it should be
    code, report = check(config)
    assert code == 1
    assert problems(report) == [("answered call without a charge", "lost")]


def test_a_call_charged_twice_is_a_difference(db: tuple[Path, Engine]) -> None:
    config, engine = db
    settle_call(engine, "c1", 400_000)
    with transaction(session_factory(engine)) as s:  # a second charge under another reference
        from agent.adapters.sql.accounts import post_entry

        post_entry(s, "alice", kind="charge", amount_micros=-400_000, reference="rogue", call_id="c1")
    code, report = check(config)
    assert code == 1
    assert ("call charged more than once", "c1") in problems(report)
    assert ("charge reference does not name its call", "c1") in problems(report)


def test_a_charge_without_a_settled_call_waits_for_the_grace_period(db: tuple[Path, Engine]) -> None:
    config, engine = db
    settle_call(engine, "c1", 400_000, record=False)
    result = run(config, "ledger", "check", "--json")  # default grace: the CDR may still be spooled
    assert result.exit_code == 0 and json.loads(result.stdout)["pending_charges"] == 1
    code, report = check(config)
    assert code == 1 and problems(report) == [("charge without a settled call", "c1")]
    add_call(engine, "c1", settled=False)
    code, report = check(config)
    assert report["problems"][0]["call_record"] == "not settled"  # type: ignore[index]


def test_balance_and_reserved_differences_are_found_from_sql_alone(db: tuple[Path, Engine]) -> None:
    config, engine = db
    SqlBalanceStore(session_factory(engine)).authorize("alice", "live", "n1", 2 * UNIT, UNIT, T0, 60_000)
    assert check(config)[0] == 0  # an open reservation adds up
    with engine.begin() as conn:
        conn.execute(update(Account).values(balance_micros=Account.balance_micros + 1,
                                            reserved_micros=Account.reserved_micros - 1))
    code, report = check(config)
    assert code == 1
    assert problems(report) == [("balance differs from ledger sum", "alice"),
                                ("reserved differs from open reservations", "alice")]
    detail = report["problems"][1]  # type: ignore[index]
    assert (detail["reserved"], detail["open_reservations"]) == ("1.999999", "2.000000")


def test_the_text_report_names_each_difference(db: tuple[Path, Engine]) -> None:
    config, engine = db
    with engine.begin() as conn:
        conn.execute(text("UPDATE ledger_entries SET created_at = :t"), {"t": datetime.now(UTC) - timedelta(1)})
        conn.execute(update(LedgerEntry).values(amount_micros=9 * UNIT))
    result = run(config, "ledger", "check")
    assert result.exit_code == 1
    assert "alice: balance differs from ledger sum (balance_micros" not in result.stdout
    assert "alice: balance differs from ledger sum (balance 10.000000, ledger_sum 9.000000)" in result.stdout
    assert "1 difference(s) found" in result.stderr


# ------------------------------------------------------------------- Redis: show, top-up, rebuild


@pytest.fixture
def redis_config(db: tuple[Path, Engine], redis_client: object) -> Iterator[tuple[Path, Engine, str]]:
    config, engine = db
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    config.write_text(config.read_text() + f"redis:\n  url: {REDIS_URL}\n  key_prefix: '{prefix}'\n")
    yield config, engine, prefix
    for key in redis_client.scan_iter(match=f"{prefix}*"):  # type: ignore[attr-defined]
        redis_client.delete(key)  # type: ignore[attr-defined]


def test_show_topup_and_rebuild_cache_use_the_shared_redis(redis_config: tuple[Path, Engine, str]) -> None:
    config, engine, prefix = redis_config
    node = RedisBalanceStore(make_client(REDIS_URL, 1000), session_factory(engine), key_prefix=prefix)
    node.authorize("alice", "c1", "n1", 2 * UNIT, UNIT, T0, 60_000)
    node.debit_and_reserve("c1", 1, UNIT, UNIT, T0 + 1, 60_000)
    shown = json.loads(run(config, "accounts", "show", "alice", "--json").stdout)
    assert (shown["balance"], shown["reserved"], shown["available"]) == ("10.000000", "2.000000", "8.000000")
    assert (shown["live_calls"], shown["source"]) == (1, "redis")
    assert run(config, "accounts", "topup", "alice", "5", "--reference", "p1").exit_code == 0
    assert node.account_state("alice").available_micros == 13 * UNIT  # the top-up reached Redis
    assert run(config, "accounts", "suspend", "alice").exit_code == 0
    assert node.account_state("alice").status == "suspended"
    result = run(config, "accounts", "rebuild-cache", "--json")
    assert result.exit_code == 0
    rebuilt = json.loads(result.stdout)
    assert [(r["account"], r["balance"], r["reserved"], r["live_calls"]) for r in rebuilt] == [
        ("alice", "14.000000", "1.000000", 1)]
    node.settle("c1", 2, 1_500_000, T0 + 2)
    node.close()
    assert json.loads(run(config, "accounts", "show", "alice", "--json").stdout)["available"] == "13.500000"


def test_rebuild_cache_without_redis_says_why(db: tuple[Path, Engine]) -> None:
    config, _ = db
    result = run(config, "accounts", "rebuild-cache")
    assert result.exit_code == 1 and "redis.url is not configured" in result.stderr


def test_a_top_up_with_redis_down_is_kept_and_says_to_rebuild(db: tuple[Path, Engine]) -> None:
    config, _ = db
    config.write_text(config.read_text() + "redis:\n  url: redis://127.0.0.1:1/0\n  timeout_ms: 200\n")
    result = run(config, "accounts", "topup", "alice", "5", "--reference", "p1")
    assert result.exit_code == 0 and "topped up 5.000000" in result.stdout
    assert "rebuild-cache alice" in result.stderr


# ------------------------------------------------------------------------------- bundles


@pytest.fixture
def bundled(db: tuple[Path, Engine]) -> tuple[Path, Engine, tuple[BundleSlot, ...]]:
    """Alice holds a 600 s bundle to 33; c1 used 90 s of it (settled, CDR written), c2 holds 30 s live."""
    config, engine = db
    assert run(config, "bundles", "create", "fr", "--seconds", "600", "--prefixes", "33").exit_code == 0
    assert run(config, "bundles", "grant", "alice", "fr", "--from", "2027-01-01").exit_code == 0
    with transaction(session_factory(engine)) as s:
        grants = [g.grant for g in account_grants(s, "alice", at=datetime(2027, 2, 1, tzinfo=UTC))]
    slots = slots_for(grants, "33140000000", T0, "UTC")
    store = SqlBalanceStore(session_factory(engine))
    store.authorize("alice", "c1", "n1", UNIT, 0, T0, 60_000, bundle_slots=slots, bundle_want_s=120)
    store.settle("c1", 1, 0, T0 + 1, bundle=BundleSettle(90, slots))
    add_call(engine, "c1", settled=True)
    with transaction(session_factory(engine)) as s:
        s.add(RatingDecision(call_id="c1", seq=1, plan_name="retail", prefix="33", rate_micros=0, billed_seconds=90,
                             bundle_seconds=90, cost_micros=0, decided_at=datetime.now(UTC), reason=""))
    store.authorize("alice", "c2", "n1", UNIT, 0, T0, 60_000, bundle_slots=slots, bundle_want_s=30)
    return config, engine, slots


def test_bundle_periods_add_up_to_their_usage_rows(bundled: tuple[Path, Engine, tuple[BundleSlot, ...]]) -> None:
    config, _, _ = bundled
    code, report = check(config)
    assert code == 0, report
    assert (report["bundle_periods"], report["bundle_usage_rows"], report["bundle_calls"]) == (1, 2, 1)
    text = run(config, "ledger", "check", "--grace-seconds", "0").stdout
    assert "bundles ok: 1 periods, each granted and used equal to its 2 usage rows, none below zero" in text


def test_a_period_that_differs_from_its_rows_is_found(bundled: tuple[Path, Engine, tuple[BundleSlot, ...]]) -> None:
    config, engine, _ = bundled
    with engine.begin() as conn:
        conn.execute(update(BundlePeriod).values(used_s=BundlePeriod.used_s - 10))
    code, report = check(config)
    assert code == 1
    (problem,) = report["problems"]  # type: ignore[misc]
    assert problem["problem"] == "bundle period differs from its usage rows"
    assert (problem["granted_s"], problem["usage_granted_s"], problem["used_s"], problem["usage_used_s"]) == (
        600, 600, 80, 90)


def test_a_period_below_zero_is_found(bundled: tuple[Path, Engine, tuple[BundleSlot, ...]]) -> None:
    config, engine, slots = bundled
    with transaction(session_factory(engine)) as s:  # an over-use that the rows record too
        period = s.scalar(select(BundlePeriod))
        assert period is not None
        post_use(s, "alice", "rogue", period, slots[0], 700)
    code, report = check(config)
    assert code == 1
    below = [p for p in report["problems"] if p["problem"] == "bundle period below zero"]  # type: ignore[union-attr]
    assert [(p["granted_s"], p["used_s"], p["left_s"]) for p in below] == [(600, 790, -190)]


def test_held_seconds_must_match_the_open_reservations(bundled: tuple[Path, Engine, tuple[BundleSlot, ...]]) -> None:
    config, engine, _ = bundled
    with engine.begin() as conn:
        conn.execute(update(BundlePeriod).values(reserved_s=45))
    code, report = check(config)
    assert code == 1
    assert [(p["problem"], p["reserved_s"], p["open_reservations_s"]) for p in report["problems"]] == [  # type: ignore[union-attr]
        ("bundle reserved differs from open reservations", 45, 30)]
    # With Redis the live holds are in Redis: SQL alone cannot compare them.
    config.write_text(config.read_text() + "redis:\n  url: redis://127.0.0.1:1/0\n")
    assert check(config)[0] == 0


def test_a_decision_must_record_the_seconds_the_call_used(bundled: tuple[Path, Engine, tuple[BundleSlot, ...]]) -> None:
    config, engine, _ = bundled
    with engine.begin() as conn:
        conn.execute(update(RatingDecision).values(bundle_seconds=60))
    code, report = check(config)
    assert code == 1
    assert problems(report) == [("call's bundle seconds differ from its bundle usage", "c1")]
    assert (report["problems"][0]["bundle_seconds"], report["problems"][0]["usage_s"]) == (60, 90)  # type: ignore[index]
    with engine.begin() as conn:
        conn.execute(delete(BundleUsage).where(BundleUsage.kind == "use"))
        conn.execute(update(BundlePeriod).values(used_s=0))
    code, report = check(config)
    assert problems(report) == [("call's bundle seconds have no bundle usage", "c1")]
