"""The authorization decision (DESIGN §5 "Authorize"), shared by the engine and the simulation.

No gevent and no clock here: the caller passes the instant and a function that runs the
store's atomic check-and-reserve (with its own deadline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from agent.core.balance import StoreAuthorization
from agent.core.bundles import BundleSlot, BundleTariff
from agent.core.events import AuthorizeDecision, AuthorizeRequest, DenyReason, Direction
from agent.core.fx import plan_tariff, rewrap
from agent.core.rating import RateRow
from agent.core.routing import CallRoutes, RouteChoice
from agent.core.session import (
    CallSession,
    Leg,
    LevelRated,
    Payer,
    RatedCall,
    RatingRefused,
    SessionSettings,
    payers_of,
)
from agent.ports import Rater

# (account, want, minimum, bundle periods, bundle seconds wanted for the first slice)
StoreAuthorize = Callable[[str, int, int, tuple[BundleSlot, ...], int], StoreAuthorization]
# (the customer's account, want, minimum, bundle periods, bundle seconds wanted, [(a level's store
# call id, its account, want, minimum)]) -> the customer's outcome and the levels' in order: a
# reseller's customer and the levels above it (DESIGN §11) reserved at once (each its own store
# step, one round trip)
ChainAuthorize = Callable[[str, int, int, tuple[BundleSlot, ...], int, Sequence[tuple[str, str, int, int]]],
                          tuple[StoreAuthorization, list[StoreAuthorization]]]
# (the call as the operator sells it: the customer's rating, or the top reseller's; the account
# that pays the operator; the number; the instant; the call id) -> the carriers to try (DESIGN
# §10); None: no carriers, no routing
Router = Callable[[RatedCall, str, str, int, str], RouteChoice | None]


class ChainRater(Protocol):
    """A ``Rater`` that also rates the levels above a customer (``PlanRater``)."""

    def rate_chain(self, account_id: str, destination: str, at_ms: int) -> tuple[LevelRated, ...]:
        """Each level above the account, nearest first, rated at its seller's price; () for a
        direct customer. Raises ``RatingRefused`` with the level's reason."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: AuthorizeDecision
    session: CallSession | None = None
    release_reservation: bool = False  # the store reserved, but the call is denied after all
    # Levels above the customer the store reserved for a call denied after all: (call id, account).
    release_levels: tuple[tuple[str, str], ...] = ()


def route_call(router: Router, rated: RatedCall, chain: Sequence[LevelRated], account_id: str, destination: str,
               at_ms: int, call_id: str) -> tuple[RouteChoice | None, CallRoutes | None]:
    """The carriers for a call (DESIGN §10), asked with the rating of the level the operator
    sells to (the customer's, or the top reseller's) and the account that pays the operator:
    the router's choice (None: no routing) and, when it has routes, the call's ``CallRoutes``.
    The weight draw is seeded by the call id, so a call adopted after a restart gets the same
    list while the carriers and their decks are unchanged."""
    top, top_level, top_payer = ((chain[-1].rated, chain[-1].level, chain[-1].account_id) if chain
                                 else (rated, 0, account_id))
    sell = plan_tariff(top.tariff)
    if not isinstance(sell, RateRow):
        return None, None
    choice = router(top, top_payer, destination, at_ms, call_id)
    if choice is None or choice.refused:
        return choice, None
    return choice, choice.call_routes(sell, top_level)


def decide(request: AuthorizeRequest, *, call_id: str, node: str, rater: Rater, store_authorize: StoreAuthorize,
           settings: SessionSettings, max_call_seconds: int, now_ms: int,
           chain_authorize: ChainAuthorize | None = None, router: Router | None = None) -> Outcome:
    """Check the request, rate the destination, reserve the first slice, size the backstop.

    With a ``ChainRater`` and ``chain_authorize``, a customer of a reseller is also rated and
    reserved at every level above it (DESIGN §11): every level is rated before anything is
    reserved (a level without a rate refuses the call with its reason), then the customer and
    every level above it are reserved at once, one round trip (see "Ordering" in
    agent/core/session.py); a refusal at any of them releases the others that were reserved.
    The call may last what every level can pay.

    With a ``router`` (wholesale, DESIGN §10) the carriers are chosen once every level is rated
    and before anything is reserved: no route refuses the call (``no_route``) with nothing held.
    The price they are compared with is the operator's: the customer's rating for a direct
    customer, the top reseller's for a reseller's customer."""

    def deny(reason: DenyReason, detail: str, *, release: bool = False,
             levels: tuple[tuple[str, str], ...] = ()) -> Outcome:
        return Outcome(AuthorizeDecision(False, call_id, reason=reason, detail=detail), release_reservation=release,
                       release_levels=levels)

    if not request.account_id.strip():
        return deny(DenyReason.UNKNOWN_ACCOUNT, "no account code on the channel")
    if not request.destination.strip() or not request.leg_id:
        return deny(DenyReason.BAD_REQUEST, "no destination or no unique id")
    try:
        rated = rater.rate(request.account_id, request.destination, now_ms)
    except RatingRefused as refused:
        return deny(refused.reason, refused.detail)
    chain: tuple[LevelRated, ...] = ()
    rate_chain = getattr(rater, "rate_chain", None) if chain_authorize is not None else None
    if rate_chain is not None:
        try:
            chain = cast(ChainRater, rater).rate_chain(request.account_id, request.destination, now_ms)
        except RatingRefused as refused:
            return deny(refused.reason, refused.detail)
    routed: CallRoutes | None = None
    if router is not None:
        choice, routed = route_call(router, rated, chain, request.account_id, request.destination, now_ms, call_id)
        if choice is not None and choice.refused:
            return deny(DenyReason.NO_ROUTE, choice.detail())
    want = rated.tariff.cost_micros(settings.nibble_ms)
    minimum = rated.tariff.cost_micros(1000)
    plan_own = plan_tariff(rated.tariff)  # under an FX conversion (DESIGN §11): the plan's own
    row = plan_own if isinstance(plan_own, RateRow) else None
    slots = rated.bundles if row is not None else ()
    bundle = BundleTariff(row, 0, slots) if row is not None and slots else None
    want_s = bundle.billed_seconds_at(settings.nibble_ms) if bundle is not None else 0
    upper: list[Payer] = []
    if chain:
        assert chain_authorize is not None
        upper = payers_of(call_id, chain)
        stored, answers = chain_authorize(
            request.account_id, want, minimum, slots, want_s,
            [(p.call_id, p.account_id, lv.rated.tariff.cost_micros(settings.nibble_ms),
              lv.rated.tariff.cost_micros(1000)) for p, lv in zip(upper, chain, strict=True)])
        reserved = tuple((p.call_id, p.account_id) for p, a in zip(upper, answers, strict=True) if a.allowed)
        if not stored.allowed:  # the customer says why; the levels that reserved give it back
            return deny(stored.reason or DenyReason.INSUFFICIENT_FUNDS, stored.detail, levels=reserved)
        for payer, got in zip(upper, answers, strict=True):
            payer.budget_micros = got.granted_micros
            payer.available_micros = got.available_micros
        unpaid = [(level, got) for level, got in zip(chain, answers, strict=True) if not got.allowed]
        if unpaid:
            level, got = unpaid[0]  # the nearest level that cannot pay says why
            return deny(got.reason or DenyReason.INSUFFICIENT_FUNDS,
                        f"tenant {level.tenant!r} (account {level.account_id!r}): {got.detail}", release=True,
                        levels=reserved)
    else:
        stored = store_authorize(request.account_id, want, minimum, slots, want_s)
        if not stored.allowed:
            return deny(stored.reason or DenyReason.INSUFFICIENT_FUNDS, stored.detail)
    tariff = rated.tariff
    limit_tariff = rated.tariff
    if bundle is not None and stored.bundle_granted_s > 0:
        # In the bundle (DESIGN §9): the call holds the first slice's seconds; the PBX limit
        # counts every bundle second the call could still draw on (the nibbles pin it later).
        tariff = rewrap(rated.tariff, bundle.holding(stored.bundle_granted_s))
        limit_tariff = rewrap(rated.tariff, bundle.holding(max(stored.bundle_available_s, stored.bundle_granted_s)))
    max_seconds = min(limit_tariff.max_seconds(stored.available_micros), max_call_seconds)
    limiter = ""
    for payer in upper:  # what every level can pay (DESIGN §11)
        level_seconds = payer.tariff.max_seconds(payer.available_micros)
        if level_seconds < max_seconds:
            max_seconds, limiter = level_seconds, payer.tenant
    if max_seconds <= 0:
        whose = f" of tenant {limiter!r}" if limiter else ""
        return deny(DenyReason.INSUFFICIENT_FUNDS, f"the balance{whose} does not cover the first charged second",
                    release=True, levels=tuple((p.call_id, p.account_id) for p in upper))
    limit_ms = max_seconds * 1000
    a_leg = Leg(request.leg_id, direction=Direction.INBOUND, created_ms=request.at_ms or now_ms,
                channel=request.channel, sip_call_id=request.sip_call_id, caller=request.caller,
                callee=request.destination)
    session = CallSession(
        call_id=call_id, node=node, pbx=request.pbx, account_id=request.account_id,
        destination=request.destination, caller=request.caller, a_leg=a_leg, authorized_ms=now_ms,
        tariff=tariff, rating=rated.info, settings=settings, granted_micros=stored.granted_micros,
        limit_ms=limit_ms, group_id=request.group_id, upper=tuple(upper), seller=chain[0].tenant if chain else "",
        bundle_open=isinstance(plan_tariff(tariff), BundleTariff) and stored.bundle_granted_s >= want_s,
        routed=routed,
    )
    warning_ms = settings.warning_ms if limit_ms > settings.warning_ms else 0
    detail = f"prefix {rated.info.prefix} plan {rated.info.plan_name}"
    if routed is not None:
        detail += " via " + ",".join(routed.carriers)
    decision = AuthorizeDecision(True, call_id, limit_ms, warning_ms, detail=detail,
                                 backstop_ms=limit_ms + settings.backstop_margin_ms,
                                 routes=routed.trunks if routed is not None else ())
    return Outcome(decision, session)
