"""The call session engine on gevent: the ``CallEngine`` the switch adapters drive.

One loop greenlet owns the pure :class:`CallRegistry`: it applies leg events, fires timers and
applies store results, in order, so no lock is needed. The loop never blocks: everything that
waits goes on a queue (``put`` never blocks) served by a fixed set of workers, store work and
switch commands apart (a store that stalls must not delay a cut, and a PBX that stalls must not
delay a nibble), and the workers report back through the loop's inbox. Nibbles that fall due
together are sent to the store as one batch (one pipeline on Redis).

Deadlines: the store's belong to the store (``EngineStore``: ``StoreGuard`` in the daemon), the
switch commands' to the engine (``switch_timeout_s``). Errors are sorted: a step the store
refuses for good (``BillingError``: a conflict, an unknown call) is not retried; anything else
is retried with a capped backoff, without holding a worker while it waits.

Timers run on the monotonic clock: the registry's instants are wall-clock ms (the PBX stamps
its events with the wall clock), and when the wall clock steps (NTP) every live call's time
base moves with it, so no cut comes early or late; durations keep their monotonic length.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.pool
import gevent.queue

from agent.core.balance import BundleSettle, LiveCall, StoreAuthorization, StoreNibble
from agent.core.bundles import BundleSlot, BundleTariff
from agent.core.cdr import CallRecord, Disposition, LegRecord, RatingRecord
from agent.core.errors import BillingError
from agent.core.events import (
    ArmBackstop,
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    Direction,
    EndedCall,
    HangupLeg,
    LegAnswered,
    LegBridged,
    LegEvent,
    LiveLeg,
    PbxCdrReread,
    PbxConnected,
    WarnLeg,
)
from agent.core.fx import ConvertedTariff, plan_tariff, rewrap
from agent.core.rating import RateRow
from agent.core.registry import CallRegistry
from agent.core.routing import CallRoutes
from agent.core.session import (
    Alert,
    Command,
    Effect,
    Finished,
    LevelRated,
    NibbleStep,
    Payer,
    RatedCall,
    RatingInfo,
    RatingRefused,
    ReleaseStep,
    SessionSettings,
    SettleStep,
    Tariff,
    is_level_call_id,
    level_call_id,
    level_decision,
    payers_of,
)
from agent.ports import Clock, EngineStore, Rater, StoreRider, Switch
from agent.services.authorize import Router, decide, route_call
from agent.services.call_path import CALL_PATH
from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

CALL_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@-]")
SETTLE_RETRY_MAX_S = 30.0
MAX_LEVELS = 4  # a tenant tree's depth (agent/adapters/sql/tenants.py): at most 3 levels above a customer
CLOCK_STEP_MS = 500  # the wall clock moved this much more (or less) than the monotonic one: a step


class DeadlineExceeded(Exception):
    """A switch command ran past its deadline (raised by our own gevent.Timeout, so an outer
    timeout of the caller is never mistaken for it)."""


class CdrSubmit(Protocol):
    def submit(self, record: Any) -> None: ...


class CallScreen(Protocol):
    """A check of every new call before the balance store, or around it for a screen that makes a
    round trip (the fraud rules, agent/services/fraud.py), told of the final decision (the fraud
    counters, the daemon's journal of authorized calls)."""

    def screen(self, request: AuthorizeRequest, call_id: str, now_ms: int) -> AuthorizeDecision | None:
        """None to go on, or the refusal. Bounded (one Redis round trip at most), never raises."""
        ...

    def decided(self, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        """The final decision on a call the screen let through."""
        ...

    @property
    def round_trip(self) -> bool:
        """The screen makes a network round trip (fraud counters in Redis): the engine then uses
        ``ride`` around the balance store's authorize instead of ``screen`` before it, so the call
        waits for one round trip, not two; a refusal then releases what the store reserved."""
        ...

    def ride(self, request: AuthorizeRequest, call_id: str, now_ms: int) -> ScreenRide:
        """``screen`` in two halves (only asked of a ``round_trip`` screen): what may ride in the
        store's authorize round trip, and ``finish`` after the store answered."""
        ...


class ScreenRide(Protocol):
    """A screen's work on one call, split around the store's authorize (``CallScreen.ride``)."""

    @property
    def rider(self) -> StoreRider | None:
        """The command the store may carry in its round trip (agent/ports.py), or None."""
        ...

    @property
    def refused(self) -> AuthorizeDecision | None:
        """A refusal known before the store is asked (an account the screen suspended): the call
        never reaches the store."""
        ...

    def finish(self) -> AuthorizeDecision | None:
        """None to go on, or the refusal; makes its own round trip if the store carried nothing.
        Bounded, never raises."""
        ...


class NothingToRide:
    """The ride of a screen whose ``screen`` never refuses and makes no round trip."""

    rider: StoreRider | None = None
    refused: AuthorizeDecision | None = None

    def finish(self) -> AuthorizeDecision | None:
        return None


@dataclass(frozen=True)
class EngineSettings:
    node: str
    nibble_seconds: int = 6
    warning_seconds: int = 0
    hangup_verify_ms: int = 3_000
    switch_timeout_s: float = 5.0
    nibble_workers: int = 16  # nibble batches in flight at once (each up to nibble_chunk calls)
    store_workers: int = 64  # settles and releases in flight at once
    switch_workers: int = 64  # switch commands in flight at once (hangups, backstops, warnings)
    max_call_seconds: int = 14_400  # no call is authorized for longer, whatever the balance
    nibble_chunk: int = 250  # nibbles per store round trip (Redis pipeline, SQL transactions)
    reservation_ttl_ms: int = 30_000  # as the store adapter renews them (adoption dates nibbles by it)
    # Each nibble runs this long before the boundary of the slice it pays for (SessionSettings.
    # nibble_lead_ms): the daemon gives the store deadline plus a margin.
    nibble_lead_ms: int = 0
    # A call authorized but neither answered nor ended after this long is released: its channel
    # went away unseen (the PBX rings at most 60 s in the shipped dialplans, 110 s with the
    # FreeSWITCH backup trunk); it must not hold an account's call slot forever.
    no_answer_guard_ms: int = 180_000


@dataclass(frozen=True, slots=True)
class _NibbleResults:
    steps: list[NibbleStep]
    results: list[StoreNibble]


@dataclass(frozen=True, slots=True)
class _Settled:
    call_id: str
    cost_micros: int | None
    level: int = 0  # which payer of the call settled (DESIGN §11)


@dataclass(frozen=True, slots=True)
class _OperatorCut:
    call_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Record:
    record: CallRecord


@dataclass(frozen=True, slots=True)
class LeftBehind:
    """What an earlier run of this node published about a call it supervised (live_calls)."""

    call_id: str
    pbx: str
    destination: str
    caller: str
    a_leg_id: str
    authorized_ms: int
    answered_ms: int | None


ENDED_WHILE_AGENT_DOWN = "ENDED_WHILE_AGENT_DOWN"
FROM_PBX_CDR = "ended_while_agent_down_pbx_cdr"  # the rating reason of such a call billed from the PBX's CDR


def covered_by(tariff: Tariff, debited_micros: int, nibble_ms: int, *, bundle_used_s: int = 0) -> int:
    """The talk time whole nibbles paid for: the fewest k with cost(k * N) >= debited and, on a
    call in its bundle, with the bundle seconds of k * N >= those used (the nibbles of a flat
    stretch debit nothing, so the fewest is the honest count)."""
    bundle = plan_tariff(tariff)  # under an FX conversion (DESIGN §11): the plan's own tariff
    k = 0
    while k < 10_000_000 and (
            (debited_micros > 0 and tariff.cost_micros(k * nibble_ms) < debited_micros)
            or (isinstance(bundle, BundleTariff) and bundle.covered_at(k * nibble_ms) < bundle_used_s)):
        k += 1
    return k * nibble_ms


def with_bundle(tariff: Tariff, held: LiveCall, slots: tuple[BundleSlot, ...]) -> Tariff:
    """The tariff of a call adopted or settled after a restart, holding the bundle seconds the
    store says it holds: the plan's own rate row (under an FX conversion too) in its bundle,
    re-wrapped in the conversion."""
    inner = plan_tariff(tariff)
    if held.bundle_held_s and slots and isinstance(inner, RateRow):
        return rewrap(tariff, BundleTariff(inner, held.bundle_held_s, slots))
    return tariff


_Internal = _NibbleResults | _Settled | _OperatorCut | _Record


class WorkQueue:
    """Jobs run by a fixed number of worker greenlets, in order of arrival. ``put`` never blocks
    (the queue is unbounded: the loop that puts must never wait for a busy store or PBX), and a
    job that fails is logged, never the end of its worker."""

    def __init__(self, name: str, workers: int, group: gevent.pool.Group, *, background: bool = False) -> None:
        self.name = name
        self.workers = workers
        self.group = group
        self.background = background  # its jobs step aside for authorizations (agent/services/call_path.py)
        self.queue: gevent.queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = gevent.queue.Queue()
        self.busy = 0

    def start(self) -> None:
        for _ in range(self.workers):
            self.group.spawn(self._work)

    def put(self, job: Callable[..., None], *args: Any) -> None:
        self.queue.put_nowait((job, args))

    def depth(self) -> int:
        return int(self.queue.qsize())

    def join(self, timeout_s: float) -> bool:
        """Wait until the queue is empty and no job runs, at most ``timeout_s``."""
        with gevent.Timeout(timeout_s, False):
            while self.queue.qsize() or self.busy:
                gevent.sleep(0.01)
            return True
        return False

    def _work(self) -> None:
        while True:
            job, args = self.queue.get()
            if self.background:
                CALL_PATH.yield_to_calls()
            self.busy += 1
            try:
                job(*args)
            except (gevent.GreenletExit, gevent.Timeout):
                raise
            except Exception:
                log.exception("engine %s job %s failed", self.name, getattr(job, "__name__", job))
            finally:
                self.busy -= 1


class Engine:
    """Implements the ``CallEngine`` port (agent/ports.py)."""

    def __init__(self, *, settings: EngineSettings, store: EngineStore, rater: Rater, clock: Clock,
                 cdr: CdrSubmit, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.rater = rater
        self.clock = clock
        self.cdr = cdr
        self.metrics = metrics or Metrics()
        self.registry = CallRegistry()
        self.switches: dict[str, Switch] = {}
        self.session_settings = SessionSettings(
            nibble_ms=settings.nibble_seconds * 1000, warning_ms=settings.warning_seconds * 1000,
            verify_ms=settings.hangup_verify_ms, max_call_ms=settings.max_call_seconds * 1000,
            no_answer_guard_ms=settings.no_answer_guard_ms, nibble_lead_ms=settings.nibble_lead_ms,
        )
        self._inbox: gevent.queue.Queue[LegEvent | _Internal] = gevent.queue.Queue()
        self._wake = gevent.event.Event()
        self._group = gevent.pool.Group()
        # Nibbles apart from settles: a slow settle must not delay the next slice of money (and
        # with it a cut); each queue has workers of its own.
        # Nibbles are asked nibble_lead_ms ahead and settles are not urgent: both step aside for
        # authorizations; switch commands (cuts, backstops) never do.
        self._nibble_work = WorkQueue("nibble", settings.nibble_workers, self._group, background=True)
        self._store_work = WorkQueue("store", settings.store_workers, self._group, background=True)
        self._switch_work = WorkQueue("switch", settings.switch_workers, self._group)
        self._retries = gevent.pool.Group()  # settles waiting for their next attempt
        self._pending_settles: dict[str, SettleStep] = {}  # not yet committed by the store
        self._clock_ref: tuple[int, int] | None = None  # (monotonic, wall) at the last loop turn
        self._accepting = True
        self._running = False
        self._nibble_batch: list[NibbleStep] = []
        self.on_finished: list[Callable[[Any], None]] = []
        # Checks of every new call before the store (the fraud rules); the first refusal wins.
        self.screens: list[CallScreen] = []
        # Wholesale routing (DESIGN §10): chooses the carriers of each call (None: no routing),
        # and the calls of this node per carrier, from authorization to the end of the call,
        # counted against the carrier tried first (the channel limits read them).
        self.router: Router | None = None
        self.carrier_calls: Counter[str] = Counter()
        self._carrier_of_call: dict[str, str] = {}
        # Shares those counts with the other nodes (Redis); called on the engine loop: never waits.
        self.carrier_claims: CarrierClaims | None = None
        self.lateness_samples: list[int] | None = None  # benchmarks set a list to get raw samples
        # Open reservations an earlier run of this node left (the daemon fills it at start); a
        # resync that shows their legs live on the PBX adopts them (agent restart, hand-over).
        self.adoptable: dict[str, LiveCall] = {}
        # What the earlier run had published about those calls (destination, caller, legs).
        self.adoptable_facts: dict[str, LeftBehind] = {}
        # Calls in ``adoptable`` whose reservation the store lost (published, but unknown to it):
        # adopted, they reserve again at once rather than count as having no money.
        self.unreserved: set[str] = set()
        # Calls in ``adoptable`` gone from a PBX whose CDR line was not written at the resync:
        # call id -> PBX, until that PBX's ``PbxCdrReread``.
        self._awaiting_pbx_cdr: dict[str, str] = {}

    # ---------------------------------------------------------------- lifecycle

    def add_switch(self, switch: Switch) -> None:
        self.switches[switch.name] = switch

    def start(self) -> None:
        self._running = True
        self._nibble_work.start()
        self._store_work.start()
        self._switch_work.start()
        loop = self._group.spawn(self._loop)
        loop.link_exception(self._crashed)

    def stop_accepting(self) -> None:
        """New calls are denied from now on; live calls go on being supervised."""
        self._accepting = False

    def live_calls(self) -> int:
        return self.registry.live_count()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every live call has ended and settled, at most ``timeout_s``."""
        with gevent.Timeout(timeout_s, False):
            while self.registry.sessions:
                gevent.sleep(0.05)
            return True
        return not self.registry.sessions

    def stop(self, timeout_s: float = 5.0) -> None:
        self._running = False
        self._wake.set()
        self._nibble_work.join(min(timeout_s, 1.0))
        self._store_work.join(timeout_s)
        self._switch_work.join(min(timeout_s, 1.0))
        self._retries.kill(timeout=1)
        self._group.kill(timeout=timeout_s)
        self._records_at_stop()

    def _records_at_stop(self) -> None:
        """No call ends the process without its CDR: a settle still failing is written with the
        rated cost (the store journal or the reservation's expiry carries the money, and the log
        says which call), and a record waiting for a leg's hangup goes out as it is."""
        now_ms = self.clock.now_ms()
        for call_id, step in list(self._pending_settles.items()):
            log.error("shutdown: settle of call=%s account=%s cost_micros=%d not committed; its CDR is written, "
                      "its reservation's expiry (or the store journal) carries the money", call_id,
                      step.account_id, step.cost_micros)
            self._apply(_Settled(step.session_id or call_id, step.cost_micros, step.level))
        for session in list(self.registry.sessions.values()):
            self._run_effects(self.registry.schedule(session.flush_record(now_ms)))

    def _crashed(self, greenlet: gevent.Greenlet[Any, Any]) -> None:
        log.critical("engine loop died: %r; live calls are no longer supervised", greenlet.exception)

    # ---------------------------------------------------------------- CallEngine port

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        if not request.account_id.strip():
            log.error("call of %s channel %s to %r has no account code: the dialplan must set it before the call "
                      "enters billing-outbound (Asterisk: Set(CHANNEL(accountcode)=...); FreeSWITCH: accountcode "
                      "or billing_account); refused", request.pbx, request.channel or request.leg_id,
                      request.destination)
        started = self.clock.monotonic_ms()
        decision = self._authorize(request)
        self.metrics.authorize_seconds.observe((self.clock.monotonic_ms() - started) / 1000)
        self.metrics.authorizations.labels("allowed" if decision.allowed else str(decision.reason)).inc()
        if log.isEnabledFor(logging.INFO):
            # Written once this greenlet yields (the adapter has sent the decision by then): the
            # line costs 0.1-0.2 ms, which the PBX would otherwise wait for before it dials.
            gevent.get_hub().loop.run_callback(
                log.info, "authorize call=%s account=%s dest=%s node=%s allowed=%s limit_ms=%d reason=%s %s",
                decision.call_id, request.account_id, request.destination, self.settings.node,
                decision.allowed, decision.limit_ms, decision.reason or "", decision.detail)
        return decision

    def on_event(self, event: LegEvent) -> None:
        self._inbox.put_nowait(event)

    def request_hangup(self, call_id: str, reason: str = "operator request") -> bool:
        """Cut a live call (an operator's ``calls hangup``); False when this node does not know
        the call. The cut is verified and escalated like a cut for credit."""
        if call_id not in self.registry.sessions:
            return False
        self._inbox.put_nowait(_OperatorCut(call_id, reason))
        return True

    def cut_account(self, account_id: str, reason: str) -> list[str]:
        """Cut every call of the account this node supervises (a fraud suspension); never blocks."""
        calls = [s.call_id for s in list(self.registry.sessions.values()) if s.account_id == account_id]
        for call_id in calls:
            self._inbox.put_nowait(_OperatorCut(call_id, reason))
        return calls

    # ---------------------------------------------------------------- authorization

    def live_carriers(self) -> dict[str, str]:
        """This node's routed live calls: call id -> the carrier they count against."""
        return self._carrier_of_call

    def call_id_for(self, request: AuthorizeRequest) -> str:
        return self.call_id_of_leg(request.leg_id)

    def call_id_of_leg(self, a_leg_id: str) -> str:
        return CALL_ID_UNSAFE.sub("_", f"{self.settings.node}-{a_leg_id}")[:64]

    def _adopt(self, event: PbxConnected) -> None:
        """Adopt the calls of an earlier run found live on the PBX (see ``adoptable``)."""
        now_ms = self.clock.now_ms()
        for a_leg in event.live_legs:
            if a_leg.direction is not Direction.INBOUND:
                continue
            call_id = self.call_id_of_leg(a_leg.leg_id)
            held = self.adoptable.pop(call_id, None)
            if held is None or call_id in self.registry.sessions:
                continue
            others = [leg for leg in event.live_legs if leg is not a_leg and leg.direction is Direction.OUTBOUND
                      and _same_call(leg, a_leg)]
            try:
                rated = self.rater.rate(held.account_id, a_leg.callee, a_leg.created_ms or now_ms)
            except RatingRefused as refused:
                log.error("cannot adopt call=%s account=%s dest=%r: %s; its reservation will expire and the PBX "
                          "limit ends it", call_id, held.account_id, a_leg.callee, refused.detail)
                continue
            tariff = with_bundle(rated.tariff, held, rated.bundles)
            adopted = self._adopt_levels(call_id, held, a_leg.callee, a_leg.created_ms or now_ms)
            if adopted is None:
                continue
            upper, levels, seller, lost, chain = adopted
            routed = self._adopted_routes(call_id, held.account_id, rated, chain, a_leg.callee,
                                          a_leg.created_ms or now_ms)
            effects = self.registry.adopt(
                call_id=call_id, node=self.settings.node, pbx=event.pbx, account_id=held.account_id, a_leg=a_leg,
                others=others, tariff=tariff, rating=rated.info, settings=self.session_settings,
                bundle_used_s=held.bundle_used_s,
                debited_micros=held.debited_micros, reserved_micros=held.reserved_micros, seq=held.seq,
                now_ms=now_ms, last_renewal_ms=held.expires_ms - self.settings.reservation_ttl_ms,
                reservation_lost=call_id in self.unreserved or lost, upper=upper, seller=seller, levels=levels,
                routed=routed)
            if routed is not None and routed.first_carrier:  # counted as at authorize, then on the answering one
                self._count_on_carrier(call_id, routed.first_carrier)
                self._count_on_answering_carrier(call_id)
            self.metrics.live_calls.set(self.registry.live_count())
            log.warning("adopted call=%s account=%s dest=%s from an earlier run: %d legs live, %d micro-units "
                        "already debited", call_id, held.account_id, a_leg.callee, 1 + len(others),
                        held.debited_micros)
            self._run_effects(effects)

    def _adopted_routes(self, call_id: str, account_id: str, rated: RatedCall, chain: Sequence[LevelRated],
                        destination: str, at_ms: int) -> CallRoutes | None:
        """The routes of an adopted call, asked again (the earlier run kept them in memory only):
        the same list while the carriers and their decks are unchanged (the draw is seeded by
        the call id), so the leg that answered names its carrier and the CDR keeps its buy side
        and margin. A carrier that left the list since (disabled, at its channel limit with this
        very call) leaves the call without one, as before this was asked."""
        if self.router is None:
            return None
        try:
            choice, routed = route_call(self.router, rated, chain, account_id, destination, at_ms, call_id)
        except Exception as exc:  # noqa: BLE001 - the call is adopted and billed either way; only the buy side is lost
            log.warning("adopted call=%s: its routes could not be asked again (%s); its CDR names no carrier",
                        call_id, exc)
            return None
        if routed is None and choice is not None:
            log.warning("adopted call=%s: no route for it now (%s); its CDR names no carrier", call_id,
                        choice.detail())
        return routed

    def _adopt_levels(self, call_id: str, held: LiveCall, destination: str, at_ms: int,
                      ) -> tuple[list[Payer], list[tuple[int, int]], str, bool, tuple[LevelRated, ...]] | None:
        """The levels above the customer of an adopted call (DESIGN §11): the chain rated again
        at the call's start, each level's own store call (its derived id) taken from
        ``adoptable``. Returns (payers, (debited, reserved) per level, the customer's seller,
        whether a level's reservation is gone), or None when the chain cannot be rated."""
        rate_chain = getattr(self.rater, "rate_chain", None)
        if rate_chain is None:
            return [], [], "", False, ()
        try:
            chain: tuple[LevelRated, ...] = rate_chain(held.account_id, destination, at_ms)
        except RatingRefused as refused:
            log.error("cannot adopt call=%s account=%s dest=%r: the chain above it: %s; its reservations will "
                      "expire and the PBX limit ends it", call_id, held.account_id, destination, refused.detail)
            return None
        if not chain:
            return [], [], "", False, ()
        upper = payers_of(call_id, chain)
        levels: list[tuple[int, int]] = []
        lost = False
        for payer in upper:
            level_held = self.adoptable.pop(payer.call_id, None)
            if level_held is None or payer.call_id in self.unreserved:
                lost = True  # expired or never reserved: the first nibble reserves it again
                levels.append((0, 0) if level_held is None else (level_held.debited_micros, 0))
            else:
                levels.append((level_held.debited_micros, level_held.reserved_micros))
            payer.debited_micros, reserved = levels[-1]
            payer.budget_micros = payer.debited_micros + reserved
            self.unreserved.discard(payer.call_id)
        return upper, levels, chain[0].tenant, lost, chain

    def _settle_left_behind(self, event: PbxConnected) -> None:
        """Calls an earlier run of this node left with open reservations that this PBX no longer
        shows ended while no agent watched them (kill -9, a crash). No event says when; the store
        says what their nibbles debited. Settle exactly that, once, and write the CDR, marked
        ``ENDED_WHILE_AGENT_DOWN`` with the time those nibbles covered, rather than let the
        reservation expire with no record (``ledger check`` then found a charge without a call).
        When the PBX writes its own CDR file for the agent (``PbxConnected.ended``), the call is
        billed its real answer-to-end time from it instead; a call whose line is not there yet
        waits for the adapter's second read of the file (``PbxCdrReread``)."""
        live = {leg.leg_id for leg in event.live_legs} | {leg.group_id for leg in event.live_legs}
        ended = {call.a_leg_id: call for call in event.ended}
        for call_id, held in list(self.adoptable.items()):
            if is_level_call_id(call_id):
                continue  # a level above a customer: settled with its call (_settle_one_left_behind)
            facts = self.adoptable_facts.get(call_id)
            if facts is not None and facts.pbx and facts.pbx != event.pbx:
                continue  # another PBX's call: its own resync decides
            if facts is None and len(self.switches) > 1:
                continue  # which PBX had it is unknown: its reservation expires as before
            if facts is not None and facts.a_leg_id in live:
                continue  # still up (its caller transferred it, say): the backstop and the expiry handle it
            pbx_cdr = ended.get(facts.a_leg_id) if facts is not None else None
            if pbx_cdr is None and facts is not None and event.cdr_reread:
                # Found by bench_faults: a call that ended just before the listing had no line yet
                # and was billed from the store. It stays adoptable until the file is read again.
                self._awaiting_pbx_cdr[call_id] = event.pbx
                continue
            self._settle_one_left_behind(call_id, held, facts, event.pbx, pbx_cdr)

    def _settle_awaiting_pbx_cdr(self, event: PbxCdrReread) -> None:
        """The PBX's CDR file read again: settle the left-behind calls that waited for it."""
        ended = {call.a_leg_id: call for call in event.ended}
        for call_id, pbx in list(self._awaiting_pbx_cdr.items()):
            if pbx != event.pbx:
                continue
            del self._awaiting_pbx_cdr[call_id]
            held = self.adoptable.get(call_id)
            if held is None:
                continue  # settled or adopted meanwhile (a later resync)
            facts = self.adoptable_facts.get(call_id)
            self._settle_one_left_behind(call_id, held, facts, pbx,
                                         ended.get(facts.a_leg_id) if facts is not None else None)

    def _settle_one_left_behind(self, call_id: str, held: LiveCall, facts: LeftBehind | None, pbx: str,
                                pbx_cdr: EndedCall | None) -> None:
        del self.adoptable[call_id]
        self.unreserved.discard(call_id)
        self._awaiting_pbx_cdr.pop(call_id, None)
        record = self._left_behind_record(held, facts, pbx, self.clock.now_ms(), pbx_cdr)
        assert record.rating is not None
        if record.rating.reason == FROM_PBX_CDR:
            log.warning("call=%s account=%s ended while the agent was down: settled from the PBX's CDR (%d ms "
                        "talked, %d micro-units; the nibbles had debited %d), CDR marked %s", call_id,
                        held.account_id, record.duration_ms, record.rating.cost_micros, held.debited_micros,
                        ENDED_WHILE_AGENT_DOWN)
        else:
            log.warning("call=%s account=%s ended while the agent was down: settled from the store (%d "
                        "micro-units the nibbles debited; no PBX CDR of it), CDR marked %s", call_id,
                        held.account_id, held.debited_micros, ENDED_WHILE_AGENT_DOWN)
        # What the nibbles used of bundles is committed; the store knows which periods it held.
        bundle = BundleSettle(record.rating.bundle_seconds) if held.bundle_held_s else None
        # The levels above the customer (DESIGN §11): billed from the PBX's CDR, each level its own
        # price of the same real time (as the customer); otherwise what its own nibbles debited.
        upper: list[RatingRecord] = []
        chain = self._chain_left_behind(held.account_id, facts)
        sellers = [chain[0].tenant, *(level.seller for level in chain)] if chain else []
        payers = {payer.level: payer for payer in payers_of(call_id, chain)}
        if sellers:
            record = replace(record, rating=replace(record.rating, tenant=sellers[0]))
        decided_ms = record.settled_ms or self.clock.now_ms()
        for level in range(1, MAX_LEVELS):
            level_id = level_call_id(call_id, level)
            level_held = self.adoptable.pop(level_id, None)
            self.unreserved.discard(level_id)
            if level_held is None:
                continue
            payer = payers.get(level)
            if record.rating.reason == FROM_PBX_CDR and payer is not None and payer.account_id == level_held.account_id:
                level_record = replace(level_decision(payer, decided_ms, record.duration_ms,
                                                      record.rating.billed_seconds), reason=FROM_PBX_CDR)
            else:
                level_record = RatingRecord(decided_ms=decided_ms, level=level,
                                            tenant=sellers[level] if level < len(sellers) else "",
                                            account_id=level_held.account_id, cost_micros=level_held.debited_micros,
                                            billed_seconds=record.rating.billed_seconds, reason=record.rating.reason)
            upper.append(level_record)
            self._store_work.put(self._settle_level_left_behind, SettleStep(
                level_id, level_held.seq + 1, level_record.cost_micros, level_held.account_id, None, level, call_id))
        if upper:
            record = replace(record, upper=tuple(upper))
        self._store_work.put(self._settle_record, SettleStep(call_id, held.seq + 1, record.rating.cost_micros,
                                                             held.account_id, bundle), record)

    def _left_behind_record(self, held: LiveCall, facts: LeftBehind | None, pbx: str, now_ms: int,
                            pbx_cdr: EndedCall | None = None) -> CallRecord:
        """The record of a call that ended while no agent ran: from the PBX's own CDR when it
        has the call (its real answer and end), else the time the debited nibbles covered."""
        covered_ms = 0
        bundle_seconds = held.bundle_used_s
        cost = held.debited_micros
        reason = ENDED_WHILE_AGENT_DOWN.lower()
        info = RatingInfo()
        tariff: Tariff | None = None
        started_ms = facts.authorized_ms if facts is not None else held.created_ms
        answered_ms = facts.answered_ms if facts is not None else None
        ended_ms: int | None = None
        if facts is not None and facts.destination:
            try:
                rated = self.rater.rate(held.account_id, facts.destination, facts.authorized_ms)
            except RatingRefused:
                rated = None
            if rated is not None:
                info = rated.info
                tariff = with_bundle(rated.tariff, held, rated.bundles)
                covered_ms = covered_by(tariff, held.debited_micros, self.session_settings.nibble_ms,
                                        bundle_used_s=held.bundle_used_s)
                if pbx_cdr is not None:
                    reason = FROM_PBX_CDR
                    answered_ms, ended_ms = pbx_cdr.answered_ms, pbx_cdr.ended_ms
                    # The real talk, whatever the reservation held: the call ran on the PBX's own
                    # limit (set from the money there was at authorize); the agent, had it run,
                    # would have nibbled on. Several calls of one account left running without an
                    # agent can take it below its limit: that is what they used.
                    covered_ms = ended_ms - answered_ms if answered_ms is not None else 0
                    cost = tariff.cost_micros(covered_ms)
                if isinstance(plan_own := plan_tariff(tariff), BundleTariff):
                    bundle_seconds = plan_own.covered_at(covered_ms)
        if answered_ms is None and cost:
            answered_ms = started_ms
        if ended_ms is None:
            ended_ms = answered_ms + covered_ms if answered_ms is not None else started_ms
        legs = (LegRecord(facts.a_leg_id, "inbound", started_ms, caller=facts.caller, callee=facts.destination,
                          answered_ms=answered_ms, hangup_cause=ENDED_WHILE_AGENT_DOWN),) if facts else ()
        # The conversion, as a settled call's decision records it (session.py): the rate and the
        # plan's own price of the time billed, so that re-rating converts at the same rate.
        converted = isinstance(tariff, ConvertedTariff)
        plan_cost = plan_tariff(tariff).cost_micros(covered_ms) if tariff is not None and converted else cost
        return CallRecord(
            call_id=held.call_id, node=self.settings.node, pbx=facts.pbx if facts and facts.pbx else pbx,
            account_id=held.account_id, destination=facts.destination if facts else "",
            caller=facts.caller if facts else "", started_ms=started_ms, answered_ms=answered_ms,
            ended_ms=ended_ms, duration_ms=covered_ms,
            disposition=Disposition.ANSWERED if answered_ms is not None else Disposition.NO_ANSWER,
            hangup_cause=ENDED_WHILE_AGENT_DOWN, settled_ms=now_ms, legs=legs,
            rating=RatingRecord(decided_ms=now_ms, plan_name=info.plan_name, rate_id=info.rate_id,
                                prefix=info.prefix, rate_micros=info.rate_micros,
                                billed_seconds=-(-covered_ms // 1000), cost_micros=cost, reason=reason,
                                bundle_seconds=bundle_seconds, plan_currency=info.plan_currency,
                                currency=info.currency, fx_rate_e10=info.fx_rate_e10 if converted else None,
                                fx_inverse=info.fx_inverse and converted,
                                plan_cost_micros=plan_cost if info.plan_currency else None))

    def _chain_left_behind(self, account_id: str, facts: LeftBehind | None) -> tuple[LevelRated, ...]:
        """The levels above the customer of a call left behind, rated again at its start (whose
        price each paid, and at what); () for a direct customer or when it cannot be rated."""
        rate_chain = getattr(self.rater, "rate_chain", None)
        if rate_chain is None or facts is None or not facts.destination:
            return ()
        try:
            chain: tuple[LevelRated, ...] = rate_chain(account_id, facts.destination, facts.authorized_ms)
        except RatingRefused:
            return ()
        return chain

    def _settle_level_left_behind(self, step: SettleStep) -> None:
        try:
            self.store.settle(step.call_id, step.seq, step.cost_micros, self.clock.now_ms(), step.account_id, None)
        except Exception as exc:  # noqa: BLE001 - the expiry charges the same money
            log.error("settle of level %d of call=%s left behind failed (%s); its reservation's expiry charges the "
                      "same %d micro-units", step.level, step.session_id, exc, step.cost_micros)

    def _settle_record(self, step: SettleStep, record: CallRecord) -> None:
        """A settle with its record ready (no session): the record goes out whatever the store
        says, since a reservation left to expire charges the same debited amount."""
        try:
            self.store.settle(step.call_id, step.seq, step.cost_micros, self.clock.now_ms(), step.account_id,
                              step.bundle)
        except Exception as exc:  # noqa: BLE001 - the expiry charges the same money; the CDR must not wait
            log.error("settle of call=%s left behind failed (%s); its reservation's expiry charges the same "
                      "%d micro-units", step.call_id, exc, step.cost_micros)
        self._inbox.put_nowait(_Record(record))

    def _authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        call_id = self.call_id_for(request)
        existing = self.registry.sessions.get(call_id)
        if existing is not None:  # the PBX asked twice for one call: the same answer, no new money
            return AuthorizeDecision(True, call_id, existing.limit_ms, self.session_settings.warning_ms,
                                     detail="already authorized",
                                     backstop_ms=existing.limit_ms + self.session_settings.backstop_margin_ms)
        if not self._accepting:
            return AuthorizeDecision(False, call_id, reason=DenyReason.SHUTTING_DOWN,
                                     detail="the agent is shutting down")
        now_ms = self.clock.now_ms()
        for screen in self.screens:
            if not screen.round_trip:
                refused = screen.screen(request, call_id, now_ms)
                if refused is not None:
                    return refused
        # The screens that make a round trip start only now (one that counted the call must see
        # the final decision): the first one's command rides in the store's own round trip (one
        # pipeline: the fraud counters' observe beside the authorize script), the verdicts come after.
        rides = [screen.ride(request, call_id, now_ms) for screen in self.screens if screen.round_trip]
        for ride in rides:
            if ride.refused is not None:
                return ride.refused
        rider = next((ride.rider for ride in rides if ride.rider is not None), None)

        def store_authorize(account_id: str, want: int, minimum: int, slots: tuple[BundleSlot, ...],
                            want_s: int) -> StoreAuthorization:
            # No deadline here: the store owns it (StoreGuard), so that its circuit and failure
            # policy see the timeout (a racing one here denied every call, fail_open or not).
            try:
                return self.store.authorize(account_id, call_id, want, minimum, now_ms, bundle_slots=slots,
                                            bundle_want_s=want_s, rider=rider)
            except Exception as exc:  # a store that is down denies the call (fail closed), never hangs it
                log.error("balance store failed during authorize of %s: %s", call_id, exc, exc_info=True)
                return StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE,
                                          detail=f"balance store error: {exc}")

        def chain_authorize(account_id: str, want: int, minimum: int, slots: tuple[BundleSlot, ...], want_s: int,
                            levels: Sequence[tuple[str, str, int, int]],
                            ) -> tuple[StoreAuthorization, list[StoreAuthorization]]:
            # A reseller's customer and the levels above it at once (each its own store step on
            # its own account), in one store call: one round trip, one pipeline.
            try:
                return self.store.authorize_with_levels(account_id, call_id, want, minimum, levels, now_ms,
                                                        bundle_slots=slots, bundle_want_s=want_s, rider=rider)
            except Exception as exc:  # as above: fail closed
                log.error("balance store failed during authorize of %s and its levels: %s", call_id, exc,
                          exc_info=True)
                down = StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE,
                                          detail=f"balance store error: {exc}")
                return down, [down for _ in levels]

        outcome = decide(request, call_id=call_id, node=self.settings.node, rater=self.rater,
                         store_authorize=store_authorize, settings=self.session_settings,
                         max_call_seconds=self.settings.max_call_seconds, now_ms=now_ms,
                         chain_authorize=chain_authorize, router=self.router)
        refused = self._finish_rides(rides, call_id)
        if refused is not None:
            if outcome.decision.allowed or outcome.release_reservation:
                # The store reserved for a call the screen refuses: give it back (queued, like
                # any release; until then the money is held, never lost).
                self._store_work.put(self._release_quietly, call_id, 1, request.account_id)
            levels = outcome.release_levels or tuple(
                (p.call_id, p.account_id) for p in (outcome.session.upper if outcome.session else ()))
            for level_id, account_id in levels:
                self._store_work.put(self._release_quietly, level_id, 1, account_id)
            return refused
        if outcome.release_reservation:
            self._store_work.put(self._release_quietly, call_id, 1, request.account_id)
        for level_id, account_id in outcome.release_levels:
            self._store_work.put(self._release_quietly, level_id, 1, account_id)
        if outcome.session is not None:
            routed = outcome.session.routed
            if routed is not None and routed.first_carrier:
                self._count_on_carrier(call_id, routed.first_carrier)
            self._run_effects(self.registry.add(outcome.session))
            self.metrics.live_calls.set(self.registry.live_count())
            self._wake.set()
        for screen in self.screens:
            screen.decided(request, outcome.decision)
        return outcome.decision

    def _finish_rides(self, rides: list[ScreenRide], call_id: str) -> AuthorizeDecision | None:
        """The first refusal of the screens that rode with the store. A screen that fails lets
        the call through, logged: money is the balance store's, not the screen's."""
        refused: AuthorizeDecision | None = None
        for ride in rides:
            try:
                verdict = ride.finish()
            except Exception:
                log.exception("call screen failed for call=%s: the call goes on unscreened", call_id)
                continue
            if refused is None:
                refused = verdict
        return refused

    def _release_quietly(self, call_id: str, seq: int, account_id: str) -> None:
        try:
            self.store.release(call_id, seq, self.clock.now_ms(), account_id)
        except Exception:  # the reservation expires by itself
            log.warning("release of %s failed; its reservation will expire", call_id, exc_info=True)

    # ---------------------------------------------------------------- the loop

    def _now_ms(self) -> int:
        """The wall clock for the registry, with steps detected against the monotonic clock: a
        step moves every live call's time base (timers included) by the step, so each timer
        still fires at its real instant and every duration keeps its monotonic length."""
        mono, wall = self.clock.monotonic_ms(), self.clock.now_ms()
        if self._clock_ref is not None:
            ref_mono, ref_wall = self._clock_ref
            step = (wall - ref_wall) - (mono - ref_mono)
            if abs(step) >= CLOCK_STEP_MS:
                moved = self.registry.shift_time(step)
                log.warning("the wall clock stepped by %+d ms (NTP?): %d live calls and their timers moved with it",
                            step, moved)
        self._clock_ref = (mono, wall)
        return wall

    def _loop(self) -> None:
        while self._running:
            next_ms = self.registry.next_timer_ms()
            wait_s = 0.5 if next_ms is None else max(0.0, (next_ms - self._now_ms()) / 1000)
            try:
                item = self._inbox.get(timeout=min(wait_s, 0.5))
            except gevent.queue.Empty:
                item = None
            if item is not None:
                self.registry.now_hint_ms = self._now_ms()
                self._apply(item)
                while not self._inbox.empty():
                    self._apply(self._inbox.get_nowait())
            now_ms = self._now_ms()
            due = self.registry.next_timer_ms()
            if due is not None and due <= now_ms:
                lateness: list[int] = []
                self._run_effects(self.registry.fire_due(now_ms, lateness))
                for late_ms in lateness:
                    self.metrics.timer_lateness.observe(late_ms / 1000)
                if self.lateness_samples is not None:
                    self.lateness_samples.extend(lateness)
            self._flush_nibbles()

    def _apply(self, item: LegEvent | _Internal) -> None:
        if isinstance(item, _NibbleResults):
            now_ms = self.clock.now_ms()
            trace = log.isEnabledFor(logging.DEBUG)  # one line per money movement when debugging
            for step, result in zip(item.steps, item.results, strict=True):
                session = self.registry.sessions.get(step.session_id or step.call_id)
                if session is None:
                    continue
                if trace:
                    log.debug("nibble call=%s account=%s seq=%d debit_micros=%d granted_micros=%d ok=%s node=%s",
                              step.call_id, session.account_id, step.seq, step.debit_micros, result.granted_micros,
                              result.ok, self.settings.node)
                if result.ok and step.debit_micros:
                    self.metrics.nibble_debits.inc()
                effects = session.on_nibble_result(step.seq, result.granted_micros, result.debited_micros,
                                                   now_ms, store_ok=result.ok, why=result.why,
                                                   bundle_granted_s=result.bundle_granted_s, level=step.level)
                self._run_effects(self.registry.schedule(effects))
            return
        if isinstance(item, _OperatorCut):
            session = self.registry.sessions.get(item.call_id)
            if session is not None:
                log.info("operator cut call=%s account=%s reason=%s", item.call_id, session.account_id, item.reason)
                self._run_effects(self.registry.schedule(session.operator_cut(self.clock.now_ms(), item.reason)))
            return
        if isinstance(item, _Record):
            self._finished(Finished(item.record))
            return
        if isinstance(item, _Settled):
            session = self.registry.sessions.get(item.call_id)
            if session is not None:  # the record may wait for a leg's hangup: a FINISH timer
                self._run_effects(self.registry.schedule(session.on_settled(self.clock.now_ms(), item.cost_micros,
                                                                            item.level)))
            return
        if isinstance(item, PbxConnected) and self.adoptable:
            self._adopt(item)
            self._settle_left_behind(item)
        if isinstance(item, PbxCdrReread) and self._awaiting_pbx_cdr:
            self._settle_awaiting_pbx_cdr(item)
        before = self.registry.stats.unknown_events
        self._run_effects(self.registry.feed(item))
        if self.registry.stats.unknown_events != before:
            self.metrics.unknown_events.inc()
        if isinstance(item, LegAnswered | LegBridged) and self._carrier_of_call:
            self._count_on_answering_carrier(self.registry.leg_index.get(item.leg_id))

    def _count_on_carrier(self, call_id: str, carrier: str) -> None:
        """A routed call holds a channel of ``carrier`` (this node's count, and the cluster-wide claim)."""
        self._carrier_of_call[call_id] = carrier
        self.carrier_calls[carrier] += 1
        if self.carrier_claims is not None:
            self.carrier_claims.claim(carrier, call_id)

    def _count_on_answering_carrier(self, call_id: str | None) -> None:
        """A routed call counts against the carrier tried first until one answers; from then
        on against the one that carried it (an earlier route that refused holds no channel)."""
        session = self.registry.sessions.get(call_id) if call_id is not None else None
        counted = self._carrier_of_call.get(call_id) if call_id is not None else None
        if session is None or session.routed is None or counted is None or session.billed_leg_id is None:
            return
        route = session.route_of(session.legs[session.billed_leg_id])
        if route is None or route.carrier == counted:
            return
        assert call_id is not None
        self._carrier_of_call[call_id] = route.carrier
        self.carrier_calls[counted] -= 1
        if self.carrier_calls[counted] <= 0:
            del self.carrier_calls[counted]
        self.carrier_calls[route.carrier] += 1
        if self.carrier_claims is not None:
            self.carrier_claims.release(counted, call_id)
            self.carrier_claims.claim(route.carrier, call_id)

    # ---------------------------------------------------------------- effects

    def _run_effects(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, NibbleStep):
                self._nibble_batch.append(effect)
            elif isinstance(effect, SettleStep):
                self._pending_settles[effect.call_id] = effect
                self._store_work.put(self._settle, effect, 0)
            elif isinstance(effect, ReleaseStep):
                self._store_work.put(self._release, effect)
            elif isinstance(effect, Command):
                self._switch_work.put(self._command, effect)
            elif isinstance(effect, Alert):
                self._alert(effect)
            elif isinstance(effect, Finished):
                self._finished(effect)

    def _flush_nibbles(self) -> None:
        if not self._nibble_batch:
            return
        batch, self._nibble_batch = self._nibble_batch, []
        # Chunks, each with its own deadline: a store that takes a while per step (the embedded
        # SQL store does one transaction per nibble) must not fail a whole second's nibbles of
        # thousands of calls, which would cut them all at the end of their slice.
        chunk = self.settings.nibble_chunk
        for start in range(0, len(batch), chunk):
            self._nibble_work.put(self._run_nibbles, batch[start:start + chunk])

    def _run_nibbles(self, steps: list[NibbleStep]) -> None:
        try:
            results = self.store.nibbles(steps, self.clock.now_ms())
        except Exception:  # fail closed: no new money
            log.error("nibble batch of %d calls failed; cutting them at the end of their slice",
                      len(steps), exc_info=True)
            results = [StoreNibble(0, 0, ok=False) for _ in steps]
        self._inbox.put_nowait(_NibbleResults(steps, results))

    def _settle(self, step: SettleStep, attempt: int) -> None:
        if step.call_id not in self._pending_settles:
            return  # written at shutdown already
        try:
            self.store.settle(step.call_id, step.seq, step.cost_micros, self.clock.now_ms(), step.account_id,
                              step.bundle)
        except BillingError as exc:  # refused for good (a conflict, an unknown call): retrying changes nothing
            self.metrics.alerts.labels("settle_refused").inc()
            log.error("ALERT settle_refused call=%s account=%s cost_micros=%d: %s; the CDR is written, the ledger "
                      "needs an operator (billing-agent ledger check)", step.call_id, step.account_id,
                      step.cost_micros, exc)
        except Exception:  # transient: the money must be settled
            self.metrics.settle_retries.inc()
            delay = min(0.2 * 2 ** min(attempt, 10), SETTLE_RETRY_MAX_S)
            log.error("settle of call=%s (%d micro-units) failed (attempt %d); retrying in %.1fs", step.call_id,
                      step.cost_micros, attempt + 1, delay, exc_info=attempt == 0)
            if self._running:  # waits without a worker; at shutdown the CDR goes out (_records_at_stop)
                self._retries.add(gevent.spawn_later(delay, self._store_work.put, self._settle, step, attempt + 1))
            return
        self._pending_settles.pop(step.call_id, None)
        self._inbox.put_nowait(_Settled(step.session_id or step.call_id, step.cost_micros, step.level))

    def _release(self, step: ReleaseStep) -> None:
        self._release_quietly(step.call_id, step.seq, step.account_id)
        self._inbox.put_nowait(_Settled(step.session_id or step.call_id, 0, step.level))

    def _command(self, effect: Command) -> None:
        session = self.registry.sessions.get(effect.call_id)
        if session is None:  # the call ended while the command waited for a worker: nothing to carry out
            log.debug("%s for call %s dropped: the call has ended", effect.command, effect.call_id)
            return
        switch = self.switches.get(session.pbx)
        if switch is None:
            log.error("no %s switch to carry %s for call %s", session.pbx, effect.command, effect.call_id)
            return
        command = effect.command
        try:
            with gevent.Timeout(self.settings.switch_timeout_s, DeadlineExceeded):
                if isinstance(command, HangupLeg):
                    if not command.escalate:
                        self.metrics.cutoffs.inc()
                    log.info("cut call=%s account=%s leg=%s escalate=%s reason=%s node=%s", effect.call_id,
                             session.account_id, command.leg_id, command.escalate,
                             command.reason, self.settings.node)
                    switch.hangup(command.leg_id, command.cause, escalate=command.escalate)
                elif isinstance(command, WarnLeg):
                    switch.warn(command.leg_id, command.seconds_left)
                elif isinstance(command, ArmBackstop):
                    switch.arm_backstop(command.leg_id, command.at_ms, command.caller_leg_id)
        except Exception as exc:  # noqa: BLE001 - the verification escalates if it mattered
            log.warning("switch command %s for call %s failed: %s", command, effect.call_id, exc)

    def _alert(self, alert: Alert) -> None:
        self.metrics.alerts.labels(alert.kind).inc()
        if alert.kind == "hangup_not_confirmed":
            self.metrics.failed_cutoffs.inc()
        log.error("ALERT %s call=%s: %s", alert.kind, alert.call_id, alert.detail)

    def _finished(self, effect: Finished) -> None:
        record = effect.record
        self.registry.remove(record.call_id)  # (a record with no session: a call left behind)
        carrier = self._carrier_of_call.pop(record.call_id, None)
        if carrier is not None:
            self.carrier_calls[carrier] -= 1
            if self.carrier_calls[carrier] <= 0:
                del self.carrier_calls[carrier]
            if self.carrier_claims is not None:
                self.carrier_claims.release(carrier, record.call_id)
        self.metrics.live_calls.set(self.registry.live_count())
        self.metrics.settled.labels(record.disposition.value).inc()
        log.info("settled call=%s account=%s disposition=%s billed_s=%d cost_micros=%d node=%s",
                 record.call_id, record.account_id, record.disposition.value, record.rating.billed_seconds,
                 record.rating.cost_micros, record.node)
        try:
            self.cdr.submit(record)
        except Exception:  # the CDR sink alarms itself; the money is already settled
            log.exception("CDR of call %s could not be spooled", record.call_id)
        for callback in self.on_finished:
            callback(record)


class CarrierClaims(Protocol):
    """Live calls per carrier shared by every node (agent/adapters/redis/carrier_channels.py)."""

    def claim(self, carrier: str, call_id: str) -> None: ...

    def release(self, carrier: str, call_id: str) -> None: ...


def _same_call(leg: LiveLeg, a_leg: LiveLeg) -> bool:
    if a_leg.leg_id in (leg.parent_leg_id, leg.bridged_to):
        return True
    return bool(a_leg.group_id) and leg.group_id == a_leg.group_id
