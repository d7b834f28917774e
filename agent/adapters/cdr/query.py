"""Reading CDRs back from SQL: filters, one call with its legs and its current rating decision,
streamed in chunks so that exporting millions of calls holds one chunk in memory.

The calls are read by one streaming query (a server-side cursor on PostgreSQL and MySQL; SQLite's
cursor is lazy by nature), ordered by ``(started_at, id)``; each chunk's legs and rating
decisions come from two ``IN`` queries on a second connection (MySQL cannot run a query while a
streamed result is open on the same connection; SQLite shares one connection, since every
transaction there takes the database's write lock).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from agent.adapters.sql.models import Call, CallLeg, RatingDecision
from agent.core.errors import NotFound

DEFAULT_CHUNK = 2_000


@dataclass(frozen=True)
class CdrFilter:
    account_id: str | None = None
    since: datetime | None = None  # started_at >= since
    until: datetime | None = None  # started_at < until
    destination_prefix: str | None = None
    disposition: str | None = None
    node: str | None = None


@dataclass(frozen=True, slots=True)
class LegView:
    pbx_unique_id: str
    direction: str
    channel: str
    sip_call_id: str
    peer: str
    caller: str
    callee: str
    created_at: datetime
    answered_at: datetime | None
    ended_at: datetime | None
    hangup_cause: str
    billsec: int
    billed: bool


@dataclass(frozen=True, slots=True)
class DecisionView:
    seq: int
    plan_name: str
    rate_id: int | None
    prefix: str
    rate_micros: int
    billed_seconds: int
    cost_micros: int
    decided_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class CdrView:
    call_id: str
    node: str
    pbx: str
    account_id: str
    caller: str
    destination: str
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime | None
    duration_ms: int
    disposition: str
    hangup_cause: str
    settled_at: datetime | None
    legs: tuple[LegView, ...]
    rating: DecisionView | None  # the current decision: the highest seq

    @property
    def billed_leg(self) -> LegView | None:
        """The leg billing ran from, else the longest outbound leg (the PBX's view of the call)."""
        for leg in self.legs:
            if leg.billed:
                return leg
        outbound = [leg for leg in self.legs if leg.direction == "outbound"]
        return max(outbound, key=lambda leg: leg.billsec) if outbound else None


CALL_FIELDS = (Call.id, Call.node, Call.pbx, Call.account_id, Call.caller, Call.destination, Call.started_at,
               Call.answered_at, Call.ended_at, Call.duration_ms, Call.disposition, Call.hangup_cause,
               Call.settled_at)
LEG_FIELDS = (CallLeg.call_id, CallLeg.pbx_unique_id, CallLeg.direction, CallLeg.channel, CallLeg.sip_call_id,
              CallLeg.peer, CallLeg.caller, CallLeg.callee, CallLeg.created_at, CallLeg.answered_at,
              CallLeg.ended_at, CallLeg.hangup_cause, CallLeg.billsec, CallLeg.billed)
DECISION_FIELDS = (RatingDecision.call_id, RatingDecision.seq, RatingDecision.plan_name, RatingDecision.rate_id,
                   RatingDecision.prefix, RatingDecision.rate_micros, RatingDecision.billed_seconds,
                   RatingDecision.cost_micros, RatingDecision.decided_at, RatingDecision.reason)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def calls_query(where: CdrFilter) -> Any:
    query: Any = select(*CALL_FIELDS)
    if where.account_id is not None:
        query = query.where(Call.account_id == where.account_id)
    if where.since is not None:
        query = query.where(Call.started_at >= where.since)
    if where.until is not None:
        query = query.where(Call.started_at < where.until)
    if where.destination_prefix:
        query = query.where(Call.destination.like(_escape_like(where.destination_prefix) + "%", escape="\\"))
    if where.disposition is not None:
        query = query.where(Call.disposition == where.disposition)
    if where.node is not None:
        query = query.where(Call.node == where.node)
    return query.order_by(Call.started_at, Call.id)


def _details(conn: Connection, call_ids: Sequence[str]) -> tuple[dict[str, list[LegView]],
                                                                   dict[str, DecisionView]]:
    legs: dict[str, list[LegView]] = {}
    leg_rows: Any = conn.execute(select(*LEG_FIELDS).where(CallLeg.call_id.in_(call_ids))
                                 .order_by(CallLeg.call_id, CallLeg.created_at, CallLeg.id))
    for row in leg_rows:
        legs.setdefault(row[0], []).append(LegView(*row[1:]))
    decisions: dict[str, DecisionView] = {}
    decision_rows: Any = conn.execute(select(*DECISION_FIELDS).where(RatingDecision.call_id.in_(call_ids)))
    for row in decision_rows:
        current = decisions.get(row[0])
        if current is None or row[1] > current.seq:
            decisions[row[0]] = DecisionView(*row[1:])
    return legs, decisions


def _views(rows: Sequence[Any] | Any, legs: dict[str, list[LegView]],
           decisions: dict[str, DecisionView]) -> Iterator[CdrView]:
    for row in rows:
        call_id = row[0]
        yield CdrView(*row[:13], legs=tuple(legs.get(call_id, ())), rating=decisions.get(call_id))  # type: ignore[misc]


def iter_cdr_chunks(engine: Engine, where: CdrFilter, *, limit: int | None = None,
                    chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[Connection, list[CdrView]]]:
    """Chunks of calls matching ``where`` in (started_at, id) order, with legs and current
    decision, and a connection on which the caller may run its own queries about the chunk."""
    query = calls_query(where)
    if limit is not None:
        query = query.limit(limit)
    with ExitStack() as stack:
        conn = stack.enter_context(engine.connect())
        details = conn if engine.dialect.name == "sqlite" else stack.enter_context(engine.connect())
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(query)
        for rows in result.partitions():
            legs, decisions = _details(details, [row[0] for row in rows])
            yield details, list(_views(rows, legs, decisions))


def iter_cdrs(engine: Engine, where: CdrFilter, *, limit: int | None = None,
              chunk: int = DEFAULT_CHUNK) -> Iterator[CdrView]:
    """Calls matching ``where`` in (started_at, id) order, with legs and current decision."""
    for _, views in iter_cdr_chunks(engine, where, limit=limit, chunk=chunk):
        yield from views


def get_cdr(engine: Engine, call_id: str) -> tuple[CdrView, list[DecisionView]]:
    """One call, and its whole rating history (oldest first)."""
    with engine.connect() as conn:
        row: Any = conn.execute(select(*CALL_FIELDS).where(Call.id == call_id)).first()
        if row is None:
            raise NotFound(f"unknown call {call_id!r}")
        legs, decisions = _details(conn, [call_id])
        rows: Any = conn.execute(
            select(*DECISION_FIELDS).where(RatingDecision.call_id == call_id).order_by(RatingDecision.seq))
        history = [DecisionView(*r[1:]) for r in rows]
    return next(_views([row], legs, decisions)), history
