"""Fraud alerts to a webhook: a signed JSON POST the receiver can verify, retried on 5xx and on a
receiver that hangs, refused ones set aside, and nothing lost across a restart (the disk spool).
A real HTTP server on loopback (a thread); no sleeps: each attempt is driven by the test."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.adapters.webhook import AlertWebhook
from agent.config import ConfigError, load_config
from agent.core.fraud import AlertRecord

SECRET = "s3cret"


class Receiver:
    def __init__(self) -> None:
        self.statuses: list[int] = []  # what to answer next (200 when empty); 0 = hang
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 0:
                    receiver.release.wait(5)
                    return
                receiver.received.append((dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()
    r.server.shutdown()
    r.server.server_close()


def alert(rule: str, figure: int = 4) -> AlertRecord:
    return AlertRecord(1_780_000_000_123, "n1", "victim", rule, "live_calls", figure, 3, 0, "suspend", "n1-c9",
                       "88212", f"live_calls to high_risk = {figure} > 3")


def test_alerts_are_signed_retried_and_survive_a_restart(receiver: Receiver, tmp_path: Path) -> None:
    hook = AlertWebhook(receiver.url, SECRET, tmp_path / "alerts", timeout_s=2)
    hook.enqueue(alert("irsf_parallel"))
    hook.enqueue(alert("spend_velocity", 7))
    receiver.statuses = [500]
    first = hook.deliver_once()
    assert first is not None and not first.delivered and first.status == 500
    hook.stop()

    again = AlertWebhook(receiver.url, SECRET, tmp_path / "alerts", timeout_s=2)  # the agent restarted
    assert again.pending() == 2
    assert again.deliver_once().delivered  # type: ignore[union-attr]
    assert again.deliver_once().delivered  # type: ignore[union-attr]
    assert again.deliver_once() is None and again.pending() == 0
    assert (tmp_path / "alerts" / "pending.jsonl").stat().st_size == 0  # emptied once all went

    bodies = [json.loads(body) for _, body in receiver.received]
    assert [b["rule"] for b in bodies] == ["irsf_parallel", "irsf_parallel", "spend_velocity"]  # the 500 one again
    assert bodies[0]["event_id"] == bodies[1]["event_id"]  # a retry is recognisable
    assert bodies[1]["at"] == "2026-05-28T20:26:40.123Z" and bodies[1]["figure"] == 4
    headers, body = receiver.received[1]
    expected = hmac.new(SECRET.encode(), headers["X-Billing-Timestamp"].encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    assert headers["X-Billing-Signature"] == f"sha256={expected}"
    assert headers["Content-Type"] == "application/json"
    again.stop()


def test_a_hanging_receiver_times_out_and_a_refusal_is_set_aside(receiver: Receiver, tmp_path: Path) -> None:
    hook = AlertWebhook(receiver.url, SECRET, tmp_path / "alerts", timeout_s=0.3)
    hook.enqueue(alert("a"))
    hook.enqueue(alert("b"))
    receiver.statuses = [0, 422]  # hangs, then refuses the same alert for good
    hung = hook.deliver_once()
    assert hung is not None and not hung.delivered and hung.status is None
    receiver.release.set()
    refused = hook.deliver_once()
    assert refused is not None and refused.delivered and refused.status == 422
    assert hook.deliver_once().delivered  # type: ignore[union-attr]  # "b" goes after the refused "a"
    (kept,) = (tmp_path / "alerts" / "rejected.jsonl").read_text().splitlines()
    assert json.loads(kept)["status"] == 422 and json.loads(kept)["alert"]["rule"] == "a"
    hook.stop()


def test_a_webhook_url_that_is_not_http_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fraud.webhook_url.*http:// or https://"):
        load_config(None, environ={}, cwd=tmp_path, overrides={"fraud": {"webhook_url": "ftp://example.com/x"}})


def test_alerts_go_to_a_redis_stream_in_order(redis_client: object, redis_prefix: str) -> None:
    from agent.adapters.redis.alert_stream import AlertStream

    stream = AlertStream(redis_client, key_prefix=redis_prefix)
    stream.enqueue(alert("irsf_parallel"))
    stream.enqueue(alert("spend_velocity", 7))
    assert stream.send_once() == 2 and stream.pending() == 0
    entries = redis_client.xrange(f"{redis_prefix}fraud:alerts")  # type: ignore[attr-defined]
    fields = [{k.decode(): v.decode() for k, v in entry.items()} for _, entry in entries]
    assert [(f["account"], f["rule"], f["figure"], f["action"]) for f in fields] == [
        ("victim", "irsf_parallel", "4", "suspend"), ("victim", "spend_velocity", "7", "suspend")]
