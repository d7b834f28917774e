"""What each daemon supervises, operators' hangup requests and node heartbeats, in shared SQL.

The daemon publishes off the call path (a greenlet every ``daemon.publish_seconds``): new calls
are inserted, an answer or a cut instant is written once, ended calls are deleted. Only facts go
here; the money of a live call is in the balance store (Redis or the SQL reservations), which
``billing-agent calls list`` reads next to these rows. ``calls hangup`` inserts a command for
the node that owns the call; that node carries it out and marks it done.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select, update

from agent.adapters.sql.models import AgentNode, CallCommand, LiveCallRow, utcnow
from agent.core.errors import NotFound


def _at(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True, slots=True)
class LiveCallFact:
    call_id: str
    pbx: str
    account_id: str
    destination: str
    caller: str
    a_leg_id: str
    authorized_ms: int
    answered_ms: int | None
    cut_at_ms: int | None


@dataclass(frozen=True, slots=True)
class PendingCommand:
    id: int
    call_id: str
    command: str
    reason: str


class LiveCallPublisher:
    """One node's side: heartbeat, published calls, commands to carry out."""

    def __init__(self, engine: Engine, node: str) -> None:
        self.engine = engine
        self.node = node
        self._published: dict[str, LiveCallFact] = {}

    def register(self, *, host: str, pid: int, version: str, pbx: str) -> None:
        """Announce the node; forget calls a previous run of this node left behind (after a
        crash they are not supervised by anyone here; their reservations expire)."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(delete(LiveCallRow).where(LiveCallRow.node == self.node))
            values = {"host": host, "pid": pid, "version": version, "pbx": pbx, "started_at": now,
                      "heartbeat_at": now, "stopped_at": None, "live_calls": 0}
            changed = conn.execute(update(AgentNode).where(AgentNode.node == self.node).values(**values)).rowcount
            if not changed:
                conn.execute(insert(AgentNode).values(node=self.node, **values))
        self._published.clear()

    def publish(self, facts: Iterable[LiveCallFact]) -> None:
        """Make the table match ``facts`` for this node, writing only what changed."""
        current = {f.call_id: f for f in facts}
        gone = [call_id for call_id in self._published if call_id not in current]
        new = [f for call_id, f in current.items() if call_id not in self._published]
        changed = [f for call_id, f in current.items()
                   if call_id in self._published and f != self._published[call_id]]
        with self.engine.begin() as conn:
            if gone:
                for i in range(0, len(gone), 500):
                    conn.execute(delete(LiveCallRow).where(LiveCallRow.call_id.in_(gone[i:i + 500])))
            if new:
                conn.execute(insert(LiveCallRow), [self._row(f) for f in new])
            for f in changed:
                conn.execute(update(LiveCallRow).where(LiveCallRow.call_id == f.call_id)
                             .values(answered_at=_at(f.answered_ms), cut_at=_at(f.cut_at_ms)))
            conn.execute(update(AgentNode).where(AgentNode.node == self.node)
                         .values(heartbeat_at=utcnow(), live_calls=len(current)))
        self._published = current

    def _row(self, f: LiveCallFact) -> dict[str, object]:
        return {"call_id": f.call_id, "node": self.node, "pbx": f.pbx, "account_id": f.account_id,
                "destination": f.destination[:64], "caller": f.caller[:128], "a_leg_id": f.a_leg_id[:191],
                "authorized_at": _at(f.authorized_ms), "answered_at": _at(f.answered_ms),
                "cut_at": _at(f.cut_at_ms)}

    def pending_commands(self) -> list[PendingCommand]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CallCommand.id, CallCommand.call_id, CallCommand.command, CallCommand.reason)
                .where(CallCommand.node == self.node, CallCommand.done_at.is_(None))
                .order_by(CallCommand.id).limit(100))
            return [PendingCommand(*row) for row in rows]

    def complete(self, command_id: int, result: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(CallCommand).where(CallCommand.id == command_id)
                         .values(done_at=utcnow(), result=result[:255]))

    def stopped(self, handed_over: Iterable[LiveCallFact] = ()) -> None:
        """Clean shutdown. Calls still live are handed over (their reservations stay open): their
        rows stay, so that the next start of this node knows what they were (destination,
        caller, legs) even if they end before it resyncs; every other row of the node goes."""
        kept = {f.call_id: f for f in handed_over}
        with self.engine.begin() as conn:
            conn.execute(delete(LiveCallRow).where(LiveCallRow.node == self.node,
                                                   LiveCallRow.call_id.not_in(list(kept) or [""])))
            missing = [f for call_id, f in kept.items() if call_id not in self._published]
            if missing:
                conn.execute(insert(LiveCallRow), [self._row(f) for f in missing])
            conn.execute(update(AgentNode).where(AgentNode.node == self.node)
                         .values(stopped_at=utcnow(), heartbeat_at=utcnow(), live_calls=len(kept)))
        self._published.clear()


# ------------------------------------------------------------------ the operator's side (CLI)


@dataclass(frozen=True, slots=True)
class NodeState:
    node: str
    host: str
    pid: int
    pbx: str
    heartbeat_at: datetime
    stopped_at: datetime | None
    live_calls: int


def live_call_rows(engine: Engine) -> list[LiveCallRow]:
    with engine.connect() as conn:
        result = conn.execute(select(LiveCallRow).order_by(LiveCallRow.authorized_at))
        return [LiveCallRow(**row._mapping) for row in result]


def node_states(engine: Engine) -> list[NodeState]:
    with engine.connect() as conn:
        rows = conn.execute(select(AgentNode.node, AgentNode.host, AgentNode.pid, AgentNode.pbx,
                                   AgentNode.heartbeat_at, AgentNode.stopped_at, AgentNode.live_calls)
                            .order_by(AgentNode.node))
        return [NodeState(*row) for row in rows]


def request_hangup(engine: Engine, call_id: str, reason: str) -> tuple[int, str]:
    """Queue a hangup for the node supervising ``call_id``; returns (command id, node)."""
    with engine.begin() as conn:
        node = conn.scalar(select(LiveCallRow.node).where(LiveCallRow.call_id == call_id))
        if node is None:
            raise NotFound(f"call {call_id!r} is not live on any node (see `billing-agent calls list`)")
        command_id = conn.execute(insert(CallCommand).values(
            call_id=call_id, node=node, command="hangup", reason=reason[:255], requested_at=utcnow(),
            result="")).inserted_primary_key
        assert command_id is not None
        return int(command_id[0]), str(node)


def command_result(engine: Engine, command_id: int) -> tuple[datetime | None, str]:
    with engine.connect() as conn:
        row = conn.execute(select(CallCommand.done_at, CallCommand.result).where(CallCommand.id == command_id)).one()
        return row[0], row[1]


def is_stale(heartbeat_at: datetime, now: datetime, publish_seconds: float) -> bool:
    """A node that has not published for three intervals (and at least 10 s) is presumed dead."""
    return now - heartbeat_at > timedelta(seconds=max(10.0, 3 * publish_seconds))
