"""The status port cannot starve the call path of descriptors (issue 14.15)."""

from __future__ import annotations

import gevent
import gevent.socket

from agent.adapters import http_status
from agent.adapters.http_status import StatusServer
from agent.services.metrics import Metrics


def get(port: int, path: str) -> int:
    with gevent.Timeout(5):
        conn = gevent.socket.create_connection(("127.0.0.1", port))
        try:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        finally:
            conn.close()
    return int(data.split()[1])


def test_slow_never_finished_requests_are_capped_and_dropped(monkeypatch) -> None:
    monkeypatch.setattr(http_status, "REQUEST_TIMEOUT_S", 0.5)
    server = StatusServer("127.0.0.1", 0, Metrics(), {"db": lambda: (True, "ok")}, max_connections=4)
    server.start()
    slow = []
    try:
        for _ in range(12):  # each sends half a request line and then nothing, forever
            conn = gevent.socket.create_connection(("127.0.0.1", server.port))
            conn.sendall(b"GET /health HT")
            slow.append(conn)
        gevent.sleep(0.2)
        assert len(server.server.pool) <= 4  # never more than the cap held by the server
        started = gevent.get_hub().loop.now()
        assert get(server.port, "/health") == 200  # answered once the slow ones time out
        assert gevent.get_hub().loop.now() - started < 3.0
        dropped = 0
        for conn in slow:
            conn.settimeout(3)
            try:
                if conn.recv(1024) == b"":
                    dropped += 1
            except OSError:
                dropped += 1
        assert dropped == len(slow)
    finally:
        for conn in slow:
            conn.close()
        server.stop()
