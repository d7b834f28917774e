"""`billing-agent rates quote`, through the real CLI on SQLite."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, insert

from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.models import Rate
from agent.adapters.sql.plans import create_plan
from agent.cli.main import cli

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WEDNESDAY_10H = "2026-03-04T10:00:00Z"
DEFAULTS: dict[str, Any] = {
    "connect_fee_micros": 0, "initial_increment": 1, "increment": 1, "minimum_seconds": 0, "grace_seconds": 0,
    "effective_from": EPOCH, "effective_to": None, "weekdays": "", "time_from_minute": 0, "time_to_minute": 1440,
    "blocked": False,
}
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
