"""The PBX-independent vocabulary between switch adapters and the call session engine.

Adapters (Asterisk AMI/FastAGI, FreeSWITCH event socket) translate wire events into these
values and execute the engine's commands; the same engine drives both switches. Every instant
is an integer count of milliseconds since the Unix epoch (``*_ms``), taken from the PBX event
when it carries one (AMI ``Timestamp``, ESL ``Event-Date-Timestamp``), else from the adapter's
clock. Leg ids are the PBX's own (Asterisk ``Uniqueid``, FreeSWITCH ``Unique-ID``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Direction(StrEnum):
    INBOUND = "inbound"  # the caller's leg (A)
    OUTBOUND = "outbound"  # a dialled leg (B): forks, retries, transfers


# ---------------------------------------------------------------- authorization (request/reply)


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """A call asks to be dialled (FastAGI request, parked FreeSWITCH channel)."""

    pbx: str  # "asterisk" | "freeswitch"
    leg_id: str  # the caller's (A) leg
    account_id: str
    destination: str
    at_ms: int
    caller: str = ""
    channel: str = ""
    sip_call_id: str = ""
    group_id: str = ""  # Asterisk Linkedid / FreeSWITCH Channel-Call-UUID


class DenyReason(StrEnum):
    UNKNOWN_ACCOUNT = "unknown_account"
    SUSPENDED = "suspended"
    CLOSED = "closed"
    MAX_CALLS = "max_calls"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    NO_RATE = "no_rate"
    BLOCKED = "blocked"
    BAD_REQUEST = "bad_request"
    STORE_UNAVAILABLE = "store_unavailable"
    SHUTTING_DOWN = "shutting_down"
    FRAUD_RULE = "fraud_rule"  # a fraud rule (fraud/rules.yaml) refused the call or suspended the account
    SPEND_LIMIT = "spend_limit"  # a spend cap (max call cost, daily or monthly spend) leaves nothing
    NO_FX_RATE = "no_fx_rate"  # the plan's currency is not the account's and no FX rate converts it (DESIGN §11)
    NO_ROUTE = "no_route"  # no carrier can take the call: none rates it, disabled, full or at a loss (DESIGN §10)


@dataclass(frozen=True, slots=True)
class AuthorizeDecision:
    """The engine's answer. ``limit_ms`` is what the money pays for from the callee's answer (the
    agent cuts there); ``backstop_ms`` is when the PBX ends the call by itself if the agent is
    gone (Asterisk ``TIMEOUT(absolute)`` on the callee, FreeSWITCH ``sched_hangup``): never before
    ``limit_ms``, so the PBX never takes paid time away, and moved by the agent as money is
    granted (``ArmBackstop``). Both 0 when denied."""

    allowed: bool
    call_id: str
    limit_ms: int = 0
    warning_ms: int = 0  # play a warning this long before the limit (0: none)
    reason: DenyReason | None = None
    detail: str = ""  # human-readable reason, for logs and the dialplan
    backstop_ms: int = 0
    # Wholesale routing (DESIGN §10): the trunks to try, in order (Asterisk BILLING_ROUTE_n,
    # FreeSWITCH a '|' failover bridge); () when no carrier is configured: the dialplan's own trunk.
    routes: tuple[str, ...] = ()

    @property
    def pbx_backstop_ms(self) -> int:
        """The PBX backstop from the answer (``limit_ms`` when no margin was given)."""
        return max(self.backstop_ms, self.limit_ms)


# ---------------------------------------------------------------- leg events (PBX -> engine)


@dataclass(frozen=True, slots=True)
class LegCreated:
    leg_id: str
    at_ms: int
    direction: Direction
    group_id: str = ""  # Linkedid / Channel-Call-UUID: grouping only
    parent_leg_id: str = ""  # for a B leg: the A leg that dialled it (DialBegin / originator)
    channel: str = ""
    caller: str = ""
    callee: str = ""
    sip_call_id: str = ""
    peer: str = ""  # SIP peer / endpoint / gateway name


@dataclass(frozen=True, slots=True)
class LegUpdated:
    """Late facts about a leg (a SIP Call-ID asked of the PBX, the number a dialled leg dialled)."""

    leg_id: str
    at_ms: int
    sip_call_id: str = ""
    peer: str = ""
    account_id: str = ""
    callee: str = ""


@dataclass(frozen=True, slots=True)
class DialBegin:
    leg_id: str  # the caller's leg
    dest_leg_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class LegAnswered:
    leg_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class LegBridged:
    leg_id: str
    peer_leg_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class LegUnbridged:
    leg_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class LegHungUp:
    leg_id: str
    at_ms: int
    cause: str = ""  # Q.850 name, e.g. NORMAL_CLEARING
    cause_code: int = 0  # Q.850 number, e.g. 16
    pbx_billsec: int | None = None  # the PBX's own figure, for reconciliation only


@dataclass(frozen=True, slots=True)
class LiveLeg:
    """One channel found by a resync (AMI CoreShowChannels, ESL ``show channels``)."""

    leg_id: str
    direction: Direction
    group_id: str = ""
    parent_leg_id: str = ""
    channel: str = ""
    caller: str = ""
    callee: str = ""
    answered: bool = False
    bridged_to: str = ""
    created_ms: int = 0
    answered_ms: int = 0
    account_id: str = ""
    peer: str = ""  # SIP peer / endpoint / gateway of a dialled leg: names the carrier of an adopted call


@dataclass(frozen=True, slots=True)
class PbxConnected:
    """The adapter (re)connected and resynced: these are all the legs alive on the PBX now,
    and (``ended``) what the PBX's own CDR file says of calls that ended, when one is set up."""

    pbx: str
    at_ms: int
    live_legs: tuple[LiveLeg, ...] = field(default_factory=tuple)
    ended: tuple[EndedCall, ...] = field(default_factory=tuple)
    # When the listing was asked for: a call authorized since is not in it, whatever it says.
    listed_ms: int | None = None
    # The adapter reads the PBX's CDR file again a little later (``PbxCdrReread``): a call absent
    # from the listing whose line is not in ``ended`` yet waits for it (the PBX writes a call's
    # line just after the channel is gone; one that ended just before the listing may be
    # missing here). False: no CDR file, or no second read.
    cdr_reread: bool = False


@dataclass(frozen=True, slots=True)
class PbxCdrReread:
    """The PBX's CDR file read again after a resync that said ``cdr_reread``: the calls held
    back for want of their line are now ended from it, or, without one, as before."""

    pbx: str
    at_ms: int
    ended: tuple[EndedCall, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class EndedCall:
    """The PBX's own record of a call that ended (its CDR): the caller's leg, when the call was
    answered (None: never) and when it ended. Calls that ended while no agent watched them
    (a crash, an AMI outage) are billed from it, to the millisecond."""

    a_leg_id: str
    answered_ms: int | None
    ended_ms: int


@dataclass(frozen=True, slots=True)
class PbxDisconnected:
    pbx: str
    at_ms: int


LegEvent = (
    LegCreated | LegUpdated | DialBegin | LegAnswered | LegBridged | LegUnbridged | LegHungUp
    | PbxConnected | PbxDisconnected | PbxCdrReread
)


# ---------------------------------------------------------------- commands (engine -> PBX)


@dataclass(frozen=True, slots=True)
class HangupLeg:
    leg_id: str
    cause: str = "NORMAL_CLEARING"
    escalate: bool = False  # a previous hangup was not confirmed: use the strongest command
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WarnLeg:
    leg_id: str
    seconds_left: int


@dataclass(frozen=True, slots=True)
class ArmBackstop:
    """Move the PBX's own hangup of a call (the backstop that holds if the agent dies) to
    ``at_ms`` (epoch ms): set on the billed leg (it stays with the call through a transfer) and,
    where the PBX keeps a ceiling on the caller's leg too (FreeSWITCH), on ``caller_leg_id``."""

    leg_id: str
    at_ms: int
    caller_leg_id: str = ""


SwitchCommand = HangupLeg | WarnLeg | ArmBackstop
