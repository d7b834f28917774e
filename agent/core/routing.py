"""Wholesale route selection and margin (DESIGN §10). Pure: no I/O, no clock, no global random.

Given the sell rate of a call's destination (the customer's plan, :mod:`agent.core.rating`) and,
per carrier, its buy rate for the same number (the longest prefix of the carrier's own buy
deck effective at the call's start; a blocked row or no row is a :class:`Refusal`), the
carriers' state and the plan's route policy, :func:`select_routes` returns the carriers to try,
in order. It drops:

* a disabled carrier, and a carrier at its channel limit (``live_channels >= max_channels``;
  the caller counts live channels cluster-wide);
* a carrier with no buy rate for the number, or whose buy row is blocked;
* **revenue assurance**: a carrier whose buy cost exceeds the sell price (below), unless the
  plan sets ``allow_loss``.

No carrier left: the call is refused with ``DenyReason.NO_ROUTE`` (Q.850 cause 34, no
circuit/channel available) and :meth:`RouteChoice.detail` says why each carrier was dropped.

**Route policies** (``rate_plans.route_policy``):

* ``lcr``: the cheapest buy cost of the same billed duration first: each carrier's §4 cost of a
  :data:`COMPARE_SECONDS` (60 s) call by its own row (its connect fee, blocks and minimum
  included); ties by priority (lower first), then by name.
* ``priority``: lower ``priority`` first; ties by the 60 s buy cost, then by name.
* ``weight``: SRV-like (RFC 2782): lower ``priority`` first; within a priority a weighted
  random order (a carrier of weight 3 is tried first three times as often as one of weight 1),
  drawn from ``random.Random(seed)``: the same seed gives the same order (the caller passes
  one, e.g. derived from the call id, so a retried authorization routes alike).

**Revenue assurance rule.** Both sides are priced by §4, each by its own row and increments,
for the same answered duration ``d``. A carrier loses money on the call when
``buy_cost(d) > sell_cost(d)`` for some ``d`` in :func:`loss_points`: 60 s and 3,600 s (a
higher per-minute rate), the first charged second of each side (``grace + 1``, where a side
charges its connect fee and its whole first block or minimum: a higher fee, a longer first
block or minimum, a shorter grace) and the first second of each side's second and third blocks
(a coarser increment: a step function is dearest, against a non-decreasing one, just after it
steps up). A buy rate per minute above the sell rate is a loss whatever the points say (long
calls). When the buy side never bills more seconds than the sell side (every billed value of
the sell side is a point of the buy side's block grid and reaches its minimum: 1/1 bought
against anything, 6/6 bought against 60/60 or 30/6 sold), with a connect fee and a rate no
higher and a grace at least as long, ``buy_cost(d) <= sell_cost(d)`` holds for every ``d``
(exact) and the points are not evaluated. Otherwise the points are a documented sample, not a
proof for every duration of exotic block structures (a 1/60 buy row against a 60/1 sell row
loses from 62 s on: the first second of the buy side's third block catches that one).

**Margin** (:func:`margin_of`): sell cost minus buy cost of one answered duration, each by §4
with its own row. A floor (per plan) is either money per minute of the answered seconds
(``margin * 60 < floor * seconds``) or basis points of the sell cost (``margin * 10000 <
floor_bp * sell_cost``); a negative margin is always below the floor. Integers throughout.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from operator import itemgetter
from typing import Any, NamedTuple, cast

from agent.core.errors import InvalidInput
from agent.core.events import DenyReason
from agent.core.money import format_amount
from agent.core.ratetable import Refusal
from agent.core.rating import RateRow, billed_seconds, cost_micros, cost_micros_for_seconds

COMPARE_SECONDS = 60  # the duration LCR compares carriers on
LONG_CALL_SECONDS = 3_600  # the long-call point of the revenue assurance rule


class RoutePolicy(StrEnum):
    LCR = "lcr"
    PRIORITY = "priority"
    WEIGHT = "weight"


def parse_policy(text: str, *, where: str = "route policy") -> RoutePolicy:
    """``lcr``, ``priority`` or ``weight``; anything else is refused naming the known ones."""
    try:
        return RoutePolicy(text.strip().lower())
    except ValueError:
        known = ", ".join(p.value for p in RoutePolicy)
        raise InvalidInput(f"{where} {text!r} does not exist (known: {known})") from None


class SkipReason(StrEnum):
    DISABLED = "disabled"
    AT_LIMIT = "at_channel_limit"
    NO_RATE = "no_rate"
    BLOCKED = "blocked"
    LOSS = "loss"


@dataclass(frozen=True, slots=True)
class CarrierState:
    """A carrier as routing sees it: its settings and its live channels (cluster-wide)."""

    name: str
    trunk: str
    priority: int = 0
    weight: int = 1
    enabled: bool = True
    max_channels: int | None = None  # None: no limit
    live_channels: int = 0

    @property
    def at_limit(self) -> bool:
        return self.max_channels is not None and self.live_channels >= self.max_channels


class Route(NamedTuple):
    """One carrier to try: its trunk, the buy row that prices the call there and its 60 s cost."""

    carrier: str
    trunk: str
    buy: RateRow
    buy_cost_micros: int  # the §4 cost of a COMPARE_SECONDS call by the buy row
    priority: int
    weight: int


class Skipped(NamedTuple):
    carrier: str
    reason: SkipReason
    note: str
    loss_seconds: int = 0  # LOSS: the duration at which the buy side costs more (0: found when read)
    sell: RateRow | None = None
    buy: RateRow | None = None

    @property
    def detail(self) -> str:
        """Why the carrier was left out (the amounts of a loss are formatted only when asked)."""
        if self.reason is SkipReason.LOSS and self.sell is not None and self.buy is not None:
            at = self.loss_seconds or loss_at(self.sell, self.buy) or LONG_CALL_SECONDS
            return (f"buys {self.buy.prefix} at {format_amount(cost_micros_for_seconds(self.buy, at))} for {at} s, "
                    f"sold at {format_amount(cost_micros_for_seconds(self.sell, at))} (revenue assurance)")
        return self.note


class RouteChoice:
    """The carriers to try, in order, and why the others were left out.

    Immutable by convention (not a frozen dataclass any more: ``skipped`` may be made when first
    read). ``later``: makes ``skipped`` on first use, so that a call that is routed, the usual
    case, never builds the rows and notes of the carriers left out (agent/core/buy_index.py).
    """

    __slots__ = ("_later", "_skipped", "policy", "routes")

    def __init__(self, routes: tuple[Route, ...], skipped: tuple[Skipped, ...] = (),
                 policy: RoutePolicy = RoutePolicy.LCR, *,
                 later: Callable[[], tuple[Skipped, ...]] | None = None) -> None:
        self.routes = routes
        self._skipped = skipped
        self.policy = policy
        self._later = later

    @property
    def skipped(self) -> tuple[Skipped, ...]:
        if self._later is not None:
            self._skipped, self._later = self._later(), None
        return self._skipped

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteChoice):
            return NotImplemented
        return (self.routes, self.skipped, self.policy) == (other.routes, other.skipped, other.policy)

    def __hash__(self) -> int:
        return hash((self.routes, self.skipped, self.policy))

    def __repr__(self) -> str:
        return f"RouteChoice(routes={self.routes!r}, skipped={self.skipped!r}, policy={self.policy!r})"

    @property
    def refused(self) -> bool:
        return not self.routes

    @property
    def reason(self) -> DenyReason | None:
        return DenyReason.NO_ROUTE if not self.routes else None

    def call_routes(self, sell: RateRow, level: int = 0) -> CallRoutes:
        """What the call keeps of this choice until it ends (the routes, ``sell``, ``level``)."""
        return FlatRoutes(self.routes, sell, level)

    def detail(self) -> str:
        """Why there is no route (or which carriers were left out), for logs and the decision."""
        why = "; ".join(f"{s.carrier}: {s.detail}" for s in self.skipped) or "no carrier"
        return ("no route: " if not self.routes else "left out: ") + why


# ------------------------------------------------------------------------ revenue assurance


def _cost(row: RateRow, seconds: int) -> int:
    """``cost_micros_for_seconds`` inlined for the hot path (same §4 steps 2-4; tested equal)."""
    _, _, rate, fee, first, increment, minimum, grace = row[:8]
    if seconds == 0 or seconds <= grace:
        return 0
    billed = seconds if seconds > minimum else minimum
    billed = first if billed <= first else first - (-(billed - first) // increment) * increment
    return fee - (-(rate * billed) // 60)


def _first_charged(row: RateRow) -> int:
    return row.grace_seconds + 1  # the first second a side charges: its first block's whole price


def loss_points(sell: RateRow, buy: RateRow) -> tuple[int, ...]:
    """The answered durations (whole seconds) at which the rule compares both sides."""
    points = {COMPARE_SECONDS, LONG_CALL_SECONDS}
    for row in (sell, buy):
        first = _first_charged(row)  # where the side starts to charge
        second = billed_seconds(row, first) + 1  # the first second of its second block
        points.update((first, second, billed_seconds(row, second) + 1))  # and of its third
    return tuple(sorted(points))



def _never_dearer(sell: RateRow, buy: RateRow) -> bool:
    """The exact fast path (module docstring): ``buy_cost(d) <= sell_cost(d)`` for every ``d``.

    With a rate and a connect fee no higher and a grace at least as long, it is enough that the
    buy side never bills more seconds: every billed value of the sell side (a point of its
    grid, at least ``max(initial_increment, minimum)``) is a point of the buy grid and reaches
    the buy minimum. The buy grid holds every multiple of its increment from its first block on
    when ``initial_increment`` is a multiple of ``increment``.
    """
    step = buy.increment
    return (buy.rate_micros <= sell.rate_micros and buy.connect_fee_micros <= sell.connect_fee_micros
            and buy.grace_seconds >= sell.grace_seconds and buy.initial_increment % step == 0
            and sell.initial_increment % step == 0 and sell.increment % step == 0
            and sell.initial_increment >= buy.initial_increment
            and buy.minimum_seconds <= max(sell.minimum_seconds, sell.initial_increment))


def loss_at(sell: RateRow, buy: RateRow) -> int | None:
    """The first duration (seconds) at which ``buy`` costs more than ``sell``, else None.

    A buy rate per minute above the sell rate is a loss on long calls: reported at
    :data:`LONG_CALL_SECONDS` when no shorter point shows it.
    """
    if _never_dearer(sell, buy):
        return None
    for seconds in loss_points(sell, buy):
        if _cost(buy, seconds) > _cost(sell, seconds):
            return seconds
    if buy.rate_micros > sell.rate_micros:
        return LONG_CALL_SECONDS
    return None


def _loses(sell: RateRow, buy: RateRow) -> bool:
    """``loss_at(sell, buy) is not None``, the likeliest answers first (the hot path)."""
    if _never_dearer(sell, buy):
        return False
    if buy.rate_micros > sell.rate_micros:
        return True
    start = buy.grace_seconds + 1  # a coarser buy block or a connect fee shows here
    if _cost(buy, start) > _cost(sell, start):
        return True
    return loss_at(sell, buy) is not None


class LossVerdicts:
    """:func:`_loses` for a call's sell row against many buy rows, fast, with what it needs kept.

    The rule splits in two. Whether ``buy_cost(d) > sell_cost(d)`` at a point ``d`` of
    :func:`loss_points` depends on the rows' *structures* (connect fee, increments, minimum,
    grace: the points, each side's billed seconds there, whether it charges at all) and on the
    two rates. So per pair of structures the points are worked out once and kept, minus those
    that cannot lose while the buy rate is no higher (the buy side bills no more seconds there
    and its fee is no higher), and none at all when :func:`_never_dearer` holds whatever the
    rates; a call then checks the rates and the few points left, in integers. Equal to
    :func:`_loses` (tested by hypothesis). Real decks have a handful of structures; the cache is
    bounded anyway (``limit`` pairs, then dropped whole).

    :meth:`for_sell` reads a buy row by position (2-7: rate, fee, first increment, increment,
    minimum, grace): a RateRow, or a record unpacked by agent/core/buy_index.py.
    """

    def __init__(self, limit: int = 4_096) -> None:
        self.limit = limit
        self.size = 0
        self._by_sell: dict[tuple[int, ...], dict[Any, tuple[tuple[int, int, int, int], ...]]] = {}
        self._shapes: Sequence[tuple[int, ...]] | None = None  # what an int key of a buy shape is a position in

    def shapes_of(self, sell: RateRow, shapes: Sequence[tuple[int, ...]] | None = None,
                  ) -> dict[Any, tuple[tuple[int, int, int, int], ...]]:
        """The points kept for a sell row's shape, per buy row shape (filled by :meth:`points`).

        A buy shape is keyed by itself (a tuple), or, by the shared buy index, by its position in
        the index's list of shapes, ``shapes`` (an int: no slice, a cheaper hash): the int keys
        hold for that list only (it only grows), so another list drops every kept point."""
        if shapes is not None and shapes is not self._shapes:
            self._by_sell.clear()
            self.size = 0
            self._shapes = shapes
        sell_shape = sell[3:8]
        plans = self._by_sell.get(sell_shape)
        if plans is None:
            plans = self._by_sell[sell_shape] = {}
        return plans

    def points(self, sell: RateRow, plans: dict[Any, tuple[tuple[int, int, int, int], ...]],
               shape: tuple[int, ...], key: int | None = None) -> tuple[tuple[int, int, int, int], ...]:
        """The points of a pair of shapes not seen yet: worked out, kept in ``plans`` (bounded)
        under ``key`` (the shape's position, :meth:`shapes_of`) or the shape itself."""
        if self.size >= self.limit:
            self._by_sell.clear()
            plans.clear()
            self._by_sell[sell[3:8]] = plans
            self.size = 0
        fee, first, increment, minimum, grace = shape
        points = plans[shape if key is None else key] = _points_that_can_lose(
            sell, RateRow("", "", 0, fee, first, increment, minimum, grace))
        self.size += 1
        return points

    def for_sell(self, sell: RateRow) -> Callable[[Sequence[Any]], bool]:
        """``loses(buy)``: ``_loses(sell, buy)`` (agent/core/buy_index.py does the same on packed records)."""
        plans = self.shapes_of(sell)
        sell_rate = sell.rate_micros

        def loses(buy: Sequence[Any]) -> bool:
            rate = buy[2]
            if rate > sell_rate:  # a dearer rate per minute always loses (long calls)
                return True
            shape = tuple(buy[3:8])
            points = plans.get(shape)
            if points is None:
                points = self.points(sell, plans, shape)
            return points_lose(points, rate, sell_rate)

        return loses


def points_lose(points: tuple[tuple[int, int, int, int], ...], rate: int, sell_rate: int) -> bool:
    """Whether a buy rate no higher than the sell rate costs more at one of a pair of shapes'
    kept points (:meth:`LossVerdicts.points`): the check of the rule once the shapes are known."""
    for billed, sell_billed, fee, sell_fee in points:
        if fee - (-(rate * billed) // 60) > sell_fee - (-(sell_rate * sell_billed) // 60):
            return True
    return False


def _points_that_can_lose(sell: RateRow, buy: RateRow) -> tuple[tuple[int, int, int, int], ...]:
    """Per point of :func:`loss_points` where the buy side may cost more when its rate is no higher
    than the sell rate: (buy billed seconds, sell billed seconds, buy fee, sell fee), a side that
    charges nothing there (``d <= grace``) given as 0 seconds and 0 fee. The rates in the rows are
    ignored: the shapes decide."""
    if _never_dearer(sell._replace(rate_micros=0), buy._replace(rate_micros=0)):
        return ()  # no duration loses while the buy rate is no higher (exact)
    kept = []
    for seconds in loss_points(sell, buy):
        if seconds == 0 or seconds <= buy.grace_seconds:
            continue  # the buy side charges nothing there
        billed, fee = billed_seconds(buy, seconds), buy.connect_fee_micros
        sell_billed, sell_fee = ((0, 0) if seconds <= sell.grace_seconds
                                 else (billed_seconds(sell, seconds), sell.connect_fee_micros))
        if billed > sell_billed or fee > sell_fee:
            kept.append((billed, sell_billed, fee, sell_fee))
    return tuple(kept)


# ------------------------------------------------------------------------------- selection


def select_routes(sell: RateRow, offers: Iterable[tuple[CarrierState, RateRow | Refusal]],
                  policy: RoutePolicy, *, allow_loss: bool = False, seed: int = 0) -> RouteChoice:
    """The ordered routes of a call whose sell rate is ``sell`` (module docstring)."""
    routes: list[Route] = []
    skipped: list[Skipped] = []
    for carrier, buy in offers:
        if not carrier.enabled:
            skipped.append(Skipped(carrier.name, SkipReason.DISABLED, "disabled"))
            continue
        if carrier.at_limit:
            skipped.append(Skipped(carrier.name, SkipReason.AT_LIMIT,
                                   f"{carrier.live_channels} of {carrier.max_channels} channels in use"))
            continue
        if isinstance(buy, Refusal):
            reason = SkipReason.BLOCKED if buy.reason is DenyReason.BLOCKED else SkipReason.NO_RATE
            skipped.append(Skipped(carrier.name, reason, buy.detail))
            continue
        if not allow_loss and _loses(sell, buy):
            skipped.append(Skipped(carrier.name, SkipReason.LOSS, "revenue assurance", 0, sell, buy))
            continue
        routes.append(Route(carrier.name, carrier.trunk, buy, _cost(buy, COMPARE_SECONDS), carrier.priority,
                            carrier.weight))
    return RouteChoice(tuple(order_routes(routes, policy, seed=seed)), tuple(skipped), policy)


# (buy_cost_micros, priority, carrier) and (priority, buy_cost_micros, carrier) of a Route, read in C
_LCR_ORDER = itemgetter(3, 4, 0)
_PRIORITY_ORDER = itemgetter(4, 3, 0)


def order_routes(routes: Sequence[Route], policy: RoutePolicy, *, seed: int = 0) -> list[Route]:
    """``routes`` in the policy's order (module docstring)."""
    if policy is RoutePolicy.LCR:
        return sorted(routes, key=_LCR_ORDER)
    if policy is RoutePolicy.PRIORITY:
        return sorted(routes, key=_PRIORITY_ORDER)
    rng = random.Random(seed)
    ordered: list[Route] = []
    by_priority: dict[int, list[Route]] = {}
    for route in sorted(routes, key=lambda r: (r.priority, r.carrier)):
        by_priority.setdefault(route.priority, []).append(route)
    for priority in sorted(by_priority):
        group = by_priority[priority]
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randrange(total)
            for index, route in enumerate(group):
                pick -= route.weight
                if pick < 0:
                    ordered.append(group.pop(index))
                    break
    return ordered


# ------------------------------------------------------------------ the call's routes


def trunk_peer(trunk: str) -> str:
    """The peer name the PBX reports for a leg on ``trunk`` (the leg's ``peer``): ``PJSIP/acme``,
    ``SIP/acme`` -> ``acme`` (the channel is ``PJSIP/acme-0000001``); ``sofia/gateway/acme`` ->
    ``acme`` (FreeSWITCH's ``sip_gateway_name``)."""
    return trunk.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]


class CallRoutes:
    """What a routed call keeps for its rating decision: the routes the PBX was given, in order,
    the sell row they were chosen against (the price the operator sells at: the customer's plan,
    or for a reseller's customer the top reseller's, DESIGN §11) and the level of the chain
    whose decision records the buy side (0: the customer's).

    A live call holds this until it ends, and every young collection of the garbage collector
    walks what it references once (then again in the older generations): so it holds as little
    as it can. :class:`FlatRoutes` (any routes) holds one flat tuple of plain values;
    ``agent.core.buy_index.IndexedRoutes`` (the daemon's route book) only the positions of the
    carriers in the offers they were chosen from, and rebuilds a route when it is read."""

    __slots__ = ("level", "sell")

    def __init__(self, sell: RateRow, level: int = 0) -> None:
        self.sell = sell
        self.level = level

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._route(n) for n in range(len(self.trunks)))

    @property
    def trunks(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def carriers(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def first_carrier(self) -> str:
        carriers = self.carriers
        return carriers[0] if carriers else ""

    def _route(self, n: int) -> Route:
        """The n-th route (0-based), as it was chosen."""
        raise NotImplementedError

    def carrier_of(self, peer: str, attempt: int) -> Route | None:
        """The route that carried a leg: the one whose trunk names the leg's ``peer``, else the
        ``attempt``-th (0-based: the dialplans try the routes in order, one leg each); None when
        neither tells."""
        trunks = self.trunks
        if peer:
            for n, trunk in enumerate(trunks):
                if trunk_peer(trunk) == peer:
                    return self._route(n)
        return self._route(attempt) if 0 <= attempt < len(trunks) else None


class FlatRoutes(CallRoutes):
    """Any routes kept as **one flat tuple** of plain values (per route: carrier, trunk, 60 s
    cost, priority, weight and the buy row's 15 fields): one tuple per route and one per buy row
    (21 for ten routes) tripled a busy node's young collections (bench_asterisk --carriers 10);
    NamedTuples are never untracked at all. ``routes`` and ``carrier_of`` rebuild them."""

    __slots__ = ("_flat",)

    def __init__(self, routes: Sequence[Route], sell: RateRow, level: int = 0) -> None:
        super().__init__(sell, level)
        flat: list[object] = []
        for r in routes:
            flat += (r.carrier, r.trunk, r.buy_cost_micros, r.priority, r.weight)
            flat += r.buy
        self._flat = tuple(flat)

    def _route(self, n: int) -> Route:
        at = n * _STRIDE
        carrier, trunk, cost, priority, weight = self._flat[at:at + 5]
        buy = RateRow(*self._flat[at + 5:at + _STRIDE])  # type: ignore[arg-type]
        return Route(carrier, trunk, buy, cost, priority, weight)  # type: ignore[arg-type]

    @property
    def trunks(self) -> tuple[str, ...]:
        return cast(tuple[str, ...], self._flat[1::_STRIDE])

    @property
    def carriers(self) -> tuple[str, ...]:
        return cast(tuple[str, ...], self._flat[0::_STRIDE])

    @property
    def first_carrier(self) -> str:
        return cast(str, self._flat[0]) if self._flat else ""


_STRIDE = 5 + len(RateRow._fields)  # FlatRoutes: a route's scalars, then its buy row's fields


# ---------------------------------------------------------------------------------- margin


@dataclass(frozen=True, slots=True)
class Margin:
    """Sell and buy side of one answered duration, each by §4 with its own row."""

    seconds: int  # answered whole seconds (a started second counts)
    sell_billed_seconds: int
    sell_cost_micros: int
    buy_billed_seconds: int
    buy_cost_micros: int

    @property
    def margin_micros(self) -> int:
        return self.sell_cost_micros - self.buy_cost_micros


def margin_of(sell: RateRow, buy: RateRow, duration_ms: int) -> Margin:
    """The margin of an answered duration in milliseconds (the carrier's own increments)."""
    seconds = -(-duration_ms // 1000) if duration_ms > 0 else 0
    return Margin(seconds, billed_seconds(sell, seconds), cost_micros(sell, duration_ms),
                  billed_seconds(buy, seconds), cost_micros(buy, duration_ms))


@dataclass(frozen=True, slots=True)
class MarginFloor:
    """A plan's margin floor: money per minute, or basis points of the sell cost (or neither)."""

    per_minute_micros: int | None = None
    percent_bp: int | None = None

    def __post_init__(self) -> None:
        if self.per_minute_micros is not None and self.percent_bp is not None:
            raise InvalidInput("margin floor: give money per minute or a percentage, not both")
        if self.per_minute_micros is not None and self.per_minute_micros < 0:
            raise InvalidInput(f"margin floor {format_amount(self.per_minute_micros)} per minute must not be negative")
        if self.percent_bp is not None and not 0 <= self.percent_bp <= 10_000:
            raise InvalidInput(f"margin floor {self.percent_bp / 100}% must be between 0% and 100%")

    def describe(self) -> str:
        if self.per_minute_micros is not None:
            return f"{format_amount(self.per_minute_micros)}/min"
        if self.percent_bp is not None:
            return f"{self.percent_bp // 100}.{self.percent_bp % 100:02d}%"
        return "none"


def below_floor(margin: Margin, floor: MarginFloor) -> str | None:
    """Why the margin is below the floor (a negative margin always is), else None."""
    value = margin.margin_micros
    if value < 0:
        return (f"negative margin {format_amount(value)} (sold {format_amount(margin.sell_cost_micros)}, "
                f"bought {format_amount(margin.buy_cost_micros)})")
    per_minute, bp, seconds, sold = floor.per_minute_micros, floor.percent_bp, margin.seconds, margin.sell_cost_micros
    if per_minute is not None and seconds > 0 and value * 60 < per_minute * seconds:
        return (f"margin {format_amount(value)} for {margin.seconds} s is below the floor of "
                f"{floor.describe()}")
    if bp is not None and sold > 0 and value * 10_000 < bp * sold:
        return (f"margin {format_amount(value)} of {format_amount(margin.sell_cost_micros)} is below the floor of "
                f"{floor.describe()}")
    return None
