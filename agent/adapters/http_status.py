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

from gevent.pywsgi import WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class StatusServer:
    def __init__(self, host: str, port: int, metrics: Metrics, checks: dict[str, HealthCheck],
                 calls: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.metrics = metrics
        self.checks = checks
        self.calls = calls or (lambda: [])
        self.server = WSGIServer((host, port), self._app, log=None, error_log=log)

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
