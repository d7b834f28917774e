"""Fraud rules in SQL: the append-only ``alerts`` table (every alert of the node: fraud rules, low
balance), an account suspended by a rule, and the hangup of its live calls on the other nodes
(through ``call_commands``, the path of ``billing-agent calls hangup``). Called off the call path
by the alert service's and the fraud service's workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from agent.adapters.sql.models import Account, CallCommand, FraudAlert, LiveCallRow, utcnow
from agent.core.errors import NotFound
from agent.core.fraud import AlertRecord


def _moment(at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms // 1000, tz=UTC) + timedelta(milliseconds=at_ms % 1000)


def _row(a: AlertRecord) -> dict[str, Any]:
    return {"created_at": _moment(a.at_ms), "node": a.node[:64], "account_id": a.account_id[:64],
            "rule": a.rule[:64], "kind": a.kind[:32], "figure": a.figure, "threshold": a.threshold,
            "window_s": a.window_s, "action": a.action[:16], "call_id": a.call_id[:64],
            "destination": a.destination[:64], "detail": a.detail[:255]}


def _key(node: str, account_id: str, rule: str, created_at: datetime, call_id: str) -> tuple[Any, ...]:
    return node, account_id, rule, created_at.astimezone(UTC).replace(tzinfo=None), call_id


def record_alerts(engine: Engine, alerts: Sequence[AlertRecord]) -> int:
    """Append alerts to the ``alerts`` table in one transaction; returns how many were added.

    An alert the table already holds (the same node, account, rule, instant and call: a batch
    written just before a crash or a lost commit answer, replayed from the spool) is not added
    again. The throttle gives at most one alert per node, account and rule per period, so that
    key names one alert."""
    if not alerts:
        return 0
    rows = [_row(a) for a in alerts]
    moments = [row["created_at"] for row in rows]
    with engine.begin() as conn:
        held = {_key(*found) for found in conn.execute(
            select(FraudAlert.node, FraudAlert.account_id, FraudAlert.rule, FraudAlert.created_at, FraudAlert.call_id)
            .where(FraudAlert.node.in_({row["node"] for row in rows}), FraudAlert.created_at >= min(moments),
                   FraudAlert.created_at <= max(moments)))}
        fresh = [row for row in rows if _key(row["node"], row["account_id"], row["rule"], row["created_at"],
                                             row["call_id"]) not in held]
        if fresh:
            conn.execute(insert(FraudAlert), fresh)
    return len(fresh)


class SqlAlerts:
    """The alert service's ``AlertSink``: the ``alerts`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        record_alerts(self.engine, alerts)


class SqlFraudActions:
    """The ``FraudActions`` port on the shared database. ``refresh`` pushes an account's new status
    into the balance store when it keeps one of its own (Redis); the SQL store reads it at once."""

    def __init__(self, engine: Engine, refresh: Callable[[str], object] | None = None) -> None:
        self.engine = engine
        self.refresh = refresh

    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        """(The port's; the daemon's alerts go through the alert service and ``SqlAlerts``.)"""
        record_alerts(self.engine, alerts)

    def suspend(self, account_id: str, rule: str, at_ms: int) -> bool:
        """Suspend an active account, naming the rule and the instant; False when it is unknown or
        not active (already suspended, closed)."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(Account).where(Account.id == account_id, Account.status == "active")
                .values(status="suspended", suspended_by_rule=rule[:64], suspended_at=_moment(at_ms),
                        updated_at=utcnow())).rowcount
            status = conn.scalar(select(Account.status).where(Account.id == account_id))
        if status == "suspended" and self.refresh is not None:  # again on a retry: Redis may have failed
            self.refresh(account_id)
        return bool(changed)

    def cut_elsewhere(self, account_id: str, node: str, reason: str) -> list[str]:
        """Queue a hangup of every live call of the account that another node supervises; the
        owning node carries it out within ``daemon.publish_seconds``. Returns the call ids."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(LiveCallRow.call_id, LiveCallRow.node).where(
                LiveCallRow.account_id == account_id, LiveCallRow.node != node)).all()
            if rows:
                now = utcnow()
                conn.execute(insert(CallCommand), [
                    {"call_id": call_id, "node": owner, "command": "hangup", "reason": reason[:255],
                     "requested_at": now, "result": ""} for call_id, owner in rows])
        return [row[0] for row in rows]


def suspended_by_rule(engine: Engine) -> dict[str, str]:
    """The accounts a fraud rule suspended (and nobody resumed): account -> rule. Each node cuts its
    own calls of them, also those authorized just before the suspension and not yet published.
    A few rows, read through the index on ``suspended_by_rule`` (NULL for every other account)."""
    with engine.connect() as conn:
        rows = conn.execute(select(Account.id, Account.suspended_by_rule).where(
            Account.suspended_by_rule.is_not(None), Account.status == "suspended"))
        return {account_id: str(rule) for account_id, rule in rows}


@dataclass(frozen=True)
class AlertView:
    id: int
    created_at: datetime
    node: str
    account_id: str
    rule: str
    kind: str
    figure: int
    threshold: int
    window_s: int
    action: str
    call_id: str
    destination: str
    detail: str
    acked_at: datetime | None


def _view(row: FraudAlert) -> AlertView:
    return AlertView(row.id, row.created_at, row.node, row.account_id, row.rule, row.kind, row.figure, row.threshold,
                     row.window_s, row.action, row.call_id, row.destination, row.detail, row.acked_at)


def list_alerts(engine: Engine, *, since: datetime | None = None, account_id: str | None = None,
                unacked: bool = False, limit: int | None = None) -> list[AlertView]:
    query = select(FraudAlert).order_by(FraudAlert.created_at, FraudAlert.id)
    if since is not None:
        query = query.where(FraudAlert.created_at >= since)
    if account_id:
        query = query.where(FraudAlert.account_id == account_id)
    if unacked:
        query = query.where(FraudAlert.acked_at.is_(None))
    if limit:
        query = query.limit(limit)
    with Session(engine) as session:
        return [_view(row) for row in session.scalars(query)]


def ack_alert(engine: Engine, alert_id: int) -> tuple[AlertView, bool]:
    """Stamp ``acked_at`` once; returns the alert and whether this call acknowledged it."""
    with engine.begin() as conn:
        changed = conn.execute(update(FraudAlert).where(FraudAlert.id == alert_id, FraudAlert.acked_at.is_(None))
                               .values(acked_at=utcnow())).rowcount
    with Session(engine) as session:
        row = session.get(FraudAlert, alert_id)
        if row is None:
            raise NotFound(f"no alert {alert_id} (see `billing-agent alerts list`)")
        return _view(row), bool(changed)
