"""``billing-agent bundles``: create, list, delete, grant, show; through the real CLI.

Seconds are drawn with the real embedded balance store (authorize with bundle slots, settle with
the covered seconds), so ``show`` and ``delete`` see what a daemon would have left behind.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.bundles_admin import account_grants, account_timezone
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.models import BundleGrant, BundleUsage
from agent.cli.main import cli
from agent.core.balance import BundleSettle
from agent.core.bundles import BundleSlot, slots_for

DECK = """prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace
4915,Germany mobile,0.12,0.05,30,6,0,0
49,Germany,0.03,0,1,1,0,0
33,France,0.02,0,1,1,0,0
"""
UNIT = 1_000_000
FEB_15 = datetime(2026, 2, 15, 11, 0, tzinfo=UTC)  # 12:00 in Paris


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def ok(config: Path, *args: str) -> Result:
    result = run(config, *args)
    assert result.exit_code == 0, result.output
    return result


def as_json(config: Path, *args: str) -> Any:
    return json.loads(ok(config, *args, "--json").stdout)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, Engine]]:
    """Plan retail (Europe/Paris) with a small deck; alice on it; plan empty (no rates)."""
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'b.db'}\n")
    deck = tmp_path / "deck.csv"
    deck.write_text(DECK)
    ok(config, "db", "upgrade")
    ok(config, "plans", "create", "retail", "--timezone", "Europe/Paris")
    ok(config, "plans", "create", "empty")
    ok(config, "rates", "import", str(deck), "--plan", "retail")
    ok(config, "accounts", "create", "alice", "--plan", "retail", "--balance", "10")
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    yield config, engine
    engine.dispose()


def slots(engine: Engine, account: str, number: str, at: datetime) -> tuple[BundleSlot, ...]:
    """What the daemon's rater gives a call: the account's grants in force, in draw order."""
    with transaction(session_factory(engine)) as session:
        _, timezone = account_timezone(session, account)
        grants = [g.grant for g in account_grants(session, account, at=at)]
    return slots_for(grants, number, ms(at), timezone)


def call(engine: Engine, call_id: str, number: str, at: datetime, *, want_s: int, covered_s: int | None = None,
         cost_micros: int = 0) -> tuple[BundleSlot, ...]:
    """Authorize a call drawing ``want_s`` bundle seconds; settle it with ``covered_s`` (None: stays live)."""
    store = SqlBalanceStore(session_factory(engine))
    found = slots(engine, "alice", number, at)
    outcome = store.authorize("alice", call_id, "n1", UNIT, 0, ms(at), 3_600_000, bundle_slots=found,
                              bundle_want_s=want_s)
    assert outcome.allowed and outcome.bundle_granted_s == want_s
    if covered_s is not None:
        store.settle(call_id, 1, cost_micros, ms(at) + 1000, bundle=BundleSettle(covered_s, found))
    return found


# ------------------------------------------------------------------------------- create


def test_create_from_a_list_and_from_a_file_and_list_them(db: tuple[Path, Engine], tmp_path: Path) -> None:
    config, _ = db
    created = as_json(config, "bundles", "create", "de-mobile", "--seconds", "600", "--prefixes", "+4915,4916 4917",
                      "--rollover")
    assert (created["seconds"], created["period"], created["anchor"], created["rollover"]) == (600, "month", 1, True)
    assert created["prefixes"] == ["4915", "4916", "4917"]
    listing = tmp_path / "france.txt"
    listing.write_text("# France\n33 # all of it\n\n336, 337\n")
    text = ok(config, "bundles", "create", "fr-week", "--seconds", "120", "--prefixes", str(listing), "--period",
              "week", "--anchor", "3").stdout
    assert text == "created bundle fr-week: 120 s per week from Wed, 3 prefix(es)\n"
    rows = as_json(config, "bundles", "list")
    assert [(b["name"], b["prefixes"], b["period"], b["anchor"], b["grants"]) for b in rows] == [
        ("de-mobile", ["4915", "4916", "4917"], "month", 1, 0), ("fr-week", ["33", "336", "337"], "week", 3, 0)]
    table = ok(config, "bundles", "list").stdout.splitlines()
    assert table[1].split()[:3] == ["de-mobile", "600", "month"] and "4915,4916,4917" in table[1]


def test_a_non_digit_prefix_in_a_file_names_the_file_and_line(db: tuple[Path, Engine], tmp_path: Path) -> None:
    config, engine = db
    listing = tmp_path / "eu.txt"
    listing.write_text("4915\n4916\n49x7  # typo\n")
    result = run(config, "bundles", "create", "eu", "--seconds", "60", "--prefixes", str(listing))
    assert result.exit_code == 1
    assert f"error: {listing}:3: prefix '49x7' must be digits" in result.stderr
    listed = run(config, "bundles", "create", "eu", "--seconds", "60", "--prefixes", "4915,49-16")
    assert listed.exit_code == 1 and "--prefixes:1: prefix '49-16' must be digits" in listed.stderr
    missing = run(config, "bundles", "create", "eu", "--seconds", "60", "--prefixes", "mobiles.txt")
    assert missing.exit_code == 1 and "there is no file 'mobiles.txt'" in missing.stderr
    assert as_json(config, "bundles", "list") == []  # nothing half-created


@pytest.mark.parametrize(("args", "message"), [
    (["--anchor", "32"], "a monthly anchor is a day of the month, 1-31"),
    (["--anchor", "0"], "a monthly anchor is a day of the month, 1-31"),
    (["--period", "week", "--anchor", "8"], "a weekly anchor is an ISO weekday, 1 (Monday) to 7 (Sunday), not 8"),
    (["--period", "once", "--anchor", "5"], "--anchor: a bundle of --period once has no anchor"),
    (["--period", "once", "--rollover"], "a bundle of one period cannot roll over"),
    (["--prefixes", " , "], "--prefixes: no prefix"),
    (["--prefixes", "4" * 33], "is longer than 32 digits"),
])
def test_bad_definitions_are_refused_with_the_reason(db: tuple[Path, Engine], args: list[str], message: str) -> None:
    config, _ = db
    base = ["bundles", "create", "b1", "--seconds", "60"]
    result = run(config, *base, *(args if "--prefixes" in args else [*args, "--prefixes", "33"]))
    assert result.exit_code == 1, result.output
    assert message in result.stderr


def test_a_name_in_use_is_refused(db: tuple[Path, Engine]) -> None:
    config, _ = db
    ok(config, "bundles", "create", "b1", "--seconds", "60", "--prefixes", "33")
    again = run(config, "bundles", "create", "b1", "--seconds", "90", "--prefixes", "49")
    assert again.exit_code == 1 and "bundle 'b1' already exists" in again.stderr


def test_prefixes_that_match_no_rate_are_a_warning_naming_them_and_the_plans(db: tuple[Path, Engine]) -> None:
    config, _ = db
    nowhere = run(config, "bundles", "create", "nowhere", "--seconds", "60", "--prefixes", "999,998", "--json")
    assert nowhere.exit_code == 0  # a warning, not a failure: rates may be imported later
    assert "warning: bundle 'nowhere': none of its prefixes matches a rate in any plan (empty, retail)" \
        in nowhere.stderr
    assert json.loads(nowhere.stdout)["warnings"] == [
        "bundle 'nowhere': none of its prefixes matches a rate in any plan (empty, retail): no call can draw on it"]
    partly = run(config, "bundles", "create", "partly", "--seconds", "60", "--prefixes", "491,999")
    assert partly.exit_code == 0
    # 491 matches through the 49 rate (it rates numbers starting with 491); 999 matches nothing.
    assert "warning: bundle 'partly': its prefixes match nothing in plan(s) empty" in partly.stderr
    assert "1 prefix(es) match no rate in any plan: 999" in partly.stderr
    broad = run(config, "bundles", "create", "broad", "--seconds", "60", "--prefixes", "4")  # rates 49, 4915 below it
    assert "retail" not in broad.stderr


# -------------------------------------------------------------------------------- grant


def test_grant_is_idempotent_per_reference(db: tuple[Path, Engine]) -> None:
    config, engine = db
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "49")
    first = as_json(config, "bundles", "grant", "alice", "de", "--from", "2026-01-01", "--reference", "order-7")
    assert first["created"] is True
    assert (first["valid_from"], first["valid_until"]) == ("2026-01-01T00:00:00+01:00", None)  # Paris midnight
    again = as_json(config, "bundles", "grant", "alice", "de", "--from", "2026-01-01", "--reference", "order-7")
    assert (again["created"], again["grant"]) == (False, first["grant"])
    text = ok(config, "bundles", "grant", "alice", "de", "--reference", "order-7").stdout  # --from as stored
    assert text.startswith(f"already granted: reference order-7 is grant {first['grant']}")
    other = run(config, "bundles", "grant", "alice", "de", "--from", "2026-01-02", "--reference", "order-7")
    assert other.exit_code == 1
    assert "reference 'order-7' was already used for grant 1 of bundle 'de' to account 'alice'" in other.stderr
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(BundleGrant)) == 1


def test_overlapping_grants_of_one_bundle_are_refused_naming_the_other(db: tuple[Path, Engine]) -> None:
    config, _ = db
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "49")
    ok(config, "bundles", "create", "fr", "--seconds", "600", "--prefixes", "33")
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-01-01", "--until", "2026-04-01", "--reference", "q1")
    clash = run(config, "bundles", "grant", "alice", "de", "--from", "2026-03-15", "--reference", "q2")
    assert clash.exit_code == 1
    assert ("bundle 'de' is already granted to account 'alice' by grant 1 (reference 'q1') valid "
            "[2025-12-31T23:00:00+00:00, 2026-03-31T22:00:00+00:00), which overlaps "
            "[2026-03-14T23:00:00+00:00, open-ended)") in clash.stderr
    # Back to back is no overlap ([from, until) is half-open); another bundle never clashes.
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-04-01", "--reference", "q2")
    ok(config, "bundles", "grant", "alice", "fr", "--from", "2026-01-01", "--reference", "f1")
    before = run(config, "bundles", "grant", "alice", "de", "--from", "2025-06-01", "--until", "2026-01-02")
    assert before.exit_code == 1 and "by grant 1 (reference 'q1')" in before.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["bob", "de"], "error: unknown account 'bob'"),
    (["alice", "nope"], "error: unknown bundle 'nope'"),
    (["alice", "de", "--from", "2026-02-01", "--until", "2026-01-01"], "is not after --from"),
    (["alice", "de", "--from", "soon"], "'soon' is not an ISO 8601 date or timestamp"),
])
def test_bad_grants_are_refused(db: tuple[Path, Engine], args: list[str], message: str) -> None:
    config, _ = db
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "49")
    result = run(config, "bundles", "grant", *args)
    assert result.exit_code in (1, 2) and message in result.stderr


def test_a_grant_whose_prefixes_match_nothing_in_the_accounts_plan_warns(db: tuple[Path, Engine]) -> None:
    config, _ = db
    ok(config, "bundles", "create", "uk", "--seconds", "60", "--prefixes", "44")
    result = run(config, "bundles", "grant", "alice", "uk")
    assert result.exit_code == 0 and "granted bundle uk to alice" in result.stdout
    assert "warning: bundle 'uk': none of its prefixes matches a rate of plan 'retail'" in result.stderr


# --------------------------------------------------------------------------------- show


def test_show_gives_granted_used_reserved_left_and_the_reset(db: tuple[Path, Engine]) -> None:
    config, engine = db
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "4915")
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-01-01", "--reference", "g1")
    call(engine, "c1", "4915111", FEB_15, want_s=90, covered_s=66, cost_micros=0)  # settled: 66 s used
    call(engine, "c2", "4915222", FEB_15, want_s=30)  # live: holds 30 s
    shown = as_json(config, "bundles", "show", "alice", "--at", "2026-02-15T12:00")
    assert (shown["account"], shown["timezone"], shown["source"]) == ("alice", "Europe/Paris", "sql")
    (grant,) = shown["grants"]
    assert (grant["granted_seconds"], grant["used_seconds"], grant["reserved_seconds"], grant["left_seconds"]) == (
        600, 66, 30, 504)
    assert (grant["period_start"], grant["period_end"], grant["resets_at"]) == (
        "2026-02-01T00:00:00+01:00", "2026-03-01T00:00:00+01:00", "2026-03-01T00:00:00+01:00")
    assert (grant["status"], grant["opened"], grant["rollover_seconds"]) == ("active", True, 0)
    lines = ok(config, "bundles", "show", "alice", "--at", "2026-02-15T12:00").stdout.splitlines()
    assert lines[0] == "account alice, plan retail, periods in Europe/Paris"
    assert lines[2].split() == ["1", "de", "[2026-02-01T00:00:00+01:00,", "2026-03-01T00:00:00+01:00)", "600", "66",
                                "30", "504", "2026-03-01T00:00:00+01:00"]
    # March: a period no call opened yet shows the whole allowance.
    march = as_json(config, "bundles", "show", "alice", "--at", "2026-03-02")["grants"][0]
    assert (march["granted_seconds"], march["used_seconds"], march["left_seconds"], march["opened"]) == (
        600, 0, 600, False)


def test_show_estimates_the_rollover_of_a_period_not_opened_yet(db: tuple[Path, Engine]) -> None:
    config, engine = db
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "4915", "--rollover")
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-02-01", "--reference", "g1")
    call(engine, "c1", "4915111", FEB_15, want_s=90, covered_s=90)
    march = as_json(config, "bundles", "show", "alice", "--at", "2026-03-02")["grants"][0]
    assert (march["granted_seconds"], march["rollover_seconds"], march["opened"]) == (600 + 510, 510, False)
    text = ok(config, "bundles", "show", "alice", "--at", "2026-03-02").stdout
    assert "510 s rolled over if used now; not used yet" in text
    # The first period of a grant carries nothing (the grant did not run in the period before).
    february = as_json(config, "bundles", "show", "alice", "--at", "2026-02-10")["grants"][0]
    assert (february["granted_seconds"], february["rollover_seconds"]) == (600, 0)


def test_anchor_31_means_the_last_day_of_shorter_months(db: tuple[Path, Engine]) -> None:
    config, _ = db
    ok(config, "bundles", "create", "eom", "--seconds", "60", "--prefixes", "33", "--anchor", "31")
    ok(config, "bundles", "grant", "alice", "eom", "--from", "2025-12-01")

    def period(at: str) -> tuple[str, str]:
        g = as_json(config, "bundles", "show", "alice", "--at", at)["grants"][0]
        return g["period_start"][:10], g["period_end"][:10]

    assert period("2026-02-15") == ("2026-01-31", "2026-02-28")
    assert period("2026-02-28T10:00") == ("2026-02-28", "2026-03-31")  # February's last day starts the period
    assert period("2026-04-30T00:00") == ("2026-04-30", "2026-05-31")
    assert period("2028-02-29T08:00") == ("2028-02-29", "2028-03-31")  # a leap year
    assert "--anchor DAY" in ok(config, "bundles", "create", "--help").stdout
    assert "31: 28/29 February" in " ".join(ok(config, "bundles", "create", "--help").stdout.split())


def test_show_of_an_unknown_account_or_no_grant(db: tuple[Path, Engine]) -> None:
    config, _ = db
    missing = run(config, "bundles", "show", "bob")
    assert missing.exit_code == 1 and "unknown account 'bob'" in missing.stderr
    assert as_json(config, "bundles", "show", "alice")["grants"] == []


# ------------------------------------------------------------------------------- delete


def test_delete_is_refused_while_a_live_call_holds_seconds(db: tuple[Path, Engine]) -> None:
    config, engine = db
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "4915")
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-01-01", "--reference", "g1")
    found = call(engine, "live-1", "4915111", FEB_15, want_s=30)
    refused = run(config, "bundles", "delete", "de")
    assert refused.exit_code == 1
    assert "bundle 'de' has live reservations: call live-1 of account alice holds seconds of grant 1" \
        in refused.stderr
    assert [b["name"] for b in as_json(config, "bundles", "list")] == ["de"]
    SqlBalanceStore(session_factory(engine)).settle("live-1", 1, 0, ms(FEB_15) + 5000,
                                                    bundle=BundleSettle(20, found))
    assert "deleted bundle de (1 grant(s) kept as history)" in ok(config, "bundles", "delete", "de").stdout
    assert as_json(config, "bundles", "list") == []
    (kept,) = as_json(config, "bundles", "list", "--deleted")
    assert kept["name"] == "de" and kept["deleted_at"] is not None
    assert as_json(config, "bundles", "show", "alice")["grants"] == []  # no call draws on it any more
    history = as_json(config, "bundles", "show", "alice", "--all", "--at", "2026-02-16")["grants"]
    assert [(g["status"], g["used_seconds"]) for g in history] == [("bundle deleted", 20)]
    again = run(config, "bundles", "grant", "alice", "de", "--from", "2027-01-01")
    assert again.exit_code == 1 and "bundle 'de' was deleted at" in again.stderr
    twice = run(config, "bundles", "delete", "de")
    assert twice.exit_code == 1 and "was already deleted" in twice.stderr
    with engine.connect() as conn:  # the usage ledger keeps its rows
        assert conn.scalar(select(func.sum(BundleUsage.seconds))) == 600 - 20


def test_on_every_backend_grants_and_show_agree(engine: Engine, tmp_path: Path) -> None:
    """The SQL of grants (overlaps, references) and figures on SQLite, PostgreSQL and MariaDB."""
    upgrade(engine)
    url = engine.url.render_as_string(hide_password=False)
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: '{url}'\n")
    deck = tmp_path / "deck.csv"
    deck.write_text(DECK)
    ok(config, "plans", "create", "retail", "--timezone", "Europe/Paris")
    ok(config, "rates", "import", str(deck), "--plan", "retail")
    ok(config, "accounts", "create", "alice", "--plan", "retail", "--balance", "10")
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "4915", "--period", "week",
       "--anchor", "1")
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-02-02", "--until", "2026-03-02", "--reference", "w")
    assert ok(config, "bundles", "grant", "alice", "de", "--from", "2026-02-02", "--until", "2026-03-02",
              "--reference", "w").stdout.startswith("already granted")
    assert run(config, "bundles", "grant", "alice", "de", "--from", "2026-03-01").exit_code == 1
    call(engine, "c1", "4915111", FEB_15, want_s=40, covered_s=36)
    (grant,) = as_json(config, "bundles", "show", "alice", "--at", "2026-02-15T12:00")["grants"]
    assert (grant["period_start"], grant["period_end"]) == ("2026-02-09T00:00:00+01:00", "2026-02-16T00:00:00+01:00")
    assert (grant["granted_seconds"], grant["used_seconds"], grant["left_seconds"]) == (600, 36, 564)
    checked = as_json(config, "ledger", "check")  # the call's charge waits for its CDR (grace period)
    assert (checked["ok"], checked["bundle_periods"], checked["bundle_usage_rows"]) == (True, 1, 2)


def test_with_redis_show_and_delete_see_every_nodes_live_holds(db: tuple[Path, Engine], redis_client: object) -> None:
    """With redis.url the live holds of every node are in Redis: show reads them there, delete
    is refused while one holds seconds of the bundle."""
    from agent.adapters.redis.store import RedisBalanceStore, make_client

    if not hasattr(RedisBalanceStore, "bundle_periods"):
        pytest.skip("this Redis balance store keeps no bundle periods yet")
    config, engine = db
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    config.write_text(config.read_text() + f"redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: '{prefix}'\n")
    ok(config, "bundles", "create", "de", "--seconds", "600", "--prefixes", "4915")
    ok(config, "bundles", "grant", "alice", "de", "--from", "2026-01-01", "--reference", "g1")
    node = RedisBalanceStore(make_client("redis://127.0.0.1:6379/0", 1000), session_factory(engine), key_prefix=prefix)
    try:
        found = slots(engine, "alice", "4915111", FEB_15)
        assert node.authorize("alice", "r1", "n1", UNIT, 0, ms(FEB_15), 3_600_000, bundle_slots=found,
                              bundle_want_s=45).bundle_granted_s == 45
        shown = as_json(config, "bundles", "show", "alice", "--at", "2026-02-15T12:00")
        assert shown["source"] == "redis"
        (grant,) = shown["grants"]
        assert (grant["granted_seconds"], grant["reserved_seconds"], grant["left_seconds"]) == (600, 45, 555)
        refused = run(config, "bundles", "delete", "de")
        assert refused.exit_code == 1
        assert "live calls of account alice hold 45 s of grant 1" in refused.stderr
        node.settle("r1", 1, 0, ms(FEB_15) + 50_000, bundle=BundleSettle(40, found))
        (grant,) = as_json(config, "bundles", "show", "alice", "--at", "2026-02-15T12:00")["grants"]
        assert (grant["used_seconds"], grant["reserved_seconds"], grant["left_seconds"]) == (40, 0, 560)
        ok(config, "bundles", "delete", "de")
    finally:
        node.close()
        for key in redis_client.scan_iter(match=f"{prefix}*"):  # type: ignore[attr-defined]
            redis_client.delete(key)  # type: ignore[attr-defined]
