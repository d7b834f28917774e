"""Rate plans: the named price lists accounts are rated on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.adapters.sql.models import Rate, RatePlan, Tenant, utcnow
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
    tenant: str = "default"  # the tenant that sells on it (DESIGN §11)


def create_plan(session: Session, name: str, *, currency: str = "EUR", timezone: str = "UTC",
                international_prefix: str = "00", tenant: str | None = None) -> PlanView:
    """A plan of ``tenant`` (DESIGN §11; None or the operator's root: the operator's, tenant_id NULL)."""
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
    tenant_id: int | None = None
    if tenant is not None:
        from agent.adapters.sql.tenants import tenant_of

        owner = tenant_of(session, tenant)
        tenant_id = owner.id if owner.parent_id is not None or owner.name != "default" else None
    plan = RatePlan(name=name, currency=cur, timezone=timezone, international_prefix=international_prefix,
                    version=1, created_at=now, updated_at=now, tenant_id=tenant_id)
    session.add(plan)
    session.flush()
    return PlanView(plan.id, name, cur, timezone, international_prefix, 1, 0, tenant or "default")


def list_plans(session: Session, *, tenant_ids: tuple[int, ...] | None = None) -> list[PlanView]:
    """Every sell plan (carriers' buy decks are not: ``carriers list``), or those of ``tenant_ids``
    (a subtree; the operator's plans belong to its root)."""
    counts = {p: n for p, n in session.execute(select(Rate.plan_id, func.count()).group_by(Rate.plan_id))}
    names: dict[int, str] = {row[0]: row[1] for row in session.execute(select(Tenant.id, Tenant.name))}
    root = session.scalar(select(Tenant.id).where(Tenant.name == "default"))
    return [
        PlanView(p.id, p.name, p.currency, p.timezone, p.international_prefix, p.version,
                 int(counts.get(p.id, 0)), names.get(p.tenant_id, "default") if p.tenant_id else "default")
        for p in session.scalars(select(RatePlan).where(RatePlan.carrier_id.is_(None)).order_by(RatePlan.name))
        if tenant_ids is None or (p.tenant_id if p.tenant_id is not None else root) in tenant_ids
    ]
