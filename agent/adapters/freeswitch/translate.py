"""FreeSWITCH channel events -> the engine's leg events (pure: no I/O, no clock).

What the captures and mod_sofia show (reference/protocols.md §4.3, §5.2):

* A B leg (created by ``bridge``) has ``variable_originator`` = the A leg's uuid, and
  ``Other-Type: originator`` + ``Other-Leg-Unique-ID`` = A. Its ``Channel-Call-UUID`` is A's
  uuid in CHANNEL_CREATE but becomes its own after the unbridge, so the group is learnt once.
* The B leg's ``variable_sip_call_id`` is absent from CHANNEL_CREATE; it arrives with the first
  SIP response (CHANNEL_PROGRESS(_MEDIA), CHANNEL_ANSWER, or the HANGUP_COMPLETE of a failed
  attempt) and is reported once as ``LegUpdated``.
* Billing runs from the B leg's answer: ``Caller-Channel-Answered-Time`` (µs) of the B leg's
  CHANNEL_ANSWER. The A leg's answer (an IVR, or the bridge) is reported too; the engine
  ignores it for billing.
* CHANNEL_HANGUP_COMPLETE carries ``Caller-Channel-Hangup-Time`` (µs, the instant of the
  hangup), ``Hangup-Cause``, ``variable_hangup_cause_q850`` and ``variable_billsec``.
* Every FreeSWITCH time stamp (these, ``Event-Date-Timestamp``, the CDR's ``*_uepoch``) is read
  from a clock its soft timer moves once per tick: 20 ms by default (``runtime.timestamp`` in
  switch_time.c, monotonic plus an offset from the last sync). Seen on 1.11.1 (2026-12-05): the
  answer and end stamps of 200 calls all fell on the same millisecond modulo 20. A stamp is the
  last tick at or before the instant, so an answer or a hangup is stamped up to one tick early:
  the agent, which cuts at the answer's stamp + the money's time on its own clock, sees a cut
  call end at exactly that instant in FreeSWITCH's stamps, or one tick (20 ms) before it when
  the hangup ran just ahead of the tick (1 call in 200 under load). Billing uses these stamps,
  as FreeSWITCH's own CDR does.
* Events reach the event socket in bursts, up to 20 ms after they happened: mod_event_socket's
  listener thread writes its queued events when it wakes, and an idle listener sleeps in a 20 ms
  ``switch_poll`` on the socket that new events do not interrupt (``read_packet``). Seen on
  1.11.1 (2026-12-05, a loopback capture at 20 calls/s): every call's events came in packets
  20.1-20.3 ms apart, a call's CHANNEL_CREATE 19 ms after its INVITE. A command we write wakes
  it at once (its reply is not delayed), so a reply can arrive before the events of what
  happened earlier. Nothing here depends on arrival times: the stamps above are FreeSWITCH's.

Events of channels never seen before (the agent restarted, the socket dropped) are translated
all the same: a live leg is first introduced with a ``LegCreated`` built from the event's own
channel data, so the engine can attach it to its call through the originator.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.adapters.freeswitch.esl_protocol import Event
from agent.adapters.legs import ENDED_MEMORY, EndedLegs
from agent.core.events import (
    AuthorizeRequest,
    Direction,
    LegAnswered,
    LegBridged,
    LegCreated,
    LegEvent,
    LegHungUp,
    LegUnbridged,
    LegUpdated,
    LiveLeg,
)

PBX = "freeswitch"
SUBSCRIBED_EVENTS = (
    "CHANNEL_CREATE", "CHANNEL_PARK", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER",
    "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP_COMPLETE", "HEARTBEAT",
)
# Channel variables shared with dialplan/freeswitch/billing.xml.
VAR_DESTINATION = "billing_destination"  # set by the dialplan before park: the number to rate and dial
VAR_ACCOUNT = "billing_account"  # optional; defaults to accountcode
VAR_DECISION = "billing_decision"  # set by the agent: allow | deny
# Set by billing-authorize before it asks over the socket: where the call goes unless the agent
# allows it (the agent's allow clears it, and the dialplan dials in the same pass). A channel
# without it comes from an older billing.xml, which dials on billing_decision=allow instead.
VAR_REFUSAL = "billing_refusal"
# Set by the agent when carriers are defined (DESIGN §10): the channel's own billing_trunk, which
# billing.xml's bridge reads before the global of the same name, as a '|' failover string.
VAR_TRUNK = "billing_trunk"


def micros_to_ms(raw: str) -> int | None:
    """An ESL µs timestamp as ms; None when absent, zero ("not yet") or not a number."""
    if not raw or not raw.isdigit():
        return None
    value = int(raw)
    return value // 1000 if value > 0 else None


def event_ms(event: Event, now_ms: int) -> int:
    return micros_to_ms(event.get("Event-Date-Timestamp")) or now_ms


def _int_or_none(raw: str) -> int | None:
    raw = raw.strip()
    return int(raw) if raw.isdigit() else None


def variable(event: Event, name: str) -> str:
    return event.get("variable_" + name)


def parent_of(event: Event) -> str:
    """The A leg that dialled this one ("" for an A leg)."""
    originator = variable(event, "originator")
    if originator:
        return originator
    if event.get("Other-Type") == "originator":
        return event.get("Other-Leg-Unique-ID")
    return ""


def direction_of(event: Event, parent: str) -> Direction:
    if parent:
        return Direction.OUTBOUND
    return Direction.INBOUND if event.get("Call-Direction", "inbound") == "inbound" else Direction.OUTBOUND


def account_of(event: Event) -> str:
    return (variable(event, VAR_ACCOUNT) or variable(event, "accountcode")).strip()


def peer_of(event: Event) -> str:
    return variable(event, "sip_gateway_name") or variable(event, "sip_profile_name")


@dataclass(slots=True)
class LegInfo:
    leg_id: str
    direction: Direction
    group_id: str
    parent_leg_id: str
    sip_call_id: str = ""
    created_ms: int = 0
    answered_ms: int = 0
    channel: str = ""
    caller: str = ""
    callee: str = ""
    account_id: str = ""

    def live(self) -> LiveLeg:
        return LiveLeg(leg_id=self.leg_id, direction=self.direction, group_id=self.group_id,
                       parent_leg_id=self.parent_leg_id, channel=self.channel, caller=self.caller, callee=self.callee,
                       answered=bool(self.answered_ms), created_ms=self.created_ms, answered_ms=self.answered_ms,
                       account_id=self.account_id)


@dataclass
class TranslatorStats:
    events: int = 0
    unknown_leg_events: int = 0  # events of legs never seen (synthesised LegCreated or passed on)
    dropped: int = 0  # events without a Unique-ID


class EventTranslator:
    """Keeps the little per-leg state translation needs (group, parent, Call-ID reported)."""

    def __init__(self, *, ended_memory: int = ENDED_MEMORY) -> None:
        self.legs: dict[str, LegInfo] = {}
        self.ended = EndedLegs(ended_memory)
        self.stats = TranslatorStats()

    # ---------------------------------------------------------------- queries

    def group_of(self, leg_id: str) -> str:
        info = self.legs.get(leg_id)
        if info is not None:
            return info.group_id
        return self.ended.group_of(leg_id)

    def has_ended(self, leg_id: str) -> bool:
        return leg_id in self.ended

    def is_live(self, leg_id: str) -> bool:
        return leg_id in self.legs

    # ---------------------------------------------------------------- events

    def translate(self, event: Event, now_ms: int) -> list[LegEvent]:
        name = event.name
        handler = _HANDLERS.get(name)
        if handler is None:
            return []
        leg_id = event.get("Unique-ID")
        if not leg_id:
            self.stats.dropped += 1
            return []
        self.stats.events += 1
        return handler(self, event, leg_id, now_ms)

    def _created(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        info, created = self._learn(event, leg_id, now_ms, force_created=True)
        return created

    def _progress(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        if leg_id in self.ended:
            return []
        _, out = self._learn(event, leg_id, now_ms)
        return out + self._call_id_update(event, leg_id, now_ms)

    def _answered(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        if leg_id in self.ended:
            return []
        info, out = self._learn(event, leg_id, now_ms)
        out += self._call_id_update(event, leg_id, now_ms)
        at_ms = micros_to_ms(event.get("Caller-Channel-Answered-Time")) or event_ms(event, now_ms)
        info.answered_ms = info.answered_ms or at_ms
        out.append(LegAnswered(leg_id, at_ms))
        return out

    def _bridged(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        a_leg = event.get("Bridge-A-Unique-ID") or leg_id
        b_leg = event.get("Bridge-B-Unique-ID") or event.get("Other-Leg-Unique-ID")
        if not b_leg:
            return []
        _, out = self._learn(event, leg_id, now_ms)
        out.append(LegBridged(a_leg, b_leg, event_ms(event, now_ms)))
        return out

    def _unbridged(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        at_ms = event_ms(event, now_ms)
        a_leg = event.get("Bridge-A-Unique-ID") or leg_id
        out: list[LegEvent] = [LegUnbridged(a_leg, at_ms)]
        b_leg = event.get("Bridge-B-Unique-ID")
        if b_leg:
            out.append(LegUnbridged(b_leg, at_ms))
        return out

    def _hung_up(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        out = self._call_id_update(event, leg_id, now_ms) if leg_id in self.legs else []
        if leg_id not in self.legs and leg_id not in self.ended:
            self.stats.unknown_leg_events += 1
        info = self.legs.pop(leg_id, None)
        self.ended.add(leg_id, info.group_id if info else event.get("Channel-Call-UUID"))
        at_ms = micros_to_ms(event.get("Caller-Channel-Hangup-Time")) or event_ms(event, now_ms)
        cause = event.get("Hangup-Cause") or variable(event, "hangup_cause")
        out.append(LegHungUp(leg_id, at_ms, cause=cause,
                             cause_code=_int_or_none(variable(event, "hangup_cause_q850")) or 0,
                             pbx_billsec=_int_or_none(variable(event, "billsec"))))
        return out

    # ---------------------------------------------------------------- helpers

    def _learn(self, event: Event, leg_id: str, now_ms: int, *,
               force_created: bool = False) -> tuple[LegInfo, list[LegEvent]]:
        """The leg's info; a leg seen for the first time is introduced with a LegCreated."""
        info = self.legs.get(leg_id)
        if info is not None and not force_created:
            return info, []
        if info is None:
            if not force_created:
                self.stats.unknown_leg_events += 1
            info = self._new_info(event, leg_id, now_ms)
            self.legs[leg_id] = info
            self.ended.discard(leg_id)
        sip_call_id = variable(event, "sip_call_id")
        info.sip_call_id = info.sip_call_id or sip_call_id
        return info, [LegCreated(
            leg_id=leg_id, at_ms=info.created_ms, direction=info.direction, group_id=info.group_id,
            parent_leg_id=info.parent_leg_id, channel=info.channel, caller=info.caller, callee=info.callee,
            sip_call_id=sip_call_id, peer=peer_of(event),
        )]

    @staticmethod
    def _new_info(event: Event, leg_id: str, now_ms: int) -> LegInfo:
        parent = parent_of(event)
        return LegInfo(
            leg_id, direction_of(event, parent), event.get("Channel-Call-UUID") or leg_id, parent,
            created_ms=micros_to_ms(event.get("Caller-Channel-Created-Time")) or event_ms(event, now_ms),
            answered_ms=micros_to_ms(event.get("Caller-Channel-Answered-Time")) or 0,
            channel=event.get("Channel-Name"), caller=event.get("Caller-Caller-ID-Number"),
            callee=event.get("Caller-Destination-Number"), account_id=account_of(event),
        )

    def _call_id_update(self, event: Event, leg_id: str, now_ms: int) -> list[LegEvent]:
        info = self.legs.get(leg_id)
        sip_call_id = variable(event, "sip_call_id")
        if info is None or not sip_call_id or info.sip_call_id == sip_call_id:
            return []
        info.sip_call_id = sip_call_id
        return [LegUpdated(leg_id, event_ms(event, now_ms), sip_call_id=sip_call_id, peer=peer_of(event))]

    def mark_ended(self, leg_id: str) -> None:
        """The leg is gone (FreeSWITCH said so) even though we saw no hangup event."""
        info = self.legs.pop(leg_id, None)
        self.ended.add(leg_id, info.group_id if info else "")

    # ---------------------------------------------------------------- resync

    def reset_live(self, dumps: list[Event], known_before: set[str],
                   now_ms: int) -> tuple[list[LiveLeg], list[LegEvent]]:
        """After a (re)connect: every leg alive now, and the Call-IDs learnt meanwhile.

        ``dumps`` are the ``uuid_dump`` of the channels ``show channels`` listed; ``known_before``
        the legs we knew when the listing was asked for. Events keep flowing during the resync,
        so a leg created since then is alive although unlisted, a leg that ended since then is
        listed although gone, and only a leg known before and not listed ended while we were
        away (it is forgotten: the engine ends it from the resync).
        """
        live: list[LiveLeg] = []
        updates: list[LegEvent] = []
        seen: set[str] = set()
        for dump in dumps:
            leg_id = dump.get("Unique-ID")
            if not leg_id or leg_id in self.ended or leg_id in seen:
                continue
            seen.add(leg_id)
            known = self.legs.get(leg_id)
            if known is None:
                known = self._new_info(dump, leg_id, now_ms)
                self.legs[leg_id] = known
            sip_call_id = variable(dump, "sip_call_id")
            if sip_call_id and sip_call_id != known.sip_call_id:
                known.sip_call_id = sip_call_id
                updates.append(LegUpdated(leg_id, now_ms, sip_call_id=sip_call_id, peer=peer_of(dump)))
            live.append(live_leg(dump, known))
        for leg_id, info in self.legs.items():
            if leg_id not in seen and leg_id not in known_before:
                live.append(info.live())  # created during the resync: its events told us
        for leg_id in known_before:
            if leg_id not in seen and leg_id in self.legs:
                self.mark_ended(leg_id)
        return live, updates


def live_leg(dump: Event, info: LegInfo) -> LiveLeg:
    answered_ms = micros_to_ms(dump.get("Caller-Channel-Answered-Time")) or 0
    return LiveLeg(
        leg_id=info.leg_id, direction=info.direction, group_id=info.group_id, parent_leg_id=info.parent_leg_id,
        channel=dump.get("Channel-Name"), caller=dump.get("Caller-Caller-ID-Number"),
        callee=dump.get("Caller-Destination-Number"),
        answered=bool(answered_ms) or dump.get("Answer-State") == "answered",
        bridged_to=variable(dump, "bridge_uuid") or variable(dump, "signal_bond"),
        created_ms=micros_to_ms(dump.get("Caller-Channel-Created-Time")) or 0,
        answered_ms=answered_ms, account_id=account_of(dump), peer=peer_of(dump),
    )


def awaiting_authorization(event: Event) -> bool:
    """A CHANNEL_PARK of the billing dialplan (which clears any old decision before parking)."""
    return bool(variable(event, VAR_DESTINATION)) and not variable(event, VAR_DECISION)


def parked_for_billing(dump: Event) -> bool:
    """A channel found parked by the billing dialplan at resync: either never decided (the agent
    was away) or decided without the transfer taking effect; both are authorized (again: the
    engine answers a repeated request with the same decision) and resumed."""
    return bool(variable(dump, VAR_DESTINATION)) and variable(dump, "current_application") == "park"


def authorize_request(event: Event, now_ms: int) -> AuthorizeRequest:
    """The request for a parked channel (CHANNEL_PARK, or its ``uuid_dump`` after a resync)."""
    leg_id = event.get("Unique-ID")
    return AuthorizeRequest(
        pbx=PBX, leg_id=leg_id, account_id=account_of(event),
        destination=variable(event, VAR_DESTINATION).strip(),
        at_ms=micros_to_ms(event.get("Caller-Channel-Created-Time")) or event_ms(event, now_ms),
        caller=event.get("Caller-Caller-ID-Number"), channel=event.get("Channel-Name"),
        sip_call_id=variable(event, "sip_call_id"), group_id=event.get("Channel-Call-UUID") or leg_id,
    )


_HANDLERS = {
    "CHANNEL_CREATE": EventTranslator._created,
    "CHANNEL_PARK": EventTranslator._progress,  # introduces the A leg if its CREATE was missed
    "CHANNEL_PROGRESS": EventTranslator._progress,
    "CHANNEL_PROGRESS_MEDIA": EventTranslator._progress,
    "CHANNEL_ANSWER": EventTranslator._answered,
    "CHANNEL_BRIDGE": EventTranslator._bridged,
    "CHANNEL_UNBRIDGE": EventTranslator._unbridged,
    "CHANNEL_HANGUP_COMPLETE": EventTranslator._hung_up,
}
