"""Batched, idempotent CDR writes: ``calls``, ``call_legs`` and ``rating_decisions`` (DESIGN §6).

One batch is one transaction. PostgreSQL (psycopg 3) loads the rows with COPY, straight into
the tables inside a savepoint; when a row is already there (a replay after a crash) the savepoint
is rolled back and the batch goes through per-connection temporary staging tables and
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` instead (twice the server's work, so only then);
the other backends use multi-row inserts that skip duplicates (SQLite ``ON CONFLICT DO
NOTHING``, MySQL/MariaDB ``ON DUPLICATE KEY UPDATE`` of the key to itself, which, unlike
``INSERT IGNORE``, still refuses a value that does not fit instead of truncating it). The unique
keys (``calls.id``, ``call_legs (call_id, pbx_unique_id)``, ``rating_decisions (call_id, seq)``)
make a replay of a batch that already committed change nothing.

A batch the database refuses because of its data (a DB-API ``DataError``/``IntegrityError``,
or a value that cannot even be converted) is split in halves until the guilty records are
alone; those are returned as rejected (the pipeline quarantines them in ``cdr_quarantine``) and
the rest is written. Any other error (connection refused or lost, deadlock, missing table) is
``CdrStoreUnavailable``: nothing is rejected, the pipeline retries the batch later.

Behind PgBouncer, use session pooling (the staging tables are per connection) or ``use_copy=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Table, insert
from sqlalchemy.dialects import mysql, postgresql, sqlite

from agent.adapters.sql.models import Call, CallLeg, CdrQuarantine, RatingDecision, utcnow
from agent.core.cdr import CallRecord
from agent.core.session import level_call_id
from agent.services.cdr_lines import TAG as LINES_TAG
from agent.services.cdr_lines import copy_rows
from agent.services.cdr_pipeline import (
    CdrStoreUnavailable,
    CdrWriteReport,
    QuarantineRefused,
    RejectedCdr,
    encode_record,
)

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_NAIVE = datetime(1970, 1, 1)

CALLS: Table = Call.__table__  # type: ignore[assignment]
LEGS: Table = CallLeg.__table__  # type: ignore[assignment]
DECISIONS: Table = RatingDecision.__table__  # type: ignore[assignment]
QUARANTINE: Table = CdrQuarantine.__table__  # type: ignore[assignment]

CALL_COLUMNS = ("id", "node", "account_id", "caller", "destination", "started_at", "answered_at",
                "ended_at", "duration_ms", "disposition", "hangup_cause", "pbx", "settled_at")
LEG_COLUMNS = ("call_id", "pbx_unique_id", "channel", "direction", "sip_call_id", "peer", "caller",
               "callee", "created_at", "answered_at", "ended_at", "hangup_cause", "billsec", "billed")
DECISION_COLUMNS = ("call_id", "seq", "plan_name", "rate_id", "prefix", "rate_micros", "billed_seconds",
                    "cost_micros", "decided_at", "reason", "bundle_seconds", "plan_currency", "currency", "fx_rate_e10",
                    "fx_inverse", "plan_cost_micros", "level", "tenant", "account_id", "of_call_id", "carrier",
                    "buy_rate_id", "buy_prefix", "buy_rate_micros", "buy_billed_seconds", "buy_cost_micros",
                    "margin_micros")

# The column a MySQL "ON DUPLICATE KEY UPDATE" sets to itself (any column of a unique key).
SKIP_KEY = {"calls": "id", "call_legs": "call_id", "rating_decisions": "call_id", "cdr_quarantine": "digest"}

UNIQUE_VIOLATION = "23505"
# After a duplicate (a replay), this many batches go through staging before COPY is tried direct again.
STAGED_AFTER_DUPLICATE = 8

# MySQL/MariaDB errors about the data of a row that PyMySQL reports as OperationalError.
MYSQL_DATA_ERRORS = {1048, 1264, 1292, 1366, 1406, 1452, 3819, 4025}
# PostgreSQL SQLSTATE classes about the data: 22 data exception, 23 integrity violation.
PG_DATA_CLASSES = ("22", "23")


def _naive(ms: int | None) -> datetime | None:
    return None if ms is None else EPOCH_NAIVE + timedelta(milliseconds=ms)


def _aware(ms: int | None) -> datetime | None:
    return None if ms is None else EPOCH + timedelta(milliseconds=ms)


def record_rows(record: CallRecord, *, aware: bool) -> tuple[tuple[Any, ...], list[tuple[Any, ...]],
                                                             list[tuple[Any, ...]]]:
    """The ``calls`` row, the ``call_legs`` rows and the ``rating_decisions`` rows of a record
    (the customer's, then one per level above it under the level's call id, DESIGN §11), in the
    column orders above (datetimes naive UTC for COPY, aware for SQLAlchemy)."""
    ts = _aware if aware else _naive
    r = record
    call = (r.call_id, r.node, r.account_id, r.caller, r.destination, ts(r.started_ms), ts(r.answered_ms),
            ts(r.ended_ms), r.duration_ms, r.disposition.value, r.hangup_cause, r.pbx, ts(r.settled_ms))
    legs = [(r.call_id, leg.pbx_unique_id, leg.channel, leg.direction, leg.sip_call_id, leg.peer, leg.caller,
             leg.callee, ts(leg.created_ms), ts(leg.answered_ms), ts(leg.ended_ms), leg.hangup_cause,
             leg.billsec, leg.billed) for leg in r.legs]
    decisions = []
    for g in (r.rating, *r.upper):
        decisions.append((level_call_id(r.call_id, g.level), g.seq, g.plan_name, g.rate_id, g.prefix, g.rate_micros,
                          g.billed_seconds, g.cost_micros, ts(g.decided_ms), g.reason, g.bundle_seconds,
                          g.plan_currency, g.currency, g.fx_rate_e10, g.fx_inverse, g.plan_cost_micros, g.level,
                          g.tenant, g.account_id, r.call_id if g.level else None, g.carrier, g.buy_rate_id,
                          g.buy_prefix, g.buy_rate_micros, g.buy_billed_seconds, g.buy_cost_micros, g.margin_micros))
    return call, legs, decisions


# --------------------------------------------------------------------------- spooled JSON -> COPY text

_NULL = "\\N"
_SECONDS: dict[int, str] = {}  # epoch second -> "YYYY-MM-DD HH:MM:SS" (calls of a batch share seconds)


def _copy_ts(ms: int | None) -> str:
    if ms is None:
        return _NULL
    seconds, millis = divmod(ms, 1000)
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        if len(_SECONDS) >= 100_000:
            _SECONDS.clear()
        prefix = _SECONDS[seconds] = (EPOCH_NAIVE + timedelta(seconds=seconds)).isoformat(" ")
    return f"{prefix}.{millis:03d}"


def _s(value: object) -> str:
    """A text value as it is; anything else (a JSON null in a text field) is not for this path."""
    if type(value) is not str:
        raise TypeError(f"expected a string, not {value!r}")
    return value


def _copy_int(value: int | None) -> str:
    return _NULL if value is None else str(value)


def spooled_copy_lines(payload: bytes, calls: list[str], legs: list[str], decisions: list[str]) -> int:
    """Append the COPY text lines (CALL_COLUMNS, LEG_COLUMNS, DECISION_COLUMNS) of one spooled
    call, straight from its JSON (no CallRecord: ~3x less Python per call than decoding it).
    Returns its settled instant (ms). Only for a payload without a backslash: then no string in
    it holds a quote, a control character or a non-ASCII character (JSON would have escaped
    them), so none needs COPY escaping. Raises KeyError/TypeError/ValueError on anything else;
    a value of the wrong type makes the database refuse the batch (the general path then
    isolates the record)."""
    d = json.loads(payload)
    cid = _s(d["call_id"])
    ts = _copy_ts
    calls.append(f"{cid}\t{_s(d['node'])}\t{_s(d['account_id'])}\t{_s(d['caller'])}\t{_s(d['destination'])}\t"
                 f"{ts(d['started_ms'])}\t{ts(d['answered_ms'])}\t{ts(d['ended_ms'])}\t{d['duration_ms']}\t"
                 f"{_s(d['disposition'])}\t{_s(d['hangup_cause'])}\t{_s(d['pbx'])}\t{ts(d['settled_ms'])}\n")
    for leg in d["legs"]:
        billed = leg["billed"]
        if not isinstance(billed, bool):
            raise TypeError(f"billed is {billed!r}")
        legs.append(f"{cid}\t{_s(leg['pbx_unique_id'])}\t{_s(leg['channel'])}\t{_s(leg['direction'])}\t{_s(leg['sip_call_id'])}\t"
                    f"{_s(leg['peer'])}\t{_s(leg['caller'])}\t{_s(leg['callee'])}\t{ts(leg['created_ms'])}\t"
                    f"{ts(leg['answered_ms'])}\t{ts(leg['ended_ms'])}\t{_s(leg['hangup_cause'])}\t{leg['billsec']}\t"
                    f"{'t' if billed else 'f'}\n")
    for r in (d["rating"], *d.get("upper", ())):
        level = r.get("level", 0)
        if type(level) is not int:
            raise TypeError(f"level is {level!r}")
        own = level_call_id(cid, level) if level else cid
        decisions.append(f"{own}\t{r['seq']}\t{_s(r['plan_name'])}\t{_copy_int(r['rate_id'])}\t{_s(r['prefix'])}\t"
                         f"{r['rate_micros']}\t{r['billed_seconds']}\t{r['cost_micros']}\t{ts(r['decided_ms'])}\t"
                         f"{_s(r['reason'])}\t{int(r.get('bundle_seconds') or 0)}\t{_s(r.get('plan_currency', ''))}\t"
                         f"{_s(r.get('currency', ''))}\t{_copy_int(r.get('fx_rate_e10'))}\t"
                         f"{'t' if r.get('fx_inverse') is True else 'f'}\t{_copy_int(r.get('plan_cost_micros'))}\t"
                         f"{level}\t{_s(r.get('tenant', ''))}\t{_s(r.get('account_id', ''))}\t"
                         f"{cid if level else _NULL}\t{_s(r.get('carrier', ''))}\t{_copy_int(r.get('buy_rate_id'))}\t"
                         f"{_s(r.get('buy_prefix', ''))}\t{int(r.get('buy_rate_micros') or 0)}\t"
                         f"{int(r.get('buy_billed_seconds') or 0)}\t{_copy_int(r.get('buy_cost_micros'))}\t"
                         f"{_copy_int(r.get('margin_micros'))}\n")
    settled: int | None = d["settled_ms"] or d["ended_ms"] or d["started_ms"]
    if not isinstance(settled, int):
        raise TypeError(f"settled_ms is {settled!r}")
    return settled


def is_data_error(exc: BaseException) -> bool:
    """True when the database (or the driver) refused the rows for what they contain."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, ValueError | TypeError | OverflowError):
        return True
    names = {cls.__name__ for cls in type(orig).__mro__}
    if names & {"DataError", "IntegrityError"}:  # DB-API 2 (PEP 249) names, any driver
        return True
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in PG_DATA_CLASSES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in MYSQL_DATA_ERRORS


def describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split()) or type(orig).__name__
    return f"{type(orig).__name__}: {text}"[:1000]


def _printable(text: str, limit: int) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:limit]


class SqlCdrStore:
    """Implements ``CdrStore`` (agent/services/cdr_pipeline.py) on any SQLAlchemy engine."""

    def __init__(self, engine: Engine, *, use_copy: bool | None = None) -> None:
        self.engine = engine
        self.backend = engine.dialect.name
        driver = engine.dialect.driver
        self.use_copy = (self.backend == "postgresql" and driver == "psycopg") if use_copy is None else use_copy
        self._staging_batches_left = 0

    # ------------------------------------------------------------------ writing

    def write(self, records: Sequence[CallRecord]) -> CdrWriteReport:
        if not records:
            return CdrWriteReport(written=0)
        try:
            new_calls = self._write_batch(records)
        except Exception as exc:  # classified below; gevent.Timeout and GreenletExit propagate
            if not is_data_error(exc):
                raise CdrStoreUnavailable(describe(exc)) from exc
            if len(records) == 1:
                record = records[0]
                return CdrWriteReport(written=0, rejected=[
                    RejectedCdr(record.call_id, record.node, describe(exc), self._payload(record))])
            middle = len(records) // 2
            first = self.write(records[:middle])
            second = self.write(records[middle:])
            return CdrWriteReport(written=first.written + second.written,
                                  rejected=[*first.rejected, *second.rejected],
                                  new_calls=_add(first.new_calls, second.new_calls))
        return CdrWriteReport(written=len(records), new_calls=new_calls)

    def write_spooled(self, payloads: Sequence[bytes], *, sending: Callable[[], None] | None = None
                      ) -> list[int] | None:
        """PostgreSQL's fast path: spooled calls go to COPY without being decoded into
        CallRecords; the COPY-lines form (agent/services/cdr_lines.py) as it is, the JSON form
        of earlier spools converted to COPY text lines. Returns each call's settled instant
        (ms), or None when the batch needs the general path (``write``): no COPY, a replay of rows already there,
        a payload it does not handle, a row the database refuses. Raises CdrStoreUnavailable.
        ``sending`` is called once the rows are ready, before they go to the server."""
        if not self.use_copy or self._staging_batches_left:
            return None
        calls: list[bytes] = []
        legs: list[bytes] = []
        decisions: list[bytes] = []
        settled: list[int] = []
        text_calls: list[str] = []
        text_legs: list[str] = []
        text_decisions: list[str] = []
        try:
            for payload in payloads:
                if payload.startswith(LINES_TAG):  # the COPY-lines form: as it is
                    moment, call, leg_lines, decision_lines = copy_rows(payload)
                    settled.append(moment)
                    calls.append(call)
                    legs += leg_lines
                    decisions += decision_lines
                    continue
                if b"\\" in payload:
                    return None
                settled.append(spooled_copy_lines(payload, text_calls, text_legs, text_decisions))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        for target, text_lines in ((calls, text_calls), (legs, text_legs), (decisions, text_decisions)):
            target.extend(line[:-1].encode("ascii") for line in text_lines)
        tables = tuple((table, columns, b"\n".join(lines) + b"\n" if lines else b"")
                       for table, columns, lines in ((CALLS, CALL_COLUMNS, calls), (LEGS, LEG_COLUMNS, legs),
                                                     (DECISIONS, DECISION_COLUMNS, decisions)))
        if sending is not None:
            sending()
        try:
            with self.engine.begin() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                if raw.info.encoding != "utf-8":
                    return None  # the lines are UTF-8
                with raw.cursor() as cursor:
                    if not self._copy_direct(cursor, tables, text_lines=True):
                        return None  # rolled back to the savepoint: nothing written
        except Exception as exc:  # classified: gevent.Timeout and GreenletExit propagate
            if is_data_error(exc):
                return None
            raise CdrStoreUnavailable(describe(exc)) from exc
        return settled

    @staticmethod
    def _payload(record: CallRecord) -> bytes:
        try:
            return encode_record(record)
        except (TypeError, ValueError):
            return repr(record).encode("ascii", "backslashreplace")

    def _write_batch(self, records: Sequence[CallRecord]) -> int | None:
        if self.use_copy:
            return self._write_copy(records)
        calls: list[dict[str, Any]] = []
        legs: list[dict[str, Any]] = []
        decisions: list[dict[str, Any]] = []
        for record in records:
            call, leg_rows, decision_rows = record_rows(record, aware=True)
            calls.append(dict(zip(CALL_COLUMNS, call, strict=True)))
            legs.extend(dict(zip(LEG_COLUMNS, leg, strict=True)) for leg in leg_rows)
            decisions.extend(dict(zip(DECISION_COLUMNS, decision, strict=True)) for decision in decision_rows)
        with self.engine.begin() as conn:
            result = conn.execute(self._insert_skipping_duplicates(CALLS), calls)
            if legs:
                conn.execute(self._insert_skipping_duplicates(LEGS), legs)
            conn.execute(self._insert_skipping_duplicates(DECISIONS), decisions)
        # MySQL counts a skipped duplicate as "found", so its row count says nothing here.
        return result.rowcount if self.backend != "mysql" and result.rowcount >= 0 else None

    def _insert_skipping_duplicates(self, table: Table) -> Any:
        key = table.c[SKIP_KEY[table.name]]
        if self.backend == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        if self.backend == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if self.backend in ("mysql", "mariadb"):
            # Setting the key to itself is a no-op on a duplicate; errors on the data still raise.
            return mysql.insert(table).on_duplicate_key_update({key.name: key})
        return insert(table)  # unknown backend: a duplicate raises and the batch is split

    def _write_copy(self, records: Sequence[CallRecord]) -> int:
        calls: list[tuple[Any, ...]] = []
        legs: list[tuple[Any, ...]] = []
        decisions: list[tuple[Any, ...]] = []
        for record in records:
            call, leg_rows, decision_rows = record_rows(record, aware=False)
            calls.append(call)
            legs.extend(leg_rows)
            decisions.extend(decision_rows)
        tables = ((CALLS, CALL_COLUMNS, calls), (LEGS, LEG_COLUMNS, legs), (DECISIONS, DECISION_COLUMNS, decisions))
        with self.engine.begin() as conn:
            info = conn.info  # per DBAPI connection: survives the checkout
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor:
                if self._staging_batches_left == 0 and self._copy_direct(cursor, tables):
                    return len(calls)
                self._staging_batches_left = max(0, self._staging_batches_left - 1)
                inserted = self._copy_staged(cursor, info, tables)
        info["cdr_staging"] = True  # only once the transaction that created them committed
        return inserted

    def _copy_direct(self, cursor: Any, tables: Any, *, text_lines: bool = False) -> bool:
        """COPY straight into the tables (half the server's work of staging); False when a row is
        already there (a replay after a crash), with nothing written: the caller then stages.
        ``text_lines``: the rows are COPY text already, one block of lines (bytes)."""
        cursor.execute("SAVEPOINT cdr_direct")
        try:
            for table, columns, rows in tables:
                if rows:
                    with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
                        if text_lines:
                            copy.write(rows)
                            continue
                        for row in rows:
                            copy.write_row(row)
        except Exception as exc:  # only a duplicate is handled here; anything else goes up
            if getattr(exc, "sqlstate", None) != UNIQUE_VIOLATION:
                raise
            cursor.execute("ROLLBACK TO SAVEPOINT cdr_direct")
            self._staging_batches_left = STAGED_AFTER_DUPLICATE
            return False
        cursor.execute("RELEASE SAVEPOINT cdr_direct")
        return True

    @staticmethod
    def _copy_staged(cursor: Any, info: dict[Any, Any], tables: Any) -> int:
        """COPY into per-connection temporary tables, then insert what is not there yet."""
        if not info.get("cdr_staging"):
            for table, columns, _ in tables:
                cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS stage_{table.name} ON COMMIT DELETE ROWS AS "
                               f"SELECT {', '.join(columns)} FROM {table.name} WITH NO DATA")
        inserted = 0
        for table, columns, rows in tables:
            if not rows:
                continue
            names = ", ".join(columns)
            with cursor.copy(f"COPY stage_{table.name} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cursor.execute(f"INSERT INTO {table.name} ({names}) SELECT {names} FROM stage_{table.name} "
                           "ON CONFLICT DO NOTHING")
            if table is CALLS:
                inserted = cursor.rowcount
        return inserted

    # ------------------------------------------------------------------ quarantine

    def quarantine(self, rejected: Sequence[RejectedCdr]) -> None:
        if not rejected:
            return
        now = utcnow()
        rows = [{
            "digest": hashlib.sha256(item.payload).hexdigest(),
            "call_id": _printable(item.call_id, 191),
            "node": _printable(item.node, 64),
            "reason": _printable(item.reason, 1000),
            "payload": item.payload.decode("utf-8", "backslashreplace").replace("\x00", "\\x00"),
            "created_at": now,
        } for item in rejected]
        try:
            with self.engine.begin() as conn:
                conn.execute(self._insert_skipping_duplicates(QUARANTINE), rows)
        except Exception as exc:  # classified: unreachable is retried, anything else kept locally
            if is_data_error(exc):
                raise QuarantineRefused(describe(exc)) from exc
            raise CdrStoreUnavailable(describe(exc)) from exc


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b

