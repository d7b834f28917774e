"""Rate plans: the named price lists accounts are rated on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.adapters.sql.models import Rate, RatePlan, utcnow
from agent.core.errors import Conflict, InvalidInput
from agent.core.fx import check_currency

PLAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PlanView:
    id: int
    name: str
    currency: str
    timezone: str
    international_prefix: str
    version: int
    rate_count: int


def create_plan(session: Session, name: str, *, currency: str = "EUR", timezone: str = "UTC",
                international_prefix: str = "00") -> PlanView:
    if not PLAN_NAME.match(name):
        raise InvalidInput(f"plan name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    cur = check_currency(currency)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"timezone {timezone!r} is not an IANA time zone (e.g. Europe/Paris)") from None
    if international_prefix and not international_prefix.isdigit():
        raise InvalidInput(f"international prefix {international_prefix!r} must be digits")
    if session.scalar(select(RatePlan).where(RatePlan.name == name)) is not None:
        raise Conflict(f"rate plan {name!r} already exists")
    now = utcnow()
    plan = RatePlan(name=name, currency=cur, timezone=timezone, international_prefix=international_prefix,
                    version=1, created_at=now, updated_at=now)
    session.add(plan)
    session.flush()
    return PlanView(plan.id, name, cur, timezone, international_prefix, 1, 0)


def list_plans(session: Session) -> list[PlanView]:
    counts = {p: n for p, n in session.execute(select(Rate.plan_id, func.count()).group_by(Rate.plan_id))}
    return [
        PlanView(p.id, p.name, p.currency, p.timezone, p.international_prefix, p.version,
                 int(counts.get(p.id, 0)))
        for p in session.scalars(select(RatePlan).order_by(RatePlan.name))
    ]
