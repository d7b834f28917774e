"""Alerts on a Redis Stream (``{redis.key_prefix}fraud:alerts``) when ``redis.url`` is set, for
other tools to consume (``XREAD``, consumer groups). One entry per alert (fraud rules, low
balance, balance exhausted), the fields of the webhook's JSON (amounts as decimal strings, the
alert's ``event_id``); the stream is capped near ``MAX_ENTRIES`` (``XADD MAXLEN ~``).

``enqueue`` never waits on Redis: the alert goes to a queue (the daemon's is a file,
``{cdr.spool_dir}/alerts/stream.jsonl``, :class:`AlertSpool`: it survives a restart and an outage
of Redis) and a greenlet sends the queued alerts in order, in batches of one pipeline, retrying
while Redis is away. At least once: a batch sent just before a crash is sent again after it
(the same ``event_id``)."""

from __future__ import annotations

import logging
from typing import Any

import gevent
import gevent.event

from agent.adapters.webhook import alert_payload
from agent.core.fraud import AlertRecord
from agent.services.alerts import AlertQueue, MemoryAlertQueue

log = logging.getLogger(__name__)

MAX_ENTRIES = 100_000
BATCH = 200


class AlertStream:
    def __init__(self, client: Any, *, key_prefix: str = "", queue: AlertQueue | None = None) -> None:
        self.client = client
        self.key = f"{key_prefix}fraud:alerts"
        self.queue: AlertQueue = queue if queue is not None else MemoryAlertQueue()
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self._failures = 0

    def enqueue(self, alert: AlertRecord) -> None:
        self.queue.append(alert)
        self._wake.set()

    def send_once(self) -> int:
        """XADD what is queued, oldest first; returns how many went (raises when Redis fails:
        what did not go stays queued)."""
        sent = 0
        while len(self.queue):
            batch = self.queue.take(BATCH)
            if batch.records:
                pipe = self.client.pipeline(transaction=False)
                for record in batch.records:
                    fields = {k: "" if v is None else str(v) for k, v in alert_payload(record).items()}
                    pipe.xadd(self.key, fields, maxlen=MAX_ENTRIES, approximate=True)
                pipe.execute()
            self.queue.done(batch)
            sent += len(batch.records)
        return sent

    def pending(self) -> int:
        return len(self.queue)

    def sync(self) -> None:
        self.queue.sync()

    def start(self) -> None:
        if len(self.queue):
            log.warning("alert stream %s: %d alerts of an earlier run to send", self.key, len(self.queue))
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(lambda g: log.critical("alert stream sender died: %r", g.exception))

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout_s)
        self.queue.sync()
        self.queue.close()

    def _run(self) -> None:
        while True:
            if not len(self.queue):
                self._wake.clear()
                self._wake.wait(timeout=5.0)
                continue
            try:
                self.send_once()
                if self._failures:
                    log.warning("alert stream %s: Redis answers again after %d failures", self.key, self._failures)
                self._failures = 0
            except Exception as exc:  # noqa: BLE001 - Redis comes back; the queue keeps the alerts
                self._failures += 1
                if self._failures == 1 or self._failures % 20 == 0:
                    log.error("alert stream %s: XADD failed (%s; %d alerts waiting)", self.key, exc,
                              len(self.queue))
                gevent.sleep(min(0.5 * 2 ** min(self._failures - 1, 6), 30.0))
