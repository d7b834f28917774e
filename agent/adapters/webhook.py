"""Alerts delivered to a webhook (``fraud.webhook_url``): a JSON POST signed with HMAC-SHA256,
retried with a backoff, spooled to disk so that neither an outage of the receiver nor a restart of
the agent loses one. Every alert of the node goes there: fraud rules (``"type": "fraud_alert"``)
and low balance / balance exhausted (``"type": "balance_alert"``).

The spool is ``{cdr.spool_dir}/alerts/pending.jsonl`` (one alert a line, appended with one
``write``: in the kernel when ``enqueue`` returns; fsynced in groups by the alert service) and
``delivered`` (the byte offset of the first alert not yet delivered, replaced atomically after
each delivery): a :class:`LineSpool`. When every alert is delivered both are emptied. A delivery
is at least once: each alert carries an ``event_id`` (the same in the ``alerts``-table writer's
spool and on the Redis Stream) the receiver can use to drop a repeat.

Answers: 2xx delivered; 408, 429 and 5xx, a timeout or a refused connection are retried (0.5 s
doubling to 5 min) while the alerts behind wait in order; another 4xx is a refusal for good: the
alert goes to ``rejected.jsonl`` with the status, and the next one is sent.

Headers: ``Content-Type: application/json``, ``X-Billing-Event-Id``, ``X-Billing-Timestamp`` (unix
seconds) and ``X-Billing-Signature: sha256=HEX``, the HMAC-SHA256 with ``fraud.webhook_secret`` of
``TIMESTAMP.BODY`` (so a replayed old body fails a receiver that checks the timestamp).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.event

from agent.adapters.alert_spool import LineSpool
from agent.core.fraud import BALANCE_KINDS, MONEY_KINDS, AlertRecord
from agent.core.money import format_amount

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 300.0
RETRYABLE = frozenset({408, 429})


def alert_payload(alert: AlertRecord) -> dict[str, Any]:
    """The JSON body of one alert (amounts as decimal strings, DESIGN §7)."""
    def money(value: int) -> int | str:
        return format_amount(value) if alert.kind in MONEY_KINDS else value

    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(alert.at_ms // 1000)) + f".{alert.at_ms % 1000:03d}Z"
    kind = "balance_alert" if alert.kind in BALANCE_KINDS else "fraud_alert"
    return {"event_id": alert.event_id or uuid.uuid4().hex, "type": kind, "at": at, "node": alert.node,
            "account": alert.account_id, "rule": alert.rule, "kind": alert.kind, "figure": money(alert.figure),
            "threshold": money(alert.threshold), "window_s": alert.window_s, "action": alert.action,
            "call_id": alert.call_id, "destination": alert.destination, "detail": alert.detail}


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass(frozen=True, slots=True)
class Attempt:
    delivered: bool  # the head of the spool went (or was refused for good): the next one may go
    status: int | None  # the HTTP status, None for no answer
    reason: str = ""


class AlertWebhook:
    def __init__(self, url: str, secret: str, folder: Path, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        self.folder = folder
        self.pending_path = folder / "pending.jsonl"
        self.offset_path = folder / "delivered"
        self.rejected_path = folder / "rejected.jsonl"
        self.spool = LineSpool(self.pending_path, self.offset_path)
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self._failures = 0
        self.delivered = 0

    # ---------------------------------------------------------------- the call path side

    def enqueue(self, alert: AlertRecord) -> None:
        """Append the alert to the spool (one write, no wait on the network)."""
        if not self.spool.append(json.dumps(alert_payload(alert), separators=(",", ":")).encode()):
            log.error("alert webhook spool %s full: alert %s not kept for %s", self.pending_path, alert.event_id,
                      self.url)
        self._wake.set()

    def sync(self) -> None:
        self.spool.sync()

    # ---------------------------------------------------------------- delivery

    def pending(self) -> int:
        """Alerts spooled and not delivered yet."""
        return len(self.spool)

    def deliver_once(self) -> Attempt | None:
        """POST the oldest undelivered alert; None when there is none. Blocks for at most
        ``timeout_s`` (call it from a greenlet of its own under gevent)."""
        lines, next_offset = self.spool.read(1)
        if not lines:
            return None
        body = lines[0]
        try:
            event_id = str(json.loads(body).get("event_id", ""))
        except (ValueError, AttributeError):  # not a JSON object: a damaged spool line
            log.error("alert webhook spool %s: unreadable line skipped: %r", self.pending_path, body[:200])
            self.spool.advance(next_offset, 1)
            return Attempt(True, None, "unreadable")
        timestamp = str(int(time.time()))
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "billing-agent", "X-Billing-Event-Id": event_id,
            "X-Billing-Timestamp": timestamp, "X-Billing-Signature": signature(self.secret, timestamp, body)})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:  # http(s) only: the config checks
                status = int(answer.status)
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
        except (OSError, ValueError) as exc:  # refused, reset, timeout, DNS
            return Attempt(False, None, str(getattr(exc, "reason", exc)))
        if 200 <= status < 300:
            self.spool.advance(next_offset, 1)
            self.delivered += 1
            return Attempt(True, status)
        if 400 <= status < 500 and status not in RETRYABLE:
            with open(self.rejected_path, "ab") as rejected:
                rejected.write(json.dumps({"status": status, "alert": json.loads(body)}).encode() + b"\n")
            self.spool.advance(next_offset, 1)
            log.error("alert webhook %s refused alert %s with HTTP %d: kept in %s, not retried", self.url,
                      event_id, status, self.rejected_path)
            return Attempt(True, status, "refused")
        return Attempt(False, status, f"HTTP {status}")

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(lambda g: log.critical("alert webhook sender died: %r", g.exception))

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout_s)
        self.spool.sync()
        self.spool.close()

    def _run(self) -> None:
        while True:
            attempt = self.deliver_once()
            if attempt is None:
                self._wake.clear()
                self._wake.wait(timeout=5.0)
                continue
            if attempt.delivered:
                if self._failures:
                    log.warning("alert webhook %s answers again after %d failed attempts", self.url,
                                self._failures)
                self._failures = 0
                continue
            self._failures += 1
            delay = min(RETRY_MIN_S * 2 ** min(self._failures - 1, 20), RETRY_MAX_S)
            if self._failures == 1 or self._failures % 10 == 0:
                log.error("alert webhook %s failed (%s; attempt %d, %d alerts waiting); retrying in %.1fs",
                          self.url, attempt.reason, self._failures, self.pending(), delay)
            gevent.sleep(delay)
