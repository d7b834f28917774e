"""Builders for settled call records (the CDR tests) and a reader of what SQL holds."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import Engine, func, select

from agent.adapters.sql.models import Call, CallLeg, CdrQuarantine, RatingDecision
from agent.core.cdr import CallRecord, Disposition, LegRecord, RatingRecord

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def make_record(n: int = 0, *, account_id: str = "acct-1", node: str = "node1", destination: str = "4930123456",
                started_ms: int | None = None, answered: bool = True, duration_ms: int = 61_000,
                billsec: int | None = None, billed_seconds: int | None = None, rate_micros: int = 120_000,
                cost_micros: int | None = None, plan_name: str = "retail", rate_id: int | None = 1,
                prefix: str = "49", call_id: str | None = None, **changes: Any) -> CallRecord:
    """Call ``n`` of a series: one minute apart, two legs (A inbound, B outbound billed)."""
    start = T0 + n * 60_000 if started_ms is None else started_ms
    answer = start + 5_000 if answered else None
    end = (answer + duration_ms) if answer is not None else start + 20_000
    seconds = -(-duration_ms // 1000) if answered else 0
    billed = seconds if billed_seconds is None else billed_seconds
    cost = (-(-rate_micros * billed // 60) if answered else 0) if cost_micros is None else cost_micros
    cid = call_id or f"call-{n:06d}"
    legs = (
        LegRecord(pbx_unique_id=f"{cid}.a", direction="inbound", created_ms=start, channel=f"PJSIP/alice-{n:08x}",
                  sip_call_id=f"sip-{cid}-a", caller="100", callee=destination, answered_ms=start,
                  ended_ms=end, hangup_cause="NORMAL_CLEARING", billsec=(end - start) // 1000),
        LegRecord(pbx_unique_id=f"{cid}.b", direction="outbound", created_ms=start + 100,
                  channel=f"PJSIP/carrier-{n:08x}", sip_call_id=f"sip-{cid}-b", peer="carrier", caller="100",
                  callee=destination, answered_ms=answer, ended_ms=end,
                  hangup_cause="NORMAL_CLEARING" if answered else "NO_ANSWER",
                  billsec=(seconds if billsec is None else billsec) if answered else 0, billed=answered),
    )
    record = CallRecord(
        call_id=cid, node=node, pbx="asterisk", account_id=account_id, destination=destination,
        started_ms=start, disposition=Disposition.ANSWERED if answered else Disposition.NO_ANSWER,
        rating=RatingRecord(decided_ms=end + 3, plan_name=plan_name, rate_id=rate_id if answered else None,
                            prefix=prefix if answered else "", rate_micros=rate_micros if answered else 0,
                            billed_seconds=billed, cost_micros=cost),
        caller="100", answered_ms=answer, ended_ms=end, duration_ms=duration_ms if answered else 0,
        hangup_cause="NORMAL_CLEARING", settled_ms=end + 3, legs=legs,
    )
    return replace(record, **changes) if changes else record


def counts(engine: Engine) -> tuple[int, int, int]:
    """Rows in calls, call_legs, rating_decisions."""
    with engine.connect() as conn:
        return (conn.scalar(select(func.count()).select_from(Call)) or 0,
                conn.scalar(select(func.count()).select_from(CallLeg)) or 0,
                conn.scalar(select(func.count()).select_from(RatingDecision)) or 0)


def call_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Call.id).order_by(Call.id)))


def quarantine_rows(engine: Engine) -> list[tuple[str, str]]:
    """(call_id, reason) of every quarantined CDR."""
    with engine.connect() as conn:
        return [(r.call_id, r.reason) for r in conn.execute(
            select(CdrQuarantine.call_id, CdrQuarantine.reason).order_by(CdrQuarantine.id))]
