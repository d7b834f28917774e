"""The CDR pipeline: settled calls go to a local spool first, then to SQL in batches.

::

    engine ── submit() ──▶ spool.append()        os.write: survives kill -9 as soon as it returns
                              │  syncer greenlet: fsync every fsync_interval_ms (group commit)
                              ▼
    writer greenlet: spool.read(batch_size) in order → store.write_spooled() (PostgreSQL: the
                     spooled COPY lines as they are) or decode → store.write() (one transaction,
                     idempotent through the unique keys) → spool.commit(end): entries leave the
                     spool only now, after their transaction committed.
                     A backlog: while the writer writes one full batch, ``_Ahead`` reads and
                     writes the next on a second connection; both are committed in the spool in
                     order once both transactions are done.

* The call path never waits on the database: ``submit`` is an ``os.write`` of one framed record
  (the call's rows as COPY text lines, agent/services/cdr_lines.py).
* Database unreachable: the writer keeps its batch, backs off (0.5 s doubling to
  ``retry_max_s``) and retries while the spool grows (bounded by ``cdr.spool_max_mb``).
* Rows the database rejects are isolated by the store (binary split of the batch) and quarantined
  in ``cdr_quarantine`` with the reason; when even that is refused, in a file in the spool's
  ``quarantine/`` folder. The rest of the batch is written.
* ``kill -9`` at any moment: everything spooled is replayed at the next start; rows already
  committed are skipped by their unique keys, so nothing is lost and nothing is duplicated.
* Disk full or spool over its bound: ``submit`` raises ``SpoolError`` so the engine alarms; the
  record is kept in a bounded in-memory overflow that the writer still sends to SQL.

The spool and the store are protocols here (adapters: ``agent/adapters/cdr/spool.py`` and
``agent/adapters/sql/cdr_writer.py``), so the service is tested without either.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Protocol

import gevent
import gevent.event
import gevent.monkey
import gevent.pool
from prometheus_client import Counter, Gauge, Histogram

from agent.core.cdr import CallRecord, LegRecord, RatingRecord
from agent.services.call_path import CALL_PATH
from agent.services.cdr_lines import TAGS as LINES_TAGS
from agent.services.cdr_lines import decode_lines, encode_lines
from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_START_S = 0.5
AHEAD_WAIT_S = 120.0  # a local disk read and a transaction of one batch; longer is a hang
AHEAD_SWITCH_INTERVAL_S = 0.0002
LOUD_LOG_EVERY_S = 10.0


# --------------------------------------------------------------------------- values and errors


class SpoolError(Exception):
    """The spool could not take or give a record (I/O error, disk full); the message says where."""


class SpoolFull(SpoolError):
    """The spool reached ``cdr.spool_max_mb`` (the database has been away for a long time)."""


class SpoolLocked(SpoolError):
    """Another process (a running agent) owns the spool folder."""


class CdrStoreUnavailable(Exception):
    """The database cannot be reached (or asked us to retry); nothing was rejected."""


class QuarantineRefused(Exception):
    """The database would not store a quarantine row either (the pipeline keeps it locally)."""


class SpoolPosition(NamedTuple):
    """A place in the spool: a segment number and a byte offset in it (ordered; a tuple, as
    one is made per record read)."""

    segment: int
    offset: int


class SpoolEntry(NamedTuple):
    position: SpoolPosition
    payload: bytes


@dataclass(frozen=True, slots=True)
class SpoolRead:
    entries: list[SpoolEntry]
    end: SpoolPosition  # commit this once the entries are in SQL
    damaged: int = 0  # damaged regions found (and quarantined) while reading


@dataclass(frozen=True, slots=True)
class RejectedCdr:
    """A record that cannot be written, with the reason; ``payload`` is its spooled JSON."""

    call_id: str
    node: str
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class CdrWriteReport:
    written: int  # records now in SQL (inserted, or already there from an earlier attempt)
    rejected: list[RejectedCdr] = field(default_factory=list)
    new_calls: int | None = None  # rows actually inserted, when the backend says so


class CdrSpool(Protocol):
    def append(self, payload: bytes) -> None:
        """Write one record; raises SpoolFull / SpoolError."""
        ...

    def read(self, max_records: int) -> SpoolRead:
        """The next records after the last read, in order (damaged regions are quarantined)."""
        ...

    def commit(self, end: SpoolPosition) -> None:
        """Everything before ``end`` is in SQL: it may leave the spool."""
        ...

    def sync(self, fsync: Callable[[int], None]) -> None:
        """fsync what was appended since the last sync (the caller decides which thread)."""
        ...

    def backlog_bytes(self) -> int:
        ...

    def quarantine_payload(self, payload: bytes, reason: str) -> str:
        """Keep a record nothing else would take in the local quarantine; returns the path."""
        ...

    def close(self) -> None:
        ...


class CdrStore(Protocol):
    """A store may also offer ``write_spooled(payloads, *, sending=None) -> list[int] | None``:
    a fast path that writes spooled payloads without decoding them, returning each call's
    settled instant (ms), or None when the batch must take ``write`` (see
    SqlCdrStore.write_spooled); it calls ``sending()`` once its Python work is done and it
    sends the rows (the pipeline then reads the next batch while the database works)."""

    def write(self, records: Sequence[CallRecord]) -> CdrWriteReport:
        """Insert the records idempotently; isolate and return the rows the database rejects.
        Raises CdrStoreUnavailable when the database cannot be reached."""
        ...

    def quarantine(self, rejected: Sequence[RejectedCdr]) -> None:
        """Store rejected records with their reason (idempotent); raises CdrStoreUnavailable or
        QuarantineRefused."""
        ...


_CALL_FIELDS = tuple(f.name for f in fields(CallRecord) if f.name not in ("legs", "rating", "upper"))
_LEG_FIELDS = tuple(f.name for f in fields(LegRecord))
_RATING_FIELDS = tuple(f.name for f in fields(RatingRecord))


def record_dict(record: CallRecord) -> dict[str, Any]:
    """``record.to_dict()``, ten times faster (``dataclasses.asdict`` deep-copies): it runs on
    the engine's loop for every settled call."""
    data = {name: getattr(record, name) for name in _CALL_FIELDS}
    data["disposition"] = record.disposition.value
    data["rating"] = {name: getattr(record.rating, name) for name in _RATING_FIELDS}
    data["legs"] = [{name: getattr(leg, name) for name in _LEG_FIELDS} for leg in record.legs]
    if record.upper:
        data["upper"] = [{name: getattr(rating, name) for name in _RATING_FIELDS} for rating in record.upper]
    return data


def encode_record(record: CallRecord) -> bytes:
    """The JSON form of a call: compact ASCII JSON of ``CallRecord.to_dict()`` (money in
    micro-units, instants in ms). Spooled by earlier versions and still for a record the
    COPY-lines form cannot carry (``spool_payload``); kept in ``cdr_quarantine`` and in the log
    lines of a record the spool refused, for people to read and re-inject."""
    return json.dumps(record_dict(record), separators=(",", ":")).encode("ascii")


def spool_payload(record: CallRecord) -> bytes:
    """What ``submit`` spools: the COPY-lines form (agent/services/cdr_lines.py), or the JSON
    form for a record with a value that form cannot carry as it is."""
    try:
        return encode_lines(record)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return encode_record(record)


def decode_record(payload: bytes) -> CallRecord:
    """Either spooled form. Raises ValueError with the reason on anything that is not a spooled call."""
    if payload.startswith(LINES_TAGS):
        return decode_lines(payload)
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError(f"a spooled call is a JSON object, not {type(data).__name__}")
    return CallRecord.from_dict(data)


# --------------------------------------------------------------------------- metrics


@dataclass
class CdrCounters:
    """Plain counts of this process (reports, tests); mirrored in Prometheus when enabled."""

    spooled: int = 0
    written: int = 0
    rejected: int = 0
    quarantined_locally: int = 0
    damaged_regions: int = 0
    refused: int = 0  # submits that could not be spooled
    retries: int = 0
    batches: int = 0


class _Prometheus:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.queue = metrics.cdr_queue
        self.spooled = Counter("billing_cdr_spooled", "CDRs appended to the local spool", registry=r)
        self.written = Counter("billing_cdr_written", "CDRs committed to SQL", registry=r)
        self.quarantined = Counter("billing_cdr_quarantined", "CDRs or spool regions quarantined",
                                   ["why"], registry=r)
        self.refused = Counter("billing_cdr_spool_refused", "CDRs the spool could not take", ["why"], registry=r)
        self.backlog = Gauge("billing_cdr_spool_backlog_bytes", "Spooled bytes not yet in SQL", registry=r)
        self.database_up = Gauge("billing_cdr_database_up", "1 when the CDR writer reaches SQL", registry=r)
        self.visible = Histogram(
            "billing_cdr_visible_seconds", "From settle to the CDR committed in SQL",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0, 600.0), registry=r)
        self.batch_seconds = Histogram(
            "billing_cdr_batch_seconds", "Time to write one batch to SQL",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0), registry=r)


@dataclass(frozen=True)
class PipelineSettings:
    node: str = "node1"
    batch_size: int = 500
    # A backlog (a replay, the database back after an outage) is written in bigger transactions:
    # 2,000 to 5,000 rows per commit is ~1.5x the rate of 500 on PostgreSQL.
    backlog_batch_size: int = 5_000
    flush_interval_ms: int = 500  # longest a CDR lingers before its batch is written
    fsync_interval_ms: int = 100  # group commit: power-loss window of a spooled CDR
    retry_max_s: float = 30.0
    overflow_max: int = 10_000  # CDRs kept in memory when the spool refuses them


@dataclass(frozen=True)
class ReplayReport:
    written: int
    rejected: int
    quarantined_locally: int
    damaged_regions: int
    batches: int
    backlog_bytes: int


class _Ahead:
    """The next batch, read from the spool and written to SQL by the store's fast path
    (``write_spooled``) while the writer writes the current one: two transactions at once,
    so that the database works on two cores. ``take`` gives it, written or not.

    A greenlet of the pipeline's group: in the daemon (gevent-patched) psycopg waits for the
    server cooperatively, so both writes proceed, and the spool (appends from the call path
    included) is still only touched by one greenlet at a time. With ``thread`` (``replay_now``
    unpatched, ``cdrs replay``: nothing else appends meanwhile) a native thread, as psycopg then
    waits without the GIL. The writer calls ``wait`` before it commits or reads again, so a read
    never runs concurrently with another or with a commit; the entries leave the spool in
    order, each batch only after its transaction and those of all batches before it committed
    (the later batch may commit in SQL first: after a crash its rows are replayed, and the
    unique keys skip them).
    """

    def __init__(self, spool: CdrSpool, store: CdrStore, size: int, group: gevent.pool.Group, *,
                 thread: bool) -> None:
        self._read: SpoolRead | None = None
        self._error: BaseException | None = None
        self.settled: list[int] | None = None  # set when the store wrote the batch
        self.write_seconds = 0.0
        self._greenlet: gevent.Greenlet[..., None] | None = None
        self._thread: threading.Thread | None = None
        if not thread:
            self._greenlet = group.spawn(self._run, spool, store, size)
        else:
            self._thread = threading.Thread(target=self._run, args=(spool, store, size), name="cdr-write-ahead",
                                            daemon=True)
            self._thread.start()

    def _run(self, spool: CdrSpool, store: CdrStore, size: int) -> None:
        try:
            self._read = spool.read(size)
        except Exception as exc:  # noqa: BLE001 - re-raised by take() in the writer
            self._error = exc
            return
        fast = getattr(store, "write_spooled", None)
        if fast is None or not self._read.entries:
            return
        started = time.monotonic()
        try:
            self.settled = fast([entry.payload for entry in self._read.entries])
        except Exception as exc:  # noqa: BLE001 - the writer writes the batch itself and reports
            log.info("CDR batch written ahead failed (%s); the writer writes it again", exc)
        self.write_seconds = time.monotonic() - started

    def wait(self) -> None:
        """Until the read and write finished; raises SpoolError when that takes longer than
        AHEAD_WAIT_S (the writer retries later and waits for this same worker again first)."""
        if self._greenlet is not None:
            self._greenlet.join(timeout=AHEAD_WAIT_S)
            done = self._greenlet.dead
        else:
            assert self._thread is not None
            self._thread.join(timeout=AHEAD_WAIT_S)
            done = not self._thread.is_alive()
        if not done:
            raise SpoolError(f"reading and writing a CDR batch ahead took over {AHEAD_WAIT_S:.0f} s")

    def take(self) -> SpoolRead | None:
        """After ``wait``: the batch read; None after a failed read (the spool then reads it
        again), re-raising what was not a SpoolError."""
        if isinstance(self._error, SpoolError):
            log.error("reading the CDR spool ahead failed: %s; reading again", self._error)
            return None
        if self._error is not None:
            raise self._error
        return self._read


class CdrPipeline:
    """Implements the ``CdrSink`` port (agent/ports.py)."""

    def __init__(self, spool: CdrSpool, store: CdrStore, settings: PipelineSettings | None = None, *,
                 metrics: Metrics | None = None, now_ms: Callable[[], int] | None = None) -> None:
        self.spool = spool
        self.store = store
        self.settings = settings or PipelineSettings()
        self.counters = CdrCounters()
        self._prom = _Prometheus(metrics) if metrics is not None else None
        if self._prom is not None:
            # Read at each scrape: set only after a commit, it stayed 0 while CDRs waited out an
            # outage, exactly when it matters.
            self._prom.backlog.set_function(lambda: float(self.spool.backlog_bytes()))
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._group = gevent.pool.Group()
        self._due = gevent.event.Event()  # write now: batch full, flush or stop asked
        self._progress = gevent.event.Event()  # a batch committed (flush waiters re-check)
        self._inflight: SpoolRead | None = None
        self._ahead: _Ahead | None = None  # the next batch, read and written while one is written
        self._inflight_written: _Ahead | None = None  # the worker that wrote _inflight already
        self._overflow: deque[CallRecord] = deque()
        self._unread = 0  # appended since the writer last read (the batch-full trigger)
        self._queued = 0  # submitted by this process and not yet in SQL (the queue-depth gauge)
        self._running = False
        self._database_up = True
        self._last_loud = -LOUD_LOG_EVERY_S

    # ------------------------------------------------------------------ the call path

    def submit(self, record: CallRecord) -> None:
        payload = spool_payload(record)
        try:
            self.spool.append(payload)
        except SpoolError as exc:
            self._keep_in_memory(record, encode_record(record), exc)
            raise
        self.counters.spooled += 1
        self._queued += 1
        if self._prom is not None:
            self._prom.spooled.inc()
            self._prom.queue.set(self._queued)
        self._unread += 1
        if self._unread >= self.settings.batch_size:
            self._due.set()

    def _keep_in_memory(self, record: CallRecord, payload: bytes, exc: SpoolError) -> None:
        why = "full" if isinstance(exc, SpoolFull) else "io"
        self.counters.refused += 1
        if self._prom is not None:
            self._prom.refused.labels(why).inc()
        if len(self._overflow) < self.settings.overflow_max:
            self._overflow.append(record)
            self._due.set()
            # The JSON in the log is the last copy if the process dies before SQL takes it.
            log.error("CDR NOT SPOOLED (%s), kept in memory until SQL takes it: %s", exc,
                      payload.decode("ascii"))
        else:
            log.critical("CDR LOST: spool refused it (%s) and the in-memory overflow is full (%d): %s",
                         exc, len(self._overflow), payload.decode("ascii"))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for target in (self._writer_loop, self._syncer_loop):
            greenlet = self._group.spawn(target)
            greenlet.link_exception(self._crashed)

    def _crashed(self, greenlet: gevent.Greenlet[..., object]) -> None:
        log.critical("CDR pipeline greenlet %s died: %r; CDRs stay in the spool until a restart",
                     greenlet, greenlet.exception)

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._progress.clear()
            if self._drained():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._due.set()
            self._progress.wait(min(remaining, self.settings.flush_interval_ms / 1000))

    def _drained(self) -> bool:
        return self._inflight is None and not self._overflow and self.spool.backlog_bytes() == 0

    def stop(self, timeout_s: float) -> None:
        flushed = self.flush(timeout_s) if self._running else self._drained()
        self._running = False
        self._group.kill(timeout=max(1.0, timeout_s))
        try:
            self.spool.sync(os.fsync)
        except SpoolError:
            log.exception("final fsync of the CDR spool failed")
        if not flushed:
            log.warning("CDR pipeline stopped with %d bytes still spooled and %d CDRs in memory; "
                        "the spool is replayed at the next start", self.spool.backlog_bytes(), len(self._overflow))
        if self._overflow:
            log.critical("%d CDRs that the spool refused were never written to SQL: they are only in the "
                         "log lines 'CDR NOT SPOOLED'", len(self._overflow))
        self.spool.close()

    # ------------------------------------------------------------------ writer and syncer

    def _writer_loop(self) -> None:
        backoff_s = RETRY_START_S
        while self._running:
            CALL_PATH.yield_to_calls()
            try:
                self._drain()
            except CdrStoreUnavailable as exc:
                self._database_down(exc)
                self._due.clear()
                self._due.wait(backoff_s)  # a flush asks for an early retry
                backoff_s = min(backoff_s * 2, self.settings.retry_max_s)
                continue
            except Exception:  # a spool I/O error or a bug: nothing was committed past it, so retry
                self.counters.retries += 1
                log.exception("CDR writer failed; retrying in %.1f s (the records stay in the spool)", backoff_s)
                self._due.clear()
                self._due.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.retry_max_s)
                continue
            backoff_s = RETRY_START_S
            self._due.wait(self.settings.flush_interval_ms / 1000)
            self._due.clear()

    def _syncer_loop(self) -> None:
        hub = gevent.get_hub()
        interval_s = self.settings.fsync_interval_ms / 1000

        def fsync_off_the_hub(fd: int) -> None:
            hub.threadpool.apply(os.fsync, (fd,))

        while self._running:
            gevent.sleep(interval_s)
            try:
                self.spool.sync(fsync_off_the_hub)
            except SpoolError:
                log.exception("fsync of the CDR spool failed (records are in the page cache, not yet on disk)")

    def replay_now(self) -> ReplayReport:
        """Write everything spooled to SQL now, in the calling greenlet (``cdrs replay``).
        Raises CdrStoreUnavailable when the database cannot be reached."""
        before = CdrCounters(**vars(self.counters))
        if gevent.monkey.is_module_patched("threading"):
            self._drain()
        else:
            # Unpatched (the CLI), the read-ahead is a native thread: nothing else runs meanwhile.
            # With the default 5 ms switch interval the writer, woken by each reply of the
            # server, would wait that long for the GIL while the reader holds it.
            previous = sys.getswitchinterval()
            sys.setswitchinterval(AHEAD_SWITCH_INTERVAL_S)
            try:
                self._drain(thread_ahead=True)
            finally:
                sys.setswitchinterval(previous)
        c = self.counters
        return ReplayReport(
            written=c.written - before.written, rejected=c.rejected - before.rejected,
            quarantined_locally=c.quarantined_locally - before.quarantined_locally,
            damaged_regions=c.damaged_regions - before.damaged_regions,
            batches=c.batches - before.batches, backlog_bytes=self.spool.backlog_bytes(),
        )

    def _drain(self, *, thread_ahead: bool = False) -> None:
        """Write batches until the spool and the overflow are empty; after one full batch (a
        backlog) in batches of ``backlog_batch_size``. While a full batch is being written, the
        next one is read and written too (``_Ahead``), and committed in the spool after it.
        ``thread_ahead``: in a native thread (only when nothing else can append meanwhile)."""
        size = self.settings.batch_size
        while True:
            if self._inflight is None:
                self._unread = 0
                batch, written = None, None
                if self._ahead is not None:
                    self._ahead.wait()  # a hang raises and stays here, to be waited for again
                    written, self._ahead = self._ahead, None
                    batch = written.take()
                if batch is None:
                    batch, written = self.spool.read(size), None
                self._count_damaged(batch.damaged)
                self._inflight = batch
                self._inflight_written = written if written is not None and written.settled is not None else None
            batch = self._inflight
            full = len(batch.entries) >= size
            size = max(self.settings.batch_size, self.settings.backlog_batch_size) if full else size

            def ahead(size: int = size) -> None:
                if self._ahead is None:
                    self._ahead = _Ahead(self.spool, self.store, size, self._group, thread=thread_ahead)

            try:
                done = self._inflight_written
                if done is not None and done.settled is not None:
                    self._count_written(len(batch.entries), len(batch.entries), done.settled,
                                        time.monotonic() - done.write_seconds)
                elif batch.entries:
                    CALL_PATH.step_aside()  # the spool's read was one piece, the rows are the next
                    self._write_batch(batch.entries, ahead if full else None)
                if full and done is None:
                    ahead()  # when the store did not
            finally:
                if self._ahead is not None:
                    self._ahead.wait()  # no spool.read in flight past this point
            if batch.entries:  # an empty read commits in the same piece: a flush sees it drained
                CALL_PATH.step_aside()  # the spool's commit (a file written and renamed) is the last piece
            self.spool.commit(batch.end)
            self._inflight = self._inflight_written = None
            self._progress.set()
            if not full:
                break
        self._write_overflow()
        self._database_is_up()

    def _count_damaged(self, damaged: int) -> None:
        if damaged:
            self.counters.damaged_regions += damaged
            if self._prom is not None:
                self._prom.quarantined.labels("spool_damaged").inc(damaged)

    def _write_batch(self, entries: Sequence[SpoolEntry], read_ahead: Callable[[], None] | None = None) -> None:
        """``read_ahead``: start reading the next batch (the store calls it once its own Python
        work is done and the database's begins; here before the general path)."""
        started = time.monotonic()
        fast = getattr(self.store, "write_spooled", None)
        if fast is not None:
            payloads = [entry.payload for entry in entries]
            settled: list[int] | None = (fast(payloads, sending=read_ahead) if read_ahead is not None
                                         else fast(payloads))
            if settled is not None:
                self._count_written(len(entries), len(entries), settled, started)
                return
        records: list[CallRecord] = []
        undecodable: list[RejectedCdr] = []
        for entry in entries:
            try:
                records.append(decode_record(entry.payload))
            except ValueError as exc:
                undecodable.append(RejectedCdr("", self.settings.node, f"undecodable spool entry at "
                                               f"segment {entry.position.segment} offset "
                                               f"{entry.position.offset}: {exc}", entry.payload))
        if read_ahead is not None:
            read_ahead()
        report = self.store.write(records)
        self._quarantine([*undecodable, *report.rejected])
        self._written(records, report, started)

    def _written(self, records: Sequence[CallRecord], report: CdrWriteReport, started: float) -> None:
        settled = [r.settled_ms or r.ended_ms or r.started_ms for r in records] if self._prom is not None else []
        self._count_written(len(records), report.written, settled, started)

    def _count_written(self, count: int, written: int, settled_ms: Sequence[int], started: float) -> None:
        self.counters.written += written
        self.counters.batches += 1
        self._queued = max(0, self._queued - count)
        if self._prom is None:
            return
        now_ms = self._now_ms()
        self._prom.written.inc(written)
        self._prom.queue.set(self._queued)
        self._prom.batch_seconds.observe(time.monotonic() - started)
        for moment_ms in settled_ms:
            self._prom.visible.observe(max(0, now_ms - moment_ms) / 1000)

    def _quarantine(self, rejected: list[RejectedCdr]) -> None:
        if not rejected:
            return
        for item in rejected:
            log.error("CDR quarantined: call=%s node=%s reason=%s", item.call_id or "?", item.node, item.reason)
        try:
            self.store.quarantine(rejected)
        except QuarantineRefused as exc:
            log.error("the database refused the quarantine rows too (%s); keeping them in the spool folder", exc)
            for item in rejected:
                path = self.spool.quarantine_payload(item.payload, item.reason)
                log.error("CDR call=%s quarantined locally in %s", item.call_id or "?", path)
            self.counters.quarantined_locally += len(rejected)
        self.counters.rejected += len(rejected)
        if self._prom is not None:
            self._prom.quarantined.labels("rejected").inc(len(rejected))

    def _write_overflow(self) -> None:
        while self._overflow:
            chunk = [self._overflow[i] for i in range(min(len(self._overflow), self.settings.batch_size))]
            started = time.monotonic()
            report = self.store.write(chunk)
            self._quarantine(report.rejected)
            for _ in chunk:
                self._overflow.popleft()
            self._written(chunk, report, started)

    def _database_down(self, exc: CdrStoreUnavailable) -> None:
        self.counters.retries += 1
        if self._prom is not None:
            self._prom.database_up.set(0)
        now = time.monotonic()
        if self._database_up or now - self._last_loud >= LOUD_LOG_EVERY_S:
            self._last_loud = now
            log.error("CDR writer cannot reach SQL (%s); %d bytes waiting in the spool, retrying", exc,
                      self.spool.backlog_bytes())
        self._database_up = False

    def _database_is_up(self) -> None:
        if not self._database_up:
            log.warning("CDR writer reaches SQL again; spool backlog %d bytes", self.spool.backlog_bytes())
        self._database_up = True
        if self._prom is not None:
            self._prom.database_up.set(1)
