"""Carriers and their buy decks; the route policy of sell plans (DESIGN §10, issue 17).

A carrier's buy deck is the rate plan it owns (``rate_plans.carrier_id``), named
``carrier:NAME`` (a name no sell plan can take: ``:`` is not allowed in plan names). It is
imported with ``rates import FILE --carrier NAME`` through the same code as a sell deck (CSV
contract, effective dates, blocked rows, the carrier's own increments, validation), loaded into
the same in-memory :class:`~agent.core.ratetable.RateTable`, and hidden from sell-plan listings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.adapters.sql.models import Carrier, Rate, RatePlan, utcnow
from agent.adapters.sql.plans import PLAN_NAME
from agent.core.errors import Conflict, InvalidInput, NotFound
from agent.core.fx import check_currency
from agent.core.routing import MarginFloor, RoutePolicy, parse_policy

BUY_PLAN_PREFIX = "carrier:"
# What a dialplan can put after Dial( / bridge without quoting: no ',', '&', '|', spaces, '$', '{'.
TRUNK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:@+-]{0,254}$")


def buy_plan_name(carrier: str) -> str:
    return f"{BUY_PLAN_PREFIX}{carrier}"


@dataclass(frozen=True)
class CarrierView:
    name: str
    trunk: str
    currency: str
    max_channels: int | None
    priority: int
    weight: int
    enabled: bool
    buy_plan: str
    buy_rates: int
    buy_version: int | None  # None: no buy deck imported yet
    created_at: str


def check_trunk(trunk: str, name: str) -> str:
    where = f"carrier {name!r}: --trunk"
    if not trunk.strip():
        raise InvalidInput(f"{where} is empty: give the Asterisk trunk (PJSIP/name, SIP/name) or the FreeSWITCH "
                           "gateway (name or sofia/gateway/name)")
    if not TRUNK.match(trunk):
        bad = next((ch for ch in trunk if not (ch.isascii() and (ch.isalnum() or ch in "_./:@+-"))), trunk[:1])
        raise InvalidInput(f"{where} {trunk!r} has {bad!r}: a trunk is 1-255 letters, digits and _ . / : @ + - "
                           "(a dialplan cannot dial anything else safely)")
    return trunk


def _check_numbers(name: str, max_channels: int | None, priority: int, weight: int) -> None:
    if max_channels is not None and max_channels < 1:
        raise InvalidInput(f"carrier {name!r}: --max-channels {max_channels} must be at least 1 "
                           "(leave it out for no limit)")
    if priority < 0:
        raise InvalidInput(f"carrier {name!r}: --priority {priority} must not be negative (0 is tried first)")
    if weight < 1:
        raise InvalidInput(f"carrier {name!r}: --weight {weight} must be at least 1")


def create_carrier(session: Session, name: str, *, trunk: str, max_channels: int | None = None,
                   priority: int = 0, weight: int = 1, currency: str = "EUR") -> CarrierView:
    if not PLAN_NAME.match(name):
        raise InvalidInput(f"carrier name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    check_trunk(trunk, name)
    _check_numbers(name, max_channels, priority, weight)
    cur = check_currency(currency)
    if session.scalar(select(Carrier.id).where(Carrier.name == name)) is not None:
        raise Conflict(f"carrier {name!r} already exists")
    now = utcnow()
    session.add(Carrier(name=name, trunk=trunk, currency=cur, max_channels=max_channels, priority=priority,
                        weight=weight, enabled=True, created_at=now, updated_at=now))
    session.flush()
    return show_carrier(session, name)


def carrier_of(session: Session, name: str) -> Carrier:
    found = session.scalar(select(Carrier).where(Carrier.name == name))
    if found is None:
        known = list(session.scalars(select(Carrier.name).order_by(Carrier.name)))
        hint = f" (known: {', '.join(known)})" if known else " (there is none yet)"
        raise NotFound(f"unknown carrier {name!r}{hint}: create it with "
                       f"`billing-agent carriers create {name} --trunk TRUNK`")
    return found


def set_enabled(session: Session, name: str, enabled: bool) -> CarrierView:
    """Disable or enable a carrier: new calls avoid a disabled one; its live calls go on."""
    carrier = carrier_of(session, name)
    carrier.enabled = enabled
    carrier.updated_at = utcnow()
    session.flush()
    return show_carrier(session, name)


def _views(session: Session, carriers: list[Carrier]) -> list[CarrierView]:
    plans = {p.carrier_id: p for p in session.scalars(select(RatePlan).where(RatePlan.carrier_id.is_not(None)))}
    ids = [p.id for p in plans.values()]
    counts: dict[int, int] = {}
    if ids:
        for plan_id, count in session.execute(select(Rate.plan_id, func.count()).where(Rate.plan_id.in_(ids))
                                              .group_by(Rate.plan_id)):
            counts[plan_id] = int(count)
    views = []
    for c in carriers:
        plan = plans.get(c.id)
        views.append(CarrierView(c.name, c.trunk, c.currency, c.max_channels, c.priority, c.weight, c.enabled,
                                 buy_plan_name(c.name), int(counts.get(plan.id, 0)) if plan else 0,
                                 plan.version if plan else None,
                                 c.created_at.isoformat().replace("+00:00", "Z")))
    return views


def list_carriers(session: Session) -> list[CarrierView]:
    return _views(session, list(session.scalars(select(Carrier).order_by(Carrier.priority, Carrier.name))))


def show_carrier(session: Session, name: str) -> CarrierView:
    return _views(session, [carrier_of(session, name)])[0]


def buy_plan_of(session: Session, carrier: Carrier) -> RatePlan | None:
    return session.scalar(select(RatePlan).where(RatePlan.carrier_id == carrier.id))


def ensure_buy_plan(session: Session, carrier: Carrier) -> RatePlan:
    """The carrier's buy deck, made (empty, in the carrier's currency) on its first import."""
    plan = buy_plan_of(session, carrier)
    if plan is None:
        now = utcnow()
        plan = RatePlan(name=buy_plan_name(carrier.name), currency=carrier.currency, timezone="UTC",
                        international_prefix="00", version=1, created_at=now, updated_at=now,
                        carrier_id=carrier.id, route_policy=RoutePolicy.LCR.value, allow_loss=False)
        session.add(plan)
        session.flush()
    return plan


# ------------------------------------------------------------------ route policy of a sell plan


@dataclass(frozen=True)
class RoutePolicyView:
    plan: str
    route_policy: str
    allow_loss: bool
    margin_floor: str  # "0.002000/min", "5.00%" or "none"


def parse_margin_floor(text: str) -> MarginFloor:
    """``none``, ``5%`` (up to two decimals: basis points) or money per minute (``0.002``)."""
    from decimal import Decimal, InvalidOperation

    from agent.core.money import MoneyError, parse_amount

    value = text.strip()
    if value.lower() == "none":
        return MarginFloor()
    if value.endswith("%"):
        try:
            percent = Decimal(value[:-1])
        except InvalidOperation:
            raise InvalidInput(f"--margin-floor {text!r} is not a percentage such as 5% or 12.5%") from None
        if not percent.is_finite() or percent * 100 != (percent * 100).to_integral_value():
            raise InvalidInput(f"--margin-floor {text!r}: a percentage has at most two decimals")
        return MarginFloor(percent_bp=int(percent * 100))
    try:
        micros = parse_amount(value, what="--margin-floor")
    except MoneyError as exc:
        raise InvalidInput(f"{exc} (money per minute such as 0.002, a percentage such as 5%, or none)") from None
    return MarginFloor(per_minute_micros=micros)


def route_policy_view(plan: RatePlan) -> RoutePolicyView:
    floor = MarginFloor(plan.margin_floor_micros, plan.margin_floor_bp)
    return RoutePolicyView(plan.name, plan.route_policy, bool(plan.allow_loss), floor.describe())


def set_route_policy(session: Session, plan_name: str, policy: str, *, allow_loss: bool = False,
                     margin_floor: str | None = None) -> RoutePolicyView:
    """Set a sell plan's route policy, loss permission and (when given) margin floor."""
    chosen = parse_policy(policy)
    floor = parse_margin_floor(margin_floor) if margin_floor is not None else None
    plan = session.scalar(select(RatePlan).where(RatePlan.name == plan_name))
    if plan is None:
        raise NotFound(f"unknown rate plan {plan_name!r}")
    if plan.carrier_id is not None:
        raise InvalidInput(f"rate plan {plan_name!r} is a carrier's buy deck: a route policy belongs to a sell plan")
    plan.route_policy = chosen.value
    plan.allow_loss = allow_loss
    if floor is not None:
        plan.margin_floor_micros = floor.per_minute_micros
        plan.margin_floor_bp = floor.percent_bp
    plan.updated_at = utcnow()
    session.flush()
    return route_policy_view(plan)

