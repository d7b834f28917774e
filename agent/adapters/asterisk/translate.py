"""AMI events -> the engine's leg events (pure: no I/O, no clock; ``now_ms`` is an argument).

What the captures show (captures/asterisk/ami-*.txt, reference/protocols.md §2.3, §5.1):

* Every channel is keyed by ``Uniqueid``. The caller's channel (A) has ``Linkedid`` equal to its
  own ``Uniqueid``; a channel created by ``Dial`` (B) inherits A's ``Linkedid``, so it is
  ``OUTBOUND`` from its ``Newchannel`` on, grouped by ``Linkedid``; ``DialBegin`` (which comes
  after B's ``Newchannel``) names its parent (``Uniqueid`` -> ``DestUniqueid``).
* Answer: ``Newstate`` with ``ChannelState: 6`` (Up), at the event's ``Timestamp``. B's Up comes
  before ``DialEnd ANSWER``; a ``DialEnd ANSWER`` for a B leg whose Up we missed answers it too.
* ``BridgeEnter``/``BridgeLeave`` carry ``BridgeUniqueid``: bridge membership is tracked, and
  a channel entering a bridge that holds another is reported as bridged to it (A first).
* ``Hangup`` has ``Cause`` (Q.850 number) and ``Cause-txt``; the name given to the engine is the
  Q.850 name (``NORMAL_CLEARING``), as FreeSWITCH spells it.
* chan_sip announces each channel's Call-ID as ``VarSet SIPCALLID`` (``dialplan`` read class);
  PJSIP does not, and the adapter asks with ``Getvar CHANNEL(pjsip,call-id)``.
* ``Local/`` channels are dialplan plumbing (protocols §5.1): they are not reported.

Events of channels never seen (the agent restarted, AMI dropped) are translated all the same: the
leg is first introduced with a ``LegCreated`` built from the event's own channel block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from agent.adapters.asterisk.ami_protocol import AmiMessage, timestamp_ms
from agent.adapters.legs import ENDED_MEMORY, EndedLegs
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
)

PBX = "asterisk"
STATE_UP = "6"
CALL_ID_VARIABLES = frozenset({"SIPCALLID", "CHANNEL(pjsip,call-id)"})

Q850_NAMES: dict[int, str] = {
    1: "UNALLOCATED_NUMBER", 2: "NO_ROUTE_TRANSIT_NET", 3: "NO_ROUTE_DESTINATION", 6: "CHANNEL_UNACCEPTABLE",
    16: "NORMAL_CLEARING", 17: "USER_BUSY", 18: "NO_USER_RESPONSE", 19: "NO_ANSWER", 20: "SUBSCRIBER_ABSENT",
    21: "CALL_REJECTED", 22: "NUMBER_CHANGED", 27: "DESTINATION_OUT_OF_ORDER", 28: "INVALID_NUMBER_FORMAT",
    29: "FACILITY_REJECTED", 31: "NORMAL_UNSPECIFIED", 34: "NORMAL_CIRCUIT_CONGESTION",
    38: "NETWORK_OUT_OF_ORDER", 41: "NORMAL_TEMPORARY_FAILURE", 42: "SWITCH_CONGESTION",
    44: "REQUESTED_CHAN_UNAVAIL", 47: "RESOURCE_UNAVAILABLE", 50: "FACILITY_NOT_SUBSCRIBED",
    52: "OUTGOING_CALL_BARRED", 54: "INCOMING_CALL_BARRED", 57: "BEARERCAPABILITY_NOTAUTH",
    58: "BEARERCAPABILITY_NOTAVAIL", 65: "BEARERCAPABILITY_NOTIMPL", 66: "CHAN_NOT_IMPLEMENTED",
    69: "FACILITY_NOT_IMPLEMENTED", 81: "INVALID_CALL_REFERENCE", 88: "INCOMPATIBLE_DESTINATION",
    95: "INVALID_MSG_UNSPECIFIED", 96: "MANDATORY_IE_MISSING", 97: "MESSAGE_TYPE_NONEXIST",
    100: "INVALID_IE_CONTENTS", 102: "RECOVERY_ON_TIMER_EXPIRE", 111: "PROTOCOL_ERROR",
    127: "INTERWORKING",
}
Q850_NUMBERS: dict[str, int] = {name: number for number, name in Q850_NAMES.items()}
Q850_NUMBERS.update({"TEMPORARY_FAILURE": 41, "ALLOTTED_TIMEOUT": 16, "NORMAL": 16, "ORIGINATOR_CANCEL": 16,
                     "SYSTEM_SHUTDOWN": 16, "MANAGER_REQUEST": 16})


def cause_name(code: int, text: str = "") -> str:
    if code in Q850_NAMES:
        return Q850_NAMES[code]
    if text:
        return "_".join(text.upper().replace(",", " ").split())
    return str(code) if code else ""


def cause_number(name: str) -> int:
    """A Q.850 name (or number as text) as the number the Hangup action and dialplan take."""
    if name.isdigit():
        return int(name)
    return Q850_NUMBERS.get(name, 16)


def event_ms(message: AmiMessage, now_ms: int) -> int:
    return timestamp_ms(message.get("Timestamp")) or now_ms


def _value(raw: str) -> str:
    return "" if raw == "<unknown>" else raw


def _int(raw: str) -> int:
    raw = raw.strip()
    return int(raw) if raw.isdigit() else 0


def is_plumbing(channel: str) -> bool:
    return channel.startswith("Local/")


def duration_ms(raw: str) -> int:
    """CoreShowChannel ``Duration: 00:00:52`` (hours may exceed 24) as ms."""
    parts = raw.strip().split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return 0
    hours, minutes, seconds = (int(p) for p in parts)
    return ((hours * 60 + minutes) * 60 + seconds) * 1000


@dataclass(slots=True)
class LegInfo:
    leg_id: str
    direction: Direction
    group_id: str
    parent_leg_id: str = ""
    channel: str = ""
    caller: str = ""
    callee: str = ""
    account_id: str = ""
    sip_call_id: str = ""
    created_ms: int = 0
    answered_ms: int = 0
    bridge_id: str = ""

    def live(self) -> LiveLeg:
        return LiveLeg(leg_id=self.leg_id, direction=self.direction, group_id=self.group_id,
                       parent_leg_id=self.parent_leg_id, channel=self.channel, caller=self.caller,
                       callee=self.callee, answered=bool(self.answered_ms), created_ms=self.created_ms,
                       answered_ms=self.answered_ms, account_id=self.account_id,
                       peer=peer_of(self.channel) if self.direction is Direction.OUTBOUND else "")


@dataclass
class TranslatorStats:
    events: int = 0
    unknown_leg_events: int = 0
    dropped: int = 0  # channel events without a Uniqueid


class EventTranslator:
    """The little per-leg state translation needs (direction, group, parent, bridge, Call-ID)."""

    def __init__(self, *, ended_memory: int = ENDED_MEMORY) -> None:
        self.legs: dict[str, LegInfo] = {}
        self.ended = EndedLegs(ended_memory)
        self.bridges: dict[str, list[str]] = {}
        self.assumed_answers: list[str] = []  # legs the last resync found up without an answer time
        self.stats = TranslatorStats()

    # ---------------------------------------------------------------- queries

    def group_of(self, leg_id: str) -> str:
        info = self.legs.get(leg_id)
        return info.group_id if info is not None else self.ended.group_of(leg_id)

    def channel_of(self, leg_id: str) -> str:
        info = self.legs.get(leg_id)
        return info.channel if info is not None else ""

    def legs_of_group(self, group_id: str) -> list[str]:
        return [leg_id for leg_id, info in self.legs.items() if info.group_id == group_id]

    def has_ended(self, leg_id: str) -> bool:
        return leg_id in self.ended

    def known(self, leg_id: str) -> bool:
        """Seen on AMI: live now, or ended and still remembered."""
        return leg_id in self.legs or leg_id in self.ended

    def call_id_of(self, leg_id: str) -> str:
        info = self.legs.get(leg_id)
        return info.sip_call_id if info is not None else ""

    # ---------------------------------------------------------------- events

    def translate(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        handler = _HANDLERS.get(message.event)
        if handler is None:
            return []
        self.stats.events += 1
        return handler(self, message, now_ms)

    def _new_channel(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        leg_id = message.get("Uniqueid")
        if not leg_id or is_plumbing(message.get("Channel")):
            return self._drop(leg_id)
        if leg_id in self.legs:
            return []
        _, out = self._learn(message, leg_id, now_ms, "")
        return out

    def _new_state(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        leg_id = message.get("Uniqueid")
        if not leg_id or is_plumbing(message.get("Channel")):
            return self._drop(leg_id)
        if leg_id in self.ended:
            return []
        info, out = self._learn(message, leg_id, now_ms, "")
        if message.get("ChannelState") == STATE_UP and not info.answered_ms:
            info.answered_ms = event_ms(message, now_ms)
            out.append(LegAnswered(leg_id, info.answered_ms))
        return out

    def _dial_begin(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        caller, dest = message.get("Uniqueid"), message.get("DestUniqueid")
        if not dest or is_plumbing(message.get("DestChannel")) or dest in self.ended:
            return []
        out: list[LegEvent] = []
        if caller and not is_plumbing(message.get("Channel")) and caller not in self.ended:
            _, out = self._learn(message, caller, now_ms, "")
        else:
            caller = ""
        dialled = dialled_number(message.get("DialString"))
        info = self.legs.get(dest)
        if info is None:
            info, created = self._learn(message, dest, now_ms, "Dest", parent=caller, callee=dialled)
            out += created
        else:
            if caller and not info.parent_leg_id:
                info.parent_leg_id = caller
            if dialled and not info.callee:
                # A dialled channel's Newchannel says Exten "s": the number is in Dial's string.
                info.callee = dialled
                out.append(LegUpdated(dest, event_ms(message, now_ms), callee=dialled))
        if caller:
            out.append(DialBegin(caller, dest, event_ms(message, now_ms)))
        return out

    def _dial_end(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        dest = message.get("DestUniqueid")
        info = self.legs.get(dest)
        if info is None or message.get("DialStatus") != "ANSWER" or info.answered_ms:
            return []
        info.answered_ms = event_ms(message, now_ms)
        return [LegAnswered(dest, info.answered_ms)]

    def _bridge_enter(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        leg_id, bridge_id = message.get("Uniqueid"), message.get("BridgeUniqueid")
        if not leg_id or not bridge_id or is_plumbing(message.get("Channel")) or leg_id in self.ended:
            return []
        info, out = self._learn(message, leg_id, now_ms, "")
        members = self.bridges.setdefault(bridge_id, [])
        at_ms = event_ms(message, now_ms)
        for other in members:
            other_info = self.legs.get(other)
            if other_info is not None and other_info.direction is Direction.INBOUND:
                out.append(LegBridged(other, leg_id, at_ms))
            else:
                out.append(LegBridged(leg_id, other, at_ms))
        if leg_id not in members:
            members.append(leg_id)
        info.bridge_id = bridge_id
        return out

    def _bridge_leave(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        leg_id, bridge_id = message.get("Uniqueid"), message.get("BridgeUniqueid")
        members = self.bridges.get(bridge_id)
        if members is not None and leg_id in members:
            members.remove(leg_id)
            if not members:
                del self.bridges[bridge_id]
        info = self.legs.get(leg_id)
        if info is None:
            return []
        info.bridge_id = ""
        return [LegUnbridged(leg_id, event_ms(message, now_ms))]

    def _bridge_destroy(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        self.bridges.pop(message.get("BridgeUniqueid"), None)
        return []

    def _hangup(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        leg_id = message.get("Uniqueid")
        if not leg_id or is_plumbing(message.get("Channel")):
            return self._drop(leg_id)
        if leg_id in self.ended:
            return []
        if leg_id not in self.legs:
            self.stats.unknown_leg_events += 1
        info = self.legs.pop(leg_id, None)
        if info is not None and info.bridge_id in self.bridges:
            members = self.bridges[info.bridge_id]
            if leg_id in members:
                members.remove(leg_id)
        code = _int(message.get("Cause"))
        hangup = LegHungUp(leg_id, event_ms(message, now_ms), cause=cause_name(code, message.get("Cause-txt")),
                           cause_code=code)
        self.ended.add(leg_id, info.group_id if info else message.get("Linkedid"), hangup)
        return [hangup]

    def _var_set(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        if message.get("Variable") not in CALL_ID_VARIABLES:
            return []
        return self.call_id_learnt(message.get("Uniqueid"), message.get("Value"), event_ms(message, now_ms))

    def _account(self, message: AmiMessage, now_ms: int) -> list[LegEvent]:
        info = self.legs.get(message.get("Uniqueid"))
        account = _value(message.get("AccountCode"))
        if info is None or not account or account == info.account_id:
            return []
        info.account_id = account
        return [LegUpdated(info.leg_id, event_ms(message, now_ms), account_id=account)]

    def call_id_learnt(self, leg_id: str, sip_call_id: str, at_ms: int) -> list[LegEvent]:
        """A leg's SIP Call-ID (VarSet SIPCALLID, or a Getvar reply): reported once."""
        info = self.legs.get(leg_id)
        if info is None or not sip_call_id or info.sip_call_id == sip_call_id:
            return []
        info.sip_call_id = sip_call_id
        return [LegUpdated(leg_id, at_ms, sip_call_id=sip_call_id)]

    # ---------------------------------------------------------------- helpers

    def _drop(self, leg_id: str) -> list[LegEvent]:
        if not leg_id:
            self.stats.dropped += 1
        return []

    def _learn(self, message: AmiMessage, leg_id: str, now_ms: int, prefix: str, *,
               parent: str = "", callee: str = "") -> tuple[LegInfo, list[LegEvent]]:
        """The leg's info; a leg seen for the first time is introduced with a LegCreated."""
        info = self.legs.get(leg_id)
        if info is not None:
            return info, []
        if message.event != "Newchannel":
            self.stats.unknown_leg_events += 1
        info = leg_info(message, leg_id, prefix, event_ms(message, now_ms), parent=parent)
        info.callee = info.callee or callee
        self.legs[leg_id] = info
        self.ended.discard(leg_id)
        return info, [LegCreated(
            leg_id=leg_id, at_ms=info.created_ms, direction=info.direction, group_id=info.group_id,
            parent_leg_id=info.parent_leg_id, channel=info.channel, caller=info.caller, callee=info.callee,
            peer=peer_of(info.channel) if info.direction is Direction.OUTBOUND else "",
        )]

    def mark_ended(self, leg_id: str) -> None:
        info = self.legs.pop(leg_id, None)
        self.ended.add(leg_id, info.group_id if info else "")

    def answer_learnt(self, leg_id: str, answered_ms: int) -> None:
        """The real answer instant of a leg a resync found up (``CDR(answer,u)``)."""
        info = self.legs.get(leg_id)
        if info is not None and 0 < answered_ms <= info.answered_ms:
            info.answered_ms = answered_ms

    # ---------------------------------------------------------------- resync

    def reset_live(self, listing: list[AmiMessage], known_before: set[str], now_ms: int) -> list[LiveLeg]:
        """After a (re)connect: every leg alive now (``CoreShowChannel`` events).

        Events keep flowing while the listing is collected: a leg created since it was asked
        for is alive although unlisted, a leg that ended since then is listed although gone,
        and only a leg known before and not listed ended while we were away."""
        live: list[LiveLeg] = []
        seen: dict[str, None] = {}  # ordered
        self.assumed_answers = []
        by_id = {m.get("Uniqueid"): m for m in listing if m.get("Uniqueid")}
        for leg_id, message in by_id.items():
            if leg_id in self.ended or leg_id in seen or is_plumbing(message.get("Channel")):
                continue
            seen[leg_id] = None
            info = self.legs.get(leg_id)
            if info is None:
                created = now_ms - duration_ms(message.get("Duration"))
                linked = message.get("Linkedid")
                parent = linked if linked and linked != leg_id and linked in by_id else ""
                info = leg_info(message, leg_id, "", created, parent=parent)
                self.legs[leg_id] = info
            if message.get("ChannelState") == STATE_UP and not info.answered_ms:
                info.answered_ms = now_ms  # the answer came while we were away: from now on,
                self.assumed_answers.append(leg_id)  # unless the adapter learns the real instant
            bridge = message.get("BridgeId")
            if bridge and leg_id not in self.bridges.setdefault(bridge, []):
                self.bridges[bridge].append(leg_id)
                info.bridge_id = bridge
        for leg_id in seen:
            info = self.legs[leg_id]
            live_leg = info.live()
            peers = [other for other in self.bridges.get(info.bridge_id, ()) if other != leg_id]
            if peers:
                live_leg = dataclasses.replace(live_leg, bridged_to=peers[0])
            live.append(live_leg)
        for leg_id, info in self.legs.items():
            if leg_id not in seen and leg_id not in known_before:
                live.append(info.live())  # created during the resync: its events told us
        for leg_id in known_before:
            if leg_id not in seen and leg_id in self.legs:
                self.mark_ended(leg_id)
        for bridge_id in list(self.bridges):  # bridges whose BridgeLeave/Destroy we missed
            members = [leg_id for leg_id in self.bridges[bridge_id] if leg_id in self.legs]
            if members:
                self.bridges[bridge_id] = members
            else:
                del self.bridges[bridge_id]
        return live


def leg_info(message: AmiMessage, leg_id: str, prefix: str, at_ms: int, *, parent: str = "") -> LegInfo:
    """A channel block (``prefix`` = "Dest" for the dialled side of Dial* events) as LegInfo."""
    linked = message.get(prefix + "Linkedid") or leg_id
    direction = Direction.INBOUND if linked == leg_id and not parent else Direction.OUTBOUND
    callee = message.get(prefix + "Exten")
    return LegInfo(
        leg_id=leg_id, direction=direction, group_id=linked, parent_leg_id=parent,
        channel=message.get(prefix + "Channel"), caller=_value(message.get(prefix + "CallerIDNum")),
        callee="" if callee == "s" else callee, account_id=_value(message.get(prefix + "AccountCode")),
        created_ms=at_ms,
    )


def dialled_number(dial_string: str) -> str:
    """The number in ``DialBegin``'s ``DialString``: ``carrier/12125551234`` (chan_sip),
    ``12125551234@carrier`` (PJSIP), ``carrier/sip:12125551234@host``; "" when it names none."""
    target = dial_string.strip()
    if "/" in target:
        target = target.split("/", 1)[1]
    elif "@" not in target:
        return ""  # "carrier": a peer without a number
    for scheme in ("sip:", "sips:", "tel:"):
        if target.lower().startswith(scheme):
            target = target[len(scheme):]
    target = target.split("@", 1)[0].split(";", 1)[0]
    return target if target and all(ch.isalnum() or ch in "+*#" for ch in target) else ""


def peer_of(channel: str) -> str:
    """``SIP/carrier-0000000b`` -> ``carrier``; ``PJSIP/trunk-00000004`` -> ``trunk``."""
    _, _, rest = channel.partition("/")
    name, sep, _ = rest.rpartition("-")
    return name if sep else rest


_HANDLERS = {
    "Newchannel": EventTranslator._new_channel,
    "Newstate": EventTranslator._new_state,
    "DialBegin": EventTranslator._dial_begin,
    "DialEnd": EventTranslator._dial_end,
    "BridgeEnter": EventTranslator._bridge_enter,
    "BridgeLeave": EventTranslator._bridge_leave,
    "BridgeDestroy": EventTranslator._bridge_destroy,
    "Hangup": EventTranslator._hangup,
    "VarSet": EventTranslator._var_set,
    "NewAccountCode": EventTranslator._account,
}
