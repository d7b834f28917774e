"""The SQL store's hot statements on SQLite's own cursor (agent/adapters/sql/driver_statements.py)
read and write exactly what SQLAlchemy's execution would: the same text for a DateTime (so SQL
comparisons of instants stay right), the same values back, the session's own transaction."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Column, DateTime, Engine, Integer, MetaData, String, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from agent.adapters.sql.driver_statements import DriverStatements
from agent.adapters.sql.engine import make_engine, session_factory, transaction

META = MetaData()
THINGS = Table("things", META, Column("id", String(20), primary_key=True), Column("n", Integer, nullable=False),
               Column("at", DateTime, nullable=True))
INSERT = insert(THINGS)
READ = select(THINGS.c.n, THINGS.c.at).where(THINGS.c.id == bindparam("id"))
BUMP = update(THINGS).where(THINGS.c.id == bindparam("thing")).values(n=THINGS.c.n + bindparam("by"), at=None)
LATER_THAN = select(THINGS.c.id).where(THINGS.c.at > bindparam("when")).order_by(THINGS.c.id)
AT = datetime(2026, 12, 5, 11, 22, 33, 456789)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    found = make_engine(f"sqlite:///{tmp_path}/things.db")
    META.create_all(found)
    yield found
    found.dispose()


def test_rows_written_and_read_on_the_cursor_are_those_of_sqlalchemy(engine: Engine) -> None:
    driver = DriverStatements(engine.dialect)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        driver.run(session, INSERT, {"id": "a", "n": 1, "at": AT})
        session.execute(INSERT, {"id": "b", "n": 2, "at": AT.replace(second=34)})  # SQLAlchemy's own path
        row = driver.run(session, READ, {"id": "a"}).first()
        assert (row.n, row.at) == (1, AT) and isinstance(row.at, datetime)
        assert driver.run(session, READ, {"id": "zz"}).first() is None
    with transaction(sessions) as session:
        # The text SQLAlchemy wrote and the text written on the cursor compare as instants.
        later = session.execute(LATER_THAN, {"when": AT.replace(microsecond=0)}).scalars().all()
        assert later == ["a", "b"]
        assert driver.run(session, LATER_THAN, {"when": AT}).scalar() == "b"
        assert session.execute(READ, {"id": "a"}).one() == (1, AT)
        driver.run(session, BUMP, {"thing": "a", "by": 41})  # ``at=None`` is written by the statement
    with engine.connect() as conn:
        assert conn.execute(READ, {"id": "a"}).one() == (42, None)


def test_the_statements_are_the_sessions_transaction(engine: Engine) -> None:
    driver = DriverStatements(engine.dialect)
    sessions = session_factory(engine)
    with pytest.raises(RuntimeError), transaction(sessions) as session:
        driver.run(session, INSERT, {"id": "c", "n": 3, "at": None})
        raise RuntimeError("the unit of work fails")
    with Session(engine) as session:
        assert driver.run(session, READ, {"id": "c"}).first() is None  # rolled back with it


def test_an_insert_runs_with_the_columns_it_was_compiled_for_only(engine: Engine) -> None:
    driver = DriverStatements(engine.dialect)
    with transaction(session_factory(engine)) as session:
        driver.run(session, INSERT, {"id": "d", "n": 4, "at": AT})
        with pytest.raises(ValueError, match="compiled for the columns"):
            driver.run(session, INSERT, {"id": "e", "n": 5})


def test_only_for_sqlite() -> None:
    with pytest.raises(ValueError, match="SQLite only"):
        DriverStatements(postgresql.dialect())
