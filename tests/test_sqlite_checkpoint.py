"""SQLite's write-ahead log is copied back by a thread of the daemon, never inside a commit of
its loop (agent/adapters/sql/checkpoint.py): a commit that crossed SQLite's 1,000-page line held
every authorization up for the 3-4 ms of the copy and its fsyncs."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import gevent
import gevent.event
import pytest
from sqlalchemy import Engine, text

from agent.adapters.sql.checkpoint import CheckpointResult, WalCheckpointer
from agent.adapters.sql.engine import make_engine, sqlite_file
from agent.cli.demo import demo_config, prepare_database
from agent.daemon import Daemon

PAGE_ROWS = 200  # rows of ~4 KiB: one transaction writes ~200 pages


def _write(engine: Engine, transactions: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS filler (id INTEGER PRIMARY KEY, body TEXT)"))
    for _ in range(transactions):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO filler (body) VALUES (:body)"), [{"body": "x" * 4000}] * PAGE_ROWS)


def test_the_daemons_connections_never_checkpoint_in_a_commit(tmp_path: Path) -> None:
    daemon_like = make_engine(f"sqlite:///{tmp_path / 'off.db'}", wal_autocheckpoint=False)
    default = make_engine(f"sqlite:///{tmp_path / 'on.db'}")
    try:
        with daemon_like.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        with default.connect() as conn:  # the CLI's: SQLite's own checkpoints stay
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
        _write(daemon_like, 10)  # ~2,000 pages: twice past SQLite's line
        _write(default, 10)
        # Without automatic checkpoints the log only grew: every frame of the ten commits is in it.
        # With them, a commit past 1,000 pages copied it back and the log started over.
        assert WalCheckpointer(str(tmp_path / "off.db")).checkpoint_once().log_pages >= 10 * PAGE_ROWS
        assert WalCheckpointer(str(tmp_path / "on.db")).checkpoint_once().log_pages < 10 * PAGE_ROWS
    finally:
        daemon_like.dispose()
        default.dispose()


def test_a_checkpoint_copies_the_whole_log_back_while_writers_go_on(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", wal_autocheckpoint=False)
    try:
        _write(engine, 6)
        checkpointer = WalCheckpointer(str(tmp_path / "db.sqlite"))
        result = checkpointer.checkpoint_once()
        assert result == CheckpointResult(False, result.log_pages, result.log_pages) and result.log_pages > 1000
        # A writer's transaction open meanwhile does not make the checkpoint wait or fail (PASSIVE).
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO filler (body) VALUES ('during')"))
            during = checkpointer.checkpoint_once()
            assert not during.busy
        _write(engine, 1)
        after = checkpointer.checkpoint_once()
        assert after.checkpointed_pages == after.log_pages and 0 < after.log_pages < result.log_pages
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM filler")).scalar() == 7 * PAGE_ROWS + 1
    finally:
        engine.dispose()


def test_the_loop_runs_each_checkpoint_in_another_thread(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", wal_autocheckpoint=False)
    threads: list[int] = []
    done = gevent.event.Event()

    class Recording(WalCheckpointer):
        def checkpoint_once(self) -> CheckpointResult:
            threads.append(threading.get_ident())
            result = super().checkpoint_once()
            done.set()
            return result

    checkpointer = Recording(str(tmp_path / "db.sqlite"), interval_s=0.01)
    stopping = gevent.event.Event()
    try:
        _write(engine, 6)
        loop = gevent.spawn(checkpointer.run, stopping)
        assert done.wait(10)
        stopping.set()
        loop.join(10)
        assert loop.dead and loop.exception is None
        assert threads and threading.get_ident() not in threads
        assert checkpointer.last is not None and checkpointer.last.checkpointed_pages == checkpointer.last.log_pages
        assert checkpointer.last.log_pages > 1000 or checkpointer.checkpoints > 1
    finally:
        engine.dispose()


def test_a_checkpoint_the_database_refuses_is_logged_once_and_tried_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "not-a-file"
    folder.mkdir()
    checkpointer = WalCheckpointer(str(folder), interval_s=0.01)  # a folder: SQLite cannot open it
    stopping = gevent.event.Event()
    with caplog.at_level(logging.ERROR, logger="agent.adapters.sql.checkpoint"):
        loop = gevent.spawn(checkpointer.run, stopping)
        with gevent.Timeout(10):
            while len(caplog.records) < 1:
                gevent.sleep(0.02)
        gevent.sleep(0.1)  # several more failures: still one line (then one per 60)
        stopping.set()
        loop.join(5)
    assert loop.dead and loop.exception is None and checkpointer.checkpoints == 0
    assert len(caplog.records) == 1 and str(folder) in caplog.records[0].getMessage()


def test_the_daemon_checkpoints_its_sqlite_database_off_the_loop(tmp_path: Path) -> None:
    prepare_database(f"sqlite:///{tmp_path / 'billing-agent.db'}", tmp_path).dispose()
    config = demo_config(tmp_path, "freeswitch", 0, 0)
    config = dataclasses.replace(config, freeswitch=dataclasses.replace(config.freeswitch, enabled=False))
    agent = Daemon(config)
    agent.start()
    try:
        assert agent.sql is not None and agent.checkpointer is not None
        with agent.sql.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        with gevent.Timeout(10):
            while agent.checkpointer.checkpoints == 0:
                gevent.sleep(0.05)
        assert agent.checkpointer.database_path == str(tmp_path / "billing-agent.db")
    finally:
        agent.shutdown()


def test_only_a_database_file_is_checkpointed() -> None:
    assert sqlite_file("sqlite://") is None and sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("sqlite:///file::memory:?cache=shared") is None
    assert sqlite_file("postgresql://postgres@127.0.0.1/test") is None
    assert sqlite_file("sqlite:////var/lib/billing-agent/billing-agent.db") == "/var/lib/billing-agent/billing-agent.db"
