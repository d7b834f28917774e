"""The buy side of stored calls (DESIGN §10, issue 17): ``cdrs show`` names the carrier and the
margin, ``cdrs margin --by carrier|destination|account|day`` adds them up to the micro-unit,
``rerate --carrier`` prices the cost side again with a corrected buy deck (history kept)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select

from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.models import LedgerEntry, RatingDecision
from agent.cli.main import cli
from agent.core.cdr import CallRecord
from tests.cdr_builders import make_record


def run(engine: Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def routed(n: int, carrier: str, buy_rate_micros: int, *, account_id: str = "alice", prefix: str = "49",
           duration_ms: int = 61_000, day: int = 0) -> CallRecord:
    """Call ``n`` to ``prefix`` sold at 0.12/min per second (61 s: 0.122), bought from ``carrier`` 60/60."""
    record = make_record(n, account_id=account_id, prefix=prefix, destination=f"{prefix}30123456",
                         duration_ms=duration_ms, started_ms=1_767_225_600_000 + day * 86_400_000 + n * 60_000)
    seconds = -(-duration_ms // 1000)
    buy_seconds = -(-seconds // 60) * 60
    buy_cost = -(-buy_rate_micros * buy_seconds // 60)
    sold = record.rating.cost_micros
    rating = replace(record.rating, plan_currency="EUR", currency="EUR", plan_cost_micros=sold, carrier=carrier,
                     buy_rate_id=500 + n, buy_prefix=prefix, buy_rate_micros=buy_rate_micros,
                     buy_billed_seconds=buy_seconds, buy_cost_micros=buy_cost, margin_micros=sold - buy_cost)
    return replace(record, rating=rating)


@pytest.fixture
def wholesale(engine: Engine) -> Engine:
    records = [
        routed(0, "acme", 60_000),  # 61 s sold 0.122000, bought 120 s at 0.06: 0.120000, margin 0.002000
        routed(1, "acme", 60_000, account_id="bob", prefix="44"),
        routed(2, "globex", 90_000, day=1),  # 0.180000 bought: margin -0.058000
        make_record(3),  # not routed: in no wholesale figure
    ]
    assert SqlCdrStore(engine).write(records).written == 4
    return engine


def test_cdrs_show_names_the_carrier_its_cost_and_the_margin(wholesale: Engine) -> None:
    data = json.loads(ok(run(wholesale, "cdrs", "show", "call-000000", "--json")))
    assert data["rating"]["route"] == {"carrier": "acme", "buy_prefix": "49", "buy_rate_per_minute": "0.060000",
                                       "buy_billed_seconds": 120, "buy_cost": "0.120000", "margin": "0.002000"}
    assert json.loads(ok(run(wholesale, "cdrs", "show", "call-000003", "--json")))["rating"]["route"] is None
    text = ok(run(wholesale, "cdrs", "show", "call-000002"))
    assert "carried by globex: buys 49 at 0.090000/min, billed 120s, cost 0.180000, margin -0.058000 EUR" in text


@pytest.mark.parametrize("by, expected", [
    ("carrier", [("acme", 2, "0.244000", "0.240000", "0.004000"), ("globex", 1, "0.122000", "0.180000", "-0.058000")]),
    ("destination", [("44", 1, "0.122000", "0.120000", "0.002000"), ("49", 2, "0.244000", "0.300000", "-0.056000")]),
    ("account", [("alice", 2, "0.244000", "0.300000", "-0.056000"), ("bob", 1, "0.122000", "0.120000", "0.002000")]),
    ("day", [("2026-01-01", 2, "0.244000", "0.240000", "0.004000"),
             ("2026-01-02", 1, "0.122000", "0.180000", "-0.058000")]),
])
def test_cdrs_margin_adds_up_routed_calls_to_the_micro_unit(wholesale: Engine, by: str,
                                                            expected: list[tuple[Any, ...]]) -> None:
    rows = json.loads(ok(run(wholesale, "cdrs", "margin", "--by", by, "--json")))
    assert [(r[by], r["calls"], r["revenue"], r["cost"], r["margin"]) for r in rows] == expected
    assert all(r["currency"] == "EUR" for r in rows)
    text = ok(run(wholesale, "cdrs", "margin", "--by", by))
    assert expected[0][0] in text and expected[-1][4] + " EUR" in text
    since = json.loads(ok(run(wholesale, "cdrs", "margin", "--by", by, "--since", "2026-01-02", "--json")))
    assert sum(r["calls"] for r in since) == 1


def test_a_corrected_buy_deck_rerates_the_cost_side_only(wholesale: Engine, tmp_path: Path) -> None:
    ok(run(wholesale, "carriers", "create", "acme", "--trunk", "PJSIP/acme"))
    deck = tmp_path / "acme.csv"
    deck.write_text("prefix,destination,rate,connect_fee,initial_increment,increment\n"
                    "49,Germany,0.030,0,1,1\n44,UK,0.060,0,60,60\n")
    ok(run(wholesale, "rates", "import", str(deck), "--carrier", "acme"))
    with wholesale.connect() as conn:
        ledger_before = conn.execute(select(LedgerEntry.id)).all()

    dry = json.loads(ok(run(wholesale, "rerate", "--carrier", "acme", "--since", "2026-01-01", "--dry-run",
                            "--json")))
    assert (dry["carrier"], dry["side"], dry["calls_checked"], dry["calls_changed"]) == ("acme", "buy", 2, 1)
    (change,) = dry["changes"]  # call 0: 61 s at 0.03 per second: 0.030500; call 1 (44, 60/60) is unchanged
    assert (change["call_id"], change["old_buy_cost"], change["new_buy_cost"], change["margin"]) == (
        "call-000000", "0.120000", "0.030500", "0.091500")
    assert change["old_cost"] == change["new_cost"] == "0.122000"

    applied = json.loads(ok(run(wholesale, "rerate", "--carrier", "acme", "--since", "2026-01-01", "--json")))
    assert applied["calls_applied"] == 1
    again = json.loads(ok(run(wholesale, "rerate", "--carrier", "acme", "--since", "2026-01-01", "--json")))
    assert again["calls_changed"] == 0  # run twice: nothing more
    with wholesale.connect() as conn:
        history = conn.execute(select(RatingDecision.seq, RatingDecision.cost_micros, RatingDecision.buy_cost_micros,
                                      RatingDecision.margin_micros, RatingDecision.buy_billed_seconds)
                               .where(RatingDecision.call_id == "call-000000").order_by(RatingDecision.seq)).all()
        assert conn.execute(select(LedgerEntry.id)).all() == ledger_before  # the customer paid what it paid
    assert [tuple(h) for h in history] == [(1, 122_000, 120_000, 2_000, 120), (2, 122_000, 30_500, 91_500, 61)]
    rows = json.loads(ok(run(wholesale, "cdrs", "margin", "--by", "carrier", "--json")))
    assert rows[0]["cost"] == "0.150500"  # the latest decision counts

    refused = run(wholesale, "rerate", "--since", "2026-01-01")
    assert refused.exit_code != 0 and "--plan" in refused.output and "--carrier" in refused.output


def test_exports_carry_the_carrier_its_cost_and_the_margin(wholesale: Engine, tmp_path: Path) -> None:
    import csv

    listed = [json.loads(line) for line in ok(run(wholesale, "cdrs", "list", "--jsonl")).splitlines() if line]
    rows = {row["call_id"]: row for row in listed}
    assert rows["call-000000"]["rating"]["route"] == json.loads(
        ok(run(wholesale, "cdrs", "show", "call-000000", "--json")))["rating"]["route"]
    assert rows["call-000003"]["rating"]["route"] is None
    out = tmp_path / "cdrs.csv"
    ok(run(wholesale, "cdrs", "export", "--output", str(out)))  # the server's COPY on PostgreSQL
    table = {r["call_id"]: (r["carrier"], r["buy_cost"], r["margin"]) for r in csv.DictReader(out.open())}
    assert table == {"call-000000": ("acme", "0.120000", "0.002000"), "call-000001": ("acme", "0.120000", "0.002000"),
                     "call-000002": ("globex", "0.180000", "-0.058000"), "call-000003": ("", "", "")}
