"""All live call sessions of one agent, their legs and their timers: pure, no clock, no I/O.

The gevent engine (agent/services/engine.py) and the deterministic simulation
(agent/sim/simulation.py) both drive this same object: they feed it events, store results and
the current instant, and carry out the effects it returns.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.core.events import (
    DialBegin,
    Direction,
    LegAnswered,
    LegBridged,
    LegCreated,
    LegEvent,
    LegHungUp,
    LegUnbridged,
    LegUpdated,
    LiveLeg,
    PbxCdrReread,
    PbxConnected,
    PbxDisconnected,
)
from agent.core.routing import CallRoutes
from agent.core.session import (
    ArmTimer,
    CallSession,
    Effect,
    Leg,
    Payer,
    Phase,
    RatingInfo,
    SessionSettings,
    Tariff,
    TimerKind,
)

PENDING_LEG_LIMIT = 10_000  # legs seen before their call was authorized, kept for a while


@dataclass
class RegistryStats:
    unknown_events: int = 0
    duplicate_events: int = 0
    timers_fired: int = 0


@dataclass
class CallRegistry:
    sessions: dict[str, CallSession] = field(default_factory=dict)
    leg_index: dict[str, str] = field(default_factory=dict)  # leg id -> call id
    group_index: dict[str, str] = field(default_factory=dict)  # PBX group id -> call id
    # Legs created before the call was authorized (Newchannel precedes the AGI request).
    pending_legs: OrderedDict[str, LegCreated] = field(default_factory=OrderedDict)
    # Calls gone from a PBX's listing whose CDR line was not written yet: the resync and the
    # session's legs that were live in it, until ``PbxCdrReread``.
    awaiting_cdr: dict[str, tuple[PbxConnected, dict[str, LiveLeg]]] = field(default_factory=dict)
    # (instant, seq, call, kind, token, when it was armed as far as the registry knows)
    timers: list[tuple[int, int, str, TimerKind, int, int]] = field(default_factory=list)
    # The latest instant the engine gave (fire_due, or the engine before it applies an event):
    # only to tell a timer armed already due from a late loop. The core reads no clock.
    now_hint_ms: int = 0
    timer_seq: int = 0
    stats: RegistryStats = field(default_factory=RegistryStats)

    # ---------------------------------------------------------------- sessions

    def add(self, session: CallSession) -> list[Effect]:
        """Register an authorized call; legs already seen are attached to it."""
        self.sessions[session.call_id] = session
        self.leg_index[session.a_leg.leg_id] = session.call_id
        if session.group_id:
            self.group_index[session.group_id] = session.call_id
        early = self.pending_legs.pop(session.a_leg.leg_id, None)
        if early is not None:
            leg = session.a_leg
            leg.created_ms = min(leg.created_ms, early.at_ms)
            leg.channel = leg.channel or early.channel
            leg.sip_call_id = leg.sip_call_id or early.sip_call_id
            leg.peer = leg.peer or early.peer
        return self.schedule(session.start())

    def adopt(self, *, call_id: str, node: str, pbx: str, account_id: str, a_leg: LiveLeg,
              others: list[LiveLeg], tariff: Tariff, rating: RatingInfo, settings: SessionSettings,
              debited_micros: int, reserved_micros: int, seq: int, now_ms: int,
              last_renewal_ms: int | None = None, reservation_lost: bool = False,
              bundle_used_s: int = 0, upper: Sequence[Payer] = (), seller: str = "",
              levels: Sequence[tuple[int, int]] = (), routed: CallRoutes | None = None) -> list[Effect]:
        """Supervise a call found live on the PBX whose reservation an earlier run of this node
        left open (agent restart, hand-over): rebuild its session from the legs the PBX shows
        and continue billing from what the store debited. ``upper``: the levels above the
        customer (DESIGN §11), ``levels`` what each of their store calls debited and holds."""
        created_ms = a_leg.created_ms or now_ms
        session = CallSession(
            call_id=call_id, node=node, pbx=pbx, account_id=account_id, destination=a_leg.callee,
            caller=a_leg.caller, a_leg=Leg(a_leg.leg_id, Direction.INBOUND, created_ms, channel=a_leg.channel,
                                           caller=a_leg.caller, callee=a_leg.callee),
            authorized_ms=created_ms, tariff=tariff, rating=rating, settings=settings,
            granted_micros=reserved_micros, limit_ms=0, group_id=a_leg.group_id, upper=tuple(upper), seller=seller,
            routed=routed)
        effects = self.add(session)
        for leg in others:
            session.on_leg_created(LegCreated(leg.leg_id, leg.created_ms or now_ms, leg.direction,
                                              group_id=leg.group_id, parent_leg_id=a_leg.leg_id, channel=leg.channel,
                                              caller=leg.caller, callee=leg.callee, peer=leg.peer))
            self.leg_index[leg.leg_id] = call_id
        answered = sorted((leg for leg in others if leg.answered), key=lambda leg: leg.answered_ms or now_ms)
        if answered:
            effects += session.on_answered(LegAnswered(answered[0].leg_id, answered[0].answered_ms or now_ms))
        effects += session.adopt_progress(debited_micros=debited_micros, reserved_micros=reserved_micros, seq=seq,
                                          now_ms=now_ms, last_renewal_ms=last_renewal_ms,
                                          reservation_lost=reservation_lost, bundle_used_s=bundle_used_s,
                                          levels=levels)
        return self.schedule(effects)

    def remove(self, call_id: str) -> None:
        session = self.sessions.pop(call_id, None)
        if session is None:
            return
        for leg_id in session.legs:
            if self.leg_index.get(leg_id) == call_id:
                del self.leg_index[leg_id]
        if session.group_id and self.group_index.get(session.group_id) == call_id:
            del self.group_index[session.group_id]

    def live_count(self) -> int:
        """Calls not yet recorded (a finished call is removed as soon as its record is out)."""
        return len(self.sessions)

    # ---------------------------------------------------------------- events

    def feed(self, event: LegEvent) -> list[Effect]:
        if isinstance(event, PbxConnected):
            return self._resync(event)
        if isinstance(event, PbxCdrReread):
            return self._cdr_reread(event)
        if isinstance(event, PbxDisconnected):
            return []
        session = self._session_for(event)
        if session is None:
            if isinstance(event, LegCreated):
                self._remember_pending(event)
            elif isinstance(event, LegUpdated) and event.leg_id in self.pending_legs:
                # A fact about a leg whose call is not authorized yet (the caller's Call-ID
                # asked at its Newchannel): kept with the leg until the call is.
                early = self.pending_legs[event.leg_id]
                self.pending_legs[event.leg_id] = dataclasses.replace(
                    early, sip_call_id=event.sip_call_id or early.sip_call_id, peer=event.peer or early.peer,
                    callee=early.callee or event.callee)
            else:
                self.stats.unknown_events += 1
            return []
        effects = self._dispatch(session, event)
        for leg_id in session.legs:
            self.leg_index.setdefault(leg_id, session.call_id)
        return self.schedule(effects)

    def _session_for(self, event: LegEvent) -> CallSession | None:
        leg_id = getattr(event, "leg_id", "")
        call_id = self.leg_index.get(leg_id)
        if call_id is None and isinstance(event, LegCreated):
            call_id = self.leg_index.get(event.parent_leg_id) if event.parent_leg_id else None
            if call_id is None and event.group_id and event.direction is Direction.OUTBOUND:
                call_id = self.group_index.get(event.group_id)
        if call_id is None and isinstance(event, LegBridged):
            call_id = self.leg_index.get(event.peer_leg_id)
        if call_id is None:
            return None
        return self.sessions.get(call_id)

    @staticmethod
    def _dispatch(session: CallSession, event: LegEvent) -> list[Effect]:
        if isinstance(event, LegCreated):
            return session.on_leg_created(event)
        if isinstance(event, DialBegin):
            return session.on_dial_begin(event)
        if isinstance(event, LegAnswered):
            return session.on_answered(event)
        if isinstance(event, LegBridged):
            return session.on_bridged(event)
        if isinstance(event, LegUnbridged):
            return session.on_unbridged(event)
        if isinstance(event, LegHungUp):
            return session.on_hung_up(event)
        if isinstance(event, LegUpdated):
            return session.on_leg_updated(event)
        return []

    def _remember_pending(self, event: LegCreated) -> None:
        self.pending_legs[event.leg_id] = event
        while len(self.pending_legs) > PENDING_LEG_LIMIT:
            self.pending_legs.popitem(last=False)

    def _resync(self, event: PbxConnected) -> list[Effect]:
        live = {leg.leg_id: leg for leg in event.live_legs}
        ended = {call.a_leg_id: call for call in event.ended}
        effects: list[Effect] = []
        for session in list(self.sessions.values()):
            if event.listed_ms is not None and session.authorized_ms >= event.listed_ms:
                # Authorized after the PBX listed its channels (the engine may take the event
                # late): absent from the listing is no sign of its end. Found by bench_faults:
                # such a call was ended at once as ENDED_DURING_PBX_OUTAGE and talked unbilled.
                continue
            if session.pbx == event.pbx and session.phase in (Phase.AUTHORIZED, Phase.ANSWERED):
                for leg in event.live_legs:
                    if leg.parent_leg_id in session.legs and leg.leg_id not in session.legs:
                        session.legs[leg.leg_id] = Leg(leg.leg_id, leg.direction, leg.created_ms or event.at_ms,
                                                       channel=leg.channel, caller=leg.caller, callee=leg.callee)
                        self.leg_index[leg.leg_id] = session.call_id
                line = ended.get(session.a_leg.leg_id)
                if line is None and event.cdr_reread and session.a_leg.leg_id not in live:
                    # Gone from the PBX and no CDR line yet: the PBX may not have written it (the
                    # call ended just before the listing). Ended when the file is read again.
                    self.awaiting_cdr[session.call_id] = (event, {leg_id: live[leg_id] for leg_id in session.legs
                                                                  if leg_id in live})
                    continue
                effects += session.on_resync(live, event.at_ms, line)
        return self.schedule(effects)

    def _cdr_reread(self, event: PbxCdrReread) -> list[Effect]:
        """End the calls ``_resync`` held back for their CDR line: from it when it is there now,
        else at the resync instant as before."""
        ended = {call.a_leg_id: call for call in event.ended}
        effects: list[Effect] = []
        for call_id, (resync, live) in list(self.awaiting_cdr.items()):
            if resync.pbx != event.pbx:
                continue
            del self.awaiting_cdr[call_id]
            session = self.sessions.get(call_id)
            if session is not None and session.phase in (Phase.AUTHORIZED, Phase.ANSWERED):
                effects += session.on_resync(live, resync.at_ms, ended.get(session.a_leg.leg_id))
        return self.schedule(effects)

    # ---------------------------------------------------------------- timers

    def schedule(self, effects: list[Effect]) -> list[Effect]:
        """Keep timers in the heap; return the other effects for the caller to carry out."""
        rest: list[Effect] = []
        for effect in effects:
            if isinstance(effect, ArmTimer):
                self.timer_seq += 1
                heapq.heappush(self.timers, (effect.at_ms, self.timer_seq, effect.call_id, effect.kind,
                                             effect.token, self.now_hint_ms))
            else:
                rest.append(effect)
        return rest

    def shift_time(self, delta_ms: int) -> int:
        """The wall clock stepped: move every live call's instants and every timer by the step
        (a uniform shift keeps the heap ordered). Returns the number of calls moved."""
        self.timers = [(at_ms + delta_ms, seq, call_id, kind, token, armed_ms + delta_ms)
                       for at_ms, seq, call_id, kind, token, armed_ms in self.timers]
        self.now_hint_ms += delta_ms
        for session in self.sessions.values():
            session.shift_time(delta_ms)
        for leg_id, early in list(self.pending_legs.items()):
            self.pending_legs[leg_id] = dataclasses.replace(early, at_ms=early.at_ms + delta_ms)
        return len(self.sessions)

    def next_timer_ms(self) -> int | None:
        return self.timers[0][0] if self.timers else None

    def fire_due(self, now_ms: int, lateness_ms: list[int] | None = None) -> list[Effect]:
        """Run every timer due at ``now_ms``; returns the effects they produced. When a list is
        given, each fired timer's lateness is appended to it: ``now_ms`` minus its instant, or
        minus the instant it was armed (``now_hint_ms``) when it was armed already due (a
        nibble catching up after a slow store answer: not the loop's delay)."""
        effects: list[Effect] = []
        self.now_hint_ms = max(self.now_hint_ms, now_ms)
        while self.timers and self.timers[0][0] <= now_ms:
            at_ms, _, call_id, kind, token, armed_ms = heapq.heappop(self.timers)
            if lateness_ms is not None:
                lateness_ms.append(now_ms - max(at_ms, armed_ms))
            session = self.sessions.get(call_id)
            if session is None:
                continue
            self.stats.timers_fired += 1
            # Nibble boundaries and the cut instant are computed from the answer time, not from
            # now_ms, so a late loop delays a command but never shifts the money.
            effects += self.schedule(session.on_timer(kind, token, now_ms))
        return effects
