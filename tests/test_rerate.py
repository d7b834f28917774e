"""``billing-agent rerate``: changed calls get a new decision and one ledger adjustment; --dry-run
writes nothing; a second run changes nothing; history is never updated."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select

from agent.adapters.cdr.rerate import Change, RerateReport, _commit_page, _pages, reprice, rerate
from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.adapters.sql.accounts import create_account, post_entry, view_account
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.bundles_admin import account_grants
from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.models import BundlePeriod, BundleUsage, LedgerEntry, Rate, RatingDecision
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.rate_import import import_deck
from agent.adapters.sql.rate_repository import load_table
from agent.cli.main import cli
from agent.core.balance import BundleSettle
from agent.core.bundles import slots_for
from tests.cdr_builders import make_record

HEADER = "prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace\n"
OLD_DECK = HEADER + "49,Germany,0.12,0,1,1,0,0\n44,United Kingdom,0.06,0,60,60,0,0\n33,France,0.03,0,1,1,0,0\n"
NEW_DECK = HEADER + "49,Germany,0.06,0,1,1,0,0\n44,United Kingdom,0.06,0,60,60,0,0\n"  # 49 halved, 33 gone
UNIT = 1_000_000
REDIS_URL = "redis://127.0.0.1:6379/0"


def run(engine: Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def import_rates(engine: Engine, tmp_path: Path, deck: str, name: str) -> dict[str, int]:
    path = tmp_path / name
    path.write_text(deck)
    import_deck(session_factory(engine), path, "retail", replace=True)
    with engine.connect() as conn:
        return {prefix: rate_id for prefix, rate_id in conn.execute(select(Rate.prefix, Rate.id))}


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> Engine:
    """Alice and Bob on plan retail; six settled calls priced (and charged) with the old deck."""
    with transaction(session_factory(engine)) as session:
        create_plan(session, "retail", currency="EUR")
    ids = import_rates(engine, tmp_path, OLD_DECK, "old.csv")
    with transaction(session_factory(engine)) as session:
        create_account(session, "alice", plan="retail", balance_micros=10 * UNIT)
        create_account(session, "bob", plan="retail", balance_micros=10 * UNIT)
    records = [
        make_record(0, account_id="alice", destination="4930111", rate_id=ids["49"]),  # 61 s at 0.12
        make_record(1, account_id="alice", destination="4930222", rate_id=ids["49"], duration_ms=125_000),
        make_record(2, account_id="bob", destination="4930333", rate_id=ids["49"]),
        make_record(3, account_id="bob", destination="44207", rate_id=ids["44"], prefix="44", rate_micros=60_000,
                    cost_micros=120_000),  # 61 s in 60/60 blocks: 120 s at 0.06
        make_record(4, account_id="alice", destination="331234", rate_id=ids["33"], prefix="33",
                    rate_micros=30_000),
        make_record(5, account_id="alice", destination="4930444", answered=False),
    ]
    SqlCdrStore(engine).write(records)
    with transaction(session_factory(engine)) as session:  # what the balance store's settle posts
        for r in records:
            if r.rating.cost_micros:
                post_entry(session, r.account_id, kind="charge", amount_micros=-r.rating.cost_micros,
                           reference=f"charge:{r.call_id}", call_id=r.call_id)
    import_rates(engine, tmp_path, NEW_DECK, "new.csv")
    return engine


def snapshot(engine: Engine) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, str]]]:
    with engine.connect() as conn:
        decisions = [tuple(r) for r in conn.execute(
            select(RatingDecision.call_id, RatingDecision.seq, RatingDecision.cost_micros)
            .order_by(RatingDecision.call_id, RatingDecision.seq))]
        ledger = [tuple(r) for r in conn.execute(
            select(LedgerEntry.account_id, LedgerEntry.amount_micros, LedgerEntry.reference).order_by(LedgerEntry.id))]
    return decisions, ledger  # type: ignore[return-value]


def balance(engine: Engine, account_id: str) -> int:
    with transaction(session_factory(engine)) as session:
        return view_account(session, account_id).balance_micros


def test_dry_run_shows_the_totals_and_writes_nothing(world: Engine) -> None:
    before = snapshot(world)
    result = run(world, "rerate", "--plan", "retail", "--since", "2026-01-01", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["calls_checked"], data["calls_changed"], data["calls_applied"], data["calls_unratable"]) == (
        6, 3, 0, 1)
    assert (data["old_total"], data["new_total"], data["difference"]) == ("0.494000", "0.247000", "-0.247000")
    assert {c["call_id"]: (c["old_cost"], c["new_cost"], c["adjustment"]) for c in data["changes"]} == {
        "call-000000": ("0.122000", "0.061000", "0.061000"),
        "call-000001": ("0.250000", "0.125000", "0.125000"),
        "call-000002": ("0.122000", "0.061000", "0.061000"),
    }
    assert data["unratable"][0]["call_id"] == "call-000004" and "no rate for 331234" in data["unratable"][0]["reason"]
    assert snapshot(world) == before
    text = run(world, "rerate", "--plan", "retail", "--since", "2026-01-01", "--dry-run").stdout
    assert "3 would change" in text and "dry run: nothing was written" in text


def test_changed_calls_get_a_new_decision_and_one_adjustment(world: Engine) -> None:
    decisions_before, ledger_before = snapshot(world)
    result = run(world, "rerate", "--plan", "retail", "--since", "2026-01-01")
    assert result.exit_code == 0, result.output
    assert "applied 3 new rating decisions" in result.stdout
    decisions, ledger = snapshot(world)
    assert set(decisions_before) <= set(decisions)  # history is never updated
    assert sorted(set(decisions) - set(decisions_before)) == [
        ("call-000000", 2, 61_000), ("call-000001", 2, 125_000), ("call-000002", 2, 61_000)]
    assert ledger[:len(ledger_before)] == ledger_before
    assert ledger[len(ledger_before):] == [
        ("alice", 61_000, "rerate:call-000000:2"), ("alice", 125_000, "rerate:call-000001:2"),
        ("bob", 61_000, "rerate:call-000002:2")]
    # Balances now equal what the calls cost at the corrected rates.
    assert balance(world, "alice") == 10 * UNIT - 61_000 - 125_000 - 30_500
    assert balance(world, "bob") == 10 * UNIT - 61_000 - 120_000
    shown = json.loads(run(world, "cdrs", "show", "call-000001", "--json").stdout)
    assert shown["rating"]["cost"] == "0.125000" and [d["seq"] for d in shown["rating_history"]] == [1, 2]
    assert shown["rating_history"][1]["reason"] == "rerate: cost 0.250000 -> 0.125000"


def test_running_it_twice_changes_nothing_the_second_time(world: Engine) -> None:
    run(world, "rerate", "--plan", "retail", "--since", "2026-01-01")
    after_first = snapshot(world)
    again = json.loads(run(world, "rerate", "--plan", "retail", "--since", "2026-01-01", "--json").stdout)
    assert (again["calls_changed"], again["calls_applied"]) == (0, 0)
    assert snapshot(world) == after_first


def test_the_range_and_the_account_narrow_the_run(world: Engine) -> None:
    data = json.loads(run(world, "rerate", "--plan", "retail", "--since", "2026-01-01T00:01:00Z",
                          "--until", "2026-01-01T00:03:00Z", "--account", "bob", "--json").stdout)
    assert (data["calls_checked"], data["calls_applied"]) == (1, 1)
    assert [c["call_id"] for c in data["changes"]] == ["call-000002"]


def test_two_runs_at_once_rerate_a_call_once(world: Engine) -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    table = load_table(world, "retail")
    stale = [c for call in next(_pages(world, "retail", since, None, "alice"))
             if isinstance(c := reprice(call, table), Change)]  # computed before the other run commits
    first = rerate(world, "retail", since, account_id="alice")
    assert first.applied == 2
    late = RerateReport(plan="retail", dry_run=False)
    _commit_page(world, stale, "retail", late)
    assert (late.applied, late.already_done) == (0, 2)
    assert balance(world, "alice") == 10 * UNIT - 61_000 - 125_000 - 30_500


def test_an_unknown_plan_is_an_error_naming_it(world: Engine) -> None:
    result = run(world, "rerate", "--plan", "nope", "--since", "2026-01-01")
    assert result.exit_code == 1
    assert "unknown rate plan 'nope'" in result.stderr


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_the_shared_redis_balances_follow_the_adjustments(world: Engine, tmp_path: Path,
                                                          redis_client: object) -> None:
    """With Redis as the balance store, the nodes see the re-rated balances at once."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    url = world.url.render_as_string(hide_password=False)
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: {url}\nredis:\n  url: {REDIS_URL}\n  key_prefix: '{prefix}'\n")
    node = RedisBalanceStore(make_client(REDIS_URL, 1000), session_factory(world), key_prefix=prefix)
    try:
        node.authorize("alice", "live", "n1", UNIT, 0, 1_800_000_000_000, 60_000)  # alice is now cached
        before = node.account_state("alice").balance_micros
        result = CliRunner().invoke(cli, ["--config", str(config), "rerate", "--plan", "retail", "--since",
                                          "2026-01-01"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert node.account_state("alice").balance_micros == before + 61_000 + 125_000 == balance(world, "alice")
    finally:
        for key in redis_client.scan_iter(match=f"{prefix}*"):  # type: ignore[attr-defined]
            redis_client.delete(key)  # type: ignore[attr-defined]
        node.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_redis_away_is_a_warning_the_ledger_has_the_adjustments(world: Engine, tmp_path: Path) -> None:
    url = world.url.render_as_string(hide_password=False)
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: {url}\nredis:\n  url: redis://127.0.0.1:1/0\n  timeout_ms: 200\n")
    result = CliRunner().invoke(cli, ["--config", str(config), "rerate", "--plan", "retail", "--since",
                                      "2026-01-01"])
    assert result.exit_code == 0 and "applied 3" in result.stdout
    assert "rebuild-cache" in result.stderr
    assert balance(world, "alice") == 10 * UNIT - 61_000 - 125_000 - 30_500


# ------------------------------------------------------------------------------ bundles

BUNDLE_OLD = HEADER + "49,Germany,0.12,0,60,60,0,0\n"  # 61 s bill 120 s
BUNDLE_NEW = HEADER + "49,Germany,0.12,0,1,1,0,0\n"  # 61 s bill 61 s


@pytest.fixture
def bundled(engine: Engine, tmp_path: Path) -> tuple[Engine, dict[str, int]]:
    """Alice's 61 s call to 4930111 billed 120 s: 50 s from a weekly bundle (it ends first, so it
    is drawn first), 50 s from a monthly one, 20 s of money (0.040000); settled by the real
    store, its CDR written with bundle_seconds 100."""
    with transaction(session_factory(engine)) as session:
        create_plan(session, "retail", currency="EUR")
    ids = import_rates(engine, tmp_path, BUNDLE_OLD, "old.csv")
    with transaction(session_factory(engine)) as session:
        create_account(session, "alice", plan="retail", balance_micros=10 * UNIT)
    for name, period in (("week-de", "week"), ("month-de", "month")):
        assert run(engine, "bundles", "create", name, "--seconds", "50", "--prefixes", "49", "--period", period
                   ).exit_code == 0
        assert run(engine, "bundles", "grant", "alice", name, "--from", "2025-12-01").exit_code == 0
    record = make_record(0, account_id="alice", destination="4930111", rate_id=ids["49"], billed_seconds=61,
                         cost_micros=40_000)
    record = replace(record, rating=replace(record.rating, bundle_seconds=100))
    with transaction(session_factory(engine)) as session:
        grants = [g.grant for g in account_grants(session, "alice", at=datetime(2026, 1, 1, tzinfo=UTC))]
    slots = slots_for(grants, "4930111", record.started_ms, "UTC")
    assert [s.seconds for s in slots] == [50, 50] and slots[0].expires_ms < slots[1].expires_ms
    store = SqlBalanceStore(session_factory(engine))
    assert store.authorize("alice", record.call_id, "n1", UNIT, 0, record.started_ms, 600_000, bundle_slots=slots,
                           bundle_want_s=120).bundle_granted_s == 100
    store.settle(record.call_id, 1, 40_000, record.started_ms + 62_000, bundle=BundleSettle(100, slots))
    SqlCdrStore(engine).write([record])
    import_rates(engine, tmp_path, BUNDLE_NEW, "new.csv")
    return engine, {"week": slots[0].grant_id, "month": slots[1].grant_id, "week_start": slots[0].period_start_ms,
                    "month_start": slots[1].period_start_ms}


def periods_used(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {int(g): int(u) for g, u in conn.execute(select(BundlePeriod.grant_id, BundlePeriod.used_s))}


def test_a_call_that_used_bundles_gives_seconds_back_to_the_right_grant(bundled: tuple[Engine, dict[str, int]]
                                                                        ) -> None:
    engine, ids = bundled
    assert periods_used(engine) == {ids["week"]: 50, ids["month"]: 50}
    dry = json.loads(run(engine, "rerate", "--plan", "retail", "--since", "2026-01-01", "--dry-run", "--json").stdout)
    assert dry["bundle_seconds_returned"] == 39 and periods_used(engine)[ids["month"]] == 50
    result = run(engine, "rerate", "--plan", "retail", "--since", "2026-01-01", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (change,) = data["changes"]
    # Billed 61 s now: all covered by the 100 s the call held; no money, the 0.04 goes back.
    assert (change["old_cost"], change["new_cost"], change["adjustment"]) == ("0.040000", "0.000000", "0.040000")
    assert (change["bundle_seconds"], change["bundle_seconds_returned"], data["bundle_seconds_returned"]) == (
        61, 39, 39)
    # The monthly period was drawn on last: it gets the 39 s back; the weekly keeps its 50 s used.
    assert periods_used(engine) == {ids["week"]: 50, ids["month"]: 11}
    with engine.connect() as conn:
        adjust = conn.execute(select(BundleUsage.grant_id, BundleUsage.period_start_ms, BundleUsage.seconds,
                                     BundleUsage.reference, BundleUsage.call_id)
                              .where(BundleUsage.kind == "adjust")).all()
        decision = conn.execute(select(RatingDecision.seq, RatingDecision.bundle_seconds, RatingDecision.cost_micros)
                                .where(RatingDecision.seq == 2)).one()
    assert [tuple(a) for a in adjust] == [(ids["month"], ids["month_start"], 39,
                                           f"bundle-rerate:call-000000:2:{ids['month']}:{ids['month_start']}",
                                           "call-000000")]
    assert tuple(decision) == (2, 61, 0)
    assert balance(engine, "alice") == 10 * UNIT
    text = run(engine, "rerate", "--plan", "retail", "--since", "2026-01-01").stdout
    assert "0 changed" in text  # a second run finds the call at its price
    checked = run(engine, "ledger", "check", "--json", "--grace-seconds", "0")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["bundle_calls"] == 1


def test_more_billed_seconds_keep_the_covered_seconds_and_money_pays_the_rest(
        bundled: tuple[Engine, dict[str, int]], tmp_path: Path) -> None:
    engine, ids = bundled
    import_rates(engine, tmp_path, HEADER + "49,Germany,0.06,0.50,90,30,0,0\n", "dearer.csv")
    data = json.loads(run(engine, "rerate", "--plan", "retail", "--since", "2026-01-01", "--json").stdout)
    (change,) = data["changes"]
    # 61 s bill 90 s now: 100 s held cover all 90 (no connect fee: a bundle covers the call).
    assert (change["new_cost"], change["bundle_seconds"], change["bundle_seconds_returned"]) == ("0.000000", 90, 10)
    assert periods_used(engine) == {ids["week"]: 50, ids["month"]: 40}
    import_rates(engine, tmp_path, HEADER + "49,Germany,0.06,0.50,120,60,0,0\n", "dearest.csv")
    data = json.loads(run(engine, "rerate", "--plan", "retail", "--since", "2026-01-01", "--json").stdout)
    (change,) = data["changes"]
    # 120 s billed, 90 s still covered (a re-rating never takes more from a bundle): 30 s of money at 0.06.
    assert (change["old_cost"], change["new_cost"], change["bundle_seconds"]) == ("0.000000", "0.030000", 90)
    assert change["bundle_seconds_returned"] == 0 and periods_used(engine) == {ids["week"]: 50, ids["month"]: 40}
    assert balance(engine, "alice") == 10 * UNIT - 30_000
    assert run(engine, "ledger", "check", "--grace-seconds", "0").exit_code == 0
