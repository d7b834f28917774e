"""The daemon's in-memory route book (DESIGN §10, issue 17): every enabled carrier's buy deck, the
carriers' settings and each sell plan's route policy, ready for :func:`agent.core.routing.select_routes`.

* **Buy decks** are rate plans (``carrier:NAME``), loaded and reloaded by a
  :class:`~agent.adapters.sql.rate_repository.RatePlanCache` of their own exactly as sell plans
  are: built beside the old table, swapped when complete, reloaded when an import bumps
  ``rate_plans.version`` (checked every ``check_interval_seconds`` off the call path).
  :meth:`RouteBook.routes` never loads a deck in the caller: a carrier whose deck is still
  loading is left out of that call ("buy deck still loading").
* **Carriers** (settings, state, the name of their deck) and **route policies** (per sell plan:
  policy, allow_loss, margin floor) are read through :class:`~agent.adapters.sql.cached_lookup.CachedLookup`,
  the one owner of authorize-time SQL reads: fresh for ``ttl_ms``, re-read in the background
  when stale (``background=True``, the daemon), the last known value serving while the database
  is away. A carrier disabled or enabled is seen within ``ttl_ms``; SIGHUP: :meth:`refresh_all`.
* **Currencies**: a carrier is compared with the sell price only when its deck is in the sell
  plan's currency; one in another currency is left out of that call with the reason (no FX
  conversion of buy costs yet).

The daemon hands it to the engine through :class:`agent.services.routes.CallRouter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import Engine, select

from agent.adapters.sql.cached_lookup import CachedLookup
from agent.adapters.sql.models import Carrier, RatePlan
from agent.adapters.sql.rate_repository import RatePlanCache, reading
from agent.core.events import DenyReason
from agent.core.ratetable import Refusal
from agent.core.rating import RateRow
from agent.core.routing import CarrierState, MarginFloor, RouteChoice, RoutePolicy, select_routes

_ALL = "*"  # the one key of the carriers look-up


@dataclass(frozen=True, slots=True)
class CarrierEntry:
    name: str
    trunk: str
    currency: str
    max_channels: int | None
    priority: int
    weight: int
    enabled: bool
    buy_plan: str | None  # None: no buy deck imported yet


@dataclass(frozen=True, slots=True)
class PlanRouting:
    policy: RoutePolicy = RoutePolicy.LCR
    allow_loss: bool = False
    floor: MarginFloor = MarginFloor()


class RoutesUnavailable(Exception):
    """The database does not answer and the carriers (or the plan's policy) were never read."""


def read_carriers(engine: Engine) -> tuple[CarrierEntry, ...]:
    with reading(engine) as connection:
        rows = connection.execute(
            select(Carrier.name, Carrier.trunk, Carrier.currency, Carrier.max_channels, Carrier.priority,
                   Carrier.weight, Carrier.enabled, RatePlan.name)
            .outerjoin(RatePlan, RatePlan.carrier_id == Carrier.id)
            .order_by(Carrier.priority, Carrier.name))
        return tuple(CarrierEntry(name, trunk, currency, max_channels, priority, weight, bool(enabled), plan)
                     for name, trunk, currency, max_channels, priority, weight, enabled, plan in rows)


def read_plan_routing(engine: Engine, plan_name: str) -> PlanRouting | None:
    with reading(engine) as connection:
        row = connection.execute(
            select(RatePlan.route_policy, RatePlan.allow_loss, RatePlan.margin_floor_micros, RatePlan.margin_floor_bp)
            .where(RatePlan.name == plan_name, RatePlan.carrier_id.is_(None))).first()
    if row is None:
        return None
    policy, allow_loss, floor_micros, floor_bp = row
    return PlanRouting(RoutePolicy(policy), bool(allow_loss), MarginFloor(floor_micros, floor_bp))


class RouteBook:
    """Routes of a call from the in-memory buy decks (module docstring)."""

    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, check_interval_seconds: float = 5.0,
                 ttl_ms: int = 5_000, retry_ms: int = 2_000, background: bool = False,
                 monotonic: Callable[[], float] = time.monotonic, tables: RatePlanCache | None = None) -> None:
        self.engine = engine
        self.tables = tables or RatePlanCache(engine, check_interval_seconds=check_interval_seconds,
                                              monotonic=monotonic)
        self.carriers: CachedLookup[tuple[CarrierEntry, ...]] = CachedLookup(
            "carriers", lambda _: read_carriers(engine), now_ms, ttl_ms=ttl_ms, retry_ms=retry_ms,
            background=background, unavailable=lambda why: RoutesUnavailable(f"carriers unknown ({why})"))
        self.policies: CachedLookup[PlanRouting | None] = CachedLookup(
            "route policies", lambda plan: read_plan_routing(engine, plan), now_ms, ttl_ms=ttl_ms,
            retry_ms=retry_ms, background=background, found=lambda found: found is not None,
            unavailable=lambda why: RoutesUnavailable(f"route policy unknown ({why})"))

    def preload(self) -> list[str]:
        """Read the carriers and load every enabled carrier's buy deck now (daemon start-up)."""
        plans = [c.buy_plan for c in self.carriers.get(_ALL) if c.enabled and c.buy_plan is not None]
        self.tables.preload(plans)
        return plans

    def refresh_all(self) -> None:
        """Read the carriers and policies again and check every loaded deck's version (SIGHUP)."""
        self.carriers.forget()
        self.policies.forget()
        self.tables.refresh_all()

    def configured(self) -> bool:
        """Any carrier defined (enabled or not): calls are routed; none: the dialplan's own trunk."""
        return bool(self.carriers.get(_ALL))

    def routing_of(self, sell_plan: str) -> PlanRouting:
        return self.policies.get(sell_plan) or PlanRouting()

    def routes(self, sell_plan: str, sell_currency: str, sell: RateRow, destination: str, at_ms: int, *,
               live_channels: Mapping[str, int] | None = None, seed: int = 0) -> RouteChoice:
        """The ordered routes of a call to ``destination`` starting at ``at_ms`` whose sell rate
        (plan ``sell_plan``, in ``sell_currency``) is ``sell``; ``live_channels``: each carrier's
        calls in progress, cluster-wide; ``seed``: the weight policy's draw (e.g. from the call id).
        Raises :class:`RoutesUnavailable` only when the database is away and was never read."""
        routing = self.routing_of(sell_plan)
        live = live_channels or {}
        offers: list[tuple[CarrierState, RateRow | Refusal]] = []
        for c in self.carriers.get(_ALL):
            state = CarrierState(c.name, c.trunk, c.priority, c.weight, c.enabled, c.max_channels,
                                 live.get(c.name, 0))
            offers.append((state, self._buy_row(c, sell_currency, destination, at_ms)))
        return select_routes(sell, offers, routing.policy, allow_loss=routing.allow_loss, seed=seed)

    def _buy_row(self, carrier: CarrierEntry, sell_currency: str, destination: str, at_ms: int) -> RateRow | Refusal:
        if not carrier.enabled:
            return Refusal(DenyReason.NO_RATE, "disabled", destination)  # dropped as disabled before its rate
        if carrier.buy_plan is None:
            return Refusal(DenyReason.NO_RATE, "no buy deck imported", destination)
        if carrier.currency != sell_currency:
            return Refusal(DenyReason.NO_RATE, f"buys in {carrier.currency}, the plan sells in {sell_currency} "
                                               "(buy costs are not converted yet)", destination)
        table = self.tables.table_if_loaded(carrier.buy_plan)
        if table is None:
            return Refusal(DenyReason.NO_RATE, "buy deck still loading", destination)
        return table.lookup(destination, at_ms)

    def close(self) -> None:
        self.carriers.close()
        self.policies.close()
        self.tables.close()
