"""Carriers and their buy decks (DESIGN §10, issue 17) through the CLI on SQLite, PostgreSQL and
MariaDB: create, list, show, disable, enable; a buy deck imported through the sell-deck code
(the carrier's own increments, validation), hidden from sell plans; a sell plan's route policy;
every bad input refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine

from agent.cli.main import cli

BUY = ("prefix,destination,rate,connect_fee,initial_increment,increment,effective_from,blocked\n"
       "44,UK,0.010,0,60,60,,\n"
       "447,UK mobile,0.030,0,6,6,,\n"
       "1900,US premium,0.5,0,1,1,,true\n")


def run(engine: Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def deck(tmp_path: Path) -> Path:
    path = tmp_path / "buy.csv"
    path.write_text(BUY)
    return path


def test_carriers_are_created_listed_shown_disabled_and_enabled(engine: Engine) -> None:
    assert "created carrier acme: trunk PJSIP/acme, enabled, 30 channels, priority 1, weight 3, EUR" in ok(run(
        engine, "carriers", "create", "acme", "--trunk", "PJSIP/acme", "--max-channels", "30", "--priority", "1",
        "--weight", "3"))
    ok(run(engine, "carriers", "create", "globex", "--trunk", "sofia/gateway/globex", "--currency", "USD"))
    listed = json.loads(ok(run(engine, "carriers", "list", "--json")))
    assert [(c["name"], c["trunk"], c["max_channels"], c["priority"], c["weight"], c["enabled"], c["currency"])
            for c in listed] == [("globex", "sofia/gateway/globex", None, 0, 1, True, "USD"),
                                 ("acme", "PJSIP/acme", 30, 1, 3, True, "EUR")]
    assert "DISABLED" in ok(run(engine, "carriers", "disable", "acme"))
    assert json.loads(ok(run(engine, "carriers", "show", "acme", "--json")))["enabled"] is False
    assert json.loads(ok(run(engine, "carriers", "enable", "acme", "--json")))["enabled"] is True
    table = ok(run(engine, "carriers", "list"))
    assert table.splitlines()[2].split() == ["acme", "PJSIP/acme", "on", "30", "1", "3", "EUR", "0"]


def test_bad_carriers_are_refused_with_the_reason(engine: Engine) -> None:
    ok(run(engine, "carriers", "create", "acme", "--trunk", "PJSIP/acme"))
    refused(run(engine, "carriers", "create", "acme", "--trunk", "PJSIP/other"), "carrier 'acme' already exists")
    refused(run(engine, "carriers", "create", "empty", "--trunk", ""), "carrier 'empty': --trunk is empty")
    refused(run(engine, "carriers", "create", "blank", "--trunk", "   "), "--trunk is empty")
    refused(run(engine, "carriers", "create", "fork", "--trunk", "PJSIP/a&PJSIP/b"), "has '&'",
            "a dialplan cannot dial anything else safely")
    refused(run(engine, "carriers", "create", "zero", "--trunk", "PJSIP/z", "--max-channels", "0"),
            "carrier 'zero': --max-channels 0 must be at least 1 (leave it out for no limit)")
    refused(run(engine, "carriers", "create", "neg", "--trunk", "PJSIP/n", "--max-channels", "-5"),
            "--max-channels -5 must be at least 1")
    refused(run(engine, "carriers", "create", "w", "--trunk", "PJSIP/w", "--weight", "0"),
            "--weight 0 must be at least 1")
    refused(run(engine, "carriers", "create", "p", "--trunk", "PJSIP/p", "--priority", "-1"), "must not be negative")
    refused(run(engine, "carriers", "create", "a:b", "--trunk", "PJSIP/x"), "carrier name 'a:b'")
    refused(run(engine, "carriers", "create", "cur", "--trunk", "PJSIP/x", "--currency", "XXY"), "XXY")
    refused(run(engine, "carriers", "show", "nobody"), "unknown carrier 'nobody' (known: acme)")
    refused(run(engine, "carriers", "disable", "nobody"), "unknown carrier 'nobody'")
    assert [c["name"] for c in json.loads(ok(run(engine, "carriers", "list", "--json")))] == ["acme"]


def test_a_buy_deck_is_imported_like_a_sell_deck_and_hidden_from_sell_plans(engine: Engine, deck: Path,
                                                                            tmp_path: Path) -> None:
    ok(run(engine, "carriers", "create", "acme", "--trunk", "PJSIP/acme"))
    assert "imported 3 rates into plan carrier:acme (plan created): version 2" in ok(
        run(engine, "rates", "import", str(deck), "--carrier", "acme"))
    shown = json.loads(ok(run(engine, "carriers", "show", "acme", "--json")))
    assert (shown["buy_plan"], shown["buy_rates"], shown["buy_version"]) == ("carrier:acme", 3, 2)
    # the carrier's own increments: 61 s on 60/60 is two minutes; 61 s on 6/6 is 66 s
    quote = json.loads(ok(run(engine, "rates", "quote", "--plan", "carrier:acme", "+4420123", "--seconds", "61",
                              "--json")))
    assert (quote["billed_seconds"], quote["cost"]) == (120, "0.020000")
    quote = json.loads(ok(run(engine, "rates", "quote", "--plan", "carrier:acme", "+447700", "--seconds", "61",
                              "--json")))
    assert (quote["billed_seconds"], quote["cost"]) == (66, "0.033000")
    refused(run(engine, "rates", "quote", "--plan", "carrier:acme", "+1900555", "--seconds", "1"), "blocked")
    # a replace bumps the version (the route book reloads on it); a second plain import is a duplicate
    ok(run(engine, "rates", "import", str(deck), "--carrier", "acme", "--replace"))
    refused(run(engine, "rates", "import", str(deck), "--carrier", "acme"), "duplicate of a rate already stored")
    assert json.loads(ok(run(engine, "carriers", "show", "acme", "--json")))["buy_version"] == 3
    # same validation as sell decks: nothing imported, the line and column named
    bad = tmp_path / "bad.csv"
    bad.write_text("prefix,rate,initial_increment\n44,0.01,0\n")
    refused(run(engine, "rates", "import", str(bad), "--carrier", "acme"), "bad.csv:2: column initial_increment",
            "nothing was imported")
    # hidden from sell plans and refused to accounts; not importable as a plan
    ok(run(engine, "plans", "create", "retail"))
    assert [p["name"] for p in json.loads(ok(run(engine, "plans", "list", "--json")))] == ["retail"]
    refused(run(engine, "accounts", "create", "1001", "--plan", "carrier:acme"),
            "rate plan 'carrier:acme' is a carrier's buy deck")
    refused(run(engine, "rates", "import", str(deck), "--plan", "carrier:acme"), "import it with --carrier acme")


def test_bad_buy_deck_imports_are_refused_with_the_reason(engine: Engine, deck: Path) -> None:
    ok(run(engine, "carriers", "create", "acme", "--trunk", "PJSIP/acme", "--currency", "USD"))
    refused(run(engine, "rates", "import", str(deck), "--carrier", "nobody"), "unknown carrier 'nobody'",
            "carriers create nobody --trunk")
    refused(run(engine, "rates", "import", str(deck)), "give --plan NAME", "or --carrier NAME")
    refused(run(engine, "rates", "import", str(deck), "--carrier", "acme", "--plan", "retail"), "one of them")
    refused(run(engine, "rates", "import", str(deck), "--carrier", "acme", "--currency", "EUR"),
            "carrier 'acme' is paid in USD, not EUR")
    refused(run(engine, "rates", "import", str(deck), "--carrier", "acme", "--create-plan"), "--create-plan is for")
    assert json.loads(ok(run(engine, "carriers", "show", "acme", "--json")))["buy_version"] is None


def test_route_policy_of_a_sell_plan(engine: Engine, deck: Path) -> None:
    ok(run(engine, "plans", "create", "retail"))
    assert json.loads(ok(run(engine, "plans", "set-route-policy", "retail", "weight", "--margin-floor", "5.5%",
                             "--json"))) == {"plan": "retail", "route_policy": "weight", "allow_loss": False,
                                             "margin_floor": "5.50%"}
    assert "route policy lcr, losses allowed, margin floor 0.002000/min" in ok(
        run(engine, "plans", "set-route-policy", "retail", "LCR", "--allow-loss", "--margin-floor", "0.002"))
    # left out: the floor is kept; none clears it
    assert "margin floor 0.002000/min" in ok(run(engine, "plans", "set-route-policy", "retail", "priority"))
    assert "margin floor none" in ok(run(engine, "plans", "set-route-policy", "retail", "priority",
                                         "--margin-floor", "none"))
    refused(run(engine, "plans", "set-route-policy", "retail", "cheapest"),
            "route policy 'cheapest' does not exist (known: lcr, priority, weight)")
    refused(run(engine, "plans", "set-route-policy", "nope", "lcr"), "unknown rate plan 'nope'")
    refused(run(engine, "plans", "set-route-policy", "retail", "lcr", "--margin-floor", "5.555%"), "two decimals")
    refused(run(engine, "plans", "set-route-policy", "retail", "lcr", "--margin-floor", "101%"), "between 0% and 100%")
    refused(run(engine, "plans", "set-route-policy", "retail", "lcr", "--margin-floor", "-1"), "must not be negative")
    refused(run(engine, "plans", "set-route-policy", "retail", "lcr", "--margin-floor", "lots"), "is not a number")
    ok(run(engine, "carriers", "create", "acme", "--trunk", "PJSIP/acme"))
    ok(run(engine, "rates", "import", str(deck), "--carrier", "acme"))
    refused(run(engine, "plans", "set-route-policy", "carrier:acme", "lcr"), "is a carrier's buy deck")
