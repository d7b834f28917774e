"""Rate plans from SQL into memory: :func:`load_table` and the reloading :class:`RatePlanCache`.

A plan is streamed (server-side cursor where the backend has one, a batch at a time, only the
columns rating needs) into a :class:`~agent.core.ratetable.RateTableBuilder`. The cache keeps
one immutable table per plan and replaces it whole when ``rate_plans.version`` changes (every
import bumps it): the new table is built beside the old one, which serves every lookup until
the reference is swapped, so a reload never leaves a gap in which calls see no rates.

Consistency: the version is read *before* the rows. An import that commits in between gives a
table with the new rows and the old version number, which only costs one more reload.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import gevent
from gevent.event import AsyncResult
from gevent.greenlet import Greenlet
from gevent.pool import Group
from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    String,
    create_engine,
    event,
    func,
    literal_column,
    select,
    type_coerce,
)
from sqlalchemy.exc import SQLAlchemyError

from agent.adapters.sql.models import Rate, RatePlan
from agent.core.errors import BillingError, InvalidInput, NotFound
from agent.core.ratetable import RateTable, RateTableBuilder, candidate_prefixes, epoch_ms_ceil

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 5_000
# Raw driver values (no per-value SQLAlchemy processing: a million rows is 15 million values):
# bounds come back as text on SQLite and naive UTC datetimes elsewhere, ``blocked`` as 0/1 or a
# bool; _Milliseconds and the builder take either.
_COLUMNS = (
    Rate.prefix, Rate.destination, Rate.rate_micros, Rate.connect_fee_micros, Rate.initial_increment,
    Rate.increment, Rate.minimum_seconds, Rate.grace_seconds, type_coerce(Rate.effective_from, String),
    type_coerce(Rate.effective_to, String), Rate.weekdays, Rate.time_from_minute, Rate.time_to_minute,
    type_coerce(Rate.blocked, Integer), Rate.id,
)


# PyMySQL decodes every value in Python (about 1 us each): on MySQL/MariaDB a row comes back as
# one text value, fields split by the unit separator, the destination last (it may hold anything).
_SEPARATOR = "\x1f"
_PACKED = (func.concat_ws(
    literal_column("CHAR(31 USING utf8mb4)"), Rate.prefix, Rate.rate_micros, Rate.connect_fee_micros,
    Rate.initial_increment, Rate.increment, Rate.minimum_seconds, Rate.grace_seconds,
    type_coerce(Rate.effective_from, String), func.ifnull(type_coerce(Rate.effective_to, String), ""),
    Rate.weekdays, Rate.time_from_minute, Rate.time_to_minute, type_coerce(Rate.blocked, Integer), Rate.id,
    Rate.destination),)


def _unpack_text(row: tuple[object, ...]) -> tuple[object, ...]:
    """One packed MySQL row as the values of ``_COLUMNS``, in that order."""
    (prefix, rate, fee, first, increment, minimum, grace, start, end, weekdays, time_from, time_to, blocked,
     rate_id, destination) = str(row[0]).split(_SEPARATOR, 14)
    return (prefix, destination, int(rate), int(fee), int(first), int(increment), int(minimum), int(grace), start,
            end or None, weekdays, int(time_from), int(time_to), blocked == "1", int(rate_id))


@dataclass(frozen=True, slots=True)
class PlanSettings:
    id: int
    name: str
    currency: str
    timezone: str
    international_prefix: str
    version: int


def plan_settings(connection: Connection, plan_name: str) -> PlanSettings:
    """The plan's rating settings and version; :class:`NotFound` if there is no such plan."""
    found = connection.execute(
        select(RatePlan.id, RatePlan.name, RatePlan.currency, RatePlan.timezone,
               RatePlan.international_prefix, RatePlan.version).where(RatePlan.name == plan_name)
    ).first()
    if found is None:
        raise NotFound(f"unknown rate plan {plan_name!r}")
    return PlanSettings(*found)


def plan_version(connection: Connection, plan_name: str) -> int | None:
    """The plan's version (the cheap poll), or None if it no longer exists."""
    version: int | None = connection.execute(
        select(RatePlan.version).where(RatePlan.name == plan_name)).scalar_one_or_none()
    return version


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for long reads that never holds a write lock.

    The agent's SQLite engine starts every transaction with BEGIN IMMEDIATE (engine.py), which
    would hold the database's write lock for the whole of a million-row load. On a SQLite
    file, reads go through a plain engine instead: in WAL mode a reader sees one snapshot per
    statement and neither blocks nor waits for writers.
    """
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with _plain_reader(engine).connect() as connection:
            yield connection
    else:
        with engine.connect() as connection:
            yield connection


# The plain reader of each SQLite engine, made once: creating an engine per read (its dialect
# set up on its first connection) took ~1 ms of the loop for every tiny periodic read, the route
# book's three every 5 s among them (hub stalls of 4-9 ms every 5 s in bench_asterisk --carriers).
# Its connections are pooled: pysqlite opens no transaction for a SELECT, so an idle one holds
# no snapshot and no lock (a million-row load still sees one snapshot per statement).
_READERS: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def _plain_reader(engine: Engine) -> Engine:
    reader = _READERS.get(engine)
    if reader is None:
        reader = _READERS[engine] = create_engine(engine.url, pool_size=2, max_overflow=8,
                                                  connect_args={"timeout": 30})
        # the engine's dispose() closes its reader's connections too (tests, the CLI's exit)
        event.listen(engine, "engine_disposed", lambda _engine: reader.dispose())
    return reader


def load_table(engine: Engine, plan_name: str, *, for_number: str | None = None,
               batch_rows: int = DEFAULT_BATCH_ROWS, pause: Callable[[], None] | None = None) -> RateTable:
    """Load a plan into a new :class:`RateTable` (raises :class:`NotFound` for an unknown plan).

    ``for_number`` loads only the rows that could rate that number (a one-off quote needs a
    few rows, not a million); the lookup rules are the same. ``pause`` runs after every batch
    of ``batch_rows`` rows: the daemon passes a cooperative yield so that a long load never
    starves live calls.
    """
    with reading(engine) as connection:
        settings = plan_settings(connection, plan_name)
        builder = RateTableBuilder(settings.name, currency=settings.currency, timezone=settings.timezone,
                                   international_prefix=settings.international_prefix,
                                   version=settings.version)
        plan_id = Rate.plan_id
        if for_number is None and connection.dialect.name == "sqlite":
            # SQLite has no statistics and would walk the (plan_id, prefix) index: one random
            # page read per row, ten times slower than scanning the table for a whole plan.
            plan_id = Rate.plan_id + 0  # type: ignore[assignment]
        packed = connection.dialect.name in ("mysql", "mariadb")
        query = select(*(_PACKED if packed else _COLUMNS)).where(plan_id == settings.id)
        if for_number is not None:
            query = query.where(Rate.prefix.in_(candidate_prefixes(for_number, settings.international_prefix)))
        result = connection.execution_options(stream_results=True, yield_per=batch_rows).execute(query)
        to_ms = _Milliseconds()
        for batch in result.partitions():
            _add_batch(builder, map(_unpack_text, batch) if packed else batch, plan_name, to_ms)
            if pause is not None:
                pause()
    return builder.build()


def _add_batch(builder: RateTableBuilder, batch: Iterable[tuple[object, ...]], plan_name: str,
               to_ms: _Milliseconds) -> None:
    add = builder.add_fields
    for (prefix, destination, rate, fee, first, increment, minimum, grace, start, end,
         weekdays, time_from, time_to, blocked, rate_id) in batch:
        try:
            add(prefix, destination, rate, fee, first, increment, minimum, grace,  # type: ignore[arg-type]
                to_ms(start), None if end is None else to_ms(end), weekdays, time_from, time_to,  # type: ignore[arg-type]
                bool(blocked), rate_id)  # type: ignore[arg-type]
        except InvalidInput as exc:
            raise InvalidInput(f"plan {plan_name!r}, rates row id {rate_id}: {exc}") from None


class _Milliseconds:
    """Effective bounds repeat (most rows say "since the epoch"): convert each raw value once."""

    def __init__(self) -> None:
        self._known: dict[object, int] = {}

    def __call__(self, raw: object) -> int:
        ms = self._known.get(raw)
        if ms is None:
            moment = datetime.fromisoformat(raw) if isinstance(raw, str) else raw
            if not isinstance(moment, datetime):
                raise InvalidInput(f"effective bound {raw!r} is not a timestamp")
            ms = self._known[raw] = epoch_ms_ceil(moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment)
        return ms


@dataclass(frozen=True, slots=True)
class _Current:
    table: RateTable
    checked_at: float  # monotonic seconds of the last version check


class RatePlanCache:
    """The current rate table of each plan (implements :class:`agent.ports.RateSource`).

    ``table_for`` never waits on SQL once a plan is loaded: when the last version check is older
    than ``check_interval_seconds`` it starts a check in the background and answers with the
    table it has. The check reads ``rate_plans.version``; on a change it builds the new table
    (yielding to other greenlets between batches) and then swaps the reference, so calls see
    the old rates until the new ones are complete, never nothing. A failed check or load is
    logged and keeps the old table; it is retried after the interval.

    The first use of a plan loads it in the caller (``preload`` does that at start-up);
    concurrent first uses share one load.
    """

    def __init__(self, engine: Engine, *, check_interval_seconds: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic, batch_rows: int = DEFAULT_BATCH_ROWS,
                 first_load_timeout_seconds: float = 120.0) -> None:
        self._engine = engine
        self._interval = check_interval_seconds
        self._monotonic = monotonic
        self._batch_rows = batch_rows
        self._first_load_timeout = first_load_timeout_seconds
        self._tables: dict[str, _Current] = {}
        self._first_loads: dict[str, AsyncResult] = {}
        self._checks: dict[str, Greenlet] = {}
        self._background: set[str] = set()  # first loads table_if_loaded started
        self._group = Group()

    def table_for(self, plan_name: str) -> RateTable:
        """The plan's current table; raises :class:`NotFound` for an unknown plan."""
        current = self._tables.get(plan_name)
        if current is None:
            return self._first_load(plan_name)
        if self._monotonic() - current.checked_at >= self._interval and plan_name not in self._checks:
            check = self._group.spawn(self.refresh, plan_name)
            self._checks[plan_name] = check
            check.link(lambda _: self._checks.pop(plan_name, None))
            check.link_exception(self._check_failed)
        return current.table

    def table_if_loaded(self, plan_name: str) -> RateTable | None:
        """The plan's current table without ever loading in the caller: None while its first load
        runs (started here in the background). A loaded table is checked for a new version as
        :meth:`table_for` does. For look-ups that must not wait (the route book's buy decks)."""
        if plan_name in self._tables:
            return self.table_for(plan_name)
        if plan_name not in self._first_loads and plan_name not in self._background:
            self._background.add(plan_name)
            loading = self._group.spawn(self._first_load, plan_name)
            loading.link(lambda _: self._background.discard(plan_name))
            loading.link_exception(self._check_failed)
        return None

    def preload(self, plan_names: Iterable[str]) -> None:
        """Load plans now (daemon start-up), so that no call waits for a first load."""
        for name in plan_names:
            self.table_for(name)

    def refresh(self, plan_name: str) -> bool:
        """Check the plan's version now and reload it if it changed; True if a new table is in.

        SQL errors and unusable rows are logged and keep the table in use (the answer is False).
        """
        current = self._tables.get(plan_name)
        if current is None:
            self._first_load(plan_name)
            return True
        started = self._monotonic()
        try:
            with reading(self._engine) as connection:
                version = plan_version(connection, plan_name)
            if version is None or version == current.table.version:
                if version is None:
                    logger.warning("rate plan %r no longer exists; keeping its last rates", plan_name)
                self._tables[plan_name] = _Current(current.table, started)
                return False
            table = self._load(plan_name)
        except (SQLAlchemyError, BillingError) as exc:
            logger.error("rate plan %r: reload failed, keeping version %d: %s", plan_name,
                         current.table.version, exc)
            self._tables[plan_name] = _Current(current.table, started)
            return False
        self._tables[plan_name] = _Current(table, started)  # the swap: one reference assignment
        logger.info("rate plan %r: version %d -> %d, %d rates, loaded in %.1f s", plan_name,
                    current.table.version, table.version, len(table), self._monotonic() - started)
        return True

    def refresh_all(self) -> None:
        """Check every loaded plan now (SIGHUP)."""
        for name in list(self._tables):
            self.refresh(name)

    def close(self, timeout_seconds: float = 5.0) -> None:
        self._group.kill(timeout=timeout_seconds)

    def _load(self, plan_name: str) -> RateTable:
        return load_table(self._engine, plan_name, batch_rows=self._batch_rows, pause=_yield)

    def _first_load(self, plan_name: str) -> RateTable:
        pending = self._first_loads.get(plan_name)
        if pending is not None:  # another greenlet is loading it: share its result
            pending.wait(self._first_load_timeout)
            if not pending.ready():
                raise BillingError(f"rate plan {plan_name!r} is still loading after "
                                   f"{self._first_load_timeout:.0f} s")
            table: RateTable = pending.get(block=False)
            return table
        pending = self._first_loads[plan_name] = AsyncResult()
        started = self._monotonic()
        try:
            table = self._load(plan_name)
        except BaseException as exc:  # handed to the waiters, then re-raised (GreenletExit included)
            pending.set_exception(exc)
            raise
        finally:
            del self._first_loads[plan_name]
        self._tables[plan_name] = _Current(table, started)
        pending.set(table)
        logger.info("rate plan %r: version %d, %d rates, loaded in %.1f s", plan_name, table.version,
                    len(table), self._monotonic() - started)
        return table

    @staticmethod
    def _check_failed(greenlet: Greenlet) -> None:
        logger.error("rate plan check crashed: %r", greenlet.exception)


def _yield() -> None:
    gevent.sleep(0)
