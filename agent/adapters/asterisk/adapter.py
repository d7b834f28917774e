"""Asterisk switch adapter: FastAGI authorization, AMI supervision, cut-off.

Authorization (FastAGI, dialplan/asterisk/extensions_billing.conf): the dialplan clears
``BILLING_DECISION``, runs ``AGI(agi://agent/authorize,${CHANNEL(accountcode)})`` and dials only
when the variable reads ``allow`` — fail closed: an agent that is down, slow or confused leaves
no variable and the call is refused (``AGISTATUS=FAILURE`` alone would let it through). The
agent asks the engine, then answers with **one** command, ``EXEC MSet``: ``BILLING_LIMIT_MS``
(what the money pays for), ``BILLING_BACKSTOP_MS`` (the backstop: ``Dial``'s ``L(x)`` without a
warning sets it as the callee's hangup time when it answers, so Asterisk ends the call even if
the agent dies), ``BILLING_WARN_MS`` (optional) and ``BILLING_DECISION=allow``, all at once; or
``BILLING_REASON``, ``BILLING_CAUSE`` (Q.850) and ``deny``. One round trip after the
environment block: real ``res_agi`` reads one command at a time (see agi.py), so nothing is
pipelined; our side of the stream ends with that command, so the AGI ends (and the dialplan
dials) as soon as Asterisk has run it; the caller's SIP Call-ID is asked over AMI, off the
call's path.

Supervision (AMI): channel events become leg events (translate.py); the engine bills from the
callee's answer and asks for hangups, carried out with the ``Hangup`` action by ``Uniqueid``
and verified by the engine through the leg's ``Hangup`` event; a channel Asterisk no longer
knows is reported as ended. As money is granted the engine moves the backstop: ``Setvar
TIMEOUT(absolute)`` on the billed leg (ms precision; ``L()`` cannot move once ``Dial`` runs).
After every (re)connect, ``CoreShowChannels`` lists the live channels and the engine reconciles
its calls with them (``PbxConnected``); every SIP leg's Call-ID is asked with ``Getvar``.

Rights: the shipped AMI user has ``read = call`` and ``write = call,reporting``. A missing
write class shows as ``Permission denied`` on the first action that needs it, logged with the
class to add; a missing ``read = call`` shows as calls whose channel events never come, logged
the same way at the first authorization.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from agent.adapters.asterisk.agi import AgiSession, FastAgiServer
from agent.adapters.asterisk.agi_protocol import (
    AgiEnvironment,
    UnsafeValue,
    exec_mset,
)
from agent.adapters.asterisk.ami import AmiClient, AmiError, AmiSettings
from agent.adapters.asterisk.ami_protocol import AmiMessage
from agent.adapters.asterisk.translate import PBX, EventTranslator, cause_number
from agent.adapters.legs import HeldEvents
from agent.adapters.pbx_cdr import parse_columns, read_ended_calls, reread_later
from agent.core.events import (
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    LegAnswered,
    LegCreated,
    LegEvent,
    LegHungUp,
    PbxConnected,
    PbxDisconnected,
)
from agent.ports import CallEngine, Clock
from agent.services.call_path import CALL_PATH
from agent.services.clock import SystemClock

log = logging.getLogger(__name__)

MISSED_ANSWER_LOOKUPS = 16  # Getvar CDR(answer,u) (and Call-IDs) at once after a resync
MAX_MISSED_ANSWER_LOOKUPS = 2_000  # beyond that, the rest are billed from the resync instant
VANISHED_CAUSE = "NO_SUCH_CHANNEL"  # Asterisk no longer knows the leg and we missed its hangup
AGI_SCRIPT = "authorize"
# Channel variables shared with dialplan/asterisk/extensions_billing.conf.
VAR_DECISION = "BILLING_DECISION"
VAR_LIMIT_MS = "BILLING_LIMIT_MS"
VAR_BACKSTOP_MS = "BILLING_BACKSTOP_MS"
VAR_WARN_MS = "BILLING_WARN_MS"
VAR_REASON = "BILLING_REASON"
VAR_CAUSE = "BILLING_CAUSE"
VAR_ROUTES = "BILLING_ROUTES"  # how many BILLING_ROUTE_n (DESIGN §10); unset: the dialplan's BILLING_TRUNK
VAR_ROUTE = "BILLING_ROUTE_{}"  # the n-th trunk to try (PJSIP/acme, SIP/acme), from 1
REASON_UNSUPERVISED = "pbx_unsupervised"  # AMI is down: refused by the adapter itself (cause 41)

DENY_CAUSES: dict[DenyReason, int] = {
    DenyReason.UNKNOWN_ACCOUNT: 21,  # CALL_REJECTED
    DenyReason.SUSPENDED: 21,
    DenyReason.CLOSED: 21,
    DenyReason.MAX_CALLS: 17,  # USER_BUSY
    DenyReason.INSUFFICIENT_FUNDS: 52,  # OUTGOING_CALL_BARRED
    DenyReason.NO_RATE: 3,  # NO_ROUTE_DESTINATION
    DenyReason.BLOCKED: 52,
    DenyReason.BAD_REQUEST: 28,  # INVALID_NUMBER_FORMAT
    DenyReason.STORE_UNAVAILABLE: 41,  # TEMPORARY_FAILURE
    DenyReason.SHUTTING_DOWN: 41,
    DenyReason.FRAUD_RULE: 52,  # a fraud rule bars the account's calls (or those to a group)
    DenyReason.SPEND_LIMIT: 52,  # the account's daily/monthly spend or max call cost is reached
    DenyReason.NO_FX_RATE: 3,  # NO_ROUTE_DESTINATION, as no_rate: the call cannot be priced in the account's money
    DenyReason.NO_ROUTE: 34,  # NORMAL_CIRCUIT_CONGESTION (no circuit/channel available): no carrier can take it
}
"""Q.850 causes given to refused calls (SIP: 403, 486, 403, 404, 403, 484, 503), as FreeSWITCH."""

CALL_ID_VARIABLE = {"SIP": "SIPCALLID", "PJSIP": "CHANNEL(pjsip,call-id)"}
# The callee's hangup time (whentohangup) that L(x) set at its answer: seconds from now with ms
# (func_timeout.c); 0 cancels it, so it is never sent.
BACKSTOP_VARIABLE = "TIMEOUT(absolute)"
RIGHTS_CHECK_DELAY_S = 1.0  # an authorized leg with no AMI event this long after: no read=call
PERMISSION_DENIED = "Permission denied"
ACTION_CLASS = {"Hangup": "call", "Getvar": "call", "Setvar": "call", "CoreShowChannels": "reporting"}


class SwitchCommandError(Exception):
    """Asterisk refused a command (the reply names why)."""


@dataclass(frozen=True)
class AsteriskSettings:
    agi_host: str = "127.0.0.1"
    agi_port: int = 4573
    agi_max_sessions: int = 2000
    agi_environment_timeout_s: float = 5.0
    agi_command_timeout_s: float = 5.0
    ami: AmiSettings = field(default_factory=AmiSettings)
    fetch_call_ids: bool = True  # Getvar every SIP leg's Call-ID (the least-rights user gets no VarSet)
    # Without AMI the agent sees no answer and no hangup: it cannot bill, so it refuses (fail closed).
    authorize_without_ami: bool = False
    # Authorizations running at once (more AGI sessions wait their turn): bounds the balance
    # store's connections (redis-py's pool refuses the 101st concurrent caller by default).
    authorize_concurrency: int = 64
    cdr_file: str = ""  # Asterisk's cdr_custom file of the shipped format (agent.adapters.pbx_cdr); "": none
    cdr_columns: tuple[int, int, int] = (0, 1, 2)  # 0-based: the caller's leg id, the answer, the end

    @classmethod
    def from_config(cls, config: Any) -> AsteriskSettings:
        """From the ``asterisk`` section of agent.yaml (agent.config.AsteriskConfig)."""
        ping_s = float(getattr(config, "ami_ping_seconds", 10.0))
        return cls(
            agi_host=config.agi_host, agi_port=int(config.agi_port),
            ami=AmiSettings(host=config.ami_host, port=int(config.ami_port), username=config.ami_username,
                            secret=config.ami_secret, ping_interval_s=ping_s,
                            ping_timeout_s=max(1.0, min(5.0, ping_s / 2))),
            cdr_file=str(getattr(config, "cdr_file", "") or ""),
            cdr_columns=parse_columns(str(getattr(config, "cdr_columns", "1,2,3"))),
        )


@dataclass
class AdapterStats:
    events: int = 0
    authorizations: int = 0
    refused_requests: int = 0  # AGI sessions refused before the engine (unknown script, no unique id)
    resyncs: int = 0
    vanished_legs: int = 0
    call_id_lookups: int = 0
    call_id_lookups_skipped: int = 0  # 64 Getvars already in flight (an event flood): Call-ID left out
    backstops_armed: int = 0
    mset_refused: int = 0  # EXEC MSet refused: no decision landed, the dialplan refused the call


class AsteriskAdapter:
    """Implements the ``Switch`` port (agent/ports.py) and drives a ``CallEngine``."""

    name = PBX

    def __init__(self, engine: CallEngine, settings: AsteriskSettings | None = None, *,
                 clock: Clock | None = None) -> None:
        self.engine = engine
        self.settings = settings or AsteriskSettings()
        self.clock = clock or SystemClock()
        self.translator = EventTranslator()
        self.stats = AdapterStats()
        self.synced = gevent.event.Event()  # set after each successful resync
        self.last_disconnect = ""
        self.agi = FastAgiServer(self.settings.agi_host, self.settings.agi_port, self._authorize_session,
                                 max_sessions=self.settings.agi_max_sessions,
                                 environment_timeout_s=self.settings.agi_environment_timeout_s,
                                 command_timeout_s=self.settings.agi_command_timeout_s)
        self.ami = AmiClient(self.settings.ami, on_event=self._on_event, on_connected=self._resync,
                             on_disconnected=self._on_disconnected)
        self._lookups = gevent.pool.Pool(64)
        self._cdr_rereads = gevent.pool.Group()  # the PBX CDR file read again after a resync
        self.held = HeldEvents(self.engine.on_event)  # a caller's events while its call is authorized
        self._authorize_slots = gevent.lock.BoundedSemaphore(self.settings.authorize_concurrency)
        self._missing_rights: set[str] = set()  # classes already reported missing (once per connection)
        # The read=call check (_check_events_arrive): one timer per allowed call until one call's
        # events have shown on this connection, which proves the right; none after that.
        self._call_events_seen = False
        self._rights_checks = gevent.pool.Group()

    # ---------------------------------------------------------------- lifecycle

    @property
    def agi_port(self) -> int:
        return self.agi.bound_port

    def start(self) -> None:
        """Bind FastAGI now (``OSError`` if the port is taken); AMI connects in the background."""
        self.agi.start()
        self.ami.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self.agi.stop(timeout_s)
        self.ami.stop(timeout_s)
        self._lookups.kill(timeout=timeout_s)
        self._cdr_rereads.kill(timeout=timeout_s)
        self._rights_checks.kill(timeout=timeout_s)

    # ---------------------------------------------------------------- Switch port

    def connected(self) -> bool:
        return self.ami.connected

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        """AMI ``Hangup`` by Uniqueid; escalated: the channel name too, then every live leg of the
        call's Linkedid group (dialled legs the engine never saw included)."""
        number = str(cause_number(cause))
        targets = [leg_id]
        if escalate:
            channel = self.translator.channel_of(leg_id)
            group = self.translator.group_of(leg_id)
            targets += [channel] if channel else []
            targets += [other for other in self.translator.legs_of_group(group) if other != leg_id] if group else []
        first = self.ami.action("Hangup", [("Channel", leg_id), ("Cause", number)])
        for target in targets[1:]:
            try:
                reply = self.ami.action("Hangup", [("Channel", target), ("Cause", number)])
                log.warning("escalated hangup of leg %s: Hangup %s: %s %s", leg_id, target, reply.response,
                            reply.get("Message"))
            except AmiError as exc:
                log.error("escalated hangup of leg %s: Hangup %s: %s", leg_id, target, exc)
        if first.response == "Success":
            return
        message = first.get("Message")
        if message == "No such channel":
            self._vanished(leg_id)
            return
        self._check_denied("Hangup", first)
        raise SwitchCommandError(f"Hangup {leg_id} cause {number}: {first.response} {message}".strip())

    def warn(self, leg_id: str, seconds_left: int) -> None:
        """Asterisk plays the warning itself: ``Dial(...,L(limit:warn))`` with ``BILLING_WARN_MS``."""
        log.debug("low-balance warning for leg %s (%d s left) is played by Dial's L() option", leg_id, seconds_left)

    def arm_backstop(self, leg_id: str, at_ms: int, caller_leg_id: str = "") -> None:
        """``Setvar TIMEOUT(absolute)`` on the billed leg: Asterisk hangs it up at ``at_ms`` by
        itself (the dialplan's ``L(x)`` set the first one at the answer: the same whentohangup).
        Only that leg carries the backstop, so it stays with the call through a transfer."""
        delay_ms = max(1, at_ms - self.clock.now_ms())  # never 0: TIMEOUT(absolute)=0 cancels
        value = f"{delay_ms // 1000}.{delay_ms % 1000:03d}"
        reply = self.ami.action("Setvar", [("Channel", leg_id), ("Variable", BACKSTOP_VARIABLE), ("Value", value)])
        if reply.response == "Success":
            self.stats.backstops_armed += 1
            return
        if reply.get("Message") == "No such channel":
            self._vanished(leg_id)
            return
        self._check_denied("Setvar", reply)
        raise SwitchCommandError(f"Setvar {BACKSTOP_VARIABLE}={value} on {leg_id}: {reply.response} "
                                 f"{reply.get('Message')}".strip())

    def _check_denied(self, action: str, reply: AmiMessage) -> None:
        """``Permission denied``: the AMI user lacks the write class of ``action``; say which, once."""
        if reply.get("Message") != PERMISSION_DENIED:
            return
        klass = ACTION_CLASS.get(action, "call")
        if f"write:{klass}" in self._missing_rights:
            return
        self._missing_rights.add(f"write:{klass}")
        log.error("Asterisk refused AMI %s to user %r: Permission denied. The agent needs 'write = %s' "
                  "(dialplan/asterisk/manager_billing.conf: read = call, write = call,reporting); "
                  "without it %s", action, self.settings.ami.username, "call,reporting",
                  "calls cannot be cut, backstops moved or SIP Call-IDs read" if klass == "call"
                  else "live calls cannot be listed after a reconnect")

    # ---------------------------------------------------------------- events (AMI reader greenlet: never block)

    def _on_event(self, message: AmiMessage) -> None:
        self.stats.events += 1
        for leg_event in self.translator.translate(message, self.clock.now_ms()):
            self._emit(leg_event)
            if self.settings.fetch_call_ids and isinstance(leg_event, LegCreated):
                self._ask_call_id(leg_event.leg_id, leg_event.channel)
            elif (self.settings.fetch_call_ids and isinstance(leg_event, LegAnswered)
                    and not self.translator.call_id_of(leg_event.leg_id)):
                # An outbound PJSIP channel may have no dialog (so no Call-ID) at its Newchannel.
                self._ask_call_id(leg_event.leg_id, self.translator.channel_of(leg_event.leg_id))

    def _ask_call_id(self, leg_id: str, channel: str) -> None:
        """Every SIP leg's Call-ID, asked with ``Getvar`` (the shipped least-rights user gets no
        ``VarSet`` events, and PJSIP publishes none)."""
        variable = CALL_ID_VARIABLE.get(channel.partition("/")[0])
        if not variable:
            return
        if self._lookups.full():
            self.stats.call_id_lookups_skipped += 1
            return
        self._lookups.spawn(self._fetch_call_id, leg_id, variable)

    def _emit(self, leg_event: LegEvent) -> None:
        self.held.emit(leg_event)

    def _fetch_call_id(self, leg_id: str, variable: str) -> None:
        self.stats.call_id_lookups += 1
        try:
            reply = self.ami.action("Getvar", [("Channel", leg_id), ("Variable", variable)])
        except AmiError as exc:
            log.debug("Getvar %s of leg %s: %s", variable, leg_id, exc)
            return
        self._check_denied("Getvar", reply)
        value = reply.get("Value") if reply.response == "Success" else ""
        for update in self.translator.call_id_learnt(leg_id, value, self.clock.now_ms()):
            self._emit(update)

    def _on_disconnected(self, reason: str) -> None:
        self.last_disconnect = reason
        self.synced.clear()
        self._missing_rights.clear()
        self._call_events_seen = False  # the next connection may log in with other rights
        self.engine.on_event(PbxDisconnected(PBX, self.clock.now_ms()))

    def _vanished(self, leg_id: str) -> None:
        """Asterisk does not know the leg: if we never saw it end, tell the engine it did; if
        we did, tell it again (the engine may not have known the call then: see ``_resync``)."""
        if self.translator.has_ended(leg_id):
            hangup = self.translator.ended.hangup_of(leg_id)
            if hangup is not None:
                self._emit(hangup)
            return
        self.stats.vanished_legs += 1
        self.translator.mark_ended(leg_id)
        self._emit(LegHungUp(leg_id, self.clock.now_ms(), cause=VANISHED_CAUSE))

    # ---------------------------------------------------------------- resync

    def _resync(self) -> None:
        """After every (re)connect: every live channel, then one PbxConnected for the engine."""
        known_before = set(self.translator.legs)
        listed_ms = self.clock.now_ms()
        try:
            listing = self.ami.action_list("CoreShowChannels", "CoreShowChannelsComplete")
        except AmiError as exc:
            if PERMISSION_DENIED in str(exc):
                log.error("Asterisk refused AMI CoreShowChannels to user %r: Permission denied. The agent needs "
                          "'write = call,reporting' (dialplan/asterisk/manager_billing.conf) to list the live "
                          "calls after every (re)connect", self.settings.ami.username)
            raise
        now_ms = self.clock.now_ms()
        live = self.translator.reset_live(listing, known_before, now_ms)
        learnt = self._missed_answers(self.translator.assumed_answers)
        if learnt:
            live = [dataclasses.replace(leg, answered_ms=learnt[leg.leg_id]) if leg.leg_id in learnt else leg
                    for leg in live]
        self.stats.resyncs += 1
        log.info("Asterisk resync: %d live channels", len(live))
        ended = (read_ended_calls(self.settings.cdr_file, columns=self.settings.cdr_columns)
                 if self.settings.cdr_file else ())
        reread = bool(self.settings.cdr_file)
        self.engine.on_event(PbxConnected(PBX, now_ms, tuple(live), ended, listed_ms, cdr_reread=reread))
        # A listed leg that hung up while the answers were looked up above: its LegHungUp reached
        # the engine before this listing, when it did not know the call (an earlier run's, to be
        # adopted from the listing) and dropped it. Found by bench_faults: such a call was
        # adopted, cut for nothing and never ended. Told again, after the listing.
        for leg in live:
            hangup = self.translator.ended.hangup_of(leg.leg_id)
            if hangup is not None:
                self._emit(hangup)
        if reread:
            reread_later(self._cdr_rereads, PBX, self.settings.cdr_file, self.settings.cdr_columns,
                         self.clock.now_ms, self.engine.on_event)
        if self.settings.fetch_call_ids:  # after a restart every leg is new to us: ask each its Call-ID
            for leg in live:
                if not self.translator.call_id_of(leg.leg_id):
                    self._ask_call_id(leg.leg_id, leg.channel)
        self.synced.set()

    def _missed_answers(self, leg_ids: list[str]) -> dict[str, int]:
        """When a callee answered while AMI was away (or before this agent started), the listing
        only says the channel is up: ask Asterisk for the real instant (``CDR(answer,u)``, epoch
        seconds with microseconds), so the call is billed from its answer, not from the resync."""
        if not leg_ids:
            return {}
        learnt: dict[str, int] = {}

        def fetch(leg_id: str) -> None:
            try:
                reply = self.ami.action("Getvar", [("Channel", leg_id), ("Variable", "CDR(answer,u)")])
            except AmiError as exc:
                log.debug("Getvar CDR(answer,u) of leg %s: %s", leg_id, exc)
                return
            answered_ms = _epoch_ms(reply.get("Value") if reply.response == "Success" else "")
            if answered_ms:
                self.translator.answer_learnt(leg_id, answered_ms)
                learnt[leg_id] = self.translator.legs[leg_id].answered_ms if leg_id in self.translator.legs else 0

        pool = gevent.pool.Pool(MISSED_ANSWER_LOOKUPS)
        pool.map(fetch, leg_ids[:MAX_MISSED_ANSWER_LOOKUPS])
        if learnt:
            log.info("Asterisk resync: real answer instants of %d legs answered while AMI was away", len(learnt))
        return {leg_id: ms for leg_id, ms in learnt.items() if ms}

    # ---------------------------------------------------------------- authorization (one AGI session)

    def _authorize_session(self, session: AgiSession, env: AgiEnvironment) -> None:
        script = env.script
        leg_id = env.get("agi_uniqueid").strip()
        if script != AGI_SCRIPT:
            self._refuse(session, env, f"unknown AGI script {script!r} (the dialplan must call "
                                       f"agi://host:port/{AGI_SCRIPT})")
            return
        if not leg_id:
            self._refuse(session, env, "the AGI environment has no agi_uniqueid")
            return
        if not self.settings.authorize_without_ami and not self.ami.connected:
            self.stats.refused_requests += 1
            log.error("call of channel %s refused: AMI %s is not connected (%s), the call could not be billed",
                      env.get("agi_channel") or "?", self.settings.ami.address, self.ami.last_error or "connecting")
            self._set(session, leg_id, [(VAR_REASON, REASON_UNSUPERVISED), (VAR_CAUSE, 41), (VAR_DECISION, "deny")])
            return
        request = authorize_request(env, self.clock.now_ms())
        decision = self._decide(request)
        self._answer(session, request, decision)
        if (decision.allowed and not self.settings.authorize_without_ami and not self._call_events_seen
                and "read:call" not in self._missing_rights):
            self._rights_checks.add(gevent.spawn_later(RIGHTS_CHECK_DELAY_S, self._check_events_arrive, leg_id))

    def _check_events_arrive(self, leg_id: str) -> None:
        """An allowed call whose caller leg never showed on AMI: the user cannot read call events.
        One whose leg did show proves the right for this connection: no more checks until it drops."""
        if "read:call" in self._missing_rights or not self.ami.connected:
            return
        if self.translator.known(leg_id):
            self._call_events_seen = True
            return
        self._missing_rights.add("read:call")
        log.error("Asterisk sent no AMI event for channel %s, which the agent just authorized: the AMI user %r "
                  "needs 'read = call' (dialplan/asterisk/manager_billing.conf); without it no answer or hangup "
                  "is seen and calls are not billed", leg_id, self.settings.ami.username)

    def _decide(self, request: AuthorizeRequest) -> AuthorizeDecision:
        self.stats.authorizations += 1
        holding = self.held.hold(request.leg_id)  # False: a second AGI of this leg is already deciding
        try:
            if not self._authorize_slots.acquire(timeout=self.settings.agi_command_timeout_s):
                return AuthorizeDecision(False, "", reason=DenyReason.STORE_UNAVAILABLE,
                                         detail=f"{self.settings.authorize_concurrency} authorizations already "
                                                f"running for {self.settings.agi_command_timeout_s}s")
            try:
                with CALL_PATH.authorizing():  # the MSet is written right after, without a switch
                    return self.engine.authorize(request)
            finally:
                self._authorize_slots.release()
        except Exception as exc:  # the engine must not raise; if it does, the call is refused
            log.exception("engine.authorize failed for leg %s", request.leg_id)
            return AuthorizeDecision(False, "", reason=DenyReason.STORE_UNAVAILABLE, detail=f"agent error: {exc}")
        finally:
            if holding:
                self.held.release(request.leg_id)

    def _answer(self, session: AgiSession, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        if decision.allowed:
            values: list[tuple[str, str | int]] = [(VAR_LIMIT_MS, decision.limit_ms),
                                                   (VAR_BACKSTOP_MS, max(1, decision.pbx_backstop_ms))]
            if 0 < decision.warning_ms < decision.limit_ms:
                values.append((VAR_WARN_MS, decision.warning_ms))
            if decision.routes:  # the carriers in order: the shipped dialplan tries each in turn
                values.append((VAR_ROUTES, len(decision.routes)))
                values += [(VAR_ROUTE.format(n), trunk) for n, trunk in enumerate(decision.routes, start=1)]
            self._set(session, request.leg_id, [*values, (VAR_DECISION, "allow")])
            return
        reason = str(decision.reason or DenyReason.BAD_REQUEST)
        cause = DENY_CAUSES.get(decision.reason, 21) if decision.reason else 21
        self._set(session, request.leg_id, [(VAR_REASON, reason), (VAR_CAUSE, cause), (VAR_DECISION, "deny")])

    def _set(self, session: AgiSession, leg_id: str, values: list[tuple[str, str | int]]) -> None:
        """The decision's variables in one ``EXEC MSet`` (``BILLING_DECISION`` last), the
        session's last command: our side of the stream ends with it, so Asterisk goes on with
        the dialplan as soon as it has run it. A refused MSet (an Asterisk without it) leaves no
        decision, and the dialplan refuses the call (fail closed)."""
        try:
            command = exec_mset(values)
        except UnsafeValue as exc:
            log.error("leg %s: %s; refusing the call", leg_id, exc)
            return
        reply = session.last_command(command)
        if reply.ok and reply.result is not None and reply.result >= 0:
            return
        self.stats.mset_refused += 1
        log.error("leg %s: EXEC MSet answered %r: the decision did not land and the dialplan refuses the call "
                  "(this Asterisk runs no MSet application?)", leg_id, reply.text)

    def _refuse(self, session: AgiSession, env: AgiEnvironment, why: str) -> None:
        self.stats.refused_requests += 1
        log.error("FastAGI request of channel %s refused: %s", env.get("agi_channel") or "?", why)
        self._set(session, env.get("agi_uniqueid") or "?",
                  [(VAR_REASON, str(DenyReason.BAD_REQUEST)), (VAR_CAUSE, 21), (VAR_DECISION, "deny")])


def _known(value: str) -> str:
    return "" if value.strip() in ("", "unknown") else value.strip()


def authorize_request(env: AgiEnvironment, now_ms: int, sip_call_id: str = "") -> AuthorizeRequest:
    """The request of one FastAGI session. The account is the first AGI argument when given
    (``AGI(agi://agent/authorize,${CHANNEL(accountcode)})``), else the channel's account code."""
    account = (env.args[0] if env.args else "").strip() or env.get("agi_accountcode").strip()
    leg_id = env.get("agi_uniqueid").strip()
    return AuthorizeRequest(
        pbx=PBX, leg_id=leg_id, account_id=account, destination=_known(env.get("agi_extension")),
        at_ms=now_ms, caller=_known(env.get("agi_callerid")), channel=env.get("agi_channel"),
        sip_call_id=sip_call_id, group_id=leg_id,
    )


def _epoch_ms(value: str) -> int:
    """``1795884213.123456`` (CDR(answer,u)) as epoch ms; 0 for empty, zero or junk."""
    try:
        seconds = Decimal(value.strip())
    except ArithmeticError:
        return 0
    return int(seconds * 1000) if seconds.is_finite() and seconds > 0 else 0
