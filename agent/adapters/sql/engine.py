"""Engine and session construction for every supported backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker


def normalise_url(url: str) -> str:
    """Pick the drivers we ship: psycopg 3 for PostgreSQL, PyMySQL for MySQL/MariaDB."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername in ("mysql", "mariadb"):
        parsed = parsed.set(drivername=f"{parsed.drivername}+pymysql")
    return parsed.render_as_string(hide_password=False)


def sqlite_file(url: str | URL) -> str | None:
    """The file a SQLite URL names; None for another database or an in-memory one."""
    parsed = make_url(url)
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or database in (None, "", ":memory:"):
        return None
    assert database is not None
    return None if database.startswith("file::memory:") else database


def make_engine(url: str, *, pool_size: int = 10, connect_timeout_seconds: float = 5.0,
                echo: bool = False, wal_autocheckpoint: bool = True) -> Engine:
    """``wal_autocheckpoint=False`` (SQLite only): commits never copy the write-ahead log back
    into the file; the daemon does it in another thread (agent/adapters/sql/checkpoint.py)."""
    url = normalise_url(url)
    backend = make_url(url).get_backend_name()
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        # Several greenlets/connections share one file: wait for the lock instead of failing.
        connect_args["timeout"] = 30
    else:
        kwargs.update(pool_size=pool_size, pool_pre_ping=True, pool_recycle=3600)
        connect_args["connect_timeout"] = max(1, int(connect_timeout_seconds))
        if backend in ("mysql", "mariadb"):
            connect_args["charset"] = "utf8mb4"
            kwargs["isolation_level"] = "READ COMMITTED"
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    if backend == "sqlite":
        _tune_sqlite(engine, wal_autocheckpoint=wal_autocheckpoint)
    return engine


def _tune_sqlite(engine: Engine, *, wal_autocheckpoint: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Disable pysqlite's own transaction handling so BEGIN IMMEDIATE below is ours.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        if not wal_autocheckpoint:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock at BEGIN: read-then-write transactions (balance checks) can then
        # never deadlock into SQLITE_BUSY halfway, which is SQLite's row lock equivalent.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
