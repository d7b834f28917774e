"""One ``node.id``, one running daemon.

A start refuses while another run of its ``node.id`` is alive (on this host: its pid; on
another host: its heartbeat advancing), and starts at once over a dead one; a run whose row
another run took over writes nothing of that run's and says so (log, /health). Real SQLite and
PostgreSQL; the watch of another host's heartbeat runs on a fake clock (no real waiting).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, insert, select, update

from agent.adapters.sql.engine import make_engine
from agent.adapters.sql.live_calls import (
    HEARTBEAT_POLL_S,
    LiveCallFact,
    LiveCallPublisher,
    NodeIdInUse,
    pid_alive,
    staleness_seconds,
)
from agent.adapters.sql.models import AgentNode, CallCommand, LiveCallRow, utcnow
from agent.cli.demo import prepare_database
from agent.config import load_config
from agent.daemon import Daemon, StartupError
from tests.conftest import _fresh_schema

HOST = socket.gethostname()
NODE = "pbx1"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'test.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    eng = make_engine(url)
    _fresh_schema(eng)
    yield eng
    eng.dispose()


class FakeTime:
    """``sleep`` and ``monotonic`` for the heartbeat watch; ``on_sleep`` plays the other host."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0
        self.on_sleep: list[object] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        for hook in self.on_sleep:
            hook(self)  # type: ignore[operator]


def no_sleep(seconds: float) -> None:
    raise AssertionError("this start must not wait")


def fact(call_id: str, account: str = "alice") -> LiveCallFact:
    return LiveCallFact(call_id=call_id, pbx="asterisk", account_id=account, destination="33142685300",
                        caller="100", a_leg_id=f"leg-{call_id}", authorized_ms=1_700_000_000_000, answered_ms=None,
                        cut_at_ms=None)


def published(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(LiveCallRow.call_id, LiveCallRow.account_id)).all())


def node_row(engine: Engine) -> AgentNode:
    with engine.connect() as conn:
        return AgentNode(**conn.execute(select(AgentNode).where(AgentNode.node == NODE)).one()._mapping)


def running(engine: Engine, *, host: str, pid: int, calls: tuple[str, ...] = ("pbx1-1", "pbx1-2"),
            **kwargs: object) -> LiveCallPublisher:
    """A first run of NODE that registered and published ``calls``."""
    first = LiveCallPublisher(engine, NODE, publish_seconds=1.0, **kwargs)  # type: ignore[arg-type]
    first.register(host=host, pid=pid, version="t", pbx="asterisk", check=False)
    first.publish([fact(c) for c in calls])
    return first


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ at start, same host


def test_a_second_start_on_this_host_is_refused_while_the_first_pid_lives(db: Engine) -> None:
    parent = os.getppid()  # the pytest runner's parent: alive
    running(db, host=HOST, pid=parent)
    second = LiveCallPublisher(db, NODE, publish_seconds=1.0, sleep=no_sleep)
    with pytest.raises(NodeIdInUse) as refused:
        second.register(host=HOST, pid=os.getpid(), version="t", pbx="asterisk")
    message = str(refused.value)
    assert f"node.id '{NODE}' is in use by another running daemon" in message
    assert f"host {HOST!r} pid {parent}" in message and re.search(r"heartbeat \d+\.\d s ago", message)
    assert "Give each daemon its own node.id" in message
    assert set(published(db)) == {"pbx1-1", "pbx1-2"}  # the first run's calls are untouched
    assert node_row(db).pid == parent


def test_a_live_sleeping_process_holds_the_node_id(db: Engine) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        running(db, host=HOST, pid=sleeper.pid)
        with pytest.raises(NodeIdInUse, match=f"pid {sleeper.pid} "):
            LiveCallPublisher(db, NODE, sleep=no_sleep).check_free(host=HOST, pid=os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
    # killed -9 and reaped: the next start takes the node at once, as a restart after a crash
    LiveCallPublisher(db, NODE, sleep=no_sleep).register(host=HOST, pid=os.getpid(), version="t", pbx="asterisk")
    assert published(db) == {} and node_row(db).pid == os.getpid()


def test_a_dead_pid_on_this_host_registers_at_once_and_forgets_its_calls(db: Engine) -> None:
    gone = dead_pid()
    running(db, host=HOST, pid=gone)
    began = time.monotonic()
    second = LiveCallPublisher(db, NODE, publish_seconds=1.0, sleep=no_sleep)
    second.register(host=HOST, pid=os.getpid(), version="t", pbx="asterisk")
    assert time.monotonic() - began < 1.0
    row = node_row(db)
    assert (row.host, row.pid, row.stopped_at) == (HOST, os.getpid(), None)
    assert published(db) == {}  # as before: the crashed run's rows are forgotten


def test_a_zombie_is_dead_and_our_own_pid_is_an_earlier_run_of_this_process(db: Engine) -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(zombie.pid) and time.monotonic() < deadline:  # exited, not reaped yet
        time.sleep(0.02)
    assert not pid_alive(zombie.pid)
    zombie.wait()
    assert pid_alive(os.getpid()) and not pid_alive(0)
    running(db, host=HOST, pid=os.getpid())  # a Daemon restarted in the same process (the tests do)
    LiveCallPublisher(db, NODE, sleep=no_sleep).register(host=HOST, pid=os.getpid(), version="t", pbx="x")


def test_a_stopped_or_stale_row_is_free(db: Engine) -> None:
    first = running(db, host="elsewhere", pid=4242)
    first.stopped()
    LiveCallPublisher(db, NODE, sleep=no_sleep).check_free(host=HOST, pid=os.getpid())
    running(db, host="elsewhere", pid=4242)
    with db.begin() as conn:
        conn.execute(update(AgentNode).values(heartbeat_at=utcnow() - timedelta(seconds=11)))
    LiveCallPublisher(db, NODE, publish_seconds=1.0, sleep=no_sleep).check_free(host=HOST, pid=os.getpid())


# ------------------------------------------------------------------ at start, another host


def test_another_host_whose_heartbeat_advances_is_alive(db: Engine) -> None:
    other = running(db, host="pbx-b", pid=4242)
    clock = FakeTime()

    def other_publishes(fake: FakeTime) -> None:
        if fake.sleeps == 3:
            other.publish([fact("pbx1-1"), fact("pbx1-2")])

    clock.on_sleep.append(other_publishes)
    second = LiveCallPublisher(db, NODE, publish_seconds=1.0, sleep=clock.sleep, monotonic=clock.monotonic)
    began = time.monotonic()
    with pytest.raises(NodeIdInUse) as refused:
        second.register(host=HOST, pid=os.getpid(), version="t", pbx="asterisk")
    assert time.monotonic() - began < 2.0  # no real waiting
    assert clock.sleeps == 3 and clock.now - 1000.0 == pytest.approx(3 * HEARTBEAT_POLL_S)
    assert "host 'pbx-b' pid 4242" in str(refused.value) and "own node.id" in str(refused.value)
    assert set(published(db)) == {"pbx1-1", "pbx1-2"} and node_row(db).host == "pbx-b"


def test_another_host_whose_heartbeat_stands_still_is_dead_after_the_window(db: Engine,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    running(db, host="pbx-b", pid=4242)
    clock = FakeTime()
    second = LiveCallPublisher(db, NODE, publish_seconds=1.0, sleep=clock.sleep, monotonic=clock.monotonic)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        second.check_free(host=HOST, pid=os.getpid())
        second.register(host=HOST, pid=os.getpid(), version="t", pbx="asterisk")  # not watched twice
    assert time.monotonic() - began < 3.0  # the window went by on the fake clock
    window = staleness_seconds(1.0)
    assert clock.now - 1000.0 == pytest.approx(window)
    assert clock.sleeps == int(window / HEARTBEAT_POLL_S)
    assert "presumed dead" in caplog.text
    row = node_row(db)
    assert (row.host, row.pid) == (HOST, os.getpid()) and published(db) == {}


# ------------------------------------------------------------------ while running


def test_publish_after_a_takeover_touches_nothing_of_the_other_run(db: Engine,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeTime()
    first = running(db, host="pbx-a", pid=1111, sleep=clock.sleep, monotonic=clock.monotonic)
    # a second daemon with the same node.id registers (two starts at once, or an old version)
    second = LiveCallPublisher(db, NODE, publish_seconds=1.0)
    second.register(host="pbx-b", pid=2222, version="t", pbx="asterisk", check=False)
    second.publish([fact("pbx1-2", "bob"), fact("pbx1-3", "bob")])  # call ids may meet: one node.id
    with db.begin() as conn:
        conn.execute(insert(CallCommand).values(
            call_id="pbx1-3", node=NODE, command="hangup", reason="op", requested_at=utcnow(), result=""))
    before = node_row(db)

    with caplog.at_level(logging.ERROR, logger="agent.adapters.sql.live_calls"):
        first.publish([fact("pbx1-1"), fact("pbx1-4")])  # pbx1-2 ended here, pbx1-4 is new
        first.publish([fact("pbx1-4")])
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, caplog.text  # at most once a minute
        assert "taken over by another run on host 'pbx-b' pid 2222" in errors[0].getMessage()
        assert "own node.id" in errors[0].getMessage()
        clock.now += 61
        first.publish([])
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2

    assert published(db) == {"pbx1-2": "bob", "pbx1-3": "bob"}  # the other run's rows, as it wrote them
    after = node_row(db)
    assert (after.host, after.pid, after.started_at, after.heartbeat_at, after.live_calls) == (
        before.host, before.pid, before.started_at, before.heartbeat_at, 2)
    assert first.taken_over_by is not None and (first.taken_over_by.host, first.taken_over_by.pid) == ("pbx-b", 2222)
    assert first.pending_commands() == []  # the other run carries them out
    assert [c.call_id for c in second.pending_commands()] == ["pbx1-3"]
    first.stopped([fact("pbx1-4")])  # its clean stop leaves the other run's row and calls alone
    assert node_row(db).stopped_at is None and published(db) == {"pbx1-2": "bob", "pbx1-3": "bob"}

    second.publish([fact("pbx1-3", "bob")])  # the holder goes on as before
    assert published(db) == {"pbx1-3": "bob"} and second.taken_over_by is None


def test_a_run_keeps_its_row_across_publishes_and_stops_cleanly(db: Engine) -> None:
    first = running(db, host=HOST, pid=os.getpid())
    for _ in range(3):
        first.publish([fact("pbx1-1")])
    assert first.taken_over_by is None and published(db) == {"pbx1-1": "alice"}
    with db.begin() as conn:  # an operator deleted the row: written again, nobody else claims it
        conn.execute(delete(AgentNode))
    first.publish([fact("pbx1-1")])
    assert node_row(db).live_calls == 1 and first.taken_over_by is None
    first.stopped()
    assert node_row(db).stopped_at is not None and published(db) == {}


# ------------------------------------------------------------------ the daemon


def _config(tmp_path: Path) -> object:
    return load_config(None, environ={}, cwd=tmp_path, overrides={
        "database": {"url": f"sqlite:///{tmp_path / 'billing-agent.db'}"}, "node": {"id": NODE},
        "metrics": {"port": 0}, "cdr": {"spool_dir": str(tmp_path / "spool")}})


def test_the_daemon_refuses_to_start_and_health_reports_a_takeover(tmp_path: Path) -> None:
    from tests.test_daemon import http_get

    sql = prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path)
    try:
        running(sql, host=HOST, pid=os.getppid())
        refused = Daemon(_config(tmp_path))  # type: ignore[arg-type]
        with pytest.raises(StartupError, match=f"node.id '{NODE}' is in use .* pid {os.getppid()}"):
            refused.start()
        refused.shutdown()
        assert set(published(sql)) == {"pbx1-1", "pbx1-2"} and node_row(sql).pid == os.getppid()

        with sql.begin() as conn:
            conn.execute(update(AgentNode).values(stopped_at=utcnow()))
        agent = Daemon(_config(tmp_path))  # type: ignore[arg-type]
        agent.start()
        try:
            assert agent.status is not None
            status, body = http_get(agent.status.port, "/health")
            assert status == 200 and json.loads(body)["checks"]["node"]["ok"], body
            LiveCallPublisher(sql, NODE).register(host="pbx-b", pid=2222, version="t", pbx="x", check=False)
            agent.publish_once()
            status, body = http_get(agent.status.port, "/health")
            node = json.loads(body)["checks"]["node"]
            assert status == 503 and not node["ok"]
            assert "taken over by another run on host 'pbx-b' pid 2222" in node["detail"]
        finally:
            agent.shutdown()
        assert node_row(sql).host == "pbx-b" and node_row(sql).stopped_at is None
    finally:
        sql.dispose()


def test_billing_agent_run_exits_non_zero_naming_the_other_run(tmp_path: Path) -> None:
    """The real entry (one subprocess, about a second): the node is held by this test process."""
    sql = prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path)
    try:
        running(sql, host=HOST, pid=os.getpid())
    finally:
        sql.dispose()
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'billing-agent.db'}\nnode:\n  id: {NODE}\n"
                      f"metrics:\n  port: 0\ncdr:\n  spool_dir: {tmp_path / 'spool'}\n")
    result = subprocess.run([sys.executable, "-m", "agent.entry", "--config", str(config), "run"], check=False,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (f"cannot start: node.id '{NODE}' is in use by another running daemon: host {HOST!r} pid {os.getpid()}"
            in result.stderr), result.stderr
    assert "Give each daemon its own node.id" in result.stderr
