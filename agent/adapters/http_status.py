"""The agent's HTTP endpoint: Prometheus metrics, health, and live calls (gevent WSGI server).

``GET /metrics``  Prometheus text format.
``GET /health``   200 with ``{"status": "ok", ...}`` when every check passes, else 503 naming the
                  failing checks (the PBX connection, the balance store, the database).
``GET /calls``    the calls this agent supervises, as JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import gevent.pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


MAX_CONNECTIONS = 32  # scrapes and health checks; more wait in the listen backlog, holding no descriptor
REQUEST_TIMEOUT_S = 5.0  # a client that does not finish its request (or read the answer) in this is dropped


class _TimedHandler(WSGIHandler):  # type: ignore[misc]  # gevent ships no types for pywsgi
    """pywsgi waits for a request's headers without a deadline: 1,020 slow, never-finished
    requests once held 1,020 of the process's 1,024 descriptors and FastAGI could not accept a
    call. Every read and write of a status connection now has a deadline."""

    def handle(self) -> None:
        self.socket.settimeout(REQUEST_TIMEOUT_S)
        super().handle()


class StatusServer:
    """``/metrics``, ``/health`` and ``/calls`` with a cap on connections (``MAX_CONNECTIONS``,
    the rest wait in the kernel's backlog) and a deadline on each (``REQUEST_TIMEOUT_S``), so the
    status port can never starve the call path of descriptors."""

    def __init__(self, host: str, port: int, metrics: Metrics, checks: dict[str, HealthCheck],
                 calls: Callable[[], list[dict[str, Any]]] | None = None, *,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.metrics = metrics
        self.checks = checks
        self.calls = calls or (lambda: [])
        self.server = WSGIServer((host, port), self._app, log=None, error_log=log, handler_class=_TimedHandler,
                                 spawn=gevent.pool.Pool(max_connections))

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> None:
        self.server.start()  # binds now: a port in use fails here, at start

    def stop(self, timeout_s: float = 2.0) -> None:
        self.server.stop(timeout=timeout_s)

    def health(self) -> tuple[bool, dict[str, Any]]:
        results = {}
        healthy = True
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # a failing check is a red check, never a crashed endpoint
                log.warning("health check %s failed: %s", name, exc, exc_info=True)
                ok, detail = False, f"check failed: {exc}"
            results[name] = {"ok": ok, "detail": detail}
            healthy = healthy and ok
        return healthy, {"status": "ok" if healthy else "failing", "checks": results}

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body = generate_latest(self.metrics.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path in ("/health", "/healthz"):
            healthy, report = self.health()
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps(report).encode()]
        if path == "/calls":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(self.calls()).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /health or /calls\n"]
