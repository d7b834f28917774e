"""The AMI client: gevent-native, supervised, always reconnecting.

Why not panoramisk's ``Manager`` (1.4, the version pip installs)? Each of these is a way to lose a
call's money or freeze supervision (reference/protocols.md §2.5, and its source):

* after a reconnect it re-sends the actions that were pending at the drop, on ``FullyBooted``:
  a ``Hangup`` the engine gave up on can run minutes later against a reused channel;
* the ping reply is never checked, so a silently dead TCP connection is never noticed;
* a refused login reconnects every ``reconnect_timeout`` seconds forever, without backoff;
* its parser only splits on ``\\r\\n\\r\\n``: a peer ending lines with ``\\n`` (or garbage with
  no blank line) grows its buffer without bound;
* it is asyncio: every event and every action would cross a bridge between the asyncio loop and
  the gevent hub (protocols §3), two more hops for nothing on a path that must carry 5,000
  events/s.

What remains is small: a socket, a pure framing parser (ami_protocol.py), ActionIDs matched to
waiting greenlets, ``EventList`` collection, a ping watchdog and a capped exponential backoff.
An action never outlives its connection: a drop fails every pending action at once
(``NotConnected``), nothing is ever re-sent.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import socket

from agent.adapters.asterisk.ami_protocol import AmiFramingError, AmiMessage, AmiParser, encode_action
from agent.adapters.backoff import Backoff
from agent.services.call_path import CALL_PATH

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024


class AmiError(Exception):
    """An AMI action failed (the message says why)."""


class NotConnected(AmiError):
    """No logged-in AMI connection right now (or it dropped while the action was pending)."""


class ActionTimeout(AmiError):
    """Asterisk did not answer an action in time."""


class LoginRefused(AmiError):
    """Asterisk refused the AMI username/secret (or the client's address)."""


@dataclass(frozen=True)
class AmiSettings:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "billing"
    secret: str = ""
    events: str = "call"  # Login "Events:" filter: the channel events (manager_billing.conf: read = call)
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 5.0
    connect_timeout_s: float = 3.0
    action_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    login_refused_delay_s: float = 30.0  # a wrong secret is not fixed by retrying faster

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class _Pending:
    result: gevent.event.AsyncResult
    list_end: str = ""  # the event that ends an EventList ("CoreShowChannelsComplete")
    response: AmiMessage | None = None
    items: list[AmiMessage] = field(default_factory=list)


@dataclass
class AmiStats:
    connections: int = 0
    login_refusals: int = 0
    messages: int = 0
    events: int = 0
    garbage: int = 0  # messages with unparseable lines, or neither Event nor Response
    framing_errors: int = 0
    ping_failures: int = 0


class _Connection:
    """One TCP connection: a socket, its parser, its pending actions, its reader greenlet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = AmiParser()
        self.pending: dict[str, _Pending] = {}
        self.write_lock = gevent.lock.Semaphore()
        self.closed_reason = ""
        self.last_rx = time.monotonic()

    def close(self, reason: str) -> None:
        if not self.closed_reason:
            self.closed_reason = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader now (close() alone would not)
        except OSError:
            pass
        self.sock.close()
        pending, self.pending = self.pending, {}
        for item in pending.values():
            if not item.result.ready():
                item.result.set_exception(NotConnected(f"AMI connection lost: {self.closed_reason}"))


EventCallback = Callable[[AmiMessage], None]


class AmiClient:
    def __init__(self, settings: AmiSettings, *, on_event: EventCallback,
                 on_connected: Callable[[], None] = lambda: None,
                 on_disconnected: Callable[[str], None] = lambda reason: None) -> None:
        self.settings = settings
        self.on_event = on_event
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.stats = AmiStats()
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self.last_error = ""
        self.group = gevent.pool.Group()
        self._conn: _Connection | None = None
        self._logged_in = False
        self._running = False
        self._wake = gevent.event.Event()
        self._ids = itertools.count(1)
        self._last_garbage_log = 0.0

    # ---------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        return self._logged_in and self._conn is not None and not self._conn.closed_reason

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        supervisor = self.group.spawn(self._supervise)
        supervisor.link_exception(self._died)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._running = False
        self._wake.set()
        conn = self._conn
        if conn is not None:
            if self._logged_in:
                try:  # polite: Asterisk logs "Logoff" instead of a broken connection
                    with gevent.Timeout(min(0.5, timeout_s), False):
                        self._write(conn, encode_action("Logoff", self._next_id()))
                except OSError:
                    pass
            conn.close("stopped")
        self.group.kill(timeout=timeout_s)

    def _died(self, greenlet: gevent.Greenlet[Any, Any]) -> None:
        log.critical("the AMI supervisor died: %r; no more reconnects", greenlet.exception)

    # ---------------------------------------------------------------- actions

    def action(self, name: str, fields: Iterable[tuple[str, str]] = (), *,
               timeout_s: float | None = None) -> AmiMessage:
        """Send one action, return its response (``Response: Error`` is returned, not raised)."""
        result = self._send(name, list(fields), "", timeout_s)
        assert isinstance(result, AmiMessage)
        return result

    def action_list(self, name: str, list_end: str, fields: Iterable[tuple[str, str]] = (), *,
                    timeout_s: float | None = None) -> list[AmiMessage]:
        """An ``EventList`` action: the events up to ``list_end``; raises ``AmiError`` on an error."""
        result = self._send(name, list(fields), list_end, timeout_s)
        if isinstance(result, AmiMessage):
            raise AmiError(f"{name}: {result.response} {result.get('Message')}".strip())
        return result

    def _send(self, name: str, fields: list[tuple[str, str]], list_end: str,
              timeout_s: float | None) -> AmiMessage | list[AmiMessage]:
        conn = self._conn
        if conn is None or conn.closed_reason or (not self._logged_in and name != "Login"):
            raise NotConnected(f"not connected to Asterisk AMI {self.settings.address}")
        return self._exchange(conn, name, fields, list_end, timeout_s or self.settings.action_timeout_s)

    def _exchange(self, conn: _Connection, name: str, fields: list[tuple[str, str]], list_end: str,
                  timeout_s: float) -> AmiMessage | list[AmiMessage]:
        action_id = self._next_id()
        data = encode_action(name, action_id, fields)
        pending = _Pending(gevent.event.AsyncResult(), list_end)
        conn.pending[action_id] = pending
        try:
            self._write(conn, data)
            result: AmiMessage | list[AmiMessage] = pending.result.get(timeout=timeout_s)
            return result
        except gevent.Timeout as exc:
            raise ActionTimeout(f"Asterisk did not answer {name} within {timeout_s}s") from exc
        except OSError as exc:
            conn.close(f"write failed: {exc}")
            raise NotConnected(f"AMI write of {name} failed: {exc}") from exc
        finally:
            conn.pending.pop(action_id, None)

    def _write(self, conn: _Connection, data: bytes) -> None:
        with conn.write_lock:
            with gevent.Timeout(self.settings.action_timeout_s, OSError("AMI write timed out")):
                conn.sock.sendall(data)

    def _next_id(self) -> str:
        return f"billing-{next(self._ids)}"

    # ---------------------------------------------------------------- supervision

    def _supervise(self) -> None:
        while self._running:
            delay = self._session()
            if not self._running:
                break
            self._wake.clear()
            self._wake.wait(delay)

    def _session(self) -> float:
        """One connection's life; returns the delay before the next attempt."""
        conn: _Connection | None = None
        was_ready = False
        try:
            conn = self._connect()
            self._conn = conn
            reader = self.group.spawn(self._read, conn)
            self._login(conn)
            self._logged_in = True
            was_ready = True
            self.stats.connections += 1
            log.info("connected to Asterisk AMI %s as %r (connection #%d)", self.settings.address,
                     self.settings.username, self.stats.connections)
            connected_at = time.monotonic()
            self.group.spawn(self._resync, conn)
            self._watch(conn, reader)
            self.last_error = conn.closed_reason
            return self.backoff.after_connection(time.monotonic() - connected_at)
        except LoginRefused as exc:
            self.stats.login_refusals += 1
            self.last_error = str(exc)
            log.error("%s; retrying in %.0fs", exc, self.settings.login_refused_delay_s)
            return self.settings.login_refused_delay_s
        except (AmiError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            delay = self.backoff.next()
            log.warning("Asterisk AMI %s: %s; retrying in %.1fs", self.settings.address, self.last_error, delay)
            return delay
        except Exception as exc:  # a bug in a callback must not stop the reconnect loop
            self.last_error = f"{type(exc).__name__}: {exc}"
            delay = self.backoff.next()
            log.exception("AMI session failed unexpectedly; retrying in %.1fs", delay)
            return delay
        finally:
            self._logged_in = False
            if conn is not None:
                conn.close(conn.closed_reason or self.last_error or "closed")
                self._conn = None
                if was_ready:
                    log.warning("Asterisk AMI %s disconnected: %s", self.settings.address, conn.closed_reason)
                    try:
                        self.on_disconnected(conn.closed_reason)
                    except Exception:  # the reconnect loop goes on whatever the callback does
                        log.exception("on_disconnected callback failed")

    def _connect(self) -> _Connection:
        try:
            sock = socket.create_connection((self.settings.host, self.settings.port),
                                            timeout=self.settings.connect_timeout_s)
        except OSError as exc:
            raise NotConnected(f"cannot connect to {self.settings.address}: {exc}") from exc
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(sock)

    def _login(self, conn: _Connection) -> None:
        fields = [("Username", self.settings.username), ("Secret", self.settings.secret),
                  ("Events", self.settings.events)]
        try:
            reply = self._exchange(conn, "Login", fields, "", self.settings.connect_timeout_s + 2.0)
        except ActionTimeout as exc:
            raise NotConnected(f"Asterisk AMI {self.settings.address} did not answer the login: "
                               f"{conn.closed_reason or exc}") from exc
        assert isinstance(reply, AmiMessage)
        if reply.response != "Success":
            raise LoginRefused(
                f"Asterisk AMI {self.settings.address} refused the login of user {self.settings.username!r}: "
                f"{reply.get('Message') or reply.response or 'no reason'} (check asterisk.ami_username/ami_secret "
                "in the agent's configuration and the [user] section, permit= and secret= in manager.conf)")

    def _resync(self, conn: _Connection) -> None:
        try:
            self.on_connected()
        except AmiError as exc:
            log.error("AMI resync failed: %s; reconnecting", exc)
            conn.close(f"resync failed: {exc}")
        except Exception:  # logged; the connection is reset so that the resync is retried
            log.exception("AMI resync failed; reconnecting")
            conn.close("resync failed")

    def _watch(self, conn: _Connection, reader: gevent.Greenlet[Any, Any]) -> None:
        """Ping every ``ping_interval_s``; no answer within ``ping_timeout_s`` drops the connection."""
        while self._running and not conn.closed_reason:
            reader.join(timeout=self.settings.ping_interval_s)
            if conn.closed_reason or not self._running:
                break
            try:
                reply = self._exchange(conn, "Ping", [], "", self.settings.ping_timeout_s)
            except AmiError as exc:
                self.stats.ping_failures += 1
                conn.close(f"no answer to Ping: {exc}")
                break
            if isinstance(reply, AmiMessage) and reply.response != "Success":
                log.warning("AMI Ping answered %s %s", reply.response, reply.get("Message"))

    def _read(self, conn: _Connection) -> None:
        try:
            while True:
                CALL_PATH.yield_to_calls()  # events carry Asterisk's time stamps: they can wait
                data = conn.sock.recv(RECV_BYTES)
                if not data:
                    conn.close(conn.closed_reason or "Asterisk closed the connection")
                    return
                conn.last_rx = time.monotonic()
                for message in conn.parser.feed(data):
                    self._dispatch(conn, message)
        except AmiFramingError as exc:
            self.stats.framing_errors += 1
            log.error("AMI %s: %s; resetting the connection", self.settings.address, exc)
            conn.close(str(exc))
        except OSError as exc:
            conn.close(conn.closed_reason or f"read failed: {exc}")

    def _dispatch(self, conn: _Connection, message: AmiMessage) -> None:
        self.stats.messages += 1
        if message.problems or not (message.event or message.response):
            self._garbage(message)
            if not (message.event or message.response):
                return
        action_id = message.action_id
        pending = conn.pending.get(action_id) if action_id else None
        if pending is not None:
            self._answer(pending, message)
            return
        if message.response:
            return  # the answer to an action that timed out, or to Logoff
        self.stats.events += 1
        try:
            self.on_event(message)
        except Exception:  # one bad event must not stop the others
            log.exception("handling AMI event %s failed", message.event)

    @staticmethod
    def _answer(pending: _Pending, message: AmiMessage) -> None:
        if pending.result.ready():
            return
        if not pending.list_end:
            if message.response:
                pending.result.set(message)
            return
        if message.response:
            if message.response != "Success" or message.get("EventList") != "start":
                pending.result.set(message)  # an error: no list follows
            pending.response = message
            return
        if message.event == pending.list_end or message.get("EventList") == "Complete":
            pending.result.set(pending.items)
        else:
            pending.items.append(message)

    def _garbage(self, message: AmiMessage) -> None:
        self.stats.garbage += 1
        now = time.monotonic()
        if now - self._last_garbage_log >= 5.0:  # a flood of garbage must not flood the log
            self._last_garbage_log = now
            problems = "; ".join(message.problems) or "neither Event nor Response"
            log.warning("AMI %s sent an unreadable message (%d so far): %s", self.settings.address,
                        self.stats.garbage, problems)
