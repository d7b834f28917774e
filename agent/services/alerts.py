"""The alert service (DESIGN §8): every alert of the node, whoever raises it, goes through here.

``Alerts.submit`` takes an :class:`AlertRecord` (a fraud rule that fired, ``agent/services/fraud.py``;
low balance and balance exhausted, ``agent/services/balance_alerts.py``) and, unless the same
account and rule gave one less than ``period_ms`` ago (one alert per account and rule per
``fraud.alert_period_seconds``):

* names it (``event_id``), counts it (``billing_fraud_alerts_total{rule,action}`` for a fraud
  rule, ``billing_alerts_total{kind}`` for a balance alert) and logs one line;
* appends it to its queue, from which one worker greenlet writes the ``alerts`` table in batches
  (``AlertSink``), retrying with a backoff while the database is away. The daemon's queue is a
  file (``agent/adapters/alert_spool.py``, ``{cdr.spool_dir}/alerts/sql.jsonl``): appended in the
  kernel before ``submit`` returns, fsynced in groups off the hub, replayed at start and trimmed
  once written, so an alert survives a ``kill -9`` and a database outage; tests and benches may
  use :class:`MemoryAlertQueue`;
* hands it to each delivery (the webhook and the Redis Stream: each keeps its own spool), which
  must not wait on the network.

``submit`` never waits on the database or the network: it is called on the call path (the fraud
screen) and from the engine loop.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.event

from agent.core.fraud import BALANCE_KINDS, MARGIN_KINDS, AlertRecord, AlertThrottle
from agent.core.money import format_amount
from agent.ports import Clock
from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

ALERT_BATCH = 500
RETRY_MAX_S = 30.0
MAX_QUEUED_IN_MEMORY = 10_000
SYNC_INTERVAL_S = 0.2  # appended alerts reach the disk (fsync) within this


@dataclass(frozen=True, slots=True)
class AlertBatch:
    records: list[AlertRecord]
    position: Any  # where the batch ends, in the queue's own terms (given back to ``done``)


class AlertQueue(Protocol):
    """Alerts waiting for the ``alerts`` table, oldest first."""

    def __len__(self) -> int: ...

    def append(self, record: AlertRecord) -> None: ...

    def take(self, max_records: int) -> AlertBatch:
        """The oldest alerts (still queued until ``done``)."""
        ...

    def done(self, batch: AlertBatch) -> None:
        """The batch is written: drop it."""
        ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class AlertSink(Protocol):
    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        """Append alerts to the ``alerts`` table in one transaction (an alert it holds already,
        replayed after a crash, is not added twice); raises when the database is away."""
        ...


class AlertDelivery(Protocol):
    def enqueue(self, alert: AlertRecord) -> None:
        """Take the alert for delivery (to a spool of its own); never waits on the network."""
        ...


class MemoryAlertQueue:
    """An in-memory queue (lost on a restart: for tests and benches), at most ``max_queued``."""

    def __init__(self, max_queued: int = MAX_QUEUED_IN_MEMORY) -> None:
        self.max_queued = max_queued
        self._queue: deque[AlertRecord] = deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def append(self, record: AlertRecord) -> None:
        if len(self._queue) >= self.max_queued:
            dropped = self._queue.popleft()
            self.dropped += 1
            log.error("alert queue full (database away?): alert not stored: %s", dropped)
        self._queue.append(record)

    def take(self, max_records: int) -> AlertBatch:
        records = [self._queue[i] for i in range(min(max_records, len(self._queue)))]
        return AlertBatch(records, len(records))

    def done(self, batch: AlertBatch) -> None:
        for _ in range(int(batch.position)):
            self._queue.popleft()

    def sync(self) -> None:
        pass

    def close(self) -> None:
        if self._queue:
            log.error("%d alerts not written to SQL are lost (kept in memory only)", len(self._queue))


class Alerts:
    def __init__(self, sink: AlertSink, *, node: str, clock: Clock, metrics: Metrics | None = None,
                 queue: AlertQueue | None = None, period_ms: int = 60_000) -> None:
        self.sink = sink
        self.node = node
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.queue: AlertQueue = queue if queue is not None else MemoryAlertQueue()
        self.throttle = AlertThrottle(period_ms)
        self.deliveries: list[AlertDelivery] = []
        self._wake = gevent.event.Event()
        self._stopping = gevent.event.Event()
        self._worker: gevent.Greenlet[[], None] | None = None
        self._syncer: gevent.Greenlet[[], None] | None = None
        self._running = False
        self.submitted = 0
        self.written = 0

    # ---------------------------------------------------------------- taking alerts

    def submit(self, record: AlertRecord) -> bool:
        """Record and deliver one alert; False when the throttle drops it (the same account and
        rule alerted less than a period ago)."""
        if not self.throttle.allow(record.account_id, record.rule, record.at_ms):
            return False
        if not record.event_id:
            record = record.with_event_id(uuid.uuid4().hex)
        self.submitted += 1
        if record.kind in BALANCE_KINDS:
            self.metrics.alerts.labels(record.kind).inc()
            log.warning("BALANCE ALERT kind=%s account=%s available=%s threshold=%s call=%s node=%s: %s", record.kind,
                        record.account_id, format_amount(record.figure), format_amount(record.threshold),
                        record.call_id or "-", record.node, record.detail)
        elif record.kind in MARGIN_KINDS:
            self.metrics.alerts.labels(record.kind).inc()
            log.warning("MARGIN ALERT kind=%s account=%s margin=%s call=%s dest=%s node=%s: %s", record.kind,
                        record.account_id, format_amount(record.figure), record.call_id or "-", record.destination,
                        record.node, record.detail)
        else:
            self.metrics.fraud_alerts.labels(record.rule, "deny" if record.action == "deny_group"
                                             else record.action).inc()
            log.warning("FRAUD ALERT rule=%s account=%s action=%s %s call=%s dest=%s node=%s", record.rule,
                        record.account_id, record.action, record.detail, record.call_id, record.destination,
                        record.node)
        try:
            self.queue.append(record)
        except OSError as exc:  # a disk that fails: the log line and the deliveries still have it
            log.error("alert not queued for SQL (%s): %s", exc, record)
        self._wake.set()
        for delivery in self.deliveries:
            try:
                delivery.enqueue(record)
            except Exception:  # a delivery that fails must not refuse or pass a call
                log.exception("alert delivery %s failed for account=%s rule=%s", type(delivery).__name__,
                              record.account_id, record.rule)
        return True

    def queued(self) -> int:
        """Alerts not written to SQL yet."""
        return len(self.queue)

    # ---------------------------------------------------------------- writing them

    def flush_once(self) -> bool:
        """Write what is queued; False (it stays queued) when the database failed."""
        while len(self.queue):
            batch = self.queue.take(ALERT_BATCH)
            if batch.records:
                try:
                    self.sink.record_alerts(batch.records)
                except Exception as exc:  # noqa: BLE001 - the database comes back; the queue keeps them
                    log.error("alerts: writing %d alerts to SQL failed (%s: %s); retrying", len(self.queue),
                              exc.__class__.__name__, str(exc).strip()[:300])
                    return False
            self.queue.done(batch)
            self.written += len(batch.records)
        return True

    def sync(self) -> None:
        """fsync the queue and the deliveries' spools (run off the hub: gevent's thread pool)."""
        for part in (self.queue, *self.deliveries):
            sync = getattr(part, "sync", None)
            if sync is not None:
                try:
                    sync()
                except OSError as exc:
                    log.error("alert spool fsync failed (%s): %s", type(part).__name__, exc)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._stopping.clear()
        if len(self.queue):
            log.warning("alerts: %d alerts of an earlier run not in SQL yet; writing them", len(self.queue))
        self._worker = gevent.spawn(self._work)
        self._worker.link_exception(lambda g: log.critical("alert writer died: %r", g.exception))
        self._syncer = gevent.spawn(self._sync_loop)
        self._syncer.link_exception(lambda g: log.critical("alert spool fsync died: %r", g.exception))

    def stop(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (at most ``timeout_s``), fsync and stop; what is left stays in the
        queue (on disk: written by the next start)."""
        self._running = False
        self._stopping.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=timeout_s)
            self._worker.kill(timeout=1)
            self._worker = None
        if self._syncer is not None:
            self._syncer.kill(timeout=1)
            self._syncer = None
        self.sync()
        if len(self.queue):
            log.warning("alerts: %d alerts not written to SQL at shutdown (kept for the next start when spooled)",
                        len(self.queue))
        self.queue.close()

    def _work(self) -> None:
        failures = 0
        while self._running or len(self.queue):
            if not len(self.queue):
                self._wake.clear()
                self._wake.wait(timeout=1.0)
                continue
            if self.flush_once():
                failures = 0
                continue
            if not self._running:
                return
            failures += 1
            # New alerts do not cut the backoff short (they are queued): only a stop does.
            self._stopping.wait(timeout=min(0.5 * 2 ** min(failures - 1, 10), RETRY_MAX_S))

    def _sync_loop(self) -> None:
        pool = gevent.get_hub().threadpool
        while True:
            gevent.sleep(SYNC_INTERVAL_S)
            pool.apply(self.sync)
