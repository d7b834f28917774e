"""The balance store's hottest statements on SQLite, run straight on the driver's cursor.

In the daemon every SQLite transaction runs in the one gevent loop that every call's
authorization waits on, and SQLAlchemy's layers (the session's execute, the compiled-cache
lookup, the execution context, the result objects) were most of an authorization's time there:
measured in process on SQLite, the five statements of an authorization took 0.31 ms through the
ORM session, 0.24 through a Core connection and 0.045 on the sqlite3 cursor. A Core statement is
compiled here once for the dialect; :meth:`DriverStatements.run` executes it on the DBAPI
connection of the session's own transaction (the same BEGIN IMMEDIATE and commit), binding the
parameters in the compiled order through the column types' own bind processors (so a DateTime is
written in SQLAlchemy's text format and compares as before) and reading results through their
result processors.

Only SQLite: the other drivers (psycopg, PyMySQL) wait for their server cooperatively under
gevent, so their statements do not hold the loop, and SQLAlchemy's cost there is small beside the
round trip. ``database.echo`` does not show these statements.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert

Processor = Callable[[Any], Any] | None
_DRIVER = "agent.driver_connection"  # the session's DBAPI connection, in ``Session.info``


class DriverRows:
    """The two reads the store makes of a result: ``first()`` and ``scalar()``."""

    __slots__ = ("_row", "_make")

    def __init__(self, row: tuple[Any, ...] | None, make: Callable[[Sequence[Any]], Any] | None) -> None:
        self._row = row
        self._make = make

    def first(self) -> Any:
        if self._row is None or self._make is None:
            return None
        return self._make(self._row)

    def scalar(self) -> Any:
        return None if self._row is None else self._row[0]


class _Compiled:
    __slots__ = ("sql", "names", "bind", "fixed", "make", "insert_keys")

    def __init__(self, statement: ClauseElement, dialect: Dialect, params: Mapping[str, Any]) -> None:
        # An INSERT without values takes its columns from the first parameters it is run with.
        keys = list(params) if isinstance(statement, Insert) else None
        self.insert_keys = frozenset(keys) if keys is not None else None
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
            raise TypeError(f"{dialect.name}: not a positional statement: {statement}")
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup)
        self.bind: tuple[Processor, ...] = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.names)
        # Values written in the statement itself (``.values(reserved_micros=0)``): bound here.
        self.fixed = {name: compiled.binds[name].effective_value for name in self.names
                      if not compiled.binds[name].required}
        self.make: Callable[[Sequence[Any]], Any] | None = None
        columns = list(getattr(statement, "selected_columns", ()))
        if columns:
            row_type = namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
            results: list[Processor] = [column.type.dialect_impl(dialect).result_processor(dialect, None)
                                        for column in columns]
            if any(results):
                def make(raw: Sequence[Any], processors: list[Processor] = results) -> Any:
                    return row_type._make([value if p is None or value is None else p(value)
                                           for p, value in zip(processors, raw, strict=True)])
                self.make = make
            else:
                self.make = row_type._make


class DriverStatements:
    """Core statements run on the session's DBAPI connection (SQLite; see the module's doc)."""

    def __init__(self, dialect: Dialect) -> None:
        if dialect.name != "sqlite":
            raise ValueError(f"driver statements are for SQLite only, not {dialect.name}")
        self.dialect = dialect
        self._compiled: dict[int, tuple[Executable, _Compiled]] = {}

    def run(self, session: Session, statement: Executable, params: Mapping[str, Any]) -> DriverRows:
        """``statement`` in the session's own transaction."""
        # The session's own transaction (its connection began it: BEGIN IMMEDIATE on SQLite);
        # the driver's connection looked up once per transaction of the session.
        transaction = session.get_transaction()
        known = session.info.get(_DRIVER)
        if known is not None and known[0] is transaction:
            driver = known[1]
        else:
            driver = session.connection().connection.driver_connection
            session.info[_DRIVER] = (session.get_transaction(), driver)
        return self.run_on(driver, statement, params)

    def run_on(self, driver: Any, statement: Executable, params: Mapping[str, Any]) -> DriverRows:
        """``statement`` on a DBAPI connection, in whatever transaction it has open."""
        found = self._compiled.get(id(statement))
        if found is None or found[0] is not statement:
            found = (statement, _Compiled(cast(ClauseElement, statement), self.dialect, params))
            self._compiled[id(statement)] = found
        compiled = found[1]
        if compiled.insert_keys is not None and compiled.insert_keys != params.keys():
            raise ValueError(f"an INSERT compiled for the columns {sorted(compiled.insert_keys)} was given "
                             f"{sorted(params)}")
        fixed = compiled.fixed
        values = []
        for name, processor in zip(compiled.names, compiled.bind, strict=True):
            value = params[name] if name in params or name not in fixed else fixed[name]
            values.append(value if processor is None else processor(value))
        cursor = driver.execute(compiled.sql, values)
        try:
            return DriverRows(cursor.fetchone() if compiled.make is not None else None, compiled.make)
        finally:
            cursor.close()
