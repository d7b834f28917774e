"""Live calls per carrier, shared by every node (DESIGN §10: a carrier's channel limit is
counted cluster-wide), when ``redis.url`` is set.

::

    {prefix}carrier:{NAME}:live   zset: call id -> ms after which it no longer counts

A node adds its call when the call is authorized on a carrier (the first route it is given),
renews it every ``ttl_ms / 3`` while the call lives and removes it when the call ends; the score
is the renewal instant + ``ttl_ms`` (60 s), so the calls of a node that died (or that a restarted
node adopted without its routes) stop counting within a minute. Each key is its own Redis
Cluster slot (the hash tag is the carrier): a step never touches two carriers.

Nothing here runs on the call path. Claims and releases are queued and written by one greenlet
in a pipeline (a Redis that is away delays them; they are retried, the oldest dropped beyond
``max_pending``); the counts are read by the same greenlet every ``refresh_s`` and kept as a
snapshot, which the router reads without a round trip. So another node's calls are seen at most
``refresh_s`` (+ the write) late: a channel limit can be passed by the calls the other nodes
authorized within that time. The router adds this node's own calls that are not in the
snapshot yet (``agent/services/routes.py``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gevent
import gevent.event

log = logging.getLogger(__name__)

MAX_PENDING = 100_000


class RedisCarrierChannels:
    def __init__(self, client: Any, *, key_prefix: str, now_ms: Callable[[], int],
                 carriers: Callable[[], Iterable[str]], live: Callable[[], Mapping[str, str]],
                 ttl_ms: int = 60_000, refresh_s: float = 0.5, max_pending: int = MAX_PENDING) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.ttl_ms = ttl_ms
        self.now_ms = now_ms
        self.carriers = carriers  # the carriers whose counts to read (the route book's)
        self.live = live  # this node's live calls: call id -> the carrier they count against
        self._renewed_ms = 0
        self.refresh_s = refresh_s
        self.max_pending = max_pending
        self._pending: deque[tuple[str, str, int]] = deque()  # (carrier, call id, expiry ms; 0 = release)
        self._counts: dict[str, int] = {}
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self.dropped = 0
        self.failures = 0

    def key(self, carrier: str) -> str:
        return f"{self.key_prefix}carrier:{{{carrier}}}:live"

    # ---------------------------------------------------------------- the engine's side (never waits)

    def claim(self, carrier: str, call_id: str) -> None:
        self._queue((carrier, call_id, self.now_ms() + self.ttl_ms))

    def release(self, carrier: str, call_id: str) -> None:
        self._queue((carrier, call_id, 0))

    def counts(self) -> Mapping[str, int]:
        """Calls per carrier on every node, as last read."""
        return self._counts

    def _queue(self, step: tuple[str, str, int]) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(step)
        self._wake.set()

    # ---------------------------------------------------------------- the worker

    def flush_once(self) -> None:
        """Write the queued claims and releases, then read every carrier's count (one pipeline
        each). Raises on a Redis error, the steps staying queued."""
        now = self.now_ms()
        if now - self._renewed_ms >= self.ttl_ms // 3:  # this node's live calls still hold their channel
            self._renewed_ms = now
            for call_id, carrier in list(self.live().items()):
                self._queue((carrier, call_id, now + self.ttl_ms))
        steps = list(self._pending)
        if steps:
            pipe = self.client.pipeline(transaction=False)
            for carrier, call_id, expires_ms in steps:
                key = self.key(carrier)
                if expires_ms:
                    pipe.zadd(key, {call_id: expires_ms})
                    pipe.pexpire(key, self.ttl_ms)
                else:
                    pipe.zrem(key, call_id)
            pipe.execute()
            for _ in steps:
                self._pending.popleft()
        names = sorted(set(self.carriers()))
        if not names:
            self._counts = {}
            return
        now = self.now_ms()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.zremrangebyscore(self.key(name), "-inf", now)
            pipe.zcard(self.key(name))
        replies = pipe.execute()
        self._counts = {name: int(replies[2 * i + 1]) for i, name in enumerate(names)}

    def _work(self) -> None:
        while True:
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            try:
                self.flush_once()
                if self.failures:
                    log.warning("carrier channel counts: Redis answers again")
                self.failures = 0
            except Exception as exc:  # noqa: BLE001 - a Redis away: the last counts serve, steps stay queued
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.error("carrier channel counts not written/read (%d pending): %s", len(self._pending), exc)
                gevent.sleep(min(5.0, self.refresh_s * self.failures))

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._work)
        self._greenlet.link_exception(lambda g: log.critical("carrier channel counts died: %r", g.exception))

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout_s)
        try:  # this node's last releases, so its ended calls do not hold channels until they expire
            with gevent.Timeout(timeout_s):
                if self._pending:
                    self.flush_once()
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - they expire by their score anyway
            log.warning("carrier channel counts: %d steps not written at stop: %s", len(self._pending), exc)
