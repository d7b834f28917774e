"""The FastAGI server: gevent ``StreamServer``, one greenlet per AGI session.

Why not panoramisk's ``Application`` (1.4)? Almost every part of it has to be replaced for a
billing daemon (reference/protocols.md §1.8): its header reader spins forever without yielding
when a peer closes before the blank line (the whole process freezes), it takes an out-of-band
``HANGUP`` line for the reply of the command in flight (every later read is off by one), reads
one line of a multi-line ``520`` usage, maps ``200 result=-1`` to an error and loses the value,
routes on the exact ``agi_network_script`` (``authorize?x=1`` is refused), has no timeouts, and
runs on asyncio, so the handler would have to hop to gevent and back for every decision. What
remains is a listening socket, the pure parsers of agi_protocol.py and a read loop, here.

``start()`` binds synchronously: a port in use raises ``OSError`` at once (the daemon fails fast).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.pool
from gevent import socket
from gevent.server import StreamServer

from agent.adapters.asterisk.agi_protocol import (
    HANGUP,
    AgiEnvironment,
    AgiProtocolError,
    AgiReply,
    AgiReplyReader,
    parse_environment,
    split_environment,
)
from agent.adapters.listener import serve_tcp

log = logging.getLogger(__name__)

RECV_BYTES = 16 * 1024


class AgiClosed(Exception):
    """The peer closed the AGI connection (or it timed out)."""


@dataclass
class AgiStats:
    sessions: int = 0
    active: int = 0
    bad_environments: int = 0  # not FastAGI, or closed / silent before the blank line
    closed_early: int = 0  # closed before all the replies came
    hangups_seen: int = 0  # out-of-band HANGUP lines
    errors: int = 0  # handler failures (logged)


class AgiSession:
    """One FastAGI connection: the environment, then commands and their replies."""

    def __init__(self, sock: socket.socket, address: Any, command_timeout_s: float) -> None:
        self.sock = sock
        self.address = address
        self.command_timeout_s = command_timeout_s
        self.reader = AgiReplyReader()
        self.hung_up = False  # Asterisk wrote HANGUP: the channel is gone (commands may still answer)
        self.commands_sent = 0  # round trips after the environment block
        self._items: list[AgiReply | str] = []
        self._rest = b""

    def read_environment(self, timeout_s: float) -> AgiEnvironment:
        buffer = b""
        with gevent.Timeout(timeout_s, AgiClosed(f"no complete AGI environment within {timeout_s}s")):
            while True:
                split = split_environment(buffer)
                if split is not None:
                    block, self._rest = split
                    return parse_environment(block)
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    raise AgiClosed(f"closed after {len(buffer)} bytes, before the end of the AGI environment")
                buffer += data

    def command(self, command: bytes) -> AgiReply:
        """Write one command and read its reply. Never more than one command in flight: real
        ``res_agi`` reads its socket through a stdio buffer (``fgets`` after a poll), so a second
        line written before the first reply sits in that buffer, unseen, until more bytes or the
        close arrive: pipelined commands stalled every call for our whole read timeout (5 s on
        Asterisk 20.20 and 22.10). ``HANGUP`` lines that come before the reply are noted
        (``hung_up``) and skipped: they are never taken for the reply."""
        if command.count(b"\n") != 1 or not command.endswith(b"\n"):
            raise AgiProtocolError(f"one AGI command per write, ending in a newline: {command[:80]!r}")
        with gevent.Timeout(self.command_timeout_s, AgiClosed(f"AGI write blocked for {self.command_timeout_s}s")):
            self.sock.sendall(command)
        self.commands_sent += 1
        with gevent.Timeout(self.command_timeout_s, AgiClosed(f"no AGI reply within {self.command_timeout_s}s "
                                                              f"to {command.strip()[:60]!r}")):
            while True:
                item = self._next_item()
                if item == HANGUP:
                    self.hung_up = True
                    continue
                assert isinstance(item, AgiReply)
                return item

    def last_command(self, command: bytes) -> AgiReply:
        """Write the session's last command and end our side of the stream in the same breath,
        then read its reply (for the log). ``res_agi`` reads the line, runs it, writes the reply,
        reads the end of the stream and the dialplan goes on, without waiting for this greenlet
        to be scheduled, read the reply and close (post-dial delay, issue 13)."""
        if command.count(b"\n") != 1 or not command.endswith(b"\n"):
            raise AgiProtocolError(f"one AGI command per write, ending in a newline: {command[:80]!r}")
        with gevent.Timeout(self.command_timeout_s, AgiClosed(f"AGI write blocked for {self.command_timeout_s}s")):
            self.sock.sendall(command)
            self.sock.shutdown(socket.SHUT_WR)
        self.commands_sent += 1
        with gevent.Timeout(self.command_timeout_s, AgiClosed(f"no AGI reply within {self.command_timeout_s}s "
                                                              f"to {command.strip()[:60]!r}")):
            while True:
                item = self._next_item()
                if item == HANGUP:
                    self.hung_up = True
                    continue
                assert isinstance(item, AgiReply)
                return item

    def _next_item(self) -> AgiReply | str:
        while not self._items:
            if self._rest:
                data, self._rest = self._rest, b""
            else:
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    raise AgiClosed("Asterisk closed the AGI connection")
            self._items.extend(self.reader.feed(data))
        return self._items.pop(0)


Handler = Callable[[AgiSession, AgiEnvironment], None]


class FastAgiServer:
    def __init__(self, host: str, port: int, handler: Handler, *, max_sessions: int = 2000,
                 environment_timeout_s: float = 5.0, command_timeout_s: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.handler = handler
        self.environment_timeout_s = environment_timeout_s
        self.command_timeout_s = command_timeout_s
        self.stats = AgiStats()
        self.pool = gevent.pool.Pool(max_sessions)
        self._server: StreamServer | None = None

    @property
    def bound_port(self) -> int:
        return int(self._server.server_port) if self._server is not None else self.port

    def start(self) -> None:
        """Bind and listen now (``OSError`` if the address is in use), accept in the background."""
        self._server = serve_tcp(self.host, self.port, self._handle, self.pool)
        log.info("FastAGI listening on %s:%d", self.host, self.bound_port)

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._server is not None:
            self._server.close()  # no new sessions
            self.pool.join(timeout=timeout_s)
            self.pool.kill(timeout=1.0)
            self._server = None

    def _handle(self, sock: socket.socket, address: Any) -> None:
        self.stats.sessions += 1
        self.stats.active += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = AgiSession(sock, address, self.command_timeout_s)
        try:
            try:
                environment = session.read_environment(self.environment_timeout_s)
            except (AgiClosed, AgiProtocolError, OSError) as exc:
                self.stats.bad_environments += 1
                log.warning("FastAGI %s: %s; connection closed (the dialplan refuses the call: no decision)",
                            _peer(address), exc)
                return
            if environment.problems:
                self.stats.bad_environments += 1
                log.warning("FastAGI %s: malformed environment lines ignored: %s", _peer(address),
                            "; ".join(environment.problems[:3]))
            try:
                self.handler(session, environment)
            except (AgiClosed, OSError) as exc:
                self.stats.closed_early += 1
                log.warning("FastAGI %s (channel %s): %s", _peer(address), environment.get("agi_channel") or "?", exc)
            except AgiProtocolError as exc:
                self.stats.errors += 1
                log.error("FastAGI %s (channel %s): %s", _peer(address), environment.get("agi_channel") or "?", exc)
            except Exception:  # one broken session must not stop the server
                self.stats.errors += 1
                log.exception("FastAGI session of channel %s failed", environment.get("agi_channel") or "?")
            if session.hung_up:
                self.stats.hangups_seen += 1
        finally:
            self.stats.active -= 1
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
