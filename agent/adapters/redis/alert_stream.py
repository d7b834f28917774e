"""Fraud alerts on a Redis Stream (``{redis.key_prefix}fraud:alerts``) when ``redis.url`` is set, for
other tools to consume (``XREAD``, consumer groups). One entry per alert, the fields of the webhook's
JSON (amounts as decimal strings); the stream is capped near ``MAX_ENTRIES`` (``XADD MAXLEN ~``).

``enqueue`` never waits on Redis: a greenlet sends the queued alerts in order and retries while
Redis is away (the queue is bounded and in memory: the alerts table and the webhook's disk spool
are the durable records)."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import gevent
import gevent.event

from agent.adapters.webhook import alert_payload
from agent.core.fraud import AlertRecord

log = logging.getLogger(__name__)

MAX_ENTRIES = 100_000
MAX_QUEUED = 10_000


class AlertStream:
    def __init__(self, client: Any, *, key_prefix: str = "") -> None:
        self.client = client
        self.key = f"{key_prefix}fraud:alerts"
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self._failures = 0

    def enqueue(self, alert: AlertRecord) -> None:
        if len(self._queue) >= MAX_QUEUED:
            dropped = self._queue.popleft()
            log.error("fraud alert stream queue full (Redis away?): %s not sent to %s", dropped.get("rule"), self.key)
        self._queue.append(alert_payload(alert))
        self._wake.set()

    def send_once(self) -> int:
        """XADD what is queued, oldest first; returns how many went (raises when Redis fails)."""
        sent = 0
        while self._queue:
            fields = {k: "" if v is None else str(v) for k, v in self._queue[0].items()}
            self.client.xadd(self.key, fields, maxlen=MAX_ENTRIES, approximate=True)
            self._queue.popleft()
            sent += 1
        return sent

    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(lambda g: log.critical("fraud alert stream sender died: %r", g.exception))

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                self._wake.wait(timeout=5.0)
                continue
            try:
                self.send_once()
                self._failures = 0
            except Exception as exc:  # noqa: BLE001 - Redis comes back; the queue keeps the alerts
                self._failures += 1
                if self._failures == 1 or self._failures % 20 == 0:
                    log.error("fraud alert stream %s: XADD failed (%s; %d alerts waiting)", self.key, exc,
                              len(self._queue))
                gevent.sleep(min(0.5 * 2 ** min(self._failures - 1, 6), 30.0))
