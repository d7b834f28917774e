"""The TCP listener the PBX connects to (FastAGI for Asterisk, the socket application for
FreeSWITCH): bound at once, so that a port in use fails the agent's start, served by a pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent.pool
from gevent import socket
from gevent.server import StreamServer


def serve_tcp(host: str, port: int, handle: Callable[[socket.socket, Any], None],
              pool: gevent.pool.Pool, *, server_class: type[StreamServer] = StreamServer) -> StreamServer:
    """Bind and listen on ``host:port`` now (``OSError`` if the address is in use; port 0: any
    free one) and accept in the background, each connection handled in ``pool`` (by a
    ``server_class``: a subclass may act in the accept callback itself, before the
    connection's greenlet is scheduled)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    server = server_class(listener, handle, spawn=pool)
    server.start()
    return server
