"""The daemon with fraud.rules_file, as an admin runs it (fake FreeSWITCH, real event-socket bytes,
SQLite): parallel calls to a high-risk group suspend the account and cut its calls; the rules are
re-read on SIGHUP (a broken file keeps the running rules); a broken file stops the start."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from click.testing import CliRunner

from agent.cli.demo import demo_config, free_port, prepare_database
from agent.cli.main import cli
from agent.config import FraudConfig
from agent.daemon import Daemon, StartupError
from agent.sim.freeswitch import FakeFreeswitch
from tests.test_fraud_webhook import Receiver

RULES = """
groups:
  risky: {prefixes: ["336"]}
rules:
  - {name: irsf_parallel, kind: live_calls, group: risky, threshold: 2, action: suspend}
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()
    r.server.shutdown()
    r.server.server_close()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    with gevent.Timeout(timeout):
        while not predicate():  # type: ignore[operator]
            gevent.sleep(0.02)


@pytest.fixture
def fake_fs() -> Iterator[FakeFreeswitch]:
    fake = FakeFreeswitch(port=0, heartbeat_s=1.0, authorize_port=free_port()).start()
    yield fake
    fake.stop()


def fraud_daemon(tmp_path: Path, fake_fs: FakeFreeswitch, rules: str, webhook_url: str = "") -> Daemon:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    config = demo_config(tmp_path, "freeswitch", fake_fs.authorize_port, fake_fs.port)
    return Daemon(dataclasses.replace(config, fraud=FraudConfig(rules_file=str(path), webhook_url=webhook_url,
                                                                webhook_secret="k" if webhook_url else "")))


def test_parallel_calls_to_a_risky_group_suspend_the_account_and_cut_its_calls(
        tmp_path: Path, fake_fs: FakeFreeswitch, receiver: Receiver) -> None:
    daemon = fraud_daemon(tmp_path, fake_fs, RULES, webhook_url=receiver.url)
    daemon.start()
    try:
        wait_for(lambda: all(a.connected() for a in daemon.adapters))
        calls = [fake_fs.place_call("alice", f"3361234567{n}", answer_after_ms=50, talk_ms=60_000) for n in range(4)]
        for call in calls:
            assert call.done.wait(15), call
        outcomes = sorted(call.outcome for call in calls)
        assert outcomes.count("denied") == 2, outcomes  # the third and the fourth; the two live ones were cut
        assert all(call.talk_us < 5_000_000 for call in calls)
        url = ["--database-url", daemon.config.database.url]
        wait_for(lambda: json.loads(CliRunner().invoke(cli, [*url, "alerts", "list", "--json"]).output))
        (alert,) = json.loads(CliRunner().invoke(cli, [*url, "alerts", "list", "--json"]).output)
        assert (alert["account"], alert["rule"], alert["figure"], alert["action"]) == (
            "alice", "irsf_parallel", 3, "suspend")
        shown = json.loads(CliRunner().invoke(cli, [*url, "accounts", "show", "alice", "--json"]).output)
        assert shown["status"] == "suspended" and shown["suspended_by_rule"] == "irsf_parallel"
        wait_for(lambda: receiver.received)  # the webhook got it too, signed
        (headers, body), = receiver.received
        assert json.loads(body)["rule"] == "irsf_parallel" and headers["X-Billing-Signature"].startswith("sha256=")

        # SIGHUP: a broken file keeps the running rules; a good one replaces them.
        path = Path(daemon.config.fraud.rules_file)
        path.write_text("rules:\n  - {name: x, kind: nope, threshold: 1, action: alert}\n")
        assert not daemon.reload_fraud_rules()
        assert daemon.fraud is not None and daemon.fraud.rules.rules[0].name == "irsf_parallel"
        path.write_text("rules:\n  - {name: all_denied, kind: new_calls, window_s: 60, threshold: 0, action: deny}\n")
        daemon.reload()
        bob = fake_fs.place_call("bob", "33142685300", talk_ms=1_000)
        assert bob.done.wait(10) and bob.outcome == "denied"
    finally:
        daemon.shutdown()


def test_a_broken_rules_file_stops_the_start_naming_the_key_and_line(tmp_path: Path, fake_fs: FakeFreeswitch) -> None:
    daemon = fraud_daemon(tmp_path, fake_fs, "rules:\n  - {name: x, kind: live_calls, threshold: -1, action: alert}\n")
    with pytest.raises(StartupError, match=r"fraud.rules_file: .*rules.yaml:2: key threshold: -1 must not be negative"):
        daemon.start()
    daemon.shutdown()
