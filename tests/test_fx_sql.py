"""FX rates in SQL on SQLite, PostgreSQL and MariaDB (DESIGN §11): ``fx set|import|list``, the
cached look-ups of the authorization, the rating decision's currencies and rate through the CDR
writer and ``cdrs``, re-rating at the rate of the call's start, quotes for an account."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select

from agent.adapters.sql.account_plans import AccountPlan, AccountPlans
from agent.adapters.sql.accounts import create_account, post_entry, view_account
from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.fx_rates import FxBook
from agent.adapters.sql.models import FxRateRow, RatingDecision
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.rate_repository import RatePlanCache
from agent.cli.main import cli
from agent.core.events import DenyReason
from agent.core.fx import Conversion
from agent.core.session import RatingRefused
from agent.services.rater import PlanRater
from tests.cdr_builders import T0, make_record

UNIT = 1_000_000
DECK = "prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace\n49,Germany,0.12,0,1,1,0,0\n"


def run(engine: Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_fx_set_list_and_the_bad_rates_it_refuses(engine: Engine) -> None:
    assert "USD/EUR = 0.92 from 2026-01-01T00:00:00+00:00" in ok(run(engine, "fx", "set", "usd", "eur", "0.92",
                                                                     "--from", "2026-01-01"))
    ok(run(engine, "fx", "set", "USD", "EUR", "0.9250000001", "--from", "2026-02-01T00:00:00+01:00"))
    ok(run(engine, "fx", "set", "USD", "EUR", "0.92", "--from", "2026-01-01"))  # the same again: harmless
    listed = json.loads(ok(run(engine, "fx", "list", "--json")))
    assert [(r["base"], r["quote"], r["rate"], r["effective_from"]) for r in listed] == [
        ("USD", "EUR", "0.92", "2026-01-01T00:00:00+00:00"),
        ("USD", "EUR", "0.9250000001", "2026-01-31T23:00:00+00:00")]
    for args, reason in [
        (("USD", "EUR", "0"), "rate '0' must be greater than zero"),
        (("USD", "EUR", "--", "-0.5"), "must be greater than zero"),
        (("USD", "EUR", "0.12345678901"), "more than 10 decimals"),
        (("USD", "EUO", "1.1"), "quote currency 'EUO' is not an active ISO 4217"),
        (("EUR", "EUR", "1"), "base and quote are both EUR"),
        (("USD", "EUR", "0.93", "--from", "2026-01-01"), "is already 0.92, not 0.93"),
    ]:
        result = run(engine, "fx", "set", *args)
        assert result.exit_code != 0 and reason in result.output, (args, result.output)
    with engine.connect() as conn:
        assert len(conn.execute(select(FxRateRow.id)).all()) == 2


def test_fx_import_is_all_or_nothing_and_names_each_line_and_column(engine: Engine, tmp_path: Path) -> None:
    bad = tmp_path / "rates.csv"
    bad.write_text("base,quote,rate,effective_from\nGBP,EUR,1.17,2026-01-01\nGBP,XYZ,1,2026-01-01\n"
                   "USD,EUR,-1,2026-01-01\nJPY,JPY,1,2026-01-01\nUSD,GBP,0.79,soon\nGBP,EUR,1.18,2026-01-01\n")
    result = run(engine, "fx", "import", str(bad))
    assert result.exit_code == 1
    for expected in (f"{bad}:3: column quote:", f"{bad}:4: column rate:", f"{bad}:5: column quote:",
                     f"{bad}:6: column effective_from:", f"{bad}:7: GBP/EUR from 2026-01-01 is already on line 2",
                     "5 errors, nothing imported"):
        assert expected in result.output, result.output
    assert json.loads(ok(run(engine, "fx", "list", "--json"))) == []
    good = tmp_path / "good.csv"
    good.write_text("base,quote,rate,effective_from\nGBP,EUR,1.17,2026-01-01\nEUR,JPY,160.5,2026-01-01T00:00:00Z\n")
    assert "imported 2 FX rates" in ok(run(engine, "fx", "import", str(good)))
    assert "imported 0 FX rates from" in ok(run(engine, "fx", "import", str(good)))  # a replay changes nothing
    assert "EUR/JPY" in ok(run(engine, "fx", "list")) and len(json.loads(ok(run(engine, "fx", "list", "--json")))) == 2


@pytest.fixture
def usd_world(engine: Engine, tmp_path: Path) -> Engine:
    """Plan usd (0.12 USD/min to 49), account eve paying in EUR, bob in USD; USD/EUR 0.9 from T0."""
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        create_plan(session, "usd", currency="USD")
        create_account(session, "eve", plan="usd", currency="EUR", balance_micros=10 * UNIT)
        create_account(session, "bob", plan="usd", balance_micros=10 * UNIT)
    deck = tmp_path / "deck.csv"
    deck.write_text(DECK)
    ok(run(engine, "rates", "import", str(deck), "--plan", "usd"))
    ok(run(engine, "fx", "set", "USD", "EUR", "0.9", "--from", "2026-01-01"))
    return engine


def test_the_authorization_reads_converts_and_refuses_through_the_cached_lookups(usd_world: Engine) -> None:
    now = [T0]
    plans = AccountPlans(usd_world, lambda: now[0])
    fx = FxBook(usd_world, lambda: now[0])
    assert plans.rating_of("eve") == AccountPlan("usd", "USD", "EUR") and plans.plan_of("eve") == "usd"
    rater = PlanRater(plans.rating_of, RatePlanCache(usd_world), fx_of=fx.conversion)
    rated = rater.rate("eve", "4930123", T0 + 1)
    assert rated.tariff.cost_micros(61_000) == 109_800  # 0.122 USD at 0.9
    assert (rated.info.plan_currency, rated.info.currency, rated.info.fx_rate_e10) == ("USD", "EUR", 9_000_000_000)
    assert rater.rate("bob", "4930123", T0 + 1).info.fx_rate_e10 is None
    with pytest.raises(RatingRefused) as refused:
        rater.rate("eve", "4930123", T0 - 1)  # before the first rate
    assert refused.value.reason is DenyReason.NO_FX_RATE and "no FX rate USD->EUR" in refused.value.detail
    # Only the inverse pair: its exact reciprocal (1 / 1.25 = 0.8).
    with transaction(session_factory(usd_world)) as session:
        create_plan(session, "gbp", currency="GBP")
        create_account(session, "gus", plan="gbp", currency="EUR")
    ok(run(usd_world, "fx", "set", "EUR", "GBP", "1.25", "--from", "2026-01-01"))
    conversion = FxBook(usd_world, lambda: now[0]).conversion("GBP", "EUR", T0)
    assert conversion == Conversion("GBP", "EUR", 12_500_000_000, True, T0)
    assert conversion is not None and conversion.charge(1_000_000) == 800_000


def test_the_decision_records_the_pair_the_rate_and_both_costs_and_cdrs_print_the_currency(
        usd_world: Engine) -> None:
    record = make_record(0, account_id="eve", cost_micros=109_800, plan_name="usd")
    record = replace(record, rating=replace(record.rating, plan_currency="USD", currency="EUR",
                                            fx_rate_e10=9_000_000_000, plan_cost_micros=122_000))
    assert SqlCdrStore(usd_world).write([record]).written == 1
    shown = json.loads(ok(run(usd_world, "cdrs", "show", "call-000000", "--json")))["rating"]
    assert (shown["cost"], shown["currency"], shown["plan_cost"], shown["plan_currency"], shown["fx_rate"]) == (
        "0.109800", "EUR", "0.122000", "USD", "0.9")
    assert "0.109800 EUR = 0.122000 USD at USD->EUR 0.9" in ok(run(usd_world, "cdrs", "show", "call-000000"))
    assert "0.109800 EUR" in ok(run(usd_world, "cdrs", "list"))
    listed = json.loads(ok(run(usd_world, "cdrs", "list", "--json")))
    assert listed[0]["rating"]["currency"] == "EUR" and listed[0]["rating"]["fx_rate"] == "0.9"
    csv_text = ok(run(usd_world, "cdrs", "list", "--csv"))
    header, row = csv_text.splitlines()[:2]
    assert header.endswith(",currency,plan_currency,plan_cost,fx_rate,carrier,buy_cost,margin")
    assert row.endswith(",EUR,USD,0.122000,0.9,,,")  # not routed: no carrier, buy cost nor margin
    inverse = replace(record, call_id="call-000001", rating=replace(record.rating, fx_rate_e10=11_000_000_000,
                                                                    fx_inverse=True))
    SqlCdrStore(usd_world).write([inverse, make_record(2, account_id="bob", plan_name="usd")])
    exported = ok(run(usd_world, "cdrs", "export", "--format", "csv"))  # PostgreSQL: the server writes it
    assert exported == ok(run(usd_world, "cdrs", "list", "--csv"))
    assert ",EUR,USD,0.122000,1/1.1,,,\n" in exported


def test_rerating_keeps_the_rate_of_the_calls_start(usd_world: Engine, tmp_path: Path) -> None:
    record = make_record(0, account_id="eve", cost_micros=109_800, plan_name="usd")
    record = replace(record, rating=replace(record.rating, plan_currency="USD", currency="EUR",
                                            fx_rate_e10=9_000_000_000, plan_cost_micros=122_000))
    SqlCdrStore(usd_world).write([record])
    with transaction(session_factory(usd_world)) as session:
        post_entry(session, "eve", kind="charge", amount_micros=-109_800, reference="charge:call-000000",
                   call_id="call-000000")
    ok(run(usd_world, "fx", "set", "USD", "EUR", "0.5", "--from", "2026-01-01T00:00:30Z"))  # a later rate
    deck = tmp_path / "new.csv"
    deck.write_text(DECK.replace("0.12", "0.06"))
    ok(run(usd_world, "rates", "import", str(deck), "--plan", "usd", "--replace"))
    ok(run(usd_world, "rerate", "--plan", "usd", "--since", "2026-01-01"))
    with usd_world.connect() as conn:
        latest = conn.execute(select(RatingDecision.cost_micros, RatingDecision.plan_cost_micros,
                                     RatingDecision.fx_rate_e10, RatingDecision.currency)
                              .where(RatingDecision.seq == 2)).one()
    assert tuple(latest) == (54_900, 61_000, 9_000_000_000, "EUR")  # 0.061 USD at 0.9, not at 0.5
    with transaction(session_factory(usd_world)) as session:
        assert view_account(session, "eve").balance_micros == 10 * UNIT - 54_900


def test_quotes_and_account_figures_carry_the_accounts_currency(usd_world: Engine) -> None:
    shown = ok(run(usd_world, "accounts", "show", "eve"))
    assert "10.000000 EUR" in shown
    quote = json.loads(ok(run(usd_world, "rates", "quote", "--account", "eve", "4930123", "--seconds", "61",
                              "--at", "2026-01-02T00:00:00Z", "--json")))
    assert (quote["cost"], quote["currency"], quote["account_cost"], quote["account_currency"], quote["fx_rate"]) == (
        "0.122000", "USD", "0.109800", "EUR", "0.9")
    text = ok(run(usd_world, "rates", "quote", "--account", "eve", "4930123", "--budget", "0.109800",
                  "--at", "2026-01-02T00:00:00Z"))
    assert "max         61 s" in text and "0.109800 EUR" in text
    refused = run(usd_world, "rates", "quote", "--account", "eve", "4930123", "--seconds", "61",
                  "--at", "2025-12-31T00:00:00Z")
    assert refused.exit_code == 1 and "no FX rate USD->EUR" in refused.output
