"""One call's billing session as a pure state machine (DESIGN §1, §5).

The engine feeds it leg events and store results with the current instant; it answers with
effects: store steps to run, timers to arm, switch commands to send, the finished record.
It never reads a clock and does no I/O, so every rule below is tested in microseconds and a
deterministic simulation can run thousands of calls.

Money rules (DESIGN §4-5):

* Billing runs from the answer of the billed leg (the first answered dialled leg, B), never
  from the caller's answer: an IVR that answers early does not inflate the bill.
* Nibble k (at answer + k·N) debits ``cost(k·N) - cost((k-1)·N)`` (the slice just used) and
  reserves ``cost((k+1)·N) - cost(k·N)`` (the next slice), so the sum of the debits is always
  ``cost`` of the time covered, exactly, with one rounding per call.
* The money the call may spend is ``budget = debited + granted``. When a grant comes back
  partial, the call is *exhausted*: it is cut at ``answer + max_seconds(budget)`` exactly (minus
  the warning lead for the warning), which is the instant the next started second would cost
  more than the budget.
* At the end the call is rated on its exact duration and settled. A call the agent cut is billed
  up to the cut instant when the PBX tore it down within the verification window (our own
  hangup latency is not the customer's use); past that window the real duration is charged and
  the overrun shows in the store's overrun record. A cut sent more than the backstop margin
  after the money ran out (``SessionSettings.cut_lateness_free_ms``: an agent that was down, or
  whose switch commands did not get through) is billed up to when it was sent; a cut sent within
  it (a starved loop, a nibble answer that came after the boundary) is billed to the money's end,
  as the PBX backstop armed there would have ended the call by then, billed the same way.
* The PBX holds a backstop of its own (it ends the call if the agent dies). It is never set
  before the money runs out (the PBX must not take paid time away) and it moves with the
  money: each granted nibble pushes it to the end of what is reserved plus a slack, an
  exhausted call pins it ``backstop_margin_ms`` after the cut, a top-up moves it again
  (``ArmBackstop``). So money that lands mid-call extends the call on both switches, and an
  agent that dies leaves the call at most one slice and a slack beyond its reserved money.
* Billing runs on the dialled leg. When the caller's leg leaves while that leg stays up (the
  caller transferred the call: SIP REFER, blind or attended), the account goes on paying for
  the carrier leg, is still cut when the money runs out, and billing ends with that leg. A
  dialled leg that follows the caller within ``TRANSFER_GRACE_MS`` is an ordinary hangup, billed
  to the caller's hangup instant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from agent.core.balance import BundleSettle
from agent.core.bundles import BundleSlot, BundleTariff
from agent.core.cdr import CallRecord, Disposition, LegRecord, RatingRecord
from agent.core.events import (
    ArmBackstop,
    DenyReason,
    DialBegin,
    Direction,
    EndedCall,
    HangupLeg,
    LegAnswered,
    LegBridged,
    LegCreated,
    LegHungUp,
    LegUnbridged,
    LegUpdated,
    LiveLeg,
    SwitchCommand,
    WarnLeg,
)
from agent.core.fx import ConvertedTariff, plan_tariff, rewrap
from agent.core.rating import billed_seconds as billed_seconds_of
from agent.core.rating import whole_seconds
from agent.core.routing import CallRoutes, Route

LAST_CHANCE_LEAD_MS = 2_000  # an exhausted call asks the store once more this long before its cut
MAX_ADOPTED_NIBBLES = 1_000_000  # a bound for the adoption search (an 11-day call at 1 s nibbles)
BACKSTOP_TOLERANCE_MS = 2_000  # a call that ended this close after the PBX backstop was ended by it
# FreeSWITCH's sched_hangup is whole-second, polled every 0.5 s: it fires up to 1.5 s after the
# instant asked (Asterisk's TIMEOUT(absolute) is ms-exact); 2 s covers both.
TRANSFER_GRACE_MS = 1_500  # a dialled leg still up this long after the caller left was transferred
LEG_LINGER_MS = 1_000  # a settled call's record waits this long at most for its other legs' hangups
# A cut sent at most this long after the money ran out is billed to that instant (a timer's
# lateness is ours); the backstop margin widens it (``SessionSettings.cut_lateness_free_ms``).
# Sent later (the agent was down, its commands did not reach the PBX), the customer talked on
# until it was sent, and that time is charged (an overrun past the money).
CUT_LATENESS_FREE_MS = 100
BUSY_CAUSES = frozenset({"USER_BUSY", "17"})
NO_ANSWER_CAUSES = frozenset({"NO_ANSWER", "NO_USER_RESPONSE", "ORIGINATOR_CANCEL", "19", "18"})


class Tariff(Protocol):
    """The rated price of this call's destination (a rate row of the rating engine)."""

    def cost_micros(self, duration_ms: int) -> int:
        """Cost of an answered duration (DESIGN §4)."""
        ...

    def max_seconds(self, budget_micros: int) -> int:
        """Largest whole duration in seconds whose cost fits the budget; 0 = nothing fits."""
        ...


@dataclass(frozen=True, slots=True)
class RatedCall:
    """The rating of a destination for one account at one instant."""

    tariff: Tariff
    info: RatingInfo
    bundles: tuple[BundleSlot, ...] = ()  # the bundle periods the call may draw on (DESIGN §9)


class RatingRefused(Exception):
    """The call cannot be rated: unknown account, no rate, blocked destination, bad number."""

    def __init__(self, reason: DenyReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------- derived charging (DESIGN §11)
#
# A customer of a reseller pays its reseller's price; the reseller's own account (``tenant:R``,
# kept in R's parent) pays the parent's price for the same call; and so on up to the operator.
# Each level is a *payer* of the session: level 0 is the customer (the session's own fields),
# levels 1..n the resellers above it, nearest first (``CallSession.upper``). A session with no
# upper level is today's single-payer call, on the same code path.
#
# Every level is its own balance-store call, on its own account, under a derived call id
# (``level_call_id``): each step is idempotent per ``(call_id, level, seq)`` because the derived
# id carries the level, and no Lua script touches two accounts' slots (Redis Cluster).
#
# Ordering: authorize reserves the customer and every level above it at once, each its own
# store step in one store call (one round trip, one pipeline; on a Cluster one part per master);
# nibbles and settles emit level 0 first and go in the same batch. A refusal at any level
# releases the others that reserved (queued off the call path), whoever refused. The price of the
# one round trip: a customer refused on its own (no money, suspended, too many calls) held its
# resellers' first slice for the moment of that round trip, and a reseller at the very end of its
# money may refuse another customer's call in that moment. (Until 2026-12 the customer went
# first and a refused customer never touched its reseller's keys: a second round trip on every
# call of a reseller's customer, +0.2-0.3 ms; bench/bench_tenants.py.) A direct customer's path
# is one store step, as before.
# Why a crash between two levels neither loses nor doubles money:
# * at authorize, a level reserved before a crash holds a reservation the call never used: the
#   PBX got no answer, so no call runs; the reservation expires (TTL) with nothing debited, or a
#   later level's refusal releases the earlier levels at once (``Outcome.release_levels``);
# * a nibble or a settle is replayed with the same ``(derived call id, seq)``: the store applies
#   it once; each level's debit is computed from that level's own running total
#   (``cost_L(k·N) - debited_L``), so a level that missed a slice catches it up at the next
#   nibble, and one that took it does not take it twice;
# * a restarted agent adopts every level (the store lists each level's open reservation; the
#   engine pairs them with the customer's call by ``level_call_id``) and nibbles on from the
#   furthest level; a call that ended while no agent ran is settled at each level with what
#   that level's nibbles debited; a level not adopted expires, charged what it debited.

LEVEL_MARK = "^"  # never in a call id the engine makes (CALL_ID_UNSAFE turns it into "_")
CALL_ID_LIMIT = 64  # the balance store's and the calls table's limit


def level_call_id(call_id: str, level: int) -> str:
    """The balance-store call id of ``level`` of a call: the call's own at level 0, else the call
    id and ``^L`` (within 64 characters: a long id keeps its head and a digest of the whole)."""
    if level == 0:
        return call_id
    tail = f"{LEVEL_MARK}{level}"
    if len(call_id) + len(tail) <= CALL_ID_LIMIT:
        return call_id + tail
    digest = hashlib.sha1(call_id.encode("utf-8")).hexdigest()[:10]
    return f"{call_id[:CALL_ID_LIMIT - len(tail) - len(digest) - 1]}{LEVEL_MARK}{digest}{tail}"


def is_level_call_id(call_id: str) -> bool:
    """A level's derived id (level >= 1), not a call's own."""
    return LEVEL_MARK in call_id


@dataclass(frozen=True, slots=True)
class LevelRated:
    """One level above the customer, rated: ``tenant`` pays ``seller`` (its parent) for the call
    through ``account_id``, at the seller's price (``rated``, FX applied)."""

    level: int
    tenant: str
    seller: str
    account_id: str
    rated: RatedCall


@dataclass(slots=True)
class Payer:
    """The money state of one level above the customer in a live call."""

    level: int
    tenant: str  # the reseller that pays
    seller: str  # whose plan prices it (the reseller's parent)
    account_id: str  # tenant:NAME
    call_id: str  # its balance-store call id (level_call_id)
    tariff: Tariff
    rating: RatingInfo
    debited_micros: int = 0
    budget_micros: int = 0  # debited + reserved
    available_micros: int = 0  # what the level could spend at authorize (sizes the PBX limit)

    def cost_at(self, billed_ms: int) -> int:
        return self.tariff.cost_micros(billed_ms)


def payers_of(call_id: str, levels: Sequence[LevelRated], granted: Sequence[int] = ()) -> list[Payer]:
    """The session's upper payers from the rated chain (``granted``: each level's first reservation)."""
    return [Payer(lv.level, lv.tenant, lv.seller, lv.account_id, level_call_id(call_id, lv.level), lv.rated.tariff,
                  lv.rated.info, 0, granted[i] if i < len(granted) else 0) for i, lv in enumerate(levels)]


class Phase(StrEnum):
    AUTHORIZED = "authorized"  # allowed, not yet answered
    ANSWERED = "answered"  # billing runs
    ENDED = "ended"  # billing stopped; waiting for the settle result
    SETTLED = "settled"  # settled; the record waits a moment for the last legs' hangups
    DONE = "done"  # settled (or released) and recorded


class TimerKind(StrEnum):
    NIBBLE = "nibble"
    WARN = "warn"
    CUT = "cut"
    VERIFY = "verify"
    LAST_CHANCE = "last_chance"
    NO_ANSWER_GUARD = "no_answer_guard"
    TRANSFER_CHECK = "transfer_check"
    FINISH = "finish"


# ------------------------------------------------------------------------------------ effects


@dataclass(frozen=True, slots=True)
class ArmTimer:
    call_id: str
    kind: TimerKind
    at_ms: int
    token: int  # a timer whose token is stale when it fires is ignored


@dataclass(frozen=True, slots=True)
class NibbleStep:
    call_id: str
    seq: int
    debit_micros: int
    reserve_micros: int
    account_id: str = ""  # the session's account: the store needs no call -> account map of its own
    bundle_used_s: int = 0  # bundle seconds used up to this step's boundary (DESIGN §9)
    bundle_want_s: int = 0  # bundle seconds wanted for the next slice (0: the call draws no more)
    level: int = 0  # the payer (0: the customer; 1, 2...: the resellers above it, DESIGN §11)
    session_id: str = ""  # the session's call id when ``call_id`` is a level's (``level_call_id``)


@dataclass(frozen=True, slots=True)
class SettleStep:
    call_id: str
    seq: int
    cost_micros: int
    account_id: str = ""
    bundle: BundleSettle | None = None  # the bundle seconds the call used, when it could draw on any
    level: int = 0
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class ReleaseStep:
    call_id: str
    seq: int
    account_id: str = ""
    level: int = 0
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    call_id: str
    command: SwitchCommand


@dataclass(frozen=True, slots=True)
class Alert:
    """Something an operator must see (log at error level, metric)."""

    call_id: str
    kind: str  # "hangup_not_confirmed", "cut_overrun", ...
    detail: str


@dataclass(frozen=True, slots=True)
class Finished:
    record: CallRecord


Effect = ArmTimer | NibbleStep | SettleStep | ReleaseStep | Command | Alert | Finished


# ------------------------------------------------------------------------------------ state


@dataclass(slots=True)
class Leg:
    leg_id: str
    direction: Direction
    created_ms: int
    channel: str = ""
    sip_call_id: str = ""
    peer: str = ""
    caller: str = ""
    callee: str = ""
    answered_ms: int | None = None
    ended_ms: int | None = None
    hangup_cause: str = ""
    bridged_to: str = ""

    def record(self, billed: bool) -> LegRecord:
        billsec = 0
        if self.answered_ms is not None and self.ended_ms is not None:
            billsec = max(0, -(-(self.ended_ms - self.answered_ms) // 1000))
        return LegRecord(
            pbx_unique_id=self.leg_id, direction=self.direction.value, created_ms=self.created_ms,
            channel=self.channel, sip_call_id=self.sip_call_id, peer=self.peer, caller=self.caller,
            callee=self.callee, answered_ms=self.answered_ms, ended_ms=self.ended_ms,
            hangup_cause=self.hangup_cause, billsec=billsec, billed=billed,
        )


@dataclass(frozen=True, slots=True)
class SessionSettings:
    nibble_ms: int
    warning_ms: int = 0
    verify_ms: int = 3_000  # a hangup must be confirmed within this
    max_hangup_attempts: int = 2  # a plain hangup, then an escalated one
    no_answer_guard_ms: int = 0  # release a call that neither answers nor ends (0: never)
    # The PBX backstop ends a call this long after its money ran out when the agent has not
    # (the agent cuts at the exact instant; the margin keeps the PBX from ever cutting first).
    backstop_margin_ms: int = 1_000
    # While nibbles are granted the backstop sits this far past the reserved slice (at least one
    # nibble): the next nibble's re-arm must land before it fires, and an agent restarted
    # within it (systemd's RestartSec plus the start) adopts the call before the PBX ends it.
    # An agent that never comes back leaves a call at most one slice and this beyond its money.
    backstop_slack_min_ms: int = 10_000
    max_call_ms: int = 0  # no call lasts longer, whatever the money (0: no cap)
    # Nibble k runs this long before its boundary (answer + k·N): the store's answer, or its
    # deadline running out, is then known before the slice it pays for begins, so a store that
    # grants nothing (hung, down, fail_closed) cuts the call at the boundary exactly, not a
    # deadline later with unpaid time on it. The engine sets it to the store deadline plus a
    # margin; it never exceeds half a nibble. A call that ends inside the lead is refunded the
    # unused part of the slice at the settle.
    nibble_lead_ms: int = 0

    @property
    def lead_ms(self) -> int:
        return max(0, min(self.nibble_lead_ms, self.nibble_ms // 2))

    @property
    def cut_lateness_free_ms(self) -> int:
        """How late after the money ran out a cut of the agent's is still billed to the money's
        end: the PBX backstop of an exhausted call is armed ``backstop_margin_ms`` after it, and a
        call that backstop ends is billed to the money's end, so a cut of ours that comes first
        is not charged more. Found by bench_nodes (issue 19 finding 3): on a saturated 2-core box
        with 1 s nibbles, cuts 103-703 ms late (a CUT timer fired late, or the nibble that found
        the money short answered after the boundary) were billed to when they were sent, one
        whole 1/1 second past what the call held, and tight prepaid accounts ended at -0.01."""
        return max(CUT_LATENESS_FREE_MS, self.backstop_margin_ms)

    @property
    def backstop_slack_ms(self) -> int:
        return max(self.nibble_ms, self.backstop_slack_min_ms, 2 * self.backstop_margin_ms)


@dataclass(frozen=True, slots=True)
class RatingInfo:
    """What the authorizer learned about the destination, kept for the rating decision."""

    plan_name: str = ""
    rate_id: int | None = None
    prefix: str = ""
    rate_micros: int = 0  # per minute, in plan_currency
    # Currencies (DESIGN §11): the plan's and the account's; when they differ, the fx_rates row
    # that converts (its rate x 10^10, and whether it is the inverse pair used as a reciprocal).
    plan_currency: str = ""
    currency: str = ""
    fx_rate_e10: int | None = None
    fx_inverse: bool = False


# Slots, an empty tuple for ``upper`` and no set until the call ends: every object a live call
# keeps that the garbage collector tracks counts towards the next young collection (a pause in
# whatever greenlet runs then: on a busy node the p99 of authorization). The session itself is 3
# such objects (itself, its legs' dict, its caller leg; tests/test_session.py), 6 before.
@dataclass(slots=True)
class CallSession:
    call_id: str
    node: str
    pbx: str
    account_id: str
    destination: str
    caller: str
    a_leg: Leg
    authorized_ms: int
    tariff: Tariff
    rating: RatingInfo
    settings: SessionSettings
    granted_micros: int  # what the authorization reserved (the first slice, maybe partial)
    limit_ms: int  # what the money paid for at authorization, from the answer (the first PBX backstop)
    group_id: str = ""
    phase: Phase = Phase.AUTHORIZED
    legs: dict[str, Leg] = field(default_factory=dict)
    billed_leg_id: str | None = None
    answer_ms: int | None = None
    end_ms: int | None = None
    end_cause: str = ""
    seq: int = 0
    nibbles_done: int = 0
    debited_micros: int = 0
    budget_micros: int = 0  # debited + currently reserved: all the call may spend so far
    want_pending: bool = False  # a store step is in flight
    pending_is_nibble: bool = False  # ... and it debits a nibble (not a last-chance request)
    exhausted: bool = False
    cut_at_ms: int | None = None
    cut_sent_ms: int | None = None
    hangup_attempts: int = 0
    cut_by_agent: bool = False
    cut_reason: str = "credit exhausted"
    token: int = 0
    settled_cost_micros: int | None = None
    settled_ms: int = 0
    backstop_at_ms: int | None = None  # where the PBX's own hangup of the call stands (epoch ms)
    caller_left_ms: int | None = None  # the caller's leg ended while the billed leg stayed up
    transferred: bool = False  # ... and the billed leg was still up TRANSFER_GRACE_MS later
    # Bundles (DESIGN §9): the tariff is then a BundleTariff holding R, the bundle seconds the
    # call holds. While ``bundle_open`` each step asks the bundles for the next slice's seconds;
    # the first partial answer fixes R for the rest of the call (money pays beyond it).
    bundle_open: bool = False
    pending_want_s: int = 0  # bundle seconds the step in flight asked for
    # Derived charging (DESIGN §11): the levels above the customer, nearest first (empty: a
    # direct customer of the operator, today's single-payer call) and the tenant whose price
    # the customer pays (its reseller's; "" for a direct customer).
    upper: tuple[Payer, ...] = ()
    seller: str = ""
    # The answers of the step in flight, by level, until every level has answered.
    answers: dict[int, tuple[int, int, bool, str, int]] = field(default_factory=dict)
    settles_left: set[int] | None = None  # levels whose settle/release is not done (from the end, with levels)
    # Wholesale (DESIGN §10): the carriers the PBX was given; the one that answered prices the
    # buy side of the rating decision (None: no carriers configured, or an adopted call).
    routed: CallRoutes | None = None

    def __post_init__(self) -> None:
        self.legs[self.a_leg.leg_id] = self.a_leg
        self.budget_micros = self.granted_micros

    # ---------------------------------------------------------------- helpers

    @property
    def nibble_ms(self) -> int:
        return self.settings.nibble_ms

    def _cost_at(self, billed_ms: int) -> int:
        return self.tariff.cost_micros(billed_ms)

    def _bundle(self) -> BundleTariff | None:
        inner = plan_tariff(self.tariff)  # under an FX conversion (DESIGN §11), the plan's own tariff
        return inner if isinstance(inner, BundleTariff) else None

    def _bundle_ask(self, k: int) -> tuple[int, int]:
        """(seconds used up to boundary ``k``, seconds wanted for slice ``k + 1``)."""
        bundle = self._bundle()
        if bundle is None:
            return 0, 0
        used = bundle.covered_at(k * self.nibble_ms)
        want = 0
        if self.bundle_open:
            want = max(0, bundle.billed_seconds_at((k + 1) * self.nibble_ms) - bundle.held_s)
        return used, want

    def _bundle_granted(self, granted_s: int) -> None:
        """The store added ``granted_s`` to the call's bundle hold for the step in flight."""
        bundle = self._bundle()
        if bundle is None:
            return
        if granted_s:
            self.tariff = rewrap(self.tariff, bundle.holding(bundle.held_s + granted_s))
        if granted_s < self.pending_want_s:
            self.bundle_open = False  # R is final: money pays every billed second beyond it
        self.pending_want_s = 0

    @property
    def bundle_seconds(self) -> int:
        """Bundle seconds the call holds (R)."""
        bundle = self._bundle()
        return bundle.held_s if bundle is not None else 0

    def _arm(self, kind: TimerKind, at_ms: int) -> ArmTimer:
        return ArmTimer(self.call_id, kind, at_ms, self.token)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def leg_ids(self) -> list[str]:
        return list(self.legs)

    # ---------------------------------------------------------------- start

    def start(self) -> list[Effect]:
        """Effects right after the authorization was granted."""
        if self.settings.no_answer_guard_ms:
            return [self._arm(TimerKind.NO_ANSWER_GUARD, self.authorized_ms + self.settings.no_answer_guard_ms)]
        return []

    # ---------------------------------------------------------------- leg events

    def on_leg_created(self, event: LegCreated) -> list[Effect]:
        if event.leg_id in self.legs:
            leg = self.legs[event.leg_id]
            leg.channel = leg.channel or event.channel
            leg.sip_call_id = leg.sip_call_id or event.sip_call_id
            leg.peer = leg.peer or event.peer
            return []
        self.legs[event.leg_id] = Leg(
            leg_id=event.leg_id, direction=event.direction, created_ms=event.at_ms,
            channel=event.channel, sip_call_id=event.sip_call_id, peer=event.peer,
            caller=event.caller, callee=event.callee,
        )
        return []

    def on_dial_begin(self, event: DialBegin) -> list[Effect]:
        if event.dest_leg_id not in self.legs:
            self.legs[event.dest_leg_id] = Leg(event.dest_leg_id, Direction.OUTBOUND, event.at_ms,
                                               callee=self.destination)
        return []

    def on_leg_updated(self, event: LegUpdated) -> list[Effect]:
        leg = self.legs.get(event.leg_id)
        if leg is not None:
            leg.sip_call_id = event.sip_call_id or leg.sip_call_id
            leg.peer = event.peer or leg.peer
            leg.callee = leg.callee or event.callee
        return []

    def on_bridged(self, event: LegBridged) -> list[Effect]:
        leg = self.legs.get(event.leg_id)
        if leg is not None:
            leg.bridged_to = event.peer_leg_id
        peer = self.legs.get(event.peer_leg_id)
        if peer is not None:
            peer.bridged_to = event.leg_id
            # A bridge with an outbound leg proves it answered, even if we missed its answer.
            if peer.direction is Direction.OUTBOUND and peer.answered_ms is None:
                return self.on_answered(LegAnswered(peer.leg_id, event.at_ms))
        return []

    def on_unbridged(self, event: LegUnbridged) -> list[Effect]:
        leg = self.legs.get(event.leg_id)
        if leg is not None:
            leg.bridged_to = ""
        return []

    def on_answered(self, event: LegAnswered) -> list[Effect]:
        leg = self.legs.get(event.leg_id)
        if leg is None or leg.answered_ms is not None or leg.ended_ms is not None:
            return []  # unknown, a duplicate answer, or an answer reported after the hangup
        leg.answered_ms = event.at_ms
        if leg.direction is not Direction.OUTBOUND or self.phase is not Phase.AUTHORIZED:
            return []  # the caller's own answer (IVR) never starts billing
        self.billed_leg_id = leg.leg_id
        self.answer_ms = event.at_ms
        self.phase = Phase.ANSWERED
        self.token += 1
        if self.limit_ms > 0:  # the dialplan armed the PBX backstop at the answer with the decision's
            self.backstop_at_ms = self.answer_ms + self.limit_ms + self.settings.backstop_margin_ms
        effects: list[Effect] = []
        first_slice = self._cost_at(self.nibble_ms)
        if (self.budget_micros < first_slice or self._at_max_duration(1)
                or any(p.budget_micros < p.cost_at(self.nibble_ms) for p in self.upper)):
            effects += self._exhaust(event.at_ms)
        else:
            effects.append(self._arm(TimerKind.NIBBLE, self._nibble_due_ms(1)))
        return effects

    def on_hung_up(self, event: LegHungUp) -> list[Effect]:
        leg = self.legs.get(event.leg_id)
        if leg is None or leg.ended_ms is not None:
            return []  # unknown, or a duplicate hangup
        leg.ended_ms = max(event.at_ms, leg.created_ms)
        leg.hangup_cause = event.cause or str(event.cause_code or "")
        if self.phase is Phase.SETTLED and all(other.ended_ms is not None for other in self.legs.values()):
            return self._finish()
        if self.phase in (Phase.ENDED, Phase.SETTLED, Phase.DONE):
            return []
        if leg.leg_id == self.a_leg.leg_id:
            if self.phase is Phase.ANSWERED and self._billed_leg_live() and not self.cut_by_agent:
                # Either an ordinary hangup (the dialled leg follows in milliseconds) or the
                # caller transferred the call (the dialled leg stays up): wait and see.
                self.caller_left_ms = event.at_ms
                return [ArmTimer(self.call_id, TimerKind.TRANSFER_CHECK, event.at_ms + TRANSFER_GRACE_MS, self.token)]
            return self._end(event.at_ms, leg.hangup_cause)
        if self.phase is Phase.ANSWERED and leg.leg_id == self.billed_leg_id:
            if self.caller_left_ms is not None:
                if self.transferred:  # the transferred call is over: billed to this instant
                    return self._end(event.at_ms, leg.hangup_cause)
                return self._end(self.caller_left_ms, self.a_leg.hangup_cause or leg.hangup_cause)
            # The billed leg is gone. Billing goes on only if the caller is bridged to another
            # answered dialled leg (a transfer); otherwise the call is over for billing.
            other = self._other_live_answered_leg()
            if other is None:
                return self._end(event.at_ms, leg.hangup_cause)
            self.billed_leg_id = other.leg_id
            return []
        if self.phase is Phase.AUTHORIZED and not self._any_live_outbound():
            return []  # a failed fork or retry: the caller may still be redirected; A's hangup ends it
        return []

    def _other_live_answered_leg(self) -> Leg | None:
        for leg in self.legs.values():
            if (leg.direction is Direction.OUTBOUND and leg.leg_id != self.billed_leg_id
                    and leg.answered_ms is not None and leg.ended_ms is None):
                return leg
        return None

    def _billed_leg_live(self) -> bool:
        return self.billed_leg_id is not None and self.legs[self.billed_leg_id].ended_ms is None

    def _any_live_outbound(self) -> bool:
        return any(leg.direction is Direction.OUTBOUND and leg.ended_ms is None for leg in self.legs.values())

    # ---------------------------------------------------------------- resync

    def on_resync(self, live: dict[str, LiveLeg], at_ms: int, ended: EndedCall | None = None) -> list[Effect]:
        """The PBX reconnected: every leg of ours that is no longer alive ended meanwhile.

        When: the PBX's own CDR of the call (``ended``) says; without one, the resync instant
        (the PBX backstop bounds it). The cause is marked so that finance can tell such calls
        apart.
        """
        effects: list[Effect] = []
        end_ms = min(at_ms, max(ended.ended_ms, self.authorized_ms)) if ended is not None else at_ms
        for leg in list(self.legs.values()):
            if leg.ended_ms is None and leg.leg_id not in live:
                effects += self.on_hung_up(LegHungUp(leg.leg_id, end_ms, cause="ENDED_DURING_PBX_OUTAGE"))
        for leg_id, info in live.items():
            known = self.legs.get(leg_id)
            if known is not None and info.answered and known.answered_ms is None and info.answered_ms:
                effects += self.on_answered(LegAnswered(leg_id, info.answered_ms))
        return effects

    # ---------------------------------------------------------------- adoption (agent restart)

    def adopt_progress(self, *, debited_micros: int, reserved_micros: int, seq: int, now_ms: int,
                       last_renewal_ms: int | None = None, reservation_lost: bool = False,
                       bundle_used_s: int = 0, levels: Sequence[tuple[int, int]] = ()) -> list[Effect]:
        """Take over a call another run of this node authorized (its reservation is still open
        in the store): continue from what the store says was debited. Debits are whole nibble
        slices, ``cost(k*N) - cost((k-1)*N)``, so ``debited == cost(k*N)`` gives the k nibbles
        done; the next nibble is due at answer + (k+1)*N (at once when that is past).

        ``reservation_lost``: the store no longer knows the call (a Redis that restarted empty
        while no agent ran). Nothing reserved is then no verdict on the money: nibble at once
        (the store reserves again from the balance, and the settle charges the whole cost);
        the nibbles catch up with the time already talked.

        ``levels``: (debited, reserved) of each upper level, as its own store call says; the
        nibbles go on from the furthest level (a crash between two levels' steps leaves them a
        slice apart: the next nibble debits each its own difference)."""
        self.seq = max(self.seq, seq)
        for payer, (level_debited, level_reserved) in zip(self.upper, levels, strict=False):
            payer.debited_micros = level_debited
            payer.budget_micros = level_debited + level_reserved
        self.debited_micros = debited_micros
        self.budget_micros = debited_micros + reserved_micros
        self.granted_micros = reserved_micros
        bundle = self._bundle()
        # A call in its bundle that has paid no money yet may go on drawing on it (R can still
        # grow without changing any debit); once money was charged, R is final.
        self.bundle_open = bundle is not None and debited_micros == 0
        if self.phase is not Phase.ANSWERED or self.answer_ms is None:
            return []
        # The fewest nibbles that cover the debit: where the tariff is flat (an initial increment
        # longer than a nibble) several counts debit the same, and the later nibbles of a flat
        # stretch debit nothing, so catching up through them is free and reserves correctly.
        done = 0
        while done < MAX_ADOPTED_NIBBLES and (
                self._cost_at(done * self.nibble_ms) < debited_micros
                or (bundle is not None and bundle.covered_at(done * self.nibble_ms) < bundle_used_s)):
            done += 1
        for payer in self.upper:
            while done < MAX_ADOPTED_NIBBLES and payer.cost_at(done * self.nibble_ms) < payer.debited_micros:
                done += 1
        self.nibbles_done = done
        if done and last_renewal_ms is not None:
            # The store renewed the reservation when nibble k was taken, at answer + k*N - lead
            # (plus the timer's lateness): a later answer than that, as a PBX that only knows the
            # channel is up reports, would drop talk time from the bill. Never earlier than the truth.
            estimate = last_renewal_ms - done * self.nibble_ms + self.settings.lead_ms
            if estimate < self.answer_ms:
                self.answer_ms = estimate
                if self.billed_leg_id is not None:
                    self.legs[self.billed_leg_id].answered_ms = estimate
        self.token += 1  # drop the timers armed by the replayed answer
        # A level a slice behind the others (a crash between two levels' steps) is no verdict
        # on its money either: nibble at once, each level debits its own difference.
        if reservation_lost or any(p.debited_micros < p.cost_at(done * self.nibble_ms) for p in self.upper):
            self.exhausted = False
            self.cut_at_ms = None
            return [self._arm(TimerKind.NIBBLE, now_ms),
                    *self._move_backstop(now_ms + self.settings.backstop_slack_ms)]
        next_slice = self._cost_at((done + 1) * self.nibble_ms) - self._cost_at(done * self.nibble_ms)
        if reserved_micros < next_slice or self._at_max_duration(done + 1) or (self.upper and (
                self.budget_micros < self._cost_at((done + 1) * self.nibble_ms)
                or any(p.budget_micros < p.cost_at((done + 1) * self.nibble_ms) for p in self.upper))):
            # the budget is final (at some level)
            return self._exhaust(now_ms)
        self.exhausted = False  # the replayed answer may have found no budget yet
        self.cut_at_ms = None
        # The backstop the earlier run left is unknown here: set it from what is reserved.
        return [self._arm(TimerKind.NIBBLE, max(now_ms, self._nibble_due_ms(done + 1))),
                *self._move_backstop(max(now_ms, self.answer_ms + (done + 1) * self.nibble_ms)
                                     + self.settings.backstop_slack_ms)]

    # ---------------------------------------------------------------- timers

    def on_timer(self, kind: TimerKind, token: int, now_ms: int) -> list[Effect]:
        if kind is TimerKind.FINISH:
            return self._finish()
        if kind is TimerKind.TRANSFER_CHECK:
            if self.phase is Phase.ANSWERED and self.caller_left_ms is not None and self._billed_leg_live():
                self.transferred = True  # billing goes on with the dialled leg the caller handed over
            return []
        if token != self.token and kind is not TimerKind.VERIFY:
            return []
        if kind is TimerKind.VERIFY:
            return self._verify(now_ms)
        if kind is TimerKind.NO_ANSWER_GUARD:
            if self.phase is Phase.AUTHORIZED:
                return self._end(now_ms, "NO_ANSWER_GUARD")
            return []
        if self.phase is not Phase.ANSWERED:
            return []
        if kind is TimerKind.NIBBLE:
            return self._nibble(now_ms)
        if kind is TimerKind.WARN:
            return [Command(self.call_id, WarnLeg(self.a_leg.leg_id, max(0, self.settings.warning_ms // 1000)))]
        if kind is TimerKind.CUT:
            return self._cut(now_ms)
        if kind is TimerKind.LAST_CHANCE:
            return self._last_chance()
        return []

    def _nibble(self, now_ms: int) -> list[Effect]:
        if self.want_pending:
            return []
        assert self.answer_ms is not None
        k = self.nibbles_done + 1
        covered = self._cost_at(k * self.nibble_ms)
        debit = covered - self.debited_micros
        reserve = self._cost_at((k + 1) * self.nibble_ms) - covered
        used_s, want_s = self._bundle_ask(k)
        self.want_pending = True
        self.pending_is_nibble = True
        self.pending_want_s = want_s
        step = NibbleStep(self.call_id, self._next_seq(), debit, reserve, self.account_id, used_s, want_s)
        if not self.upper:
            return [step]
        self.answers = {}
        # The customer first, then upward (see "Ordering" above): each level its own difference.
        return [step, *(NibbleStep(p.call_id, step.seq, p.cost_at(k * self.nibble_ms) - p.debited_micros,
                                   p.cost_at((k + 1) * self.nibble_ms) - p.cost_at(k * self.nibble_ms),
                                   p.account_id, level=p.level, session_id=self.call_id) for p in self.upper)]

    def on_nibble_result(self, seq: int, granted_micros: int, debited_micros: int, now_ms: int,
                         *, store_ok: bool = True, why: str = "", bundle_granted_s: int = 0,
                         level: int = 0) -> list[Effect]:
        """The store answered nibble ``seq``: ``debited_micros`` were taken (the slice just
        used) and ``granted_micros`` reserved for the next slice (partial: that is all), after
        ``bundle_granted_s`` bundle seconds were added to the call's hold. With levels above the
        customer, each level answers for itself (``level``); the call goes on when all have."""
        if seq != self.seq or not self.want_pending:
            return []  # a stale or replayed answer
        if self.upper:
            return self._on_level_result(level, granted_micros, debited_micros, now_ms, store_ok, why,
                                         bundle_granted_s)
        self.want_pending = False
        if self.phase is not Phase.ANSWERED:
            return []
        assert self.answer_ms is not None
        self._bundle_granted(bundle_granted_s if store_ok else 0)
        if not store_ok:
            # The cut's reason says what happened: the money may well be there (a balance store
            # that restarted empty, a circuit open), it is the store that granted none.
            self.cut_reason = f"no money granted by the balance store ({why or 'store_unavailable'})"
            # The store is unreachable: no new money. Fail closed: cut at the end of what was
            # granted before (the slice in flight counts as used: it will be settled).
            if self.pending_is_nibble:
                self.nibbles_done += 1
                self.debited_micros = self._cost_at(self.nibbles_done * self.nibble_ms)
            self.budget_micros = max(self.budget_micros, self.debited_micros)
            return self._exhaust(now_ms)
        if self.pending_is_nibble:
            self.nibbles_done += 1
            self.debited_micros += debited_micros
        self.budget_micros = self.debited_micros + granted_micros
        next_slice = self._cost_at((self.nibbles_done + 1) * self.nibble_ms) - self._cost_at(
            self.nibbles_done * self.nibble_ms)
        if granted_micros < next_slice or self._at_max_duration(self.nibbles_done + 1):
            return self._exhaust(now_ms)
        if self.exhausted:  # a top-up arrived: back to normal nibbling
            self.exhausted = False
            self.cut_at_ms = None
            self.token += 1
        return [self._arm(TimerKind.NIBBLE, self._nibble_due_ms(self.nibbles_done + 1)),
                *self._move_backstop(self.answer_ms + (self.nibbles_done + 1) * self.nibble_ms
                                     + self.settings.backstop_slack_ms)]

    def _on_level_result(self, level: int, granted_micros: int, debited_micros: int, now_ms: int, store_ok: bool,
                         why: str, bundle_granted_s: int) -> list[Effect]:
        """One level's answer to the step in flight; once every level has answered, the call goes
        on for what every level can pay, or is cut when one of them cannot (DESIGN §11)."""
        self.answers[level] = (granted_micros, debited_micros, store_ok, why, bundle_granted_s)
        if len(self.answers) < 1 + len(self.upper):
            return []
        answers, self.answers = self.answers, {}
        self.want_pending = False
        if self.phase is not Phase.ANSWERED:
            return []
        granted0, debited0, ok0, why0, bundle0 = answers[0]
        self._bundle_granted(bundle0 if ok0 else 0)
        if self.pending_is_nibble:
            self.nibbles_done += 1
        done_ms = self.nibbles_done * self.nibble_ms
        failed = ""
        if ok0:
            if self.pending_is_nibble:
                self.debited_micros += debited0
            self.budget_micros = self.debited_micros + granted0
        else:
            failed = f"no money granted by the balance store ({why0 or 'store_unavailable'})"
            if self.pending_is_nibble:
                self.debited_micros = self._cost_at(done_ms)
            self.budget_micros = max(self.budget_micros, self.debited_micros)
        short = self.budget_micros < self._cost_at(done_ms + self.nibble_ms)
        for payer in self.upper:
            granted, debited, ok, level_why, _ = answers.get(payer.level, (0, 0, False, "no answer", 0))
            if ok:
                if self.pending_is_nibble:
                    payer.debited_micros += debited
                payer.budget_micros = payer.debited_micros + granted
            else:
                failed = failed or (f"no money granted by the balance store at tenant {payer.tenant} "
                                    f"({level_why or 'store_unavailable'})")
                if self.pending_is_nibble:
                    payer.debited_micros = payer.cost_at(done_ms)
                payer.budget_micros = max(payer.budget_micros, payer.debited_micros)
            short = short or payer.budget_micros < payer.cost_at(done_ms + self.nibble_ms)
        if failed:
            self.cut_reason = failed
            return self._exhaust(now_ms)
        if short or self._at_max_duration(self.nibbles_done + 1):
            return self._exhaust(now_ms)
        if self.exhausted:  # a top-up arrived (at every level that lacked): back to normal nibbling
            self.exhausted = False
            self.cut_at_ms = None
            self.cut_reason = "credit exhausted"
            self.token += 1
        assert self.answer_ms is not None
        return [self._arm(TimerKind.NIBBLE, self._nibble_due_ms(self.nibbles_done + 1)),
                *self._move_backstop(self.answer_ms + (self.nibbles_done + 1) * self.nibble_ms
                                     + self.settings.backstop_slack_ms)]

    def _nibble_due_ms(self, k: int) -> int:
        """When nibble ``k`` runs: the lead before its boundary (see ``nibble_lead_ms``)."""
        assert self.answer_ms is not None
        return self.answer_ms + k * self.nibble_ms - self.settings.lead_ms

    def _at_max_duration(self, nibbles: int) -> bool:
        """The call would pass the daemon's longest call within ``nibbles`` nibbles."""
        return 0 < self.settings.max_call_ms <= nibbles * self.nibble_ms

    def _move_backstop(self, at_ms: int) -> list[Effect]:
        """Re-arm the PBX's own hangup of the call at ``at_ms`` (nothing when it is there already)."""
        if self.billed_leg_id is None or at_ms == self.backstop_at_ms:
            return []
        billed = self.legs[self.billed_leg_id]
        if billed.ended_ms is not None:
            return []
        self.backstop_at_ms = at_ms
        caller = self.a_leg.leg_id if self.a_leg.ended_ms is None else ""
        return [Command(self.call_id, ArmBackstop(billed.leg_id, at_ms, caller))]

    def _exhaust(self, now_ms: int) -> list[Effect]:
        """The budget is final: cut the call the instant the money runs out."""
        assert self.answer_ms is not None
        self.exhausted = True
        self.token += 1
        # max_seconds answers 0 ("deny") when the budget only covers a free grace period; the
        # time already covered by nibbles was affordable all the same, so never cut before it.
        seconds = self.tariff.max_seconds(self.budget_micros)
        for payer in self.upper:  # the call lasts what every level can pay (DESIGN §11)
            level_seconds = payer.tariff.max_seconds(payer.budget_micros)
            if level_seconds < seconds:
                seconds = level_seconds
                if self.cut_reason == "credit exhausted":
                    self.cut_reason = f"credit exhausted at tenant {payer.tenant} (account {payer.account_id})"
        affordable_ms = max(seconds * 1000, self.nibbles_done * self.nibble_ms)
        if self.settings.max_call_ms and affordable_ms >= self.settings.max_call_ms:
            affordable_ms = self.settings.max_call_ms
            self.cut_reason = "maximum call duration"
        self.cut_at_ms = self.answer_ms + affordable_ms
        effects: list[Effect] = [self._arm(TimerKind.CUT, max(now_ms, self.cut_at_ms)),
                                 *self._move_backstop(self.cut_at_ms + self.settings.backstop_margin_ms)]
        warn_at = self.cut_at_ms - self.settings.warning_ms
        if self.settings.warning_ms and warn_at > now_ms:
            effects.append(self._arm(TimerKind.WARN, warn_at))
        last_chance = self.cut_at_ms - LAST_CHANCE_LEAD_MS - self.settings.warning_ms
        if last_chance <= now_ms and self.settings.lead_ms:
            # Exhausted less than the usual lead before the cut (a nibble runs the store deadline
            # early, so this is common): look once more as late as the store's deadline allows,
            # its answer still before the cut. Found by the real-PBX suite: a top-up that landed
            # 1.3 s before the money ran out did not extend the call.
            last_chance = self.cut_at_ms - self.settings.lead_ms - self.settings.warning_ms
        if last_chance > now_ms:
            effects.append(self._arm(TimerKind.LAST_CHANCE, last_chance))
        return effects

    def _last_chance(self) -> list[Effect]:
        """Ask once more for the next slice (a top-up may have landed): debit nothing new."""
        if self.want_pending:
            return []
        covered = self._cost_at(self.nibbles_done * self.nibble_ms)
        # The budget beyond what is covered is already reserved; ask for the whole next slice.
        want = self._cost_at((self.nibbles_done + 1) * self.nibble_ms) - covered
        used_s, want_s = self._bundle_ask(self.nibbles_done)
        self.want_pending = True
        self.pending_is_nibble = False
        self.pending_want_s = want_s
        step = NibbleStep(self.call_id, self._next_seq(), 0, want, self.account_id, used_s, want_s)
        if not self.upper:
            return [step]
        self.answers = {}
        k = self.nibbles_done
        return [step, *(NibbleStep(p.call_id, step.seq, 0, p.cost_at((k + 1) * self.nibble_ms)
                                   - p.cost_at(k * self.nibble_ms), p.account_id, level=p.level,
                                   session_id=self.call_id) for p in self.upper)]

    def _cut(self, now_ms: int) -> list[Effect]:
        self.cut_by_agent = True
        self.cut_sent_ms = now_ms
        return self._send_hangups(now_ms, escalate=False)

    def operator_cut(self, now_ms: int, reason: str) -> list[Effect]:
        """An operator hangs the call up (``billing-agent calls hangup``). Billing stops at this
        instant if the PBX confirms within the verify window (as for a cut when the money runs
        out); timers are kept, so an unconfirmed hangup goes on being charged and escalated."""
        if self.phase in (Phase.ENDED, Phase.SETTLED, Phase.DONE):
            return []
        if self.phase is Phase.ANSWERED and self.cut_at_ms is None:
            self.cut_at_ms = now_ms
        self.cut_by_agent = True
        self.cut_sent_ms = now_ms
        self.cut_reason = reason
        return self._send_hangups(now_ms, escalate=False)

    def _send_hangups(self, now_ms: int, *, escalate: bool) -> list[Effect]:
        self.hangup_attempts += 1
        effects: list[Effect] = []
        for leg in self._live_legs_to_cut():
            effects.append(Command(self.call_id, HangupLeg(leg.leg_id, "NORMAL_CLEARING", escalate=escalate,
                                                           reason=self.cut_reason)))
        effects.append(ArmTimer(self.call_id, TimerKind.VERIFY, now_ms + self.settings.verify_ms, self.token))
        return effects

    def _live_legs_to_cut(self) -> list[Leg]:
        legs = [self.a_leg] if self.a_leg.ended_ms is None else []
        if self.billed_leg_id:
            billed = self.legs[self.billed_leg_id]
            if billed.ended_ms is None:
                legs.append(billed)
        return legs

    def _verify(self, now_ms: int) -> list[Effect]:
        if self.phase is not Phase.ANSWERED or self.cut_sent_ms is None:
            return []  # the hangup was confirmed
        if self.hangup_attempts < self.settings.max_hangup_attempts:
            return [Alert(self.call_id, "hangup_escalated",
                          f"hangup not confirmed within {self.settings.verify_ms} ms; escalating"),
                    *self._send_hangups(now_ms, escalate=True)]
        return [Alert(self.call_id, "hangup_not_confirmed",
                      f"the PBX did not end the call after {self.hangup_attempts} hangup commands; "
                      "the money keeps running (the PBX limit is the backstop)"),
                ArmTimer(self.call_id, TimerKind.VERIFY, now_ms + self.settings.verify_ms * 4, self.token)]

    # ---------------------------------------------------------------- end and settle

    def _end(self, at_ms: int, cause: str) -> list[Effect]:
        self.end_ms = at_ms
        self.end_cause = cause
        self.token += 1
        was_answered = self.phase is Phase.ANSWERED
        self.phase = Phase.ENDED
        self.want_pending = False
        if self.upper:
            self.settles_left = {0, *(p.level for p in self.upper)}
        if not was_answered:
            seq = self._next_seq()
            return [ReleaseStep(self.call_id, seq, self.account_id),
                    *(ReleaseStep(p.call_id, seq, p.account_id, p.level, self.call_id) for p in self.upper)]
        billed_ms = self.billed_ms()
        bundle = self._bundle()
        use = None if bundle is None else BundleSettle(bundle.covered_at(billed_ms), bundle.slots)
        seq = self._next_seq()
        # Each level is charged its own price (§4, FX applied) of the same billed time.
        return [SettleStep(self.call_id, seq, self._cost_at(billed_ms), self.account_id, use),
                *(SettleStep(p.call_id, seq, p.cost_at(billed_ms), p.account_id, None, p.level, self.call_id)
                  for p in self.upper)]

    def billed_ms(self) -> int:
        """Answered time that is billed (see the module docstring for the cut rule)."""
        if self.answer_ms is None or self.end_ms is None:
            return 0
        duration = max(0, self.end_ms - self.answer_ms)
        if self.cut_at_ms is None or duration <= self.cut_at_ms - self.answer_ms:
            return duration
        cut_rel = self.cut_at_ms - self.answer_ms
        confirmed_in_time = self.cut_sent_ms is not None and self.end_ms <= self.cut_sent_ms + self.settings.verify_ms
        if self.cut_by_agent and confirmed_in_time:
            # Our own hangup latency is not the customer's use, nor is a cut late within the
            # backstop margin (see ``cut_lateness_free_ms``); the talk before a later cut is.
            # Found by bench_faults: an agent restarted 2.6 s after a call's money ran out cut it
            # at once and billed it to the money's end, giving the 2.6 s away.
            assert self.cut_sent_ms is not None
            if self.cut_sent_ms - self.cut_at_ms <= self.settings.cut_lateness_free_ms:
                return cut_rel
            return min(duration, self.cut_sent_ms - self.answer_ms)
        if self.exhausted and self._ended_by_pbx_backstop():
            # The PBX's own backstop (or Asterisk's L() with a warning) ended the call after the
            # money ran out: the money covered only up to the cut, and the customer did not
            # choose the extra milliseconds.
            return cut_rel
        return duration

    def _ended_by_pbx_backstop(self) -> bool:
        if self.end_ms is None or self.cut_at_ms is None:
            return False
        if self.end_cause == "ALLOTTED_TIMEOUT":
            return True
        backstop = self.backstop_at_ms if self.backstop_at_ms is not None else self.cut_at_ms
        return self.end_ms <= max(backstop, self.cut_at_ms) + BACKSTOP_TOLERANCE_MS

    def on_settled(self, now_ms: int, cost_micros: int | None = None, level: int = 0) -> list[Effect]:
        """The store committed the settle (or the release); emit the record once, when every leg
        has ended or ``LEG_LINGER_MS`` later (the other leg's hangup event usually follows the
        one that ended the call by a few ms: the CDR should have its end)."""
        if self.phase is not Phase.ENDED:
            return []
        if self.upper:  # every level's settle (or release) first
            if level == 0:
                self.settled_cost_micros = cost_micros
            left = self.settles_left
            if left is not None:
                left.discard(level)
                if left:
                    return []
            cost_micros = self.settled_cost_micros
        self.phase = Phase.SETTLED
        self.settled_ms = now_ms
        self.settled_cost_micros = cost_micros
        if any(leg.ended_ms is None for leg in self.legs.values()):
            return [ArmTimer(self.call_id, TimerKind.FINISH, now_ms + LEG_LINGER_MS, self.token)]
        return self._finish()

    def _finish(self) -> list[Effect]:
        if self.phase is not Phase.SETTLED:
            return []
        self.phase = Phase.DONE
        now_ms = self.settled_ms
        cost_micros = self.settled_cost_micros
        billed_ms = self.billed_ms()
        cost = self._cost_at(billed_ms) if cost_micros is None else cost_micros
        self.settled_cost_micros = cost
        billed_seconds = -(-billed_ms // 1000) if billed_ms else 0
        info = self.rating
        converted = isinstance(self.tariff, ConvertedTariff)
        rating = RatingRecord(
            decided_ms=now_ms, plan_name=info.plan_name, rate_id=info.rate_id,
            prefix=info.prefix, rate_micros=info.rate_micros,
            billed_seconds=billed_seconds, cost_micros=cost, reason="settle",
            bundle_seconds=bundle.covered_at(billed_ms) if (bundle := self._bundle()) is not None else 0,
            plan_currency=info.plan_currency, currency=info.currency,
            fx_rate_e10=info.fx_rate_e10 if converted else None, fx_inverse=info.fx_inverse and converted,
            plan_cost_micros=plan_tariff(self.tariff).cost_micros(billed_ms) if converted else cost,
            tenant=self.seller,
        )
        upper = tuple(level_decision(p, now_ms, billed_ms, billed_seconds) for p in self.upper)
        if self.routed is not None:
            rating, upper = self._with_buy_side(rating, upper, billed_ms)
        record = CallRecord(
            call_id=self.call_id, node=self.node, pbx=self.pbx, account_id=self.account_id,
            destination=self.destination, caller=self.caller, started_ms=self.a_leg.created_ms,
            answered_ms=self.answer_ms, ended_ms=self.end_ms, duration_ms=billed_ms,
            disposition=self.disposition(), hangup_cause=self.end_cause, settled_ms=now_ms,
            legs=tuple(leg.record(leg.leg_id == self.billed_leg_id) for leg in self.legs.values()),
            rating=rating, upper=upper,
        )
        return [Finished(record)]

    def route_of(self, leg: Leg) -> Route | None:
        """The route a dialled leg was placed on: its peer names the trunk, else the n-th route
        for the n-th dialled leg (the dialplans try the routes in order, one leg each)."""
        if self.routed is None:
            return None
        dialled = sorted((other for other in self.legs.values() if other.direction is Direction.OUTBOUND),
                         key=lambda other: other.created_ms)
        return self.routed.carrier_of(leg.peer, dialled.index(leg) if leg in dialled else -1)

    def carrier_leg(self) -> Leg | None:
        """The dialled leg whose carrier carried the call (the billed one), if answered."""
        return self.legs.get(self.billed_leg_id) if self.billed_leg_id is not None else None

    def _with_buy_side(self, rating: RatingRecord, upper: tuple[RatingRecord, ...], billed_ms: int,
                       ) -> tuple[RatingRecord, tuple[RatingRecord, ...]]:
        """The decision of the level the operator sells to (the customer's, or the top
        reseller's) records the carrier that answered, its buy row, the seconds and cost it bills
        by its own increments, and the margin: what that level paid in the plan's currency minus
        the buy cost (DESIGN §10). Unanswered calls record no carrier (their legs name them)."""
        routed, leg = self.routed, self.carrier_leg()
        if routed is None or leg is None:
            return rating, upper
        route = self.route_of(leg)
        if route is None:
            return rating, upper
        ratings = [rating, *upper]
        index = min(routed.level, len(ratings) - 1)
        target = ratings[index]
        buy_cost = route.buy.cost_micros(billed_ms)
        sold = target.plan_cost_micros if target.plan_cost_micros is not None else target.cost_micros
        ratings[index] = replace(
            target, carrier=route.carrier, buy_rate_id=route.buy.rate_id, buy_prefix=route.buy.prefix,
            buy_rate_micros=route.buy.rate_micros,
            buy_billed_seconds=billed_seconds_of(route.buy, whole_seconds(billed_ms)) if billed_ms else 0,
            buy_cost_micros=buy_cost, margin_micros=sold - buy_cost)
        return ratings[0], tuple(ratings[1:])

    def flush_record(self, now_ms: int) -> list[Effect]:
        """The process stops: a settled call waiting for its other legs' hangups goes out now."""
        return self._finish() if self.phase is Phase.SETTLED else []

    def shift_time(self, delta_ms: int) -> None:
        """The wall clock stepped by ``delta_ms``: every instant of this call moves with it, so its
        timers keep their real instants and its durations their length."""
        def moved(value: int | None) -> int | None:
            return None if value is None else value + delta_ms

        self.authorized_ms += delta_ms
        self.answer_ms = moved(self.answer_ms)
        self.end_ms = moved(self.end_ms)
        self.cut_at_ms = moved(self.cut_at_ms)
        self.cut_sent_ms = moved(self.cut_sent_ms)
        self.backstop_at_ms = moved(self.backstop_at_ms)
        self.caller_left_ms = moved(self.caller_left_ms)
        if self.settled_ms:
            self.settled_ms += delta_ms
        for leg in self.legs.values():
            leg.created_ms += delta_ms
            leg.answered_ms = moved(leg.answered_ms)
            leg.ended_ms = moved(leg.ended_ms)

    def _ended_by_backstop(self) -> bool:
        """The money ran out and the call ended at the cut: by the agent, or by the PBX's own
        backstop when it was faster (FreeSWITCH says so with ALLOTTED_TIMEOUT; Asterisk's
        timeout hangs up with a normal cause, so the instant tells)."""
        if self.end_cause == "ALLOTTED_TIMEOUT":
            return True
        if not self.exhausted or self.cut_at_ms is None or self.end_ms is None:
            return False
        return self.end_ms >= self.cut_at_ms - BACKSTOP_TOLERANCE_MS // 2 and self._ended_by_pbx_backstop()

    def disposition(self) -> Disposition:
        if self.answer_ms is not None:
            return Disposition.CUT if self.cut_by_agent or self._ended_by_backstop() else Disposition.ANSWERED
        causes = {leg.hangup_cause for leg in self.legs.values() if leg.direction is Direction.OUTBOUND}
        if causes & BUSY_CAUSES:
            return Disposition.BUSY
        if not causes or causes & NO_ANSWER_CAUSES or self.end_cause in NO_ANSWER_CAUSES:
            return Disposition.NO_ANSWER
        return Disposition.FAILED


def level_decision(payer: Payer, decided_ms: int, billed_ms: int, billed_seconds: int) -> RatingRecord:
    """The rating decision of one level above the customer: its own price of the billed time."""
    info = payer.rating
    converted = isinstance(payer.tariff, ConvertedTariff)
    cost = payer.cost_at(billed_ms)
    return RatingRecord(
        decided_ms=decided_ms, plan_name=info.plan_name, rate_id=info.rate_id, prefix=info.prefix,
        rate_micros=info.rate_micros, billed_seconds=billed_seconds, cost_micros=cost, reason="settle",
        plan_currency=info.plan_currency, currency=info.currency,
        fx_rate_e10=info.fx_rate_e10 if converted else None, fx_inverse=info.fx_inverse and converted,
        plan_cost_micros=plan_tariff(payer.tariff).cost_micros(billed_ms) if converted else cost,
        level=payer.level, tenant=payer.seller, account_id=payer.account_id)
