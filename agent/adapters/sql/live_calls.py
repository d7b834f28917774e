"""What each daemon supervises, operators' hangup requests and node heartbeats, in shared SQL.

The daemon publishes off the call path (a greenlet every ``daemon.publish_seconds``): new calls
are inserted, an answer or a cut instant is written once, ended calls are deleted. Only facts go
here; the money of a live call is in the balance store (Redis or the SQL reservations), which
``billing-agent calls list`` reads next to these rows. ``calls hangup`` inserts a command for
the node that owns the call; that node carries it out and marks it done.

One ``node.id``, one running daemon: a start refuses while another run of its ``node.id`` is
alive (``check_free``), and a run whose ``agent_nodes`` row another run took over stops writing
(``publish`` updates the row only where host, pid and started_at are its own).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import gevent
from sqlalchemy import ColumnElement, Connection, Engine, bindparam, delete, insert, select, update

from agent.adapters.sql.models import AgentNode, CallCommand, LiveCallRow, utcnow
from agent.core.errors import BillingError, NotFound

log = logging.getLogger(__name__)

HEARTBEAT_POLL_S = 0.5  # how often a start watches another host's heartbeat
TAKEOVER_LOG_EVERY_S = 60.0  # a run whose node.id was taken over says so at most this often


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
class NodeOwner:
    """The run an ``agent_nodes`` row describes."""

    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None

    def describe(self, now: datetime) -> str:
        age = (now - self.heartbeat_at).total_seconds()
        return (f"host {self.host!r} pid {self.pid} (started {self.started_at.isoformat(timespec='seconds')}, "
                f"heartbeat {age:.1f} s ago)")


class NodeIdInUse(BillingError):
    """Another run of this ``node.id`` is alive: this one must not start."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (a zombie does not count: a daemon
    killed -9 whose parent has not reaped it yet is dead)."""
    if pid <= 0:
        return False  # os.kill(0, ...) would signal our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True  # no /proc (or it just ended): os.kill said it exists


@dataclass(frozen=True, slots=True)
class PendingCommand:
    id: int
    call_id: str
    command: str
    reason: str


# A published call's answer and cut instants, for many calls in one executemany.
_UPDATE_LIVE_CALL = (update(LiveCallRow).where(LiveCallRow.call_id == bindparam("b_call_id"))
                     .values(answered_at=bindparam("answered_at"), cut_at=bindparam("cut_at")))


class LiveCallPublisher:
    """One node's side: heartbeat, published calls, commands to carry out."""

    def __init__(self, engine: Engine, node: str, *, publish_seconds: float = 2.0,
                 sleep: Callable[[float], object] = gevent.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.node = node
        self.publish_seconds = publish_seconds
        self._sleep = sleep
        self._monotonic = monotonic
        self._published: dict[str, LiveCallFact] = {}
        self._claim: tuple[str, int, datetime] | None = None  # (host, pid, started_at) of this run's row
        self.taken_over_by: NodeOwner | None = None  # another run registered this node.id after us
        self._takeover_logged_at: float | None = None
        self._presumed_dead: NodeOwner | None = None  # another host's run whose heartbeat stood still

    # ---------------------------------------------------------------- one run per node.id

    def owner(self, conn: Connection | None = None) -> NodeOwner | None:
        """The run the node's ``agent_nodes`` row describes (None: no row)."""
        query = (select(AgentNode.host, AgentNode.pid, AgentNode.started_at, AgentNode.heartbeat_at,
                        AgentNode.stopped_at).where(AgentNode.node == self.node))
        if conn is not None:
            row = conn.execute(query).one_or_none()
        else:
            with self.engine.connect() as own:
                row = own.execute(query).one_or_none()
        return None if row is None else NodeOwner(*row)

    def check_free(self, *, host: str, pid: int) -> None:
        """Raise ``NodeIdInUse`` when another run of this ``node.id`` is alive.

        A row stopped cleanly or whose heartbeat is stale (``is_stale``) is free. On this host the
        row's pid decides at once (alive and not ours: in use), so a restart after a crash or a
        kill -9 starts without waiting. On another host the heartbeat is watched for up to the
        staleness window: it advances, the run is alive; it stays still, the run is dead."""
        owner = self.owner()
        if owner is not None and owner == self._presumed_dead:
            return  # watched already (register after the daemon's early check): not again
        if owner is None or owner.stopped_at is not None or is_stale(owner.heartbeat_at, utcnow(),
                                                                      self.publish_seconds):
            return
        if owner.host == host:
            if owner.pid != pid and pid_alive(owner.pid):
                raise NodeIdInUse(self._refusal(owner))
            return
        window = staleness_seconds(self.publish_seconds)
        log.warning("node.id %r: its row says it runs on %s; watching its heartbeat for up to %.0f s before "
                    "starting", self.node, owner.describe(utcnow()), window)
        deadline = self._monotonic() + window
        while self._monotonic() < deadline:
            self._sleep(HEARTBEAT_POLL_S)
            latest = self.owner()
            if latest is None or latest.stopped_at is not None:
                return  # it stopped cleanly meanwhile
            if (latest.host, latest.pid, latest.started_at) != (owner.host, owner.pid, owner.started_at) \
                    or latest.heartbeat_at != owner.heartbeat_at:
                raise NodeIdInUse(self._refusal(latest))  # it published (or yet another run started)
        self._presumed_dead = owner
        log.warning("node.id %r: the heartbeat of %s pid %d did not advance in %.0f s; that run is presumed dead",
                    self.node, owner.host, owner.pid, window)

    def _refusal(self, owner: NodeOwner) -> str:
        return (f"node.id {self.node!r} is in use by another running daemon: {owner.describe(utcnow())}. "
                f"Give each daemon its own node.id (or stop the other one first)")

    def _mine(self) -> ColumnElement[bool]:
        """The node's row, if it is still this run's."""
        if self._claim is None:
            return AgentNode.node == self.node
        host, pid, started_at = self._claim
        return ((AgentNode.node == self.node) & (AgentNode.host == host) & (AgentNode.pid == pid)
                & (AgentNode.started_at == started_at))

    def _taken_over(self, owner: NodeOwner) -> None:
        self.taken_over_by = owner
        now = self._monotonic()
        if self._takeover_logged_at is not None and now - self._takeover_logged_at < TAKEOVER_LOG_EVERY_S:
            return
        self._takeover_logged_at = now
        host, pid = self._claim[:2] if self._claim else ("?", 0)
        log.error("node.id %r was taken over by another run on %s; this run (host %r pid %d) no longer publishes "
                  "its live calls nor carries out hangup requests. Give each daemon its own node.id and restart "
                  "this one", self.node, owner.describe(utcnow()), host, pid)

    # ---------------------------------------------------------------- this run

    def register(self, *, host: str, pid: int, version: str, pbx: str, check: bool = True) -> None:
        """Announce the node; forget calls a previous run of this node left behind (after a
        crash they are not supervised by anyone here; their reservations expire). Raises
        ``NodeIdInUse`` (``check_free``) while another run of this node.id is alive."""
        if check:
            self.check_free(host=host, pid=pid)
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(delete(LiveCallRow).where(LiveCallRow.node == self.node))
            values = {"host": host, "pid": pid, "version": version, "pbx": pbx, "started_at": now,
                      "heartbeat_at": now, "stopped_at": None, "live_calls": 0}
            changed = conn.execute(update(AgentNode).where(AgentNode.node == self.node).values(**values)).rowcount
            if not changed:
                conn.execute(insert(AgentNode).values(node=self.node, **values))
        self._claim = (host, pid, now)
        self.taken_over_by = None
        self._takeover_logged_at = None
        self._published.clear()

    def _own_row(self, conn: Connection, **values: object) -> bool:
        """Update this run's node row; False (and the takeover noted) when another run holds it.
        A row deleted under us is written again: no other run claims the node."""
        if conn.execute(update(AgentNode).where(self._mine()).values(**values)).rowcount:
            return True
        owner = self.owner(conn)
        if owner is None and self._claim is not None:
            host, pid, started_at = self._claim
            conn.execute(insert(AgentNode).values(node=self.node, host=host, pid=pid, started_at=started_at,
                                                  **{"heartbeat_at": utcnow(), "stopped_at": None, **values}))
            return True
        if owner is not None:
            self._taken_over(owner)
        return False

    def publish(self, facts: Iterable[LiveCallFact]) -> None:
        """Make the table match ``facts`` for this node, writing only what changed. Once another
        run has taken the node's row over, nothing is written (its calls are its own)."""
        current = {f.call_id: f for f in facts}
        gone = [call_id for call_id in self._published if call_id not in current]
        new = [f for call_id, f in current.items() if call_id not in self._published]
        changed = [f for call_id, f in current.items()
                   if call_id in self._published and f != self._published[call_id]]
        with self.engine.begin() as conn:
            if not self._own_row(conn, heartbeat_at=utcnow(), live_calls=len(current)):
                return
            if gone:
                for i in range(0, len(gone), 500):
                    conn.execute(delete(LiveCallRow).where(LiveCallRow.call_id.in_(gone[i:i + 500])))
            if new:
                conn.execute(insert(LiveCallRow), [self._row(f) for f in new])
            if changed:  # one statement for all (an answer changes most calls once)
                conn.execute(_UPDATE_LIVE_CALL, [{"b_call_id": f.call_id, "answered_at": _at(f.answered_ms),
                                                  "cut_at": _at(f.cut_at_ms)} for f in changed])
        self._published = current

    def _row(self, f: LiveCallFact) -> dict[str, object]:
        return {"call_id": f.call_id, "node": self.node, "pbx": f.pbx, "account_id": f.account_id,
                "destination": f.destination[:64], "caller": f.caller[:128], "a_leg_id": f.a_leg_id[:191],
                "authorized_at": _at(f.authorized_ms), "answered_at": _at(f.answered_ms),
                "cut_at": _at(f.cut_at_ms)}

    def pending_commands(self) -> list[PendingCommand]:
        if self.taken_over_by is not None:
            return []  # the run that holds the node.id carries them out
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
        caller, legs) even if they end before it resyncs; every other row of the node goes.
        Nothing is written by a run that never registered or whose row another run took over."""
        if self._claim is None:
            return
        kept = {f.call_id: f for f in handed_over}
        with self.engine.begin() as conn:
            if not self._own_row(conn, stopped_at=utcnow(), heartbeat_at=utcnow(), live_calls=len(kept)):
                return
            conn.execute(delete(LiveCallRow).where(LiveCallRow.node == self.node,
                                                   LiveCallRow.call_id.not_in(list(kept) or [""])))
            missing = [f for call_id, f in kept.items() if call_id not in self._published]
            if missing:
                conn.execute(insert(LiveCallRow), [self._row(f) for f in missing])
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


def staleness_seconds(publish_seconds: float) -> float:
    """Three publish intervals, and at least 10 s."""
    return max(10.0, 3 * publish_seconds)


def is_stale(heartbeat_at: datetime, now: datetime, publish_seconds: float) -> bool:
    """A node that has not published for three intervals (and at least 10 s) is presumed dead."""
    return now - heartbeat_at > timedelta(seconds=staleness_seconds(publish_seconds))
