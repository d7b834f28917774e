"""`billing-agent rates quote`, through the real CLI on SQLite."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, insert

from agent.adapters.sql.accounts import create_account
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.bundles_admin import account_grants
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.models import Rate
from agent.adapters.sql.plans import create_plan
from agent.cli.main import cli
from agent.core.balance import BundleSettle
from agent.core.bundles import slots_for
from agent.core.clock import parse_iso8601
from agent.core.ratetable import epoch_ms

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WEDNESDAY_10H = "2026-03-04T10:00:00Z"
DEFAULTS: dict[str, Any] = {
    "connect_fee_micros": 0, "initial_increment": 1, "increment": 1, "minimum_seconds": 0, "grace_seconds": 0,
    "effective_from": EPOCH, "effective_to": None, "weekdays": "", "time_from_minute": 0, "time_to_minute": 1440,
    "blocked": False,
}
UNIT = 1_000_000
SAMPLE_DECK = Path(__file__).resolve().parent.parent / "rates" / "sample-small.csv"


@pytest.fixture
def url(sqlite_engine: Engine) -> str:
    with transaction(session_factory(sqlite_engine)) as session:
        plan_id = create_plan(session, "retail", currency="EUR", timezone="Europe/Paris").id
    rows: list[dict[str, Any]] = [
        {"prefix": "447", "destination": "UK Mobile", "rate_micros": 120_000, "connect_fee_micros": 50_000,
         "initial_increment": 30, "increment": 6},
        {"prefix": "44", "destination": "UK", "rate_micros": 9_500, "grace_seconds": 3},
        {"prefix": "33", "destination": "France peak", "rate_micros": 20_000, "weekdays": "12345",
         "time_from_minute": 8 * 60, "time_to_minute": 20 * 60},
        {"prefix": "33", "destination": "France off-peak", "rate_micros": 10_000},
        {"prefix": "1900", "destination": "Premium", "rate_micros": 0, "blocked": True},
        {"prefix": "800", "destination": "Free", "rate_micros": 0},
    ]
    with sqlite_engine.begin() as conn:
        conn.execute(insert(Rate), [{**DEFAULTS, "plan_id": plan_id, **row} for row in rows])
    return sqlite_engine.url.render_as_string(hide_password=False)


def quote(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--database-url", url, "rates", "quote", "--plan", "retail", *args])


def quote_json(url: str, *args: str) -> dict[str, Any]:
    result = quote(url, *args, "--json", "--at", WEDNESDAY_10H)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_json_cost_quote(url: str) -> None:
    data = quote_json(url, "+447700900123", "--seconds", "61")
    assert data["prefix"] == "447" and data["destination"] == "UK Mobile"
    assert data["billed_seconds"] == 66 and data["cost"] == "0.182000"
    assert data["rate_per_minute"] == "0.120000" and data["normalised"] == "447700900123"
    assert data["breakdown"] == [
        {"item": "connect_fee", "amount": "0.050000"},
        {"item": "initial_block", "count": 1, "seconds_each": 30, "from_second": 0, "to_second": 30,
         "amount": "0.060000"},
        {"item": "increment_block", "count": 6, "seconds_each": 6, "from_second": 30, "to_second": 66,
         "amount": "0.072000"},
    ]


def test_json_max_duration(url: str) -> None:
    data = quote_json(url, "00447700900123", "--budget", "1")
    assert data["max_seconds"] == 474 and isinstance(data["max_seconds"], int)
    assert data["limit_ms"] == 474_000 and data["allowed"] is True
    assert (data["cost"], data["next_second_cost"]) == ("0.998000", "1.010000")
    denied = quote_json(url, "+447700900123", "--budget", "0.10")
    assert denied["max_seconds"] == 0 and denied["allowed"] is False
    assert denied["first_charged_second_cost"] == "0.110000"


def test_human_output_explains_every_line(url: str) -> None:
    result = quote(url, "+447700900123", "--seconds", "61", "--at", WEDNESDAY_10H)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["plan", "retail", "(EUR),", "version", "1"]
    assert "prefix 447 UK Mobile: 0.120000 EUR/min, connect fee 0.050000, blocks 30 s then 6 s" in result.stdout
    assert "61 s answered -> 66 s billed" in result.stdout
    assert [line.split()[-1] for line in lines[-4:]] == ["0.050000", "0.060000", "0.072000", "EUR"]
    assert "1 x 30 s (0-30 s)" in lines[-3] and "6 x 6 s (30-66 s)" in lines[-2]
    assert lines[-1].split()[:2] == ["total", "0.182000"]


def test_grace_and_budget_in_words(url: str) -> None:
    free = quote(url, "+441234", "--seconds", "3", "--at", WEDNESDAY_10H)
    assert "within the grace period of 3 s, nothing is charged" in free.stdout
    assert free.stdout.splitlines()[-1].split()[:2] == ["total", "0.000000"]
    budget = quote(url, "+447700900123", "--budget", "1", "--at", WEDNESDAY_10H)
    assert "474 s (7 min 54 s), costing 0.998000; one second more would cost 1.010000" in budget.stdout
    deny = quote(url, "+447700900123", "--budget", "0.1", "--at", WEDNESDAY_10H)
    assert deny.exit_code == 0 and "0 s: deny" in deny.stdout and "costs 0.110000" in deny.stdout


def test_at_picks_the_time_window_in_the_plans_timezone(url: str) -> None:
    assert quote_json(url, "+33140000000", "--seconds", "60")["destination"] == "France peak"
    evening = quote(url, "+33140000000", "--seconds", "60", "--at", "2026-03-04T19:30:00Z", "--json")
    assert json.loads(evening.stdout)["destination"] == "France off-peak"  # 20:30 in Paris
    local = quote(url, "+33140000000", "--seconds", "60", "--at", "2026-03-04T19:30:00+01:00", "--json")
    assert json.loads(local.stdout)["at"] == "2026-03-04T18:30:00Z"


def test_free_destination_budget(url: str) -> None:
    data = quote_json(url, "+8001234", "--budget", "0")
    assert data["capped"] is True and data["max_seconds"] == 1_000_000_000


@pytest.mark.parametrize(("number", "message"), [
    ("+19005551234", "error: destination 1900 (Premium) is blocked"),
    ("+999123456", "error: no rate for 999123456 in plan 'retail'"),
    ("33abc", "error: number '33abc' has 'a', which is not a digit"),
    ("+", "error: number '+' has no digits"),
])
def test_refusals_exit_1_with_the_reason(url: str, number: str, message: str) -> None:
    for args in (["--seconds", "60"], ["--budget", "5", "--json"]):
        result = quote(url, number, *args)
        assert result.exit_code == 1, result.output
        assert message in result.stderr and result.stdout == ""


def test_unknown_plan(url: str) -> None:
    result = CliRunner().invoke(cli, ["--database-url", url, "rates", "quote", "--plan", "gold", "33",
                                      "--seconds", "1"])
    assert result.exit_code == 1 and "unknown rate plan 'gold'" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--seconds", "-5"], "-5 is not in the range x>=0"),
    (["--budget", "-1"], "must not be negative"),
    (["--budget", "1.0000001"], "more than 6 decimals"),
    (["--seconds", "ten"], "'ten' is not a valid integer"),
    (["--seconds", "5", "--at", "yesterday"], "--at 'yesterday' is not an ISO 8601"),
    (["--seconds", "5", "--at", "2026-13-01"], "is not an ISO 8601"),
    (["--seconds", "5", "--budget", "1"], "exactly one of --seconds N or --budget AMOUNT"),
    ([], "exactly one of --seconds N or --budget AMOUNT"),
])
def test_bad_options_are_usage_errors(url: str, args: list[str], message: str) -> None:
    result = quote(url, "+33140000000", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_quote_after_a_real_import(sqlite_engine: Engine) -> None:
    database_url = sqlite_engine.url.render_as_string(hide_password=False)
    runner = CliRunner()
    imported = runner.invoke(cli, ["--database-url", database_url, "rates", "import", str(SAMPLE_DECK),
                                   "--plan", "sample", "--create-plan"])
    assert imported.exit_code == 0, imported.output
    result = runner.invoke(cli, ["--database-url", database_url, "rates", "quote", "--plan", "sample",
                                 "+33612345678", "--seconds", "61", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["prefix"], data["billed_seconds"], data["cost"]) == ("336", 66, "0.049500")


# ---------------------------------------------------------------- --account: bundles (DESIGN §9)


@pytest.fixture
def alice(url: str) -> str:
    """Alice on retail with a 100 s monthly bundle to UK mobiles (447), 40 s of it used by a call."""
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            create_account(session, "alice", plan="retail", balance_micros=UNIT)
        cli_ok(url, "bundles", "create", "uk-mobile", "--seconds", "100", "--prefixes", "447")
        cli_ok(url, "bundles", "grant", "alice", "uk-mobile", "--from", "2026-03-01")
        at = parse_iso8601(WEDNESDAY_10H)
        with transaction(session_factory(engine)) as session:
            grants = [g.grant for g in account_grants(session, "alice", at=at)]
        slots = slots_for(grants, "447700900999", epoch_ms(at), "Europe/Paris")
        store = SqlBalanceStore(session_factory(engine))
        store.authorize("alice", "used-40", "n1", UNIT, 0, epoch_ms(at), 60_000, bundle_slots=slots, bundle_want_s=40)
        store.settle("used-40", 1, 0, epoch_ms(at) + 40_000, bundle=BundleSettle(40, slots))
    finally:
        engine.dispose()
    return url


def cli_ok(url: str, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--database-url", url, *args])
    assert result.exit_code == 0, result.output
    return result


def account_quote(url: str, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["--database-url", url, "rates", "quote", "--account", "alice", *args,
                                      "--json", "--at", WEDNESDAY_10H])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_account_quote_splits_a_call_between_its_bundle_and_money(alice: str) -> None:
    data = account_quote(alice, "+447700900123", "--seconds", "61")
    # 61 s bill 66 s (30 s then 6 s blocks): 60 s left in the bundle, 6 s of money, no connect fee.
    assert (data["plan"], data["billed_seconds"], data["bundle_seconds"], data["money_seconds"]) == (
        "retail", 66, 60, 6)
    assert (data["cost"], data["connect_fee_waived"], data["cost_without_bundles"]) == ("0.012000", True, "0.182000")
    assert data["bundles"] == [{"grant": 1, "bundle": "uk-mobile", "period_start": "2026-03-01T00:00:00+01:00",
                                "period_end": "2026-04-01T00:00:00+02:00", "left_seconds": 60,
                                "covered_seconds": 60}]
    inside = account_quote(alice, "+447700900123", "--seconds", "20")
    assert (inside["billed_seconds"], inside["bundle_seconds"], inside["cost"]) == (30, 30, "0.000000")
    text = cli_ok(alice, "rates", "quote", "--account", "alice", "+447700900123", "--seconds", "61", "--at",
                  WEDNESDAY_10H).stdout
    assert "bundle uk-mobile (grant 1, 60 s left)" in text and "connect fee waived: a bundle covers the call" in text
    assert "total                                           0.012000 EUR (without bundles 0.182000)" in text


def test_several_bundles_are_drawn_earliest_expiry_first(alice: str) -> None:
    cli_ok(alice, "bundles", "create", "uk-week", "--seconds", "50", "--prefixes", "44", "--period", "week")
    cli_ok(alice, "bundles", "grant", "alice", "uk-week", "--from", "2026-03-01")
    data = account_quote(alice, "+447700900123", "--seconds", "200")
    # 200 s bill 204 s: 50 s from the weekly bundle (it ends first), 60 s from the monthly, 94 s of money.
    assert [(b["bundle"], b["left_seconds"], b["covered_seconds"]) for b in data["bundles"]] == [
        ("uk-week", 50, 50), ("uk-mobile", 60, 60)]
    assert (data["billed_seconds"], data["bundle_seconds"], data["cost"]) == (204, 110, "0.188000")
    landline = account_quote(alice, "+442071234567", "--seconds", "10")  # the weekly bundle alone covers 44
    assert [b["bundle"] for b in landline["bundles"]] == ["uk-week"] and landline["cost"] == "0.000000"
    budget = account_quote(alice, "+447700900123", "--budget", "0.12")
    # 110 s of bundles + 60 s that 0.12 pays = 170 billed seconds, down to a block boundary: 168.
    assert (budget["max_seconds"], budget["bundle_seconds"], budget["cost"]) == (168, 110, "0.116000")
    assert budget["without_bundles_max_seconds"] == 30  # connect fee 0.05 + the 30 s block 0.06


def test_account_quote_without_a_covering_bundle_is_the_plain_cost(alice: str) -> None:
    data = account_quote(alice, "+33140000000", "--seconds", "60")
    assert (data["bundles"], data["bundle_seconds"], data["cost"], data["cost_without_bundles"]) == (
        [], 0, "0.020000", "0.020000")
    after = account_quote(alice, "+447700900123", "--seconds", "61", "--plan", "retail")
    assert after["bundle_seconds"] == 60


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--account", "bob"], 1, "unknown account 'bob'"),
    (["--account", "alice", "--plan", "wholesale"], 1, "--plan 'wholesale': account 'alice' is rated on plan 'retail'"),
    ([], 2, "give --plan NAME or --account ACCOUNT"),
])
def test_account_quote_errors(alice: str, args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(cli, ["--database-url", alice, "rates", "quote", "+447700900123", "--seconds", "5",
                                      *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
