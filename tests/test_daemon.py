"""The daemon as an admin runs it: composition, lifecycle, health, live calls and operator hangups.

Driven in-process against the fake FreeSWITCH (real event-socket bytes) on a temporary SQLite
database prepared like ``billing-agent demo`` does; the ``run`` command itself is exercised in a
subprocess with real signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.models import AgentNode, Call, LiveCallRow, utcnow
from agent.adapters.sql.reconcile import check_ledger
from agent.cli.demo import SimulatedPbx, demo_config, free_port, prepare_database
from agent.cli.main import cli
from agent.config import load_config
from agent.daemon import Daemon, StartupError
from agent.sim.freeswitch import FakeFreeswitch
from tests.conftest import REDIS_URL


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """A cooperative GET (the test process is not monkey-patched, the server is a greenlet)."""
    with gevent.Timeout(5):
        conn = gevent.socket.create_connection(("127.0.0.1", port))
        try:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        finally:
            conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.02)


def adopt_to_the_end(config: Any, call: Any, *, ends_within_s: float) -> None:
    """Start a daemon again on ``config`` after a hand-over: it adopts the live call, which must
    end within ``ends_within_s``, and stops once nothing is left live."""
    second = Daemon(config)
    second.start()
    try:
        wait_for(lambda: any(c["phase"] == "answered" for c in second.live_call_dicts()), timeout=10)
        assert call.done.wait(ends_within_s)
        wait_for(lambda: not second.live_call_dicts(), timeout=10)
    finally:
        second.shutdown()


@pytest.fixture
def fake_fs() -> Iterator[FakeFreeswitch]:
    fake = FakeFreeswitch(port=0, heartbeat_s=1.0, authorize_port=free_port()).start()
    yield fake
    fake.stop()


@pytest.fixture
def daemon(tmp_path: Path, fake_fs: FakeFreeswitch) -> Iterator[Daemon]:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    agent = Daemon(demo_config(tmp_path, "freeswitch", fake_fs.authorize_port, fake_fs.port))
    agent.start()
    wait_for(lambda: all(a.connected() for a in agent.adapters))
    yield agent
    if not agent.stopped.is_set():
        agent.shutdown()


def test_calls_are_authorized_billed_cut_and_recorded_then_the_daemon_stops_cleanly(
        daemon: Daemon, fake_fs: FakeFreeswitch, tmp_path: Path) -> None:
    assert daemon.status is not None
    status, body = http_get(daemon.status.port, "/health")
    assert status == 200, body
    assert json.loads(body)["checks"]["pbx"]["detail"] == "connected: freeswitch"

    talk = fake_fs.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=1_500)
    cut = fake_fs.place_call("bob", "33612345678", answer_after_ms=50, talk_ms=30_000)  # 8 s of money
    denied = fake_fs.place_call("carol", "33142685300", talk_ms=1_000)
    for call in (talk, cut, denied):
        assert call.done.wait(20), call
    assert denied.outcome == "denied"
    assert cut.talk_us < 9_000_000  # cut by the money, not the scripted 30 s

    _, metrics = http_get(daemon.status.port, "/metrics")
    assert b'billing_authorizations_total{result="allowed"} 2.0' in metrics
    assert b'billing_connection_up{target="freeswitch"} 1.0' in metrics

    took = daemon.shutdown()
    assert took < 30
    sql = make_engine(daemon.config.database.url)
    try:
        with sql.connect() as conn:
            dispositions = dict(conn.execute(select(Call.account_id, Call.disposition)).all())
            node = conn.execute(select(AgentNode.stopped_at)).one()
            live_left = conn.execute(select(LiveCallRow)).all()
        assert dispositions == {"alice": "ANSWERED", "bob": "CUT"}
        assert node.stopped_at is not None and live_left == []
        with transaction(session_factory(sql)) as session:
            report = check_ledger(session, now=utcnow(), grace=timedelta(0))
        assert report.ok, report.problems
        assert report.settled_calls == 2
    finally:
        sql.dispose()


def test_operators_list_live_calls_and_hang_one_up_from_the_cli(daemon: Daemon, fake_fs: FakeFreeswitch) -> None:
    call = fake_fs.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=60_000)
    wait_for(lambda: any(c["phase"] == "answered" for c in daemon.live_call_dicts()))
    gevent.sleep(daemon.config.daemon.publish_seconds + 0.5)  # published to SQL
    assert daemon.status is not None
    _, body = http_get(daemon.status.port, "/calls")
    (mine,) = json.loads(body)
    assert mine["account"] == "alice" and mine["phase"] == "answered"
    assert mine["spent"].count(".") == 1 and len(mine["spent"].split(".")[1]) == 6  # "0.010000", never a float
    runner = CliRunner()
    url = ["--database-url", daemon.config.database.url]
    listed = runner.invoke(cli, [*url, "calls", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (live,) = json.loads(listed.output)["calls"]
    assert (live["account"], live["destination"], live["state"], live["node"]) == (
        "alice", "33142685300", "answered", "demo")
    assert live["spent"] is not None and not live["node_stale"]

    hung = runner.invoke(cli, [*url, "calls", "hangup", live["call_id"], "--reason", "test", "--json"])
    assert hung.exit_code == 0, hung.output
    assert json.loads(hung.output)["result"] == "hangup sent"
    assert call.done.wait(10)
    wait_for(lambda: not daemon.live_call_dicts())

    missing = runner.invoke(cli, [*url, "calls", "hangup", "no-such-call"])
    assert missing.exit_code == 1 and "not live on any node" in missing.output


def test_a_port_in_use_fails_the_start_naming_the_key(tmp_path: Path) -> None:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = load_config(None, environ={}, cwd=tmp_path, overrides={
            "database": {"url": f"sqlite:///{tmp_path / 'billing-agent.db'}"},
            "metrics": {"port": busy.getsockname()[1]}})
        agent = Daemon(config)
        with pytest.raises(StartupError, match="metrics.port"):
            agent.start()
        agent.shutdown()


def test_a_database_without_schema_fails_the_start_with_the_fix(tmp_path: Path) -> None:
    config = load_config(None, environ={}, cwd=tmp_path, overrides={
        "database": {"url": f"sqlite:///{tmp_path / 'empty.db'}"}, "metrics": {"port": 0}})
    agent = Daemon(config)
    with pytest.raises(StartupError, match="db upgrade"):
        agent.start()
    agent.shutdown()


def test_an_unreachable_database_is_retried_with_health_red(tmp_path: Path) -> None:
    config = load_config(None, environ={}, cwd=tmp_path, overrides={
        "database": {"url": "postgresql+psycopg://nobody@127.0.0.1:1/none", "connect_timeout_seconds": 1},
        "metrics": {"port": 0}, "daemon": {"startup_retry_max_seconds": 0.5}})
    agent = Daemon(config)
    starting = gevent.spawn(agent.start)
    wait_for(lambda: agent.status is not None and "unreachable" not in agent.health.database[1]
             and agent.health.database[1] != "not connected yet")
    assert agent.status is not None
    status, body = http_get(agent.status.port, "/health")
    assert status == 503
    assert json.loads(body)["checks"]["database"]["ok"] is False
    agent.stopping.set()
    with pytest.raises(StartupError, match="stopped while waiting"):
        starting.get(timeout=10)
    agent.shutdown()


def test_run_stops_on_sigterm_and_a_bad_config_fails_before_anything_listens(tmp_path: Path) -> None:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    exe = [sys.executable, "-m", "agent.entry"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("billing:\n  nibble_seconds: -1\n")
    result = subprocess.run([*exe, "--config", str(bad), "run"], check=False, capture_output=True, text=True,
                            timeout=60,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert "nibble_seconds" in result.stderr
    (tmp_path / "afile").write_text("")
    unwritable = subprocess.run([*exe, "run"], check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                env={**os.environ, "BILLING_AGENT_CDR_SPOOL_DIR": str(tmp_path / "afile" / "spool"),
                                     "BILLING_AGENT_METRICS_PORT": "0"})
    assert unwritable.returncode != 0 and "Traceback" not in unwritable.stderr
    assert f"cdr.spool_dir: cannot create {tmp_path / 'afile' / 'spool'}: Not a directory" in unwritable.stderr

    port = free_port()
    good = tmp_path / "agent.yaml"
    good.write_text(f"database:\n  url: sqlite:///{tmp_path / 'billing-agent.db'}\nmetrics:\n  port: {port}\n"
                    f"cdr:\n  spool_dir: {tmp_path / 'spool'}\n")
    proc = subprocess.Popen([*exe, "--config", str(good), "run"], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            lines.append(line)
            if "objects of the start frozen" in line or not line:
                break
        assert any("ready in" in line for line in lines), "".join(lines)
        # What the start built is out of the collector's reach (no full-collection stalls).
        frozen = [line for line in lines if "objects of the start frozen" in line]
        assert frozen and int(frozen[0].split("garbage collector: ")[1].split()[0]) > 10_000, "".join(lines)
        good.write_text(good.read_text() + "logging:\n  level: debug\nnode:\n  id: renamed\n")
        proc.send_signal(signal.SIGHUP)
        reloaded = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            reloaded.append(line)
            if "restart: node.id" in line or not line:
                break
        text = "".join(reloaded)
        assert "SIGHUP: logging now level=debug" in text and "restart: node.id" in text, text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped in" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_redis_with_sqlite_is_refused_at_start(tmp_path: Path) -> None:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    config = load_config(None, environ={}, cwd=tmp_path, overrides={
        "database": {"url": f"sqlite:///{tmp_path / 'billing-agent.db'}"}, "metrics": {"port": 0},
        "redis": {"url": "redis://127.0.0.1:6379/0"}})
    agent = Daemon(config)
    with pytest.raises(StartupError, match="shared PostgreSQL or MariaDB"):
        agent.start()
    agent.shutdown()


@pytest.mark.parametrize("pbx_kind", ["asterisk", "freeswitch"])
def test_a_restarted_agent_adopts_the_calls_it_handed_over_and_bills_them_once(tmp_path: Path, pbx_kind: str) -> None:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    pbx = SimulatedPbx(pbx_kind)
    config = demo_config(tmp_path, pbx_kind, pbx.agi_port, pbx.port)
    from dataclasses import replace

    config = replace(config, daemon=replace(config.daemon, drain_seconds=0.0))
    try:
        first = Daemon(config)
        first.start()
        wait_for(lambda: all(a.connected() for a in first.adapters))
        call = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=6_000)
        wait_for(lambda: any(c["phase"] == "answered" for c in first.live_call_dicts()))
        gevent.sleep(2.2)  # two nibbles debited by the first run
        first.shutdown()  # drain 0: the call is handed over, its reservation stays open
        assert not call.done.is_set()
        adopt_to_the_end(config, call, ends_within_s=15)
    finally:
        pbx.stop()
    sql = make_engine(config.database.url)
    try:
        with sql.connect() as conn:
            (cdr,) = conn.execute(select(Call.account_id, Call.disposition, Call.duration_ms)).all()
        assert cdr[0] == "alice" and cdr[1] == "ANSWERED"
        assert 5_900 <= cdr[2] <= 6_500  # the whole call (not from the restart on), billed once
        with transaction(session_factory(sql)) as session:
            report = check_ledger(session, now=utcnow(), grace=timedelta(0))
        assert report.ok, report.problems
        assert report.settled_calls == 1 and report.charges == 1
    finally:
        sql.dispose()


def test_health_turns_red_when_the_pbx_connection_is_lost(daemon: Daemon, fake_fs: FakeFreeswitch) -> None:
    assert daemon.status is not None
    fake_fs.stop()  # FreeSWITCH goes away
    wait_for(lambda: not all(a.connected() for a in daemon.adapters))
    status, body = http_get(daemon.status.port, "/health")
    assert status == 503
    report = json.loads(body)
    assert report["checks"]["pbx"] == {"ok": False, "detail": "down: freeswitch"}
    assert report["checks"]["database"]["ok"] and report["checks"]["store"]["ok"]
    daemon.publish_once()
    _, metrics = http_get(daemon.status.port, "/metrics")
    assert b'billing_connection_up{target="freeswitch"} 0.0' in metrics


def _read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline() if proc.stderr else ""
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen:\n{''.join(seen)}")


def test_a_second_sigterm_exits_at_once_and_the_reservation_is_left_to_expire(tmp_path: Path) -> None:
    sql = prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path)
    from agent.adapters.sql.accounts import create_account

    with transaction(session_factory(sql)) as session:
        create_account(session, "acct0", plan="demo", balance_micros=10_000_000)
    fs_port, status_port = free_port(), free_port()
    fake = subprocess.Popen([sys.executable, "-m", "agent.sim.freeswitch", "--port", str(fs_port), "--load-rate", "5",
                             "--load-calls", "1", "--talk-ms", "60000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'billing-agent.db'}\nmetrics:\n  port: {status_port}\n"
                      f"cdr:\n  spool_dir: {tmp_path / 'spool'}\nfreeswitch:\n  enabled: true\n  port: {fs_port}\n")
    agent = subprocess.Popen([sys.executable, "-m", "agent.entry", "--config", str(config), "run"],
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _read_until(agent, "authorize call=", 30)
        gevent.sleep(1.5)  # answered, a nibble taken
        agent.send_signal(signal.SIGTERM)
        _read_until(agent, "draining 1 live calls", 10)
        began = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 130
        assert time.monotonic() - began < 5
        with sql.connect() as conn:
            open_reservations = conn.execute(text("SELECT count(*) FROM reservations WHERE state = 'open'")).scalar()
        assert open_reservations == 1  # held, not lost: the sweeper or the next start settles it
        with transaction(session_factory(sql)) as session:
            assert check_ledger(session, now=utcnow(), grace=timedelta(hours=1)).ok
    finally:
        for proc in (agent, fake):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sql.dispose()


def test_bad_arguments_to_the_live_call_commands_are_named(tmp_path: Path) -> None:
    runner = CliRunner()
    url = ["--database-url", f"sqlite:///{tmp_path / 'billing-agent.db'}"]
    prepare_database(url[1], tmp_path).dispose()
    wait = runner.invoke(cli, [*url, "calls", "hangup", "some-call", "--wait", "-1"])
    assert wait.exit_code == 2 and "--wait" in wait.output
    demo = runner.invoke(cli, ["demo", "--pbx", "yate"])
    assert demo.exit_code == 2 and "'yate' is not one of" in demo.output
    empty = runner.invoke(cli, [*url, "calls", "list", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.output) == {"calls": [], "nodes": []}


def _call_ends_between_two_runs(config: Any, pbx: SimulatedPbx, *, talk_ms: int, handed_over_after_s: float,
                                unpublished: bool = False) -> None:
    """alice calls 33142685300; the first run stops (drain 0: the call is handed over, its
    reservation stays open) ``handed_over_after_s`` after the answer; the call ends while no
    agent runs; a second run starts, settles what it was left and flushes its CDRs.
    ``unpublished``: the first run never publishes its calls (killed within a publish interval)."""
    first = Daemon(config)
    first.start()
    if unpublished:
        first.publisher = None
    wait_for(lambda: all(a.connected() for a in first.adapters))
    call = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=talk_ms)
    wait_for(lambda: any(c["phase"] == "answered" for c in first.live_call_dicts()))
    gevent.sleep(handed_over_after_s)
    first.shutdown()
    assert call.done.wait(10)
    second = Daemon(config)
    second.start()
    try:
        wait_for(lambda: second.engine is not None and not second.engine.adoptable, timeout=10)
        assert second.cdr is not None and second.cdr.flush(5)
    finally:
        second.shutdown()


@pytest.mark.parametrize("pbx_kind", ["asterisk", "freeswitch"])
def test_a_call_that_ends_while_the_agent_is_down_is_settled_once_with_a_cdr(tmp_path: Path, pbx_kind: str) -> None:
    """Issue 14.3: the call ends between the agent's stop and its next start. The next start's
    resync no longer shows it: it is settled from what the store knows (the debited nibbles),
    once, with a CDR marked ENDED_WHILE_AGENT_DOWN, and the ledger adds up."""
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    pbx = SimulatedPbx(pbx_kind)
    config = demo_config(tmp_path, pbx_kind, pbx.agi_port, pbx.port)
    from dataclasses import replace

    config = replace(config, daemon=replace(config.daemon, drain_seconds=0.0))
    try:
        _call_ends_between_two_runs(config, pbx, talk_ms=3_000, handed_over_after_s=2.2)  # two nibbles debited
    finally:
        pbx.stop()
    sql = make_engine(config.database.url)
    try:
        with sql.connect() as conn:
            (cdr,) = conn.execute(select(Call.account_id, Call.disposition, Call.hangup_cause, Call.duration_ms,
                                         Call.destination)).all()
        assert cdr[:3] == ("alice", "ANSWERED", "ENDED_WHILE_AGENT_DOWN")
        assert cdr[4] == "33142685300", cdr  # published by the first run
        assert cdr[3] >= 2_000, cdr  # the time the debited nibbles covered
        with transaction(session_factory(sql)) as session:
            report = check_ledger(session, now=utcnow(), grace=timedelta(0))
        assert report.ok, report.problems
        assert report.settled_calls == 1 and report.charges == 1
    finally:
        sql.dispose()


def test_calls_left_behind_survive_a_redis_that_restarted_empty(tmp_path: Path, postgres_url: str,
                                                               redis_client: Any, redis_prefix: str) -> None:
    """Found by bench/bench_faults.py: the agent is killed, Redis restarts empty meanwhile, and
    the next start found no reservation to adopt: both calls went unbilled with no CDR. Now the
    calls the earlier run published (live_calls) are adopted from their facts: the one still up
    is supervised and billed whole (re-reserved), the one that ended gets its CDR; the ledger
    adds up."""
    from dataclasses import replace

    from tests.conftest import _fresh_schema

    sql = make_engine(postgres_url)
    _fresh_schema(sql)
    sql.dispose()
    prepare_database(postgres_url, tmp_path).dispose()
    pbx = SimulatedPbx("asterisk")
    config = demo_config(tmp_path, "asterisk", pbx.agi_port, pbx.port)
    config = replace(config, database=replace(config.database, url=postgres_url),
                     redis=replace(config.redis, url=REDIS_URL, key_prefix=redis_prefix),
                     daemon=replace(config.daemon, drain_seconds=0.0, publish_seconds=0.2))
    try:
        first = Daemon(config)
        first.start()
        wait_for(lambda: all(a.connected() for a in first.adapters))
        short = pbx.fake.place_call("alice", "33142685300", answer_after_ms=50, talk_ms=2_500)
        long = pbx.fake.place_call("bob", "33142685301", answer_after_ms=50, talk_ms=6_000)
        wait_for(lambda: sum(c["phase"] == "answered" for c in first.live_call_dicts()) == 2)
        gevent.sleep(1.5)  # published, nibbles debited
        first.shutdown()  # drain 0: handed over
        for key in redis_client.scan_iter(match=f"{redis_prefix}*", count=1000):  # Redis restarted empty
            redis_client.delete(key)
        assert short.done.wait(10)  # ended while no agent ran
        second = Daemon(config)
        second.start()
        try:
            assert long.done.wait(15)
            wait_for(lambda: second.engine is not None and not second.engine.adoptable
                     and not second.live_call_dicts(), timeout=10)
            assert second.cdr is not None and second.cdr.flush(5)
        finally:
            second.shutdown()
    finally:
        pbx.stop()
    sql = make_engine(postgres_url)
    try:
        with sql.connect() as conn:
            cdrs = {row[0]: row for row in conn.execute(select(Call.account_id, Call.hangup_cause, Call.duration_ms))}
        assert set(cdrs) == {"alice", "bob"}, cdrs
        assert cdrs["alice"][1] == "ENDED_WHILE_AGENT_DOWN"
        assert cdrs["bob"][1] != "ENDED_WHILE_AGENT_DOWN" and cdrs["bob"][2] >= 5_500, cdrs  # supervised to its end
        with transaction(session_factory(sql)) as session:
            report = check_ledger(session, now=utcnow(), grace=timedelta(0))
        assert report.ok, report.problems
    finally:
        sql.dispose()


@pytest.mark.parametrize("pbx_kind", ["asterisk", "freeswitch"])
def test_a_call_that_ends_while_the_agent_is_down_is_billed_from_the_pbx_cdr(tmp_path: Path, pbx_kind: str) -> None:
    """With the PBX's own CDR file set up (asterisk.cdr_file / freeswitch.cdr_file), a call that
    ended while no agent ran is billed its real duration, not the nibbles it had paid."""
    from dataclasses import replace

    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    pbx = SimulatedPbx(pbx_kind)
    cdr_file = tmp_path / "pbx-cdr.csv"
    pbx.fake.cdr_file = str(cdr_file)
    config = demo_config(tmp_path, pbx_kind, pbx.agi_port, pbx.port)
    section = "asterisk" if pbx_kind == "asterisk" else "freeswitch"
    config = replace(config, daemon=replace(config.daemon, drain_seconds=0.0),
                     **{section: replace(getattr(config, section), cdr_file=str(cdr_file))})
    try:
        _call_ends_between_two_runs(config, pbx, talk_ms=4_300, handed_over_after_s=1.2)  # one nibble debited
    finally:
        pbx.stop()
    sql = make_engine(config.database.url)
    try:
        with sql.connect() as conn:
            (cdr,) = conn.execute(select(Call.hangup_cause, Call.duration_ms)).all()
            (reason, cost) = conn.execute(text("SELECT reason, cost_micros FROM rating_decisions")).one()
        assert cdr[0] == "ENDED_WHILE_AGENT_DOWN" and reason == "ended_while_agent_down_pbx_cdr"
        assert 4_250 <= cdr[1] <= 4_400, cdr  # the real talk (4.3 s), not the 1-2 s the nibbles paid
        with transaction(session_factory(sql)) as session:
            report = check_ledger(session, now=utcnow(), grace=timedelta(0))
        assert report.ok, report.problems
    finally:
        sql.dispose()


def test_a_call_authorized_just_before_a_crash_is_billed_from_the_pbx_cdr_by_the_local_journal(tmp_path: Path) -> None:
    """Found by bench_faults: killed less than a publish interval after authorizing a call, the
    agent left only the call's reservation; the next run recorded it NO ANSWER for 0. The local
    journal of authorized calls gives the next run its leg and destination: billed its real talk
    from the PBX's CDR."""
    from dataclasses import replace

    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    pbx = SimulatedPbx("asterisk")
    cdr_file = tmp_path / "pbx-cdr.csv"
    pbx.fake.cdr_file = str(cdr_file)
    config = demo_config(tmp_path, "asterisk", pbx.agi_port, pbx.port)
    config = replace(config, daemon=replace(config.daemon, drain_seconds=0.0),
                     asterisk=replace(config.asterisk, cdr_file=str(cdr_file)))
    try:
        _call_ends_between_two_runs(config, pbx, talk_ms=2_300, handed_over_after_s=0.2, unpublished=True)
    finally:
        pbx.stop()
    sql = make_engine(config.database.url)
    try:
        with sql.connect() as conn:
            (cdr,) = conn.execute(select(Call.disposition, Call.hangup_cause, Call.duration_ms,
                                         Call.destination)).all()
            (reason, cost) = conn.execute(text("SELECT reason, cost_micros FROM rating_decisions")).one()
        assert cdr[:2] == ("ANSWERED", "ENDED_WHILE_AGENT_DOWN") and reason == "ended_while_agent_down_pbx_cdr"
        assert 2_250 <= cdr[2] <= 2_400 and cdr[3] == "33142685300", cdr
        assert cost > 0
    finally:
        sql.dispose()
