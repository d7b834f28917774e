"""Wholesale routing of live calls (DESIGN §10, issue 17): the engine's router and the margin
alerts.

:class:`CallRouter` is the ``Router`` of :func:`agent.services.authorize.decide`: it asks the
route book (``agent/adapters/sql/route_book.py``: the carriers, their buy decks in memory, each
plan's route policy) for the carriers of a call once every level is rated, with the live calls
per carrier, and draws the weight policy's order from the call id (a retried authorization
routes alike). No carrier defined at all: no routing (``None``), the dialplan's own trunk
carries the call as before carriers existed. A book that cannot say (the database away before
the carriers were ever read) refuses the call with ``no_route``: dialling a trunk nobody chose
could lose money on every call.

Margin alerts (``margin_predicted`` at authorization, on the first route for a
``COMPARE_SECONDS`` call; ``margin_actual`` at settle, from the rating decision's buy side)
go through the node's alerts (table, log line, counter, webhook and stream), one per account
and kind per throttle period.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from agent.core.cdr import CallRecord, RatingRecord
from agent.core.fraud import MARGIN_ACTUAL, MARGIN_PREDICTED, AlertRecord
from agent.core.fx import plan_tariff
from agent.core.rating import RateRow, whole_seconds
from agent.core.routing import (
    COMPARE_SECONDS,
    Margin,
    MarginFloor,
    RouteChoice,
    RoutePolicy,
    Skipped,
    SkipReason,
    below_floor,
    margin_of,
)
from agent.core.session import RatedCall

log = logging.getLogger(__name__)


class _Routing(Protocol):
    @property
    def floor(self) -> MarginFloor: ...


class RouteSource(Protocol):
    """What the router reads (``RouteBook``)."""

    def configured(self) -> bool: ...

    def routing_of(self, sell_plan: str) -> _Routing: ...

    def routes(self, sell_plan: str, sell_currency: str, sell: RateRow, destination: str, at_ms: int, *,
               live_channels: Mapping[str, int] | None = None, seed: int = 0) -> RouteChoice: ...


class ChannelView(Mapping[str, int]):
    """Live calls per carrier as the channel limits see them: this node's own (exact, at once)
    or every node's as last read from Redis, whichever is higher (this node's newest calls may
    not be in the shared snapshot yet)."""

    def __init__(self, local: Mapping[str, int], shared: Callable[[], Mapping[str, int]]) -> None:
        self.local = local
        self.shared = shared

    def __getitem__(self, carrier: str) -> int:
        return max(self.local.get(carrier, 0), self.shared().get(carrier, 0))

    def __iter__(self) -> Iterator[str]:
        return iter(set(self.local) | set(self.shared()))

    def __len__(self) -> int:
        return len(set(self.local) | set(self.shared()))


class CallRouter:
    def __init__(self, book: RouteSource, *, node: str, live_channels: Callable[[], Mapping[str, int]],
                 alert: Callable[[AlertRecord], object] | None = None) -> None:
        self.book = book
        self.node = node
        self.live_channels = live_channels
        self.alert = alert
        self.unavailable = 0  # calls refused because the book could not say

    def __call__(self, top: RatedCall, account_id: str, destination: str, at_ms: int,
                 call_id: str) -> RouteChoice | None:
        sell = plan_tariff(top.tariff)
        if not isinstance(sell, RateRow):
            return None
        try:
            if not self.book.configured():
                return None
            choice = self.book.routes(top.info.plan_name, top.info.plan_currency, sell, destination, at_ms,
                                      live_channels=self.live_channels(), seed=zlib.crc32(call_id.encode()))
        except Exception as exc:  # noqa: BLE001 - the database away and never read: refuse, never dial blind
            self.unavailable += 1
            log.error("routes of call=%s to %s unknown: %s", call_id, destination, exc)
            return RouteChoice((), (Skipped("*", SkipReason.NO_RATE, f"carriers unknown: {exc}"),), RoutePolicy.LCR)
        if choice.routes and self.alert is not None:
            self._predicted(top, sell, choice, account_id, destination, at_ms, call_id)
        return choice

    def _predicted(self, top: RatedCall, sell: RateRow, choice: RouteChoice, account_id: str, destination: str,
                   at_ms: int, call_id: str) -> None:
        first = choice.routes[0]
        margin = margin_of(sell, first.buy, COMPARE_SECONDS * 1000)
        floor = self._floor(top.info.plan_name)
        why = below_floor(margin, floor)
        if why is not None and self.alert is not None:
            self.alert(self._record(MARGIN_PREDICTED, margin, floor, top.info.plan_name, at_ms, account_id, call_id,
                                    destination, f"predicted for a {COMPARE_SECONDS} s call on {first.carrier}: {why}"))

    def finished(self, record: CallRecord) -> None:
        """A settled call (engine ``on_finished``): the actual margin against the plan's floor."""
        if self.alert is None:
            return
        decision = next((d for d in (record.rating, *record.upper) if d.carrier), None)
        if decision is None or decision.buy_cost_micros is None or decision.margin_micros is None:
            return
        sold = decision.plan_cost_micros if decision.plan_cost_micros is not None else decision.cost_micros
        margin = Margin(whole_seconds(record.duration_ms), decision.billed_seconds, sold,
                        decision.buy_billed_seconds, decision.buy_cost_micros)
        floor = self._floor(decision.plan_name)
        why = below_floor(margin, floor)
        if why is not None:
            self.alert(self._record(MARGIN_ACTUAL, margin, floor, decision.plan_name,
                                    record.settled_ms or record.ended_ms or record.started_ms,
                                    _payer(record, decision), record.call_id, record.destination,
                                    f"{decision.carrier} for {margin.seconds} s: {why}"))

    def _floor(self, plan: str) -> MarginFloor:
        try:
            return self.book.routing_of(plan).floor
        except Exception as exc:  # noqa: BLE001 - an unknown floor: a negative margin still alerts
            log.warning("margin floor of plan %r unknown: %s", plan, exc)
            return MarginFloor()

    def _record(self, kind: str, margin: Margin, floor: MarginFloor, plan: str, at_ms: int, account_id: str,
                call_id: str, destination: str, detail: str) -> AlertRecord:
        per_minute = floor.per_minute_micros
        threshold = -(-per_minute * margin.seconds // 60) if per_minute is not None else 0
        return AlertRecord(at_ms, self.node, account_id, f"margin_floor:{plan}", kind,
                           margin.margin_micros, threshold, 0, "alert", call_id, destination, detail)


def _payer(record: CallRecord, decision: RatingRecord) -> str:
    """The account that paid the operator for the call: the top reseller's, or the customer."""
    return decision.account_id or record.account_id
