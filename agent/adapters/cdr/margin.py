"""What each reseller earns (DESIGN §11, ``billing-agent cdrs margin --by tenant``): per reseller
tenant, its revenue (what the level below paid at its price: its customers, and the accounts
of its sub-resellers) and its cost (what its own account ``tenant:NAME`` paid its parent for the
same calls), from the rating decisions of every level, in the reseller's currency, exact.

Revenue is counted in the reseller's currency: the plan-currency cost when its sell plan is
priced in it (the customer may have paid in another currency, converted at the call's start),
else the charged cost when the customer paid in it; any other revenue is listed apart, by
currency, and is not in the margin. Each decision counts once, at its latest re-rating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, case, func, select
from sqlalchemy.orm import Session

from agent.adapters.sql.models import Call, RatingDecision
from agent.adapters.sql.tenants import Tree


@dataclass
class TenantMargin:
    tenant: str
    currency: str
    calls: int = 0
    seconds: int = 0
    revenue_micros: int = 0
    cost_micros: int = 0
    other_revenue: dict[str, int] = field(default_factory=dict)  # currency -> micro-units, not in the margin

    @property
    def margin_micros(self) -> int:
        return self.revenue_micros - self.cost_micros


def margin_by_tenant(engine: Engine, *, since: datetime | None = None, until: datetime | None = None,
                     ) -> list[TenantMargin]:
    d = RatingDecision
    latest = select(d.call_id, func.max(d.seq).label("seq")).group_by(d.call_id).subquery()

    def current(query: Any) -> Any:
        query = query.join(latest, and_(latest.c.call_id == d.call_id, latest.c.seq == d.seq))
        if since is not None or until is not None:
            query = query.join(Call, Call.id == func.coalesce(d.of_call_id, d.call_id))
            if since is not None:
                query = query.where(Call.started_at >= since)
            if until is not None:
                query = query.where(Call.started_at < until)
        return query

    plan_cost = func.coalesce(d.plan_cost_micros, d.cost_micros)
    with Session(engine) as session:
        tree = Tree(session)
        sold: Any = session.execute(current(
            select(d.tenant, d.plan_currency, d.currency, func.count(), func.sum(d.billed_seconds),
                   func.sum(plan_cost), func.sum(d.cost_micros))
            .where(d.tenant != "").group_by(d.tenant, d.plan_currency, d.currency))).all()
        paid: Any = session.execute(current(
            select(d.account_id, d.currency, func.sum(d.cost_micros))
            .where(d.level > 0).group_by(d.account_id, d.currency))).all()
    resellers = sorted((t for t in tree.by_id.values() if t.parent_id is not None and t.account_id),
                       key=lambda t: t.name)
    by_name = {t.name: TenantMargin(t.name, t.currency) for t in resellers}
    by_account = {t.account_id: by_name[t.name] for t in resellers}
    for tenant, plan_currency, currency, calls, seconds, plan_total, charged in sold:
        row = by_name.get(tenant)
        if row is None:
            continue  # the operator's own sales (a root tenant): no margin of a reseller
        row.calls += int(calls)
        row.seconds += int(seconds or 0)
        if (plan_currency or currency) == row.currency:
            row.revenue_micros += int(plan_total or 0)
        elif currency == row.currency:
            row.revenue_micros += int(charged or 0)
        else:
            row.other_revenue[currency] = row.other_revenue.get(currency, 0) + int(charged or 0)
    for account_id, currency, charged in paid:
        row = by_account.get(account_id)
        if row is None:
            continue
        if currency and currency != row.currency:
            row.other_revenue[currency] = row.other_revenue.get(currency, 0) - int(charged or 0)
            continue
        row.cost_micros += int(charged or 0)
    return list(by_name.values())


@dataclass
class RouteMargin:
    """The wholesale margin of routed calls (DESIGN §10) under one key, in one currency."""

    key: str
    currency: str
    calls: int = 0
    seconds: int = 0  # billed seconds of the sell side
    revenue_micros: int = 0  # what the operator sold the calls for (plan currency)
    cost_micros: int = 0  # what the carriers bill for them, by their own increments

    @property
    def margin_micros(self) -> int:
        return self.revenue_micros - self.cost_micros


ROUTE_KEYS = ("carrier", "destination", "account", "day")


def margin_by_route(engine: Engine, by: str, *, since: datetime | None = None, until: datetime | None = None,
                    ) -> list[RouteMargin]:
    """Routed calls (a decision that names the carrier that answered, at its latest re-rating)
    grouped ``by`` carrier, destination (the sell prefix), account (the one that paid the
    operator: the customer, or the top reseller's account) or day (UTC, of the call's start):
    calls, billed seconds, revenue (the plan-currency cost), buy cost, margin, per currency."""
    if by not in ROUTE_KEYS:
        raise ValueError(f"--by {by!r}: one of {', '.join(ROUTE_KEYS)}")
    d = RatingDecision
    latest = select(d.call_id, func.max(d.seq).label("seq")).group_by(d.call_id).subquery()
    payer = case((d.account_id != "", d.account_id), else_=Call.account_id)
    key: Any = {"carrier": d.carrier, "destination": d.prefix, "account": payer,
                "day": func.date(Call.started_at)}[by]
    query: Any = (select(key, d.plan_currency, func.count(), func.sum(d.billed_seconds),
                         func.sum(func.coalesce(d.plan_cost_micros, d.cost_micros)), func.sum(d.buy_cost_micros))
                  .join(latest, and_(latest.c.call_id == d.call_id, latest.c.seq == d.seq))
                  .join(Call, Call.id == func.coalesce(d.of_call_id, d.call_id))
                  .where(d.carrier != "", d.buy_cost_micros.is_not(None))
                  .group_by(key, d.plan_currency).order_by(key, d.plan_currency))
    if since is not None:
        query = query.where(Call.started_at >= since)
    if until is not None:
        query = query.where(Call.started_at < until)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [RouteMargin(str(k), currency or "", int(calls), int(seconds or 0), int(revenue or 0), int(cost or 0))
            for k, currency, calls, seconds, revenue, cost in rows]
