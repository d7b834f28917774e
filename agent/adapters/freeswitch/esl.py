"""The FreeSWITCH event-socket client: greenswitch's ``InboundESL``, supervised.

greenswitch 0.0.19 provides the connection, the password exchange, the FIFO of replies and the
handler registry. It lacks what a billing daemon needs (reference/protocols.md §0.8, §4.6), so
:class:`GreenswitchConnection` replaces two methods:

* ``receive_events``: greenswitch url-decodes a whole event before splitting it (an encoded
  newline or an event body ends up inside ``Content-Length``), trusts any ``Content-Length``,
  dies on a non-numeric one while ``connected`` stays True, and never fails the commands in
  flight when the socket drops. Ours reads with :class:`FrameReader` (esl_protocol.py), which
  names bad frames, and on any end fails every pending command at once.
* ``send``: greenswitch writes with ``sock.send`` (not ``sendall``), without a lock (two
  greenlets can interleave their bytes against the FIFO) and waits for the reply forever.
  Ours writes under a lock with ``sendall``, can pipeline several commands, and waits under a
  ``gevent.Timeout``; a timed-out command drops the connection (FreeSWITCH answers commands in
  order, a stall means the socket is dead or the switch is stuck).

:class:`EslClient` supervises it: connect (bounded), authenticate (a wrong password is a clear
error followed by the longest backoff, never a crash loop), subscribe with ``event plain`` to
the channel events the billing needs, call ``on_connected`` (the adapter's resync), then watch
the receive greenlet and the heartbeat (FreeSWITCH sends HEARTBEAT every 20 s: 45 s of silence
means a dead peer), and reconnect with a capped exponential backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import socket
from greenswitch.esl import InboundESL, NotConnectedError

from agent.adapters.backoff import Backoff
from agent.adapters.freeswitch.esl_protocol import (
    API_RESPONSE,
    AUTH_REQUEST,
    COMMAND_REPLY,
    DISCONNECT_NOTICE,
    EVENT_PLAIN,
    RUDE_REJECTION,
    EslError,
    Event,
    Frame,
    FrameReader,
    FramingError,
    encode_command,
    parse_event,
)
from agent.services.call_path import CALL_PATH

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024


class NotConnected(EslError):
    """No authenticated connection to FreeSWITCH right now."""


class CommandTimeout(EslError):
    """FreeSWITCH did not answer a command in time."""


class AuthenticationFailed(EslError):
    """FreeSWITCH refused the event-socket password or the client's address."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A command/reply or api/response (duck-typed like greenswitch's ESLEvent)."""

    content_type: str
    headers: dict[str, str]
    data: str  # Reply-Text of a command/reply, the body of an api/response


@dataclass(frozen=True)
class EslSettings:
    host: str = "127.0.0.1"
    port: int = 8021
    password: str = "ClueCon"
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 5.0
    heartbeat_timeout_s: float = 45.0  # FreeSWITCH sends HEARTBEAT every 20 s
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    events: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class GreenswitchConnection(InboundESL):  # type: ignore[misc]  # greenswitch has no type hints
    """One connection: greenswitch's connect/auth/dispatch with our reader and sender."""

    def __init__(self, settings: EslSettings, on_frame_error: Callable[[str], None]) -> None:
        super().__init__(settings.host, settings.port, settings.password, timeout=settings.connect_timeout_s)
        self.settings = settings
        self._on_frame_error = on_frame_error
        self._send_lock = gevent.lock.Semaphore()
        self.last_rx = time.monotonic()
        self._commands_sent: list[gevent.event.AsyncResult[Reply]] = []  # greenswitch's FIFO, typed
        self.rejection = ""  # text of a rude-rejection (ACL)
        self.closed_reason = ""

    # ---------------------------------------------------------------- receiving

    def receive_events(self) -> None:  # replaces greenswitch's line reader
        reader = FrameReader()
        reason = "closed by FreeSWITCH"
        try:
            while self._run:
                CALL_PATH.yield_to_calls()  # events carry FreeSWITCH's time stamps: they can wait
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    reader.close()
                    break
                self.last_rx = time.monotonic()
                for frame in reader.feed(data):
                    self._dispatch(frame)
        except FramingError as exc:
            reason = f"bad frame from FreeSWITCH: {exc}"
            self._on_frame_error(reason)
        except OSError as exc:
            reason = f"socket error: {exc}"
        except Exception as exc:  # a bug here must end the connection cleanly, never hang it
            reason = f"reader failed: {exc!r}"
            log.exception("event-socket reader failed")
        finally:
            self._lost(reason)

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.content_type
        if kind == EVENT_PLAIN:
            event = parse_event(frame.body, where=f"event at byte {frame.offset}")
            event.received_at = time.perf_counter()
            self._esl_event_queue.put(event)
        elif kind in (COMMAND_REPLY, API_RESPONSE):
            if not self._commands_sent:
                log.warning("FreeSWITCH sent a %s nobody asked for: %r", kind, frame.reply_text or frame.body[:80])
                return
            data = frame.reply_text if kind == COMMAND_REPLY else frame.text()
            self._commands_sent.pop(0).set(Reply(kind, dict(frame.headers), data))
        elif kind == AUTH_REQUEST:
            self._auth_request_event.set()
        elif kind == DISCONNECT_NOTICE:
            log.info("FreeSWITCH %s says: %s", self.settings.address, frame.text().strip().replace("\n", " "))
            if frame.headers.get("Content-Disposition") != "linger":
                self.connected = False
        elif kind == RUDE_REJECTION:
            self.rejection = frame.text().strip()
            self.connected = False
            self._auth_request_event.set()
        else:
            log.debug("ignoring a %s frame from FreeSWITCH", kind)

    def _lost(self, reason: str) -> None:
        # _run stays True: greenswitch's dispatcher must still hand over the events read before
        # the loss (a hangup just before a drop matters); close() drains it, then stops it.
        self.closed_reason = self.closed_reason or reason
        self.connected = False
        pending: list[gevent.event.AsyncResult[Reply]] = self._commands_sent
        self._commands_sent = []
        for result in pending:
            result.set_exception(NotConnected(f"connection to FreeSWITCH {self.settings.address} lost ({reason})"))
        self._auth_request_event.set()  # a connect() waiting for auth/request wakes up and fails
        try:
            self.sock.close()
        except OSError:
            pass

    # ---------------------------------------------------------------- sending

    def send(self, data: str) -> Reply:  # greenswitch's authenticate() goes through here
        return self.send_many([data], self.settings.command_timeout_s)[0]

    def send_many(self, commands: Sequence[str], timeout_s: float) -> list[Reply]:
        """Write the commands in one go and wait for their replies, in order."""
        payload = b"".join(encode_command(command) for command in commands)
        if not self.connected:
            raise NotConnected(f"not connected to FreeSWITCH {self.settings.address}")
        deadline = CommandTimeout(f"FreeSWITCH {self.settings.address} did not answer "
                                  f"{commands[0].split(' ', 2)[:2]} within {timeout_s}s")
        results: list[gevent.event.AsyncResult[Reply]] = [gevent.event.AsyncResult() for _ in commands]
        try:
            with gevent.Timeout(timeout_s, deadline):
                with self._send_lock:  # the FIFO order must be the byte order
                    self._commands_sent.extend(results)
                    try:
                        self.sock.sendall(payload)
                    except OSError as exc:
                        self._lost(f"send failed: {exc}")
                        raise NotConnected(f"connection to FreeSWITCH {self.settings.address} lost "
                                           f"while sending: {exc}") from exc
                return [result.get() for result in results]
        except CommandTimeout as exc:
            if exc is deadline:
                self._lost(str(exc))  # a half-written or unanswered command: this socket is done
            raise

    # ---------------------------------------------------------------- lifecycle

    def greenlets(self) -> list[gevent.Greenlet[Any, Any]]:
        return [g for g in (self._receive_events_greenlet, self._process_events_greenlet) if g is not None]

    def close(self, timeout_s: float = 1.0) -> None:
        """Say goodbye if possible, then stop both greenlets (bounded, unlike greenswitch's stop)."""
        if self.connected:
            try:
                self.send_many(["exit"], min(timeout_s, self.settings.command_timeout_s))
            except EslError:
                pass
        self._lost("closed by the agent")
        dispatcher = self._process_events_greenlet
        deadline = time.monotonic() + timeout_s
        while (dispatcher is not None and not dispatcher.dead and not self._esl_event_queue.empty()
               and time.monotonic() < deadline):
            gevent.sleep(0.005)
        self._run = False
        gevent.killall(self.greenlets(), timeout=timeout_s)


EventCallback = Callable[[Event], None]


class EslClient:
    """A supervised, always-reconnecting inbound event-socket client."""

    def __init__(self, settings: EslSettings, *, on_event: EventCallback,
                 on_connected: Callable[[], None] = lambda: None,
                 on_disconnected: Callable[[str], None] = lambda reason: None,
                 on_frame_error: Callable[[str], None] = lambda reason: None) -> None:
        self.settings = settings
        self.on_event = on_event
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.on_frame_error = on_frame_error
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self.group = gevent.pool.Group()
        self.connections = 0  # successful (authenticated and subscribed) connections so far
        self.auth_failures = 0
        self.last_error = ""
        self._conn: GreenswitchConnection | None = None
        self._ready = False
        self._running = False
        self._ready_event = gevent.event.Event()
        self._wake = gevent.event.Event()

    # ---------------------------------------------------------------- public

    @property
    def connected(self) -> bool:
        return self._ready and self._conn is not None and bool(self._conn.connected)

    def start(self) -> None:
        self._running = True
        supervisor = self.group.spawn(self._supervise)
        supervisor.link_exception(self._died)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._running = False
        self._wake.set()
        conn = self._conn
        if conn is not None:
            conn.close(timeout_s=min(timeout_s, 1.0))
        self.group.kill(timeout=timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._ready_event.wait(timeout_s) and self.connected

    def reconnect(self, reason: str) -> None:
        """Drop the current connection (the supervisor reconnects and resyncs)."""
        conn = self._conn
        if conn is not None:
            log.warning("dropping the FreeSWITCH connection: %s", reason)
            conn._lost(reason)

    def api(self, command: str, timeout_s: float | None = None) -> str:
        return self.api_many([command], timeout_s)[0]

    def api_many(self, commands: Sequence[str], timeout_s: float | None = None) -> list[str]:
        """Run several ``api`` commands pipelined; returns their outputs in order."""
        replies = self._send([f"api {command}" for command in commands], timeout_s)
        return [reply.data for reply in replies]

    def command(self, command: str, timeout_s: float | None = None) -> str:
        """A plain command (``event``, ``filter``, ...); returns its Reply-Text."""
        return self._send([command], timeout_s)[0].data

    # ---------------------------------------------------------------- internals

    def _send(self, commands: list[str], timeout_s: float | None) -> list[Reply]:
        conn = self._conn
        if conn is None or not self._ready:
            raise NotConnected(f"not connected to FreeSWITCH {self.settings.address}")
        return conn.send_many(commands, timeout_s or self.settings.command_timeout_s)

    def _died(self, greenlet: gevent.Greenlet[Any, Any]) -> None:
        log.critical("the FreeSWITCH supervisor died: %r; no more reconnects", greenlet.exception)

    def _supervise(self) -> None:
        while self._running:
            delay = self._session()
            if not self._running:
                break
            self._wake.clear()
            self._wake.wait(delay)

    def _session(self) -> float:
        """One connection's life; returns the delay before the next attempt."""
        conn: GreenswitchConnection | None = None
        was_ready = False
        try:
            conn = self._connect()
            self._conn = conn
            self._subscribe(conn)
            self._ready = True
            self._ready_event.set()
            self.connections += 1
            was_ready = True
            log.info("connected to FreeSWITCH %s (connection #%d)", self.settings.address, self.connections)
            connected_at = time.monotonic()
            self.on_connected()
            self._watch(conn)
            return self.backoff.after_connection(time.monotonic() - connected_at)
        except AuthenticationFailed as exc:
            self.auth_failures += 1
            self.last_error = str(exc)
            log.error("%s; retrying in %.0fs", exc, self.settings.backoff_max_s)
            return self.settings.backoff_max_s
        except (EslError, NotConnectedError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            delay = self.backoff.next()
            log.warning("FreeSWITCH %s: %s; retrying in %.1fs", self.settings.address, self.last_error, delay)
            return delay
        except Exception as exc:  # a bug in a callback must not stop the reconnect loop
            self.last_error = f"{type(exc).__name__}: {exc}"
            delay = self.backoff.next()
            log.exception("FreeSWITCH session failed unexpectedly; retrying in %.1fs", delay)
            return delay
        finally:
            self._ready = False
            self._ready_event.clear()
            if conn is not None:
                reason = conn.closed_reason or self.last_error or "closed"
                conn.close(timeout_s=0.5)
                self._conn = None
                if was_ready:
                    log.warning("FreeSWITCH %s disconnected: %s", self.settings.address, reason)
                    self._notify_disconnected(reason)

    def _notify_disconnected(self, reason: str) -> None:
        try:
            self.on_disconnected(reason)
        except Exception:  # the reconnect loop goes on whatever the callback does
            log.exception("on_disconnected callback failed")

    def _connect(self) -> GreenswitchConnection:
        conn = GreenswitchConnection(self.settings, self.on_frame_error)
        for name in self.settings.events:
            conn.register_handle(name, self._handle)
        deadline = CommandTimeout(f"no auth/request from {self.settings.address} within "
                                  f"{self.settings.connect_timeout_s}s")
        try:
            with gevent.Timeout(self.settings.connect_timeout_s, deadline):
                conn.connect()
        except socket.timeout as exc:
            conn.close(timeout_s=0.2)
            raise NotConnected(f"TCP connect to {self.settings.address} timed out") from exc
        except ValueError as exc:  # greenswitch: 'Invalid password.'
            conn.close(timeout_s=0.2)
            raise AuthenticationFailed(
                f"FreeSWITCH {self.settings.address} refused the event-socket password (check freeswitch.password "
                "in the agent's configuration and <param name=\"password\"> in event_socket.conf.xml)") from exc
        except NotConnectedError as exc:
            conn.close(timeout_s=0.2)
            if conn.rejection:
                raise AuthenticationFailed(
                    f"FreeSWITCH {self.settings.address} rejected this client: {conn.rejection!r} (allow the agent's "
                    "address in apply-inbound-acl, event_socket.conf.xml)") from exc
            raise NotConnected(f"FreeSWITCH {self.settings.address} closed the connection before the "
                               f"password exchange: {conn.closed_reason or exc}") from exc
        except BaseException:
            conn.close(timeout_s=0.2)
            raise
        # Small commands must not wait for a delayed ACK (FreeSWITCH sets TCP_NODELAY on its side too).
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for greenlet in conn.greenlets():
            self.group.add(greenlet)
        return conn

    def _subscribe(self, conn: GreenswitchConnection) -> None:
        if not self.settings.events:
            return
        reply = conn.send_many(["event plain " + " ".join(self.settings.events)],
                               self.settings.command_timeout_s)[0].data
        if not reply.startswith("+OK"):
            raise NotConnected(f"FreeSWITCH refused the event subscription: {reply}")

    def _watch(self, conn: GreenswitchConnection) -> None:
        receiver = conn._receive_events_greenlet
        while self._running and conn.connected:
            silent_s = time.monotonic() - conn.last_rx
            if silent_s > self.settings.heartbeat_timeout_s:
                conn._lost(f"no data (not even HEARTBEAT) for {silent_s:.0f}s")
                break
            receiver.join(timeout=min(1.0, self.settings.heartbeat_timeout_s - silent_s + 0.05))

    def _handle(self, event: Event) -> None:
        """Runs in greenswitch's dispatch greenlet: never raise, never block."""
        try:
            self.on_event(event)
        except Exception:  # one bad event must not stop the others
            log.exception("handling FreeSWITCH event %s failed", event.name)
