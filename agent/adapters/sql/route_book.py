"""The daemon's in-memory route book (DESIGN §10, issue 17): every enabled carrier's buy deck, the
carriers' settings and each sell plan's route policy, ready for :func:`agent.core.routing.select_routes`.

* **Buy decks** are rate plans (``carrier:NAME``), all held in one shared
  :class:`~agent.core.buy_index.BuyIndex` (one dict of prefixes for every deck, a packed array
  of records per deck: 11 decks of a million prefixes fit in about half the memory of one
  ``RateTable`` each, bench/bench_routing.py). A deck is streamed from SQL into a
  ``RateTableBuilder`` (the sell decks' checks, windows and precedence), merged into a *new*
  index built beside the current one, and the reference is swapped when it is complete, as
  :class:`~agent.adapters.sql.rate_repository.RatePlanCache` swaps a sell plan's table. Every
  ``check_interval_seconds`` one background check reads the loaded decks' ``rate_plans.version``
  and reloads the decks whose import bumped it, one at a time (the other decks' arrays are
  shared, not copied). :meth:`RouteBook.routes` never loads a deck in the caller: a carrier
  whose deck is still loading is left out of that call ("buy deck still loading") while the
  deck loads in the background.
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

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import gevent
from gevent.greenlet import Greenlet
from gevent.lock import Semaphore
from gevent.pool import Group
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from agent.adapters.sql.cached_lookup import CachedLookup
from agent.adapters.sql.models import Carrier, Rate, RatePlan
from agent.adapters.sql.rate_repository import (
    _COLUMNS,
    _PACKED,
    DEFAULT_BATCH_ROWS,
    _add_batch,
    _Milliseconds,
    _unpack_text,
    plan_settings,
    reading,
)
from agent.core.buy_index import BuyIndex, Offers, prepare_offers, select_offers
from agent.core.errors import BillingError
from agent.core.ratetable import RateTableBuilder
from agent.core.rating import RateRow
from agent.core.routing import CarrierState, LossVerdicts, MarginFloor, RouteChoice, RoutePolicy

logger = logging.getLogger(__name__)

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
                 monotonic: Callable[[], float] = time.monotonic, batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        self.engine = engine
        self.index = BuyIndex()  # swapped whole, never changed in place
        self.verdicts = LossVerdicts()
        self._interval = check_interval_seconds
        self._monotonic = monotonic
        self._batch_rows = batch_rows
        self._checked_at = monotonic()
        self._check: Greenlet | None = None
        self._loading: set[str] = set()  # decks whose first load runs in the background
        self._merging = Semaphore()  # one new index at a time: each starts from the current one
        self._group = Group()
        # prepare_offers' answer for (carriers list, index) by sell currency: rebuilt when either changes
        self._offers: tuple[object, object, dict[str, Offers]] = (None, None, {})
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
        missing = [plan for plan in plans if self.index.deck(plan) is None]
        if missing:
            started = self._monotonic()
            self._merge(self._builders(missing))
            logger.info("buy decks: %d loaded in %.1f s, %d prefixes in the shared index", len(missing),
                        self._monotonic() - started, self.index.slot_count)
        return plans

    def refresh_all(self) -> None:
        """Read the carriers and policies again and check every loaded deck's version (SIGHUP)."""
        self.carriers.forget()
        self.policies.forget()
        self.check_versions()

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
        carriers = self.carriers.get(_ALL)
        index = self.index  # this call's index, whatever a reload swaps in meanwhile
        if self._monotonic() - self._checked_at >= self._interval and self._check is None:
            self._start_check()
        offers = self._offers_of(carriers, index, sell_currency)
        for plan in offers.loading:
            self._load_in_background(plan)
        return select_offers(sell, destination, at_ms, index, offers, routing.policy, live_channels=live_channels,
                             allow_loss=routing.allow_loss, seed=seed, verdicts=self.verdicts)

    def check_versions(self) -> list[str]:
        """Read the loaded decks' versions and reload the changed ones now; the reloaded plans.
        A failed read or load is logged and keeps the deck in use (retried at the next check)."""
        self._checked_at = self._monotonic()
        loaded = {plan: deck.version for plan, deck in self.index.decks.items()}
        if not loaded:
            return []
        try:
            with reading(self.engine) as connection:
                versions: dict[str, int] = {name: version for name, version in connection.execute(
                    select(RatePlan.name, RatePlan.version).where(RatePlan.name.in_(loaded)))}
        except SQLAlchemyError as exc:
            logger.error("buy decks: version check failed, keeping the decks in use: %s", exc)
            return []
        reloaded = []
        for plan, version in loaded.items():
            if plan not in versions:
                logger.warning("buy deck %r no longer exists; keeping its last rates", plan)
            elif versions[plan] != version:
                started = self._monotonic()
                try:
                    self._merge(self._builders([plan]))
                except (SQLAlchemyError, BillingError) as exc:
                    logger.error("buy deck %r: reload failed, keeping version %d: %s", plan, version, exc)
                    continue
                reloaded.append(plan)
                logger.info("buy deck %r: version %d -> %d, loaded in %.1f s", plan, version, versions[plan],
                            self._monotonic() - started)
        return reloaded

    def close(self) -> None:
        self.carriers.close()
        self.policies.close()
        self._group.kill(timeout=5.0)

    # ---------------------------------------------------------------------------- internals

    def _offers_of(self, carriers: tuple[CarrierEntry, ...], index: BuyIndex, sell_currency: str) -> Offers:
        known_carriers, known_index, by_currency = self._offers
        if known_carriers is not carriers or known_index is not index:
            by_currency = {}
            self._offers = (carriers, index, by_currency)
        offers = by_currency.get(sell_currency)
        if offers is None:
            offers = by_currency[sell_currency] = prepare_offers(index, (
                (CarrierState(c.name, c.trunk, c.priority, c.weight, c.enabled, c.max_channels), c.buy_plan,
                 _no_rate_note(c, sell_currency)) for c in carriers))
        return offers

    def _builders(self, plans: Iterable[str]) -> Iterator[RateTableBuilder]:
        for plan in plans:  # one deck's rows at a time: each is merged before the next is read
            yield load_builder(self.engine, plan, batch_rows=self._batch_rows, pause=_yield)

    def _merge(self, builders: Iterable[RateTableBuilder]) -> None:
        with self._merging:
            self.index = self.index.with_decks(builders, pause=_yield)  # the swap: one reference assignment

    def _start_check(self) -> None:
        check = self._check = self._group.spawn(self.check_versions)

        def done(_: Greenlet) -> None:
            self._check = None
            self._checked_at = self._monotonic()

        check.link(done)
        check.link_exception(_crashed)

    def _load_in_background(self, plan: str) -> None:
        if plan in self._loading:
            return
        self._loading.add(plan)

        def load() -> None:
            if self.index.deck(plan) is None:  # loaded meanwhile by preload or another greenlet
                self._merge(self._builders([plan]))
                logger.info("buy deck %r loaded", plan)

        loading = self._group.spawn(load)
        loading.link(lambda _: self._loading.discard(plan))
        loading.link_exception(_crashed)


def _no_rate_note(carrier: CarrierEntry, sell_currency: str) -> str | None:
    """Why a carrier has no buy rate for any call of this currency, else None."""
    if carrier.buy_plan is None:
        return "no buy deck imported"
    if carrier.currency != sell_currency:
        return f"buys in {carrier.currency}, the plan sells in {sell_currency} (buy costs are not converted yet)"
    return None


def load_builder(engine: Engine, plan_name: str, *, batch_rows: int = DEFAULT_BATCH_ROWS,
                 pause: Callable[[], None] | None = None) -> RateTableBuilder:
    """A plan's rows in a :class:`RateTableBuilder`, not built: ``load_table``'s read (the same
    columns, streaming and checks), for :meth:`BuyIndex.with_decks` to build into the shared index
    instead of a table of its own."""
    with reading(engine) as connection:
        settings = plan_settings(connection, plan_name)
        builder = RateTableBuilder(settings.name, currency=settings.currency, timezone=settings.timezone,
                                   international_prefix=settings.international_prefix, version=settings.version)
        plan_id = Rate.plan_id
        if connection.dialect.name == "sqlite":
            plan_id = Rate.plan_id + 0  # type: ignore[assignment]  # a table scan: see load_table
        packed = connection.dialect.name in ("mysql", "mariadb")
        query = select(*(_PACKED if packed else _COLUMNS)).where(plan_id == settings.id)
        result = connection.execution_options(stream_results=True, yield_per=batch_rows).execute(query)
        to_ms = _Milliseconds()
        for batch in result.partitions():
            _add_batch(builder, map(_unpack_text, batch) if packed else batch, plan_name, to_ms)
            if pause is not None:
                pause()
    return builder


def _yield() -> None:
    gevent.sleep(0)  # a long load or merge never starves live calls


def _crashed(greenlet: Greenlet) -> None:
    logger.error("buy deck check or load crashed: %r", greenlet.exception)
