"""The ``api`` commands the agent sends to FreeSWITCH, built from checked values (pure).

Every value placed in a command is checked first: a space would shift the arguments, a
newline would smuggle a second command into the socket, and an empty value can widen a
command's target (``hupall CAUSE call_uuid`` with no value hangs up *every* channel).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agent.core.events import AuthorizeDecision, DenyReason

_UUID_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_CAUSE = re.compile(r"[A-Z][A-Z0-9_]{1,63}")
_DESTINATION = re.compile(r"[0-9A-Za-z+*#._-]{1,64}")
_CONTEXT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_VAR_VALUE_UNSAFE = re.compile(r"[;=\r\n]")
_TRUNK_SAFE = re.compile(r"[A-Za-z0-9_./:@+-]{1,255}")  # as carriers allow (agent/adapters/sql/carriers.py)
_DIAL_STRING = re.compile(r"[A-Za-z0-9_./:@+|*#-]{201,8000}")

SCHEDULER_SLACK_S = 1
"""``sched_hangup +N`` runs at ``floor(now) + N`` whole seconds (up to a second *before* now + N),
seen by a scheduler that polls every 0.5 s (switch_scheduler.c: it fires once the epoch second
reaches the task's). The backstop must never end a call before its money is used, so a relative
backstop gets one second more than asked, and an absolute one is rounded up to the next second:
it fires between the instant asked and 1.5 s after it. The agent itself cuts at the exact instant."""

DENY_CAUSES: dict[DenyReason, str] = {
    DenyReason.UNKNOWN_ACCOUNT: "CALL_REJECTED",
    DenyReason.SUSPENDED: "CALL_REJECTED",
    DenyReason.CLOSED: "CALL_REJECTED",
    DenyReason.MAX_CALLS: "USER_BUSY",
    DenyReason.INSUFFICIENT_FUNDS: "OUTGOING_CALL_BARRED",
    DenyReason.NO_RATE: "NO_ROUTE_DESTINATION",
    DenyReason.BLOCKED: "OUTGOING_CALL_BARRED",
    DenyReason.BAD_REQUEST: "INVALID_NUMBER_FORMAT",
    DenyReason.STORE_UNAVAILABLE: "NORMAL_TEMPORARY_FAILURE",
    DenyReason.SHUTTING_DOWN: "NORMAL_TEMPORARY_FAILURE",
    DenyReason.FRAUD_RULE: "OUTGOING_CALL_BARRED",
    DenyReason.SPEND_LIMIT: "OUTGOING_CALL_BARRED",
    DenyReason.NO_FX_RATE: "NO_ROUTE_DESTINATION",  # as no_rate: the call cannot be priced in the account's money
    DenyReason.NO_ROUTE: "NORMAL_CIRCUIT_CONGESTION",  # cause 34: no carrier can take the call (DESIGN §10)
}
"""Q.850 cause names (SIP: 403, 486, 403, 404, 403, 484, 503) given to refused calls."""


class UnsafeValue(ValueError):
    """A value that cannot be put in an event-socket command."""


def check_uuid(value: str, what: str = "channel uuid") -> str:
    if not _UUID_SAFE.fullmatch(value):
        raise UnsafeValue(f"{what} {value!r} is not a channel uuid (letters, digits, ._:@- only)")
    return value


def check_cause(value: str) -> str:
    if not _CAUSE.fullmatch(value):
        raise UnsafeValue(f"hangup cause {value!r} is not a Q.850 cause name such as NORMAL_CLEARING")
    return value


def check_destination(value: str) -> str:
    if not _DESTINATION.fullmatch(value):
        raise UnsafeValue(f"destination {value!r} cannot be used as a dialplan extension")
    return value


def check_context(value: str) -> str:
    if not _CONTEXT.fullmatch(value):
        raise UnsafeValue(f"dialplan context {value!r} is not a plain name")
    return value


def plain_value(value: str) -> str:
    """A channel-variable value for ``uuid_setvar_multi`` (``;`` and ``=`` separate pairs)."""
    return _VAR_VALUE_UNSAFE.sub(" ", value).strip()[:200]


def deny_cause(decision: AuthorizeDecision) -> str:
    return DENY_CAUSES.get(decision.reason, "CALL_REJECTED") if decision.reason else "CALL_REJECTED"


def backstop_seconds(backstop_ms: int) -> int:
    """Whole seconds for ``sched_hangup +N`` at the answer that never end the call before
    ``backstop_ms`` after it."""
    return max(1, -(-backstop_ms // 1000) + SCHEDULER_SLACK_S)


def epoch_second_at_or_after(at_ms: int) -> int:
    """The absolute ``sched_hangup`` time (epoch seconds) that fires no earlier than ``at_ms``."""
    return -(-at_ms // 1000)


# ------------------------------------------------------------------------------------ commands


def uuid_kill(leg_id: str, cause: str) -> str:
    return f"uuid_kill {check_uuid(leg_id)} {check_cause(cause)}"


def hupall_call(cause: str, call_uuid: str) -> str:
    """Every channel of one call (A and all its B legs share ``call_uuid``)."""
    return f"hupall {check_cause(cause)} call_uuid {check_uuid(call_uuid, 'call uuid')}"


def sched_hangup(leg_id: str, seconds: int, cause: str = "ALLOTTED_TIMEOUT") -> str:
    if seconds < 0:
        raise UnsafeValue(f"sched_hangup needs a delay of 0 s or more, not {seconds}")
    return f"sched_hangup +{seconds} {check_uuid(leg_id)} {check_cause(cause)}"


def sched_hangup_at(leg_id: str, epoch_s: int, cause: str = "ALLOTTED_TIMEOUT") -> str:
    """``sched_hangup <epoch>``: without ``+`` the time is absolute (mod_commands)."""
    if epoch_s <= 0:
        raise UnsafeValue(f"sched_hangup needs an epoch time, not {epoch_s}")
    return f"sched_hangup {epoch_s} {check_uuid(leg_id)} {check_cause(cause)}"


def sched_del(leg_id: str) -> str:
    """Delete the tasks scheduled for a channel (their group is the channel's uuid)."""
    return f"sched_del {check_uuid(leg_id)}"


def setvar_multi(leg_id: str, variables: dict[str, str]) -> str:
    pairs = []
    for name, value in variables.items():
        if not _VAR_NAME.fullmatch(name):
            raise UnsafeValue(f"channel variable name {name!r} is not a plain name")
        # A dial string (a failover trunk of many routes) is kept whole; text is cut at 200.
        pairs.append(f"{name}={value if _DIAL_STRING.fullmatch(value) else plain_value(value)}")
    if not pairs:
        raise UnsafeValue("uuid_setvar_multi needs at least one variable")
    return f"uuid_setvar_multi {check_uuid(leg_id)} {';'.join(pairs)}"


def gateway_dial(trunk: str) -> str:
    """A carrier's trunk as FreeSWITCH dials it: a bare gateway name is ``sofia/gateway/NAME``."""
    return trunk if "/" in trunk else f"sofia/gateway/{trunk}"


def failover_trunk(trunks: Sequence[str], destination: str) -> str:
    """The routes of a call as one ``billing_trunk`` value: billing.xml's bridge dials
    ``${billing_trunk}/NUMBER``, so every route but the last carries the number itself and the
    dialplan appends it to the last: ``sofia/gateway/a/NUM|sofia/gateway/b`` + ``/NUM``. A bridge
    tries ``|`` routes in turn; billing.xml's ``fail_on_single_reject`` stops at busy, no answer
    and a caller's cancel (DESIGN §10: the next carrier only when one cannot take the call)."""
    if not trunks:
        raise UnsafeValue("a failover trunk needs at least one route")
    number = check_destination(destination)
    dials = [gateway_dial(trunk) for trunk in trunks]
    for dial in dials:
        if not _TRUNK_SAFE.fullmatch(dial):
            raise UnsafeValue(f"route {dial!r} cannot be dialled safely by FreeSWITCH")
    return "|".join([*(f"{dial}/{number}" for dial in dials[:-1]), dials[-1]])


def transfer(leg_id: str, destination: str, context: str) -> str:
    return f"uuid_transfer {check_uuid(leg_id)} {check_destination(destination)} XML {check_context(context)}"


def broadcast(leg_id: str, sound: str, legs: str = "aleg") -> str:
    if not sound or any(ch.isspace() for ch in sound):
        raise UnsafeValue(f"warning sound {sound!r} must be one path or tone_stream:// without spaces")
    if legs not in ("aleg", "bleg", "both", "holdb"):
        raise UnsafeValue(f"uuid_broadcast legs must be aleg, bleg, both or holdb, not {legs!r}")
    return f"uuid_broadcast {check_uuid(leg_id)} {sound} {legs}"


def uuid_dump(leg_id: str) -> str:
    return f"uuid_dump {check_uuid(leg_id)}"


# ------------------------------------------------------------------------------------ replies


def is_ok(reply: str) -> bool:
    return reply.startswith("+OK")


def is_no_such_channel(reply: str) -> bool:
    return reply.startswith("-ERR No such channel") or reply.startswith("-ERR invalid uuid")


def first_line(reply: str) -> str:
    return reply.strip().split("\n", 1)[0]
