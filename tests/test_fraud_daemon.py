"""The daemon with fraud.rules_file, as an admin runs it (fake FreeSWITCH, real event-socket bytes,
SQLite): parallel calls to a high-risk group suspend the account and cut its calls; the rules are
re-read on SIGHUP (a broken file keeps the running rules); a broken file stops the start."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from click.testing import CliRunner

from agent.adapters.sql.engine import make_engine
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


def test_an_attack_spread_over_two_nodes_is_seen_whole_and_cut_on_both(
        tmp_path: Path, postgres_url: str, redis_client: Any, redis_prefix: str) -> None:
    """PostgreSQL + Redis, two daemons (n1, n2) each with its own FreeSWITCH: 2 risky calls on n1,
    then 2 on n2. Node-local counters would see 2 each; the Redis counters see 4 > 3, n2 suspends
    the account and cuts its call, and n1 cuts its two on the Redis bus's message, long before its
    next look at SQL (publish_seconds is 5 s here)."""
    from tests.conftest import REDIS_URL, _fresh_schema

    sql = make_engine(postgres_url)
    _fresh_schema(sql)
    sql.dispose()
    prepare_database(postgres_url, tmp_path).dispose()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("threshold: 2", "threshold: 3"))
    fakes, daemons = [], []
    try:
        for node in ("n1", "n2"):
            fake = FakeFreeswitch(port=0, heartbeat_s=1.0, authorize_port=free_port()).start()
            fakes.append(fake)
            folder = tmp_path / node
            folder.mkdir()
            config = demo_config(folder, "freeswitch", fake.authorize_port, fake.port)
            config = dataclasses.replace(
                config, database=dataclasses.replace(config.database, url=postgres_url),
                redis=dataclasses.replace(config.redis, url=REDIS_URL, key_prefix=redis_prefix),
                node=dataclasses.replace(config.node, id=node),
                daemon=dataclasses.replace(config.daemon, drain_seconds=0.0, publish_seconds=5.0),
                fraud=FraudConfig(rules_file=str(rules)))
            daemon = Daemon(config)
            daemon.start()
            daemons.append(daemon)
            wait_for(lambda d=daemon: all(a.connected() for a in d.adapters))
        n1, n2 = daemons
        on_n1 = [fakes[0].place_call("alice", f"336123456{n}", answer_after_ms=50, talk_ms=60_000) for n in range(2)]
        wait_for(lambda: sum(c["phase"] == "answered" for c in n1.live_call_dicts()) == 2)
        third = fakes[1].place_call("alice", "3361234562", answer_after_ms=50, talk_ms=60_000)
        wait_for(lambda: sum(c["phase"] == "answered" for c in n2.live_call_dicts()) == 1)
        fourth = fakes[1].place_call("alice", "3361234563", answer_after_ms=50, talk_ms=60_000)
        assert fourth.done.wait(10) and fourth.outcome == "denied"
        refused_at = time.monotonic()
        for call in [*on_n1, third]:  # every live call of the account, on both nodes
            assert call.done.wait(5), call
        assert time.monotonic() - refused_at < 2.0  # ~0.1 s here; the SQL path alone would take up to 5 s
        wait_for(lambda: redis_client.xrange(f"{redis_prefix}fraud:alerts"))
        stream = redis_client.xrange(f"{redis_prefix}fraud:alerts")
        (_, fields), = stream
        assert (fields[b"account"], fields[b"rule"], fields[b"figure"], fields[b"node"]) == (
            b"alice", b"irsf_parallel", b"4", b"n2")
        later = fakes[0].place_call("alice", "33142685300", talk_ms=1_000)  # n1 refuses it too (status)
        assert later.done.wait(10) and later.outcome == "denied"
        # The counters' observe rode in the balance store's authorize round trip (the daemon gives
        # both one client), but for each node's first call: that one loads the script on Redis.
        observed = [{how: d.metrics.fraud_observes.labels(how)._value.get() for how in ("with_store", "alone")}
                    for d in daemons]
        assert observed == [{"with_store": 2, "alone": 1}, {"with_store": 1, "alone": 1}], observed  # 3 calls, 2
    finally:
        for daemon in daemons:
            daemon.shutdown()
        for fake in fakes:
            fake.stop()


def test_a_rule_limited_to_a_reseller_refuses_its_customers_only(tmp_path: Path, fake_fs: FakeFreeswitch) -> None:
    """The demo's tree: operator > globex (a reseller) > zoe; alice is the operator's own customer.
    The tenants above zoe come from the daemon's cached chains (the database, read once)."""
    rules = "rules:\n  - {name: globex_closed, kind: new_calls, window_s: 60, threshold: 0, action: deny, " \
            "tenant: globex}\n"
    daemon = fraud_daemon(tmp_path, fake_fs, rules)
    daemon.start()
    try:
        wait_for(lambda: all(a.connected() for a in daemon.adapters))
        zoe = fake_fs.place_call("zoe", "33142685300", answer_after_ms=50, talk_ms=500)
        alice = fake_fs.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=500)
        assert zoe.done.wait(10) and alice.done.wait(10)
        assert (zoe.outcome, alice.outcome) == ("denied", "answered"), (zoe, alice)
    finally:
        daemon.shutdown()
