"""Alerts through the daemon as an admin runs it (fake FreeSWITCH, SQLite): a low-balance alert
with no fraud rules file reaches the webhook at once and SQL after a restart when the database
was away when it was raised (the spool replayed); a CEL rule reads the hour in the timezone of the
account's plan."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from agent.adapters.sql.models import RatePlan
from agent.cli.demo import demo_config, free_port, prepare_database
from agent.cli.main import cli
from agent.config import FraudConfig
from agent.core.fraud import AlertRecord
from agent.daemon import Daemon
from agent.sim.freeswitch import FakeFreeswitch
from tests.test_fraud_daemon import wait_for
from tests.test_fraud_webhook import Receiver

ZONE = "Pacific/Kiritimati"  # UTC+14: its hour is never UTC's


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def fake_fs() -> Iterator[FakeFreeswitch]:
    fake = FakeFreeswitch(port=0, heartbeat_s=1.0, authorize_port=free_port()).start()
    yield fake
    fake.stop()


class Away:
    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        raise OSError("database away")


def cli_json(url: str, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_low_balance_alert_survives_a_restart_with_the_database_away_and_cel_reads_the_plan_s_hour(
        tmp_path: Path, fake_fs: FakeFreeswitch, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'billing-agent.db'}"
    sql = prepare_database(url, tmp_path)
    with sql.begin() as conn:
        conn.execute(update(RatePlan).values(timezone=ZONE))
    sql.dispose()
    assert CliRunner().invoke(cli, ["--database-url", url, "plans", "set-low-balance", "demo", "5.00"]).exit_code == 0
    now = datetime.now(UTC)
    hours = sorted({(now + timedelta(seconds=s)).astimezone(ZoneInfo(ZONE)).hour for s in (0, 120)})
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: local_hour, kind: new_calls, window_s: 60, threshold: 0, action: alert, "
                     f"when: '{' || '.join(f'hour == {h}' for h in hours)}'}}\n"
                     "  - {name: utc_hour, kind: new_calls, window_s: 60, threshold: 0, action: alert, "
                     f"when: 'hour == {now.hour}'}}\n")
    config = demo_config(tmp_path, "freeswitch", fake_fs.authorize_port, fake_fs.port)
    config = dataclasses.replace(config, fraud=FraudConfig(rules_file=str(rules), webhook_url=receiver.url,
                                                           webhook_secret="k"))
    first = Daemon(config)
    first.start()
    try:
        assert first.alerts is not None
        first.alerts.sink = Away()  # the database goes away for the alerts table
        wait_for(lambda: all(a.connected() for a in first.adapters))
        call = fake_fs.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=1_500)
        assert call.done.wait(15) and call.outcome == "answered", call.outcome
        wait_for(lambda: len(receiver.received) == 2)  # the webhook does not need the database
        bodies = sorted((json.loads(body) for _, body in receiver.received), key=lambda b: b["type"])
        assert [(b["type"], b["rule"]) for b in bodies] == [("balance_alert", "low_balance"),
                                                            ("fraud_alert", "local_hour")]
        low = bodies[0]
        assert low["account"] == "alice" and low["threshold"] == "5.000000"
        assert low["figure"] in ("4.980000", "4.970000")  # 2 s at 0.60/min (3 s on a very slow run)
        assert first.alerts.queued() == 2
    finally:
        first.shutdown()
    assert cli_json(url, "alerts", "list", "--json") == []  # not in SQL: in the spool

    second = Daemon(config)  # the next start, the database back: the spool is replayed
    second.start()
    try:
        wait_for(lambda: len(cli_json(url, "alerts", "list", "--json")) == 2)
        listed = sorted(cli_json(url, "alerts", "list", "--json"), key=lambda a: a["rule"])
        assert [(a["account"], a["rule"], a["figure"], a["threshold"], a["action"]) for a in listed] == [
            ("alice", "local_hour", 1, 0, "alert"), ("alice", "low_balance", low["figure"], "5.000000", "alert")]
        assert listed[1]["call_id"] == low["call_id"] and listed[1]["detail"] == f"available {low['figure']} < 5.000000"
        assert second.alerts is not None and second.alerts.queued() == 0
        shown = cli_json(url, "accounts", "show", "alice", "--json")
        assert (shown["low_balance"], shown["low_balance_source"]) == ("5.000000", "plan")
    finally:
        second.shutdown()
    assert len(receiver.received) == 2  # the webhook had them already: not sent again
    assert (tmp_path / "spool" / "alerts" / "sql.jsonl").stat().st_size == 0  # trimmed once in SQL


def test_without_a_rules_file_an_account_s_own_threshold_raises_its_alert(tmp_path: Path,
                                                                          fake_fs: FakeFreeswitch) -> None:
    url = f"sqlite:///{tmp_path / 'billing-agent.db'}"
    prepare_database(url, tmp_path).dispose()
    assert cli_json(url, "accounts", "set-low-balance", "alice", "4.995", "--json")["low_balance_source"] == "account"
    daemon = Daemon(demo_config(tmp_path, "freeswitch", fake_fs.authorize_port, fake_fs.port))
    daemon.start()
    try:
        assert daemon.fraud is None and daemon.alerts is not None
        wait_for(lambda: all(a.connected() for a in daemon.adapters))
        call = fake_fs.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=1_500)
        assert call.done.wait(15) and call.outcome == "answered", call.outcome
        wait_for(lambda: cli_json(url, "alerts", "list", "--json"))
        (got,) = cli_json(url, "alerts", "list", "--json")
        assert (got["account"], got["rule"], got["kind"], got["threshold"], got["node"]) == (
            "alice", "low_balance", "low_balance", "4.995000", "demo")
    finally:
        daemon.shutdown()
