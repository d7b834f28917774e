"""Suspensions by fraud rules told to every node at once through Redis pub/sub (``redis.url`` set):
the node that suspends an account publishes ``{redis.key_prefix}fraud:suspended`` once the status
is written (SQL, then the balance store), and every other node cuts its calls of that account on
receipt, well within a second, instead of at its next look at ``call_commands``
(``daemon.publish_seconds``). Pub/sub delivers at most once: a node that was disconnected then
still cuts at its next publish (the SQL path), so nothing depends on this message alone."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import gevent

log = logging.getLogger(__name__)

POLL_S = 0.05


class SuspensionBus:
    def __init__(self, client: Any, *, key_prefix: str, node: str,
                 on_suspended: Callable[[str, str], object]) -> None:
        self.client = client
        self.channel = f"{key_prefix}fraud:suspended"
        self.node = node
        self.on_suspended = on_suspended  # (account, rule): cut this node's calls of the account
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self.received = 0

    def publish(self, account_id: str, rule: str) -> None:
        """Tell the other nodes (called off the call path, once the suspension is written)."""
        self.client.publish(self.channel, json.dumps({"account": account_id, "rule": rule, "node": self.node}))

    def handle(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
            account_id, rule, node = str(message["account"]), str(message["rule"]), str(message["node"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("fraud suspension bus: ignoring a message that is not ours (%s): %r", exc, data)
            return
        self.received += 1
        if node != self.node:  # the suspending node cut its own calls already
            self.on_suspended(account_id, rule)

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._listen)
        self._greenlet.link_exception(lambda g: log.critical("fraud suspension bus died: %r", g.exception))

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout_s)

    def _listen(self) -> None:
        failures = 0
        while True:
            pubsub = None
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                if failures:
                    log.warning("fraud suspension bus: subscribed to %s again", self.channel)
                failures = 0
                while True:
                    # Polled without waiting, then a gevent sleep: never a blocking read on the hub,
                    # whether or not the process is monkey-patched (at most 50 ms late).
                    message = pubsub.get_message(timeout=0)
                    if message is None:
                        gevent.sleep(POLL_S)
                    elif message.get("type") == "message":
                        self.handle(message["data"])
            except Exception as exc:  # noqa: BLE001 - Redis comes back; the SQL path cuts meanwhile
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.error("fraud suspension bus: %s (attempt %d); other nodes' suspensions reach this node "
                              "through SQL meanwhile", exc, failures)
                gevent.sleep(min(0.5 * 2 ** min(failures - 1, 6), 30.0))
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # closing a broken connection
                        log.debug("closing the pubsub connection failed", exc_info=True)
