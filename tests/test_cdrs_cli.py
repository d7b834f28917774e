"""``billing-agent cdrs``: list/show/export with filters, CSV and JSON lines, reconcile, replay."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine

from agent.adapters.cdr.spool import Spool
from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.models import Rate, RatePlan, RatingDecision
from agent.cli.main import cli
from agent.core.cdr import CallRecord
from agent.services.cdr_pipeline import encode_record
from tests.cdr_builders import T0, call_ids, make_record


def run(engine: Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def jsonl(result: Result) -> list[dict[str, object]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line]


@pytest.fixture
def calls(engine: Engine) -> Engine:
    """Eight calls: two accounts, two nodes, three destinations, answered and not."""
    records = [
        make_record(0, account_id="alice", destination="493012345"),
        make_record(1, account_id="alice", destination="4989555", node="node2"),
        make_record(2, account_id="bob", destination="441234567"),
        make_record(3, account_id="alice", destination="493099999", answered=False),
        make_record(4, account_id="bob", destination="4930_777", node="node2"),
        make_record(5, account_id="alice", destination="441200000"),
        make_record(6, account_id="bob", destination="493011111", answered=False),
        make_record(7, account_id="alice", destination="4930%", duration_ms=1_500),
    ]
    assert SqlCdrStore(engine).write(records).written == 8
    return engine


def test_list_filters_combine(calls: Engine) -> None:
    def ids(*args: str) -> list[object]:
        return [row["call_id"] for row in jsonl(run(calls, "cdrs", "list", "--jsonl", *args))]

    assert ids() == [f"call-00000{i}" for i in range(8)]  # start order
    assert ids("--account", "alice") == ["call-000000", "call-000001", "call-000003", "call-000005", "call-000007"]
    assert ids("--since", "2026-01-01T00:02:00Z", "--until", "2026-01-01T00:05:00Z") == [
        "call-000002", "call-000003", "call-000004"]
    assert ids("--since", "2026-01-01T01:03:00+01:00", "--until", "2026-01-01T00:04:00") == ["call-000003"]
    assert ids("--destination", "4930") == ["call-000000", "call-000003", "call-000004", "call-000006",
                                            "call-000007"]
    assert ids("--destination", "4930_") == ["call-000004"]  # a literal "_", not a wildcard
    assert ids("--destination", "4930%") == ["call-000007"]
    assert ids("--disposition", "no_answer") == ["call-000003", "call-000006"]
    assert ids("--node", "node2", "--account", "bob") == ["call-000004"]
    assert ids("--limit", "2") == ["call-000000", "call-000001"]


def test_each_cdr_carries_its_legs_and_current_rating(calls: Engine) -> None:
    row = jsonl(run(calls, "cdrs", "list", "--jsonl", "--account", "bob", "--limit", "1"))[0]
    assert row["started_at"] == "2026-01-01T00:02:00.000Z"
    assert row["rating"] == {"seq": 1, "plan": "retail", "rate_id": 1, "prefix": "49",
                             "rate_per_minute": "0.120000", "billed_seconds": 61, "cost": "0.122000",
                             "decided_at": "2026-01-01T00:03:06.003Z", "reason": "settle", "currency": None,
                             "plan_currency": None, "plan_cost": None, "fx_rate": None, "route": None}
    legs = row["legs"]
    assert isinstance(legs, list)
    assert [(leg["direction"], leg["billed"], leg["billsec"]) for leg in legs] == [("inbound", False, 66),
                                                                                 ("outbound", True, 61)]
    as_json = json.loads(run(calls, "cdrs", "list", "--json", "--account", "bob", "--limit", "1").stdout)
    assert as_json == [row]
    shown = json.loads(run(calls, "cdrs", "show", "call-000002", "--json").stdout)
    assert shown.pop("rating_history") == [row["rating"]]
    assert shown.pop("levels") == []  # a direct customer's call: no reseller level above it
    assert shown == row  # the export path (timestamps formatted by SQL) and show agree


def test_list_csv_has_a_header_and_one_row_per_call(calls: Engine) -> None:
    result = run(calls, "cdrs", "list", "--csv", "--disposition", "ANSWERED")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["call_id"] for r in rows] == ["call-000000", "call-000001", "call-000002", "call-000004",
                                            "call-000005", "call-000007"]
    last = rows[-1]
    assert (last["destination"], last["cost"], last["billed_seconds"], last["pbx_billsec"]) == (
        "4930%", "0.004000", "2", "2")
    assert (last["leg_count"], last["a_leg"], last["b_leg"], last["b_peer"], last["b_answered_at"]) == (
        "2", "call-000007.a", "call-000007.b", "carrier", "2026-01-01T00:07:05.000Z")
    with_legs = run(calls, "cdrs", "list", "--csv", "--legs", "--limit", "1")
    first = next(csv.DictReader(io.StringIO(with_legs.stdout)))
    assert [leg["pbx_unique_id"] for leg in json.loads(first["legs"])] == ["call-000000.a", "call-000000.b"]


def test_list_table_for_people(calls: Engine) -> None:
    result = run(calls, "cdrs", "list", "--account", "bob")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "disposition" in lines[0] and len(lines) == 4
    assert "call-000002" in lines[1] and "0.122000" in lines[1]


def test_show_gives_the_legs_and_the_whole_rating_history(calls: Engine) -> None:
    with transaction(session_factory(calls)) as session:
        session.add(RatingDecision(call_id="call-000002", seq=2, plan_name="retail", prefix="44", rate_micros=60_000,
                                   billed_seconds=61, cost_micros=61_000, reason="rerate",
                                   decided_at=datetime(2026, 2, 1, tzinfo=UTC)))
    data = json.loads(run(calls, "cdrs", "show", "call-000002", "--json").stdout)
    assert data["rating"]["seq"] == 2 and data["rating"]["cost"] == "0.061000"
    assert [d["seq"] for d in data["rating_history"]] == [1, 2]
    assert len(data["legs"]) == 2
    text = run(calls, "cdrs", "show", "call-000002").stdout
    assert "#2 2026-02-01T00:00:00.000Z" in text and "<- current" in text and "(billed)" in text


def test_show_an_unknown_call_fails_with_its_name(sqlite_engine: Engine) -> None:
    result = run(sqlite_engine, "cdrs", "show", "nope")
    assert result.exit_code == 1
    assert "unknown call 'nope'" in result.stderr


def test_a_bad_instant_names_the_option(sqlite_engine: Engine) -> None:
    result = run(sqlite_engine, "cdrs", "list", "--since", "yesterday")
    assert result.exit_code == 2
    assert "--since 'yesterday' is not an ISO 8601" in result.stderr


def test_export_streams_csv_to_a_file_and_json_lines_to_stdout(calls: Engine, tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    result = run(calls, "cdrs", "export", "--account", "alice", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert "exported 5 calls" in result.stderr
    assert [r["call_id"] for r in csv.DictReader(target.open())] == [
        "call-000000", "call-000001", "call-000003", "call-000005", "call-000007"]
    rows = jsonl(run(calls, "cdrs", "export", "--format", "jsonl", "--destination", "44"))
    assert [r["call_id"] for r in rows] == ["call-000002", "call-000005"]


def test_export_streams_in_small_fetches_and_keeps_every_call_in_order(sqlite_engine: Engine) -> None:
    from agent.adapters.cdr.export import iter_flat
    from agent.adapters.cdr.query import CdrFilter

    SqlCdrStore(sqlite_engine).write([make_record(i) for i in range(25)])
    cdrs = list(iter_flat(sqlite_engine, CdrFilter(), fetch=4))
    assert [c.call_id for c in cdrs] == call_ids(sqlite_engine)
    assert all(len(c.legs) == 2 and c.decision is not None for c in cdrs)


def _plan_with_rates(engine: Engine) -> dict[str, int]:
    """Rate ids of a per-second rate, a 60/60 rate and a rate with a 30-second minimum."""
    with transaction(session_factory(engine)) as session:
        plan = RatePlan(name="retail", currency="EUR")
        session.add(plan)
        session.flush()
        ids = {}
        for prefix, initial, increment, minimum in (("49", 1, 1, 0), ("44", 60, 60, 0), ("39", 1, 1, 30)):
            rate = Rate(plan_id=plan.id, prefix=prefix, rate_micros=60_000, initial_increment=initial,
                        increment=increment, minimum_seconds=minimum, effective_from=datetime(1970, 1, 1, tzinfo=UTC))
            session.add(rate)
            session.flush()
            ids[prefix] = rate.id
    return ids


def test_reconcile_flags_charges_beyond_one_increment_of_the_pbx_seconds(engine: Engine) -> None:
    ids = _plan_with_rates(engine)
    SqlCdrStore(engine).write([
        make_record(0, rate_id=ids["49"], billsec=60),  # 61 charged, PBX 60: one second, normal
        make_record(1, rate_id=ids["49"], billsec=50),  # 61 charged, PBX 50: overcharged
        make_record(2, rate_id=ids["44"], billsec=59, billed_seconds=60, destination="4412"),  # 60/60 block
        make_record(3, rate_id=ids["44"], billsec=130, billed_seconds=60, destination="4412"),  # undercharged
        make_record(4, rate_id=999_999, billsec=61),  # its rate is gone: 1-second increments
        make_record(5, answered=False),
        make_record(6, rate_id=ids["39"], duration_ms=9_500, billsec=10, destination="3906"),  # minimum 30 s
    ])
    result = run(engine, "cdrs", "reconcile", "--since", "2026-01-01", "--json")
    assert result.exit_code == 1  # something is flagged
    data = json.loads(result.stdout)
    assert data["summary"] == {"checked": 7, "flagged": 2, "pbx_seconds": 60 + 50 + 59 + 130 + 61 + 10,
                               "charged_seconds": 61 + 61 + 60 + 60 + 61 + 30,
                               "by_status": {"ok": 5, "overcharged": 1, "undercharged": 1}}
    flagged = {c["call_id"]: (c["status"], c["difference"], c["increment"]) for c in data["calls"]}
    assert flagged == {"call-000001": ("overcharged", 11, 1), "call-000003": ("undercharged", -120, 60)}
    clean = run(engine, "cdrs", "reconcile", "--since", "2026-01-01", "--until", "2026-01-01T00:01:00Z")
    assert clean.exit_code == 0 and "checked 1 calls: 0 flagged" in clean.stdout


def test_replay_writes_a_stopped_agents_spool_once(sqlite_engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = Spool(folder, max_bytes=1 << 20)
    for i in range(12):
        spool.append(encode_record(make_record(i)))
    spool.append(b"not a call")
    spool.close()
    result = run(sqlite_engine, "cdrs", "replay", "--spool-dir", str(folder), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["written"], report["quarantined"], report["backlog_bytes"]) == (12, 1, 0)
    assert len(call_ids(sqlite_engine)) == 12
    again = run(sqlite_engine, "cdrs", "replay", "--spool-dir", str(folder))
    assert again.exit_code == 0 and "0 CDRs written" in again.stdout
    quarantined = run(sqlite_engine, "cdrs", "quarantine")
    assert "undecodable spool entry" in quarantined.stdout


def test_replay_refuses_a_spool_a_running_agent_owns(sqlite_engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    owner = Spool(folder, max_bytes=1 << 20)
    result = run(sqlite_engine, "cdrs", "replay", "--spool-dir", str(folder))
    assert result.exit_code == 1
    assert "in use by process" in result.stderr
    owner.close()


def test_replay_with_the_database_away_keeps_the_spool(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = Spool(folder, max_bytes=1 << 20)
    spool.append(encode_record(make_record(T0 % 7)))
    spool.close()
    url = "postgresql://nobody@127.0.0.1:1/none"
    result = CliRunner().invoke(cli, ["--database-url", url, "cdrs", "replay", "--spool-dir", str(folder)])
    assert result.exit_code == 1
    assert "database" in result.stderr
    assert list(folder.glob("seg-*.cdr"))


def _awkward_calls() -> list[CallRecord]:
    """Forks, a call without legs, a refund-sized cost, texts that CSV must quote."""
    fork = make_record(1, account_id="bob, \"the builder\"", destination="4930\n777")
    b1, b2 = (replace(fork.legs[1], pbx_unique_id=f"b{i}", billed=False, billsec=s, peer="p,eer")
              for i, s in ((1, 40), (2, 40)))
    forked_unbilled = replace(fork, legs=(fork.legs[0], b1, b2))  # two equal outbound legs: the first
    three = make_record(2)
    late_billed = replace(three.legs[1], pbx_unique_id="zz", created_ms=three.started_ms + 500, billsec=3,
                          billed=True)
    unbilled = replace(three.legs[1], billed=False, billsec=99)
    two_inbound = replace(three.legs[0], pbx_unique_id="a0", created_ms=three.started_ms - 1)
    return [
        make_record(0, hangup_cause="", caller=""),
        forked_unbilled,
        replace(three, legs=(three.legs[0], two_inbound, unbilled, late_billed)),
        replace(make_record(3), legs=()),
        make_record(4, cost_micros=-1_500_000, answered=False, node="node2"),
        make_record(5, destination="44\"1"),
        make_record(6, caller="=HYPERLINK(\"http://x\")", destination="+4930", account_id="@acct"),
    ]


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_postgresql_writes_the_same_csv_itself(engine: Engine, tmp_path: Path) -> None:
    """On PostgreSQL `cdrs export` lets the server format the CSV (COPY ... TO STDOUT): byte for
    byte what the Python writer makes, with every filter."""
    from agent.adapters.cdr.export import copy_csv, iter_flat
    from agent.adapters.cdr.query import CdrFilter
    from agent.cli.cdrs import write_csv

    SqlCdrStore(engine).write(_awkward_calls())
    with transaction(session_factory(engine)) as session:
        session.add(RatingDecision(call_id="call-000002", seq=2, plan_name="retail", prefix="4", rate_micros=1,
                                   billed_seconds=1, cost_micros=7, reason="rerate, \"again\"",
                                   decided_at=datetime(2026, 2, 1, tzinfo=UTC)))
    filters = [CdrFilter(), CdrFilter(account_id="bob, \"the builder\""), CdrFilter(destination_prefix="4930\n"),
               CdrFilter(destination_prefix="44\""), CdrFilter(node="node2", disposition="NO ANSWER"),
               CdrFilter(since=datetime(2026, 1, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
                         until=datetime(2026, 1, 1, 0, 4, tzinfo=UTC))]
    for where in filters:
        server = io.BytesIO()
        count = copy_csv(engine, where, server)
        local = io.StringIO()
        assert write_csv(iter_flat(engine, where), local) == count
        assert server.getvalue().decode() == local.getvalue(), where
    assert count == 3  # the time range: calls 1, 2 and 3 (the offset is honoured)
    target = tmp_path / "all.csv"
    result = run(engine, "cdrs", "export", "-o", str(target))
    assert result.exit_code == 0 and "exported 7 calls" in result.stderr
    rows = list(csv.DictReader(target.open(newline="")))
    assert [(r["rating_seq"], r["leg_count"]) for r in rows] == [("1", "2"), ("1", "3"), ("2", "4"), ("1", "0"),
                                                                 ("1", "2"), ("1", "2"), ("1", "2")]
    assert (rows[6]["caller"], rows[6]["destination"], rows[6]["account_id"]) == (
        "'=HYPERLINK(\"http://x\")", "'+4930", "'@acct")
    assert (rows[1]["b_leg"], rows[2]["a_leg"], rows[2]["b_leg"], rows[4]["cost"]) == ("b1", "a0", "zz",
                                                                                       "-1.500000")


@pytest.mark.filterwarnings("ignore:Previous unbuffered result")  # PyMySQL, leaving a stream early
def test_the_stream_folds_calls_across_fetches_and_can_be_left_early(engine: Engine) -> None:
    """Small fetches (a call's rows split between two) on every backend, the current decision
    is the highest seq, and leaving the stream early frees its connection (no hang, no leak)."""
    from agent.adapters.cdr.export import iter_flat
    from agent.adapters.cdr.query import CdrFilter

    SqlCdrStore(engine).write([make_record(i) for i in range(25)])
    with transaction(session_factory(engine)) as session:
        for seq in (2, 3):
            session.add(RatingDecision(call_id="call-000007", seq=seq, plan_name="retail", prefix="4",
                                       rate_micros=1, billed_seconds=1, cost_micros=seq, reason="rerate",
                                       decided_at=datetime(2026, 2, seq, tzinfo=UTC)))
    cdrs = list(iter_flat(engine, CdrFilter(), fetch=3))
    assert [c.call_id for c in cdrs] == call_ids(engine)
    assert all(len(c.legs) == 2 for c in cdrs)
    assert [c.decision[0] if c.decision else None for c in cdrs].count(1) == 24
    assert cdrs[7].decision is not None and cdrs[7].decision[0] == 3
    for _ in range(3):
        stream = iter_flat(engine, CdrFilter(), fetch=2)
        assert next(stream).call_id == "call-000000"
        stream.close()
    assert engine.pool.checkedout() == 0


def test_csv_cells_a_spreadsheet_would_evaluate_are_made_inert(engine: Engine) -> None:
    """A caller ID is whatever the calling party sent: ``=``, ``+``, ``-``, ``@``, tab or CR at
    the start of a text cell gets a leading quote (OWASP CSV injection); amounts stay numbers."""
    SqlCdrStore(engine).write([make_record(0, caller="=cmd|' /C calc'!A0", destination="-2+3",
                                           account_id="\tacct", cost_micros=-1_500_000)])
    for args in (("cdrs", "list", "--csv"), ("cdrs", "export")):
        result = run(engine, *args)
        (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
        assert (row["caller"], row["destination"], row["account_id"]) == ("'=cmd|' /C calc'!A0", "'-2+3", "'\tacct")
        assert row["cost"] == "-1.500000"  # a negative amount is a number, not a formula


def test_a_reversed_range_is_an_error_not_an_empty_answer(calls: Engine) -> None:
    for args in (("cdrs", "list"), ("cdrs", "export"), ("rerate", "--plan", "retail")):
        result = run(calls, *args, "--since", "2026-02-01T00:00:00Z", "--until", "2026-01-01T00:00:00Z")
        assert result.exit_code == 1, args
        assert "--until 2026-01-01T00:00:00+00:00 is not after --since 2026-02-01T00:00:00+00:00" in result.stderr


def test_a_read_command_on_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agent.cli.main import cli

    missing = tmp_path / "nothing-here.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{missing}", "accounts", "list"])
    assert result.exit_code != 0 and "run `billing-agent db upgrade` first" in result.stderr
    assert not missing.exists()
