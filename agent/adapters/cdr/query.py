"""Reading CDRs back from SQL: the filters, and one call with its legs and its rating history.

Streaming many calls (list, export, reconcile) is :mod:`agent.adapters.cdr.export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from agent.adapters.sql.models import Account, Call, CallLeg, RatingDecision
from agent.core.errors import NotFound


@dataclass(frozen=True)
class CdrFilter:
    account_id: str | None = None
    since: datetime | None = None  # started_at >= since
    until: datetime | None = None  # started_at < until
    destination_prefix: str | None = None
    disposition: str | None = None
    node: str | None = None
    tenant_ids: tuple[int, ...] | None = None  # only the accounts of these tenants (a subtree, DESIGN §11)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def filter_calls(query: Any, where: CdrFilter, calls: Any = None) -> Any:
    """``query`` restricted to the calls matching ``where``; ``calls`` is the calls table or an
    alias of it (its columns: ``.c`` of an alias, the mapped class's attributes otherwise)."""
    c = calls.c if calls is not None else Call
    if where.account_id is not None:
        query = query.where(c.account_id == where.account_id)
    if where.since is not None:
        query = query.where(c.started_at >= where.since)
    if where.until is not None:
        query = query.where(c.started_at < where.until)
    if where.destination_prefix:
        query = query.where(c.destination.like(_escape_like(where.destination_prefix) + "%", escape="\\"))
    if where.disposition is not None:
        query = query.where(c.disposition == where.disposition)
    if where.node is not None:
        query = query.where(c.node == where.node)
    if where.tenant_ids is not None:
        query = query.where(c.account_id.in_(select(Account.id).where(Account.tenant_id.in_(where.tenant_ids))))
    return query


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
    currency: str = ""  # of cost_micros, the account's ('' before migration 0009)
    plan_currency: str = ""
    fx_rate_e10: int | None = None
    fx_inverse: bool = False
    plan_cost_micros: int | None = None
    # The buy side (DESIGN §10, migration 0012): the carrier that answered; '' / None: not routed.
    carrier: str = ""
    buy_prefix: str = ""
    buy_rate_micros: int = 0
    buy_billed_seconds: int = 0
    buy_cost_micros: int | None = None
    margin_micros: int | None = None
    # Derived charging (DESIGN §11): the level charged (0: the customer), whose price (the
    # seller tenant) and, above the customer, the reseller's account charged.
    level: int = 0
    tenant: str = ""
    level_account_id: str = ""


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


CALL_FIELDS = (Call.id, Call.node, Call.pbx, Call.account_id, Call.caller, Call.destination, Call.started_at,
               Call.answered_at, Call.ended_at, Call.duration_ms, Call.disposition, Call.hangup_cause,
               Call.settled_at)
LEG_FIELDS = (CallLeg.pbx_unique_id, CallLeg.direction, CallLeg.channel, CallLeg.sip_call_id, CallLeg.peer,
              CallLeg.caller, CallLeg.callee, CallLeg.created_at, CallLeg.answered_at, CallLeg.ended_at,
              CallLeg.hangup_cause, CallLeg.billsec, CallLeg.billed)
DECISION_FIELDS = (RatingDecision.seq, RatingDecision.plan_name, RatingDecision.rate_id, RatingDecision.prefix,
                   RatingDecision.rate_micros, RatingDecision.billed_seconds, RatingDecision.cost_micros,
                   RatingDecision.decided_at, RatingDecision.reason, RatingDecision.currency,
                   RatingDecision.plan_currency, RatingDecision.fx_rate_e10, RatingDecision.fx_inverse,
                   RatingDecision.plan_cost_micros, RatingDecision.carrier, RatingDecision.buy_prefix,
                   RatingDecision.buy_rate_micros, RatingDecision.buy_billed_seconds, RatingDecision.buy_cost_micros,
                   RatingDecision.margin_micros, RatingDecision.level, RatingDecision.tenant, RatingDecision.account_id)


def get_cdr(engine: Engine, call_id: str) -> tuple[CdrView, list[DecisionView]]:
    """One call with its legs, and its whole rating history (oldest first; the last counts)."""
    with engine.connect() as conn:
        row: Any = conn.execute(select(*CALL_FIELDS).where(Call.id == call_id)).first()
        if row is None:
            raise NotFound(f"unknown call {call_id!r}")
        legs: Sequence[Any] = conn.execute(select(*LEG_FIELDS).where(CallLeg.call_id == call_id)
                                           .order_by(CallLeg.created_at, CallLeg.id)).all()
        history: Sequence[Any] = conn.execute(select(*DECISION_FIELDS).where(RatingDecision.call_id == call_id)
                                              .order_by(RatingDecision.seq)).all()
    decisions = [DecisionView(*d) for d in history]
    view = CdrView(*row, legs=tuple(LegView(*leg) for leg in legs),  # type: ignore[misc]
                   rating=decisions[-1] if decisions else None)
    return view, decisions


def get_levels(engine: Engine, call_id: str) -> list[DecisionView]:
    """The current decision of each reseller level above a customer's call (DESIGN §11: each
    has rows of its own under ``call^L``, ``of_call_id`` naming the call), nearest level first;
    empty for a direct customer's call."""
    with engine.connect() as conn:
        rows: Sequence[Any] = conn.execute(select(*DECISION_FIELDS).where(RatingDecision.of_call_id == call_id)
                                           .order_by(RatingDecision.level, RatingDecision.seq)).all()
    current: dict[int, DecisionView] = {}
    for row in rows:
        decision = DecisionView(*row)
        current[decision.level] = decision  # the highest seq of each level counts
    return [current[level] for level in sorted(current)]
