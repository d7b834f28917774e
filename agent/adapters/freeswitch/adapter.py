"""FreeSWITCH switch adapter: authorization, supervision, cut-off.

Authorization, two ways into the same decision:

* **The outbound socket** (the shipped billing.xml): the dialplan runs ``socket`` (synchronous,
  ``full``) to the agent's authorize port; the agent writes ``connect`` from the accept
  callback itself, reads the channel's data, decides, sends one ``api uuid_setvar_multi``
  (an allowed call: ``billing_refusal`` cleared, the limit and the caller's ceiling; a refused
  one: the decision, the reason and the cause) and ends its side of the stream; FreeSWITCH
  goes on with the same extension at once: it dials when ``billing_refusal`` is empty, else it
  transfers the call back into the context to be refused. Then, over the event socket, the
  caller's ceiling replaces the dialplan's 10 s guard. One pass through the dialplan (each
  application and each transfer costs FreeSWITCH events carrying every channel variable:
  post-dial delay, issue 13). A channel from an older billing.xml (no ``billing_refusal``) gets
  ``billing_decision=allow`` and is dialled by that dialplan's second pass. An agent that cannot
  be reached leaves the refusal in place: the dialplan refuses the call (fail closed).
* **Park and resume** (CGRateS' way; dialplans that park): the agent authorizes on
  CHANNEL_PARK and resumes the call with ``uuid_transfer``. It costs a parked channel's wake-up:
  ``switch_ivr_park`` of a channel without media sleeps 20 ms between looks at its messages
  (switch_ivr.c), which was +22 ms p50, +38 ms p99 of post-dial delay on FreeSWITCH 1.11.1.
  After a reconnect the resync finds the calls still parked and authorizes them.

One inbound socket carries the supervision (B legs, hangups, resync) either way.

The flow for a CHANNEL_PARK of the billing dialplan (``billing_destination`` set, no decision):
``engine.authorize`` → in one round trip, ``uuid_setvar_multi`` (decision, call id, limit,
backstop), ``sched_hangup +(backstop + ring allowance)`` on the A leg (the absolute ceiling) and
``uuid_transfer`` back into the billing context, whose dial extension (README.md, the parking
dialplan) puts ``execute_on_answer='sched_hangup +<backstop>'`` on every B leg: the PBX cuts
the call at the B answer + the limit even if the agent dies. A refusal sets the decision, the
reason and a Q.850 cause, and transfers to the refusal extension (a plain ``uuid_kill`` with the
cause if that fails).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
import gevent.event
import gevent.pool
from gevent import socket
from gevent.server import StreamServer

from agent.adapters.freeswitch import commands
from agent.adapters.freeswitch.esl import EslClient, EslSettings
from agent.adapters.freeswitch.esl_protocol import (
    EslError,
    Event,
    FrameReader,
    FramingError,
    encode_command,
    parse_event,
)
from agent.adapters.freeswitch.translate import (
    PBX,
    SUBSCRIBED_EVENTS,
    VAR_DECISION,
    VAR_REFUSAL,
    VAR_TRUNK,
    EventTranslator,
    authorize_request,
    awaiting_authorization,
    parked_for_billing,
    variable,
)
from agent.adapters.legs import HeldEvents
from agent.adapters.listener import serve_tcp
from agent.adapters.pbx_cdr import parse_columns, read_ended_calls, reread_later
from agent.core.events import (
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    LegEvent,
    LegHungUp,
    PbxConnected,
    PbxDisconnected,
)
from agent.ports import CallEngine, Clock
from agent.services.call_path import CALL_PATH
from agent.services.clock import SystemClock

log = logging.getLogger(__name__)

VANISHED_CAUSE = "NO_SUCH_CHANNEL"  # FreeSWITCH no longer knows the leg and we missed its hangup
MAX_AUTHORIZATIONS_PER_LEG = 3  # a resync may ask again; more means a loop between us and the dialplan
MAX_TRACKED_ATTEMPTS = 100_000
CONNECT = encode_command("connect")
MAX_CHANNEL_DATA_BYTES = 256 * 1024  # the reply to connect: every channel variable (about 7 kB)
# What the dialplan does not wait for (the decision's variables for the CDR template, the
# caller's ceiling in place of billing.xml's guard) goes this long after the decision, once
# FreeSWITCH has dialled (about 2 ms after the end of our stream on the real 1.11.1). Sent at
# once, its api commands ran in FreeSWITCH's event-socket thread while the channel's thread set
# up the bridge, on the same cores (bench/bench_realpbx.py, 400 calls at 20/s, PostgreSQL + Redis,
# alternated, medians of the sets: added p50 4.26 -> 4.10 ms, p99 5.68 -> 5.37; small, inside a
# shared 2-core machine's noise, and free).
INFORMATIVE_DELAY_S = 0.02


class SwitchCommandError(Exception):
    """FreeSWITCH refused a command (the reply names why)."""


@dataclass(frozen=True)
class FreeswitchSettings:
    esl: EslSettings = field(default_factory=EslSettings)
    context: str = "billing-outbound"  # the dialplan context of dialplan/freeswitch/billing.xml
    ring_allowance_s: int = 120  # A-leg ceiling = backstop + this (ringing, gateway failover)
    warning_sound: str = "tone_stream://%(200,100,800);loops=3"
    warning_legs: str = "aleg"  # only the payer hears it
    authorize_concurrency: int = 512
    resync_batch: int = 50  # uuid_dump commands pipelined per round trip
    authorize_host: str = "127.0.0.1"  # the outbound-socket listener of billing.xml's socket app
    authorize_port: int | None = None  # None: no listener (a dialplan that parks calls); 0: any free port
    cdr_file: str = ""  # mod_cdr_csv's file of the shipped template (agent.adapters.pbx_cdr); "": none
    cdr_columns: tuple[int, int, int] = (0, 1, 2)  # 0-based: the caller's leg id, the answer, the end

    @classmethod
    def from_config(cls, config: Any) -> FreeswitchSettings:
        """From the ``freeswitch`` section of agent.yaml (agent.config.FreeswitchConfig)."""
        timeout = float(getattr(config, "command_timeout_seconds", 5.0))
        return cls(esl=EslSettings(host=config.host, port=int(config.port), password=config.password,
                                   command_timeout_s=timeout),
                   authorize_host=str(getattr(config, "authorize_host", "127.0.0.1")),
                   authorize_port=int(getattr(config, "authorize_port", 8084)) or None,
                   cdr_file=str(getattr(config, "cdr_file", "") or ""),
                   cdr_columns=parse_columns(str(getattr(config, "cdr_columns", "1,2,3"))))


@dataclass
class AdapterStats:
    events: int = 0
    bad_events: int = 0  # events with a decoding problem (logged with the header at fault)
    frame_errors: int = 0  # broken framing (wrong Content-Length...): the connection was reset
    authorizations: int = 0
    resyncs: int = 0
    vanished_legs: int = 0
    backstops_armed: int = 0


class FreeswitchAdapter:
    """Implements the ``Switch`` port (agent/ports.py) and drives a ``CallEngine``."""

    name = PBX

    def __init__(self, engine: CallEngine, settings: FreeswitchSettings | None = None, *,
                 clock: Clock | None = None) -> None:
        self.engine = engine
        self.settings = settings or FreeswitchSettings()
        self.clock = clock or SystemClock()
        self.translator = EventTranslator()
        self.stats = AdapterStats()
        self.synced = gevent.event.Event()  # set after each successful resync
        self.last_disconnect = ""  # why the last connection ended (health checks, logs)
        self.client = EslClient(
            replace(self.settings.esl, events=SUBSCRIBED_EVENTS), on_event=self._on_event,
            on_connected=self._resync, on_disconnected=self._on_disconnected, on_frame_error=self._on_frame_error)
        self._auth_pool = gevent.pool.Pool(self.settings.authorize_concurrency)
        self._cdr_rereads = gevent.pool.Group()  # the PBX CDR file read again after a resync
        self.held = HeldEvents(self.engine.on_event)  # a caller's events while its call is authorized
        self._attempts: OrderedDict[str, int] = OrderedDict()  # A leg -> authorizations started
        self._authorize_server: StreamServer | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def authorize_port(self) -> int:
        server = self._authorize_server
        return int(server.server_port) if server is not None else (self.settings.authorize_port or 0)

    def start(self) -> None:
        """Bind the authorize port now (``OSError`` if it is taken); the event socket connects
        in the background."""
        if self.settings.authorize_port is not None:
            self._listen(self.settings.authorize_port)
        self.client.start()

    def _listen(self, port: int) -> None:
        host = self.settings.authorize_host
        self._authorize_server = serve_tcp(host, port, self._socket_session, self._auth_pool,
                                           server_class=AuthorizeServer)
        log.info("FreeSWITCH authorize socket listening on %s:%d", host, self.authorize_port)

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._authorize_server is not None:
            self._authorize_server.close()
            self._authorize_server = None
        self.client.stop(timeout_s)
        self._auth_pool.kill(timeout=timeout_s)
        self._cdr_rereads.kill(timeout=timeout_s)

    # ---------------------------------------------------------------- Switch port

    def connected(self) -> bool:
        return self.client.connected

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        """``uuid_kill``; escalated: again, then ``hupall`` of every leg sharing the call's
        ``call_uuid`` (B legs the agent never saw included). The engine verifies through the
        leg's hangup event; a leg FreeSWITCH no longer knows is reported as ended."""
        kill = commands.uuid_kill(leg_id, cause)
        group = self.translator.group_of(leg_id) or leg_id
        if escalate:
            reply, everything = self.client.api_many([kill, commands.hupall_call(cause, group)])
            log.warning("escalated hangup of leg %s: uuid_kill: %s; hupall call_uuid=%s: %s", leg_id,
                        commands.first_line(reply), group, commands.first_line(everything))
        else:
            reply = self.client.api(kill)
        if commands.is_no_such_channel(reply):
            self._vanished(leg_id)
        elif not commands.is_ok(reply):
            raise SwitchCommandError(f"uuid_kill {leg_id} {cause}: {commands.first_line(reply)}")

    def arm_backstop(self, leg_id: str, at_ms: int, caller_leg_id: str = "") -> None:
        """Move the backstop: ``sched_del`` the leg's scheduled hangup, ``sched_hangup`` it at the
        epoch second at or after ``at_ms`` (and the caller's ceiling a second later while it is
        up), in one round trip. ``sched_del`` takes the channel's tasks as a group: the only ones the
        billing dialplan schedules on these channels are these hangups."""
        epoch_s = commands.epoch_second_at_or_after(at_ms)
        batch = [commands.sched_del(leg_id), commands.sched_hangup_at(leg_id, epoch_s)]
        if caller_leg_id:  # a second later: the billed leg is the one the backstop ends (ALLOTTED_TIMEOUT)
            batch += [commands.sched_del(caller_leg_id), commands.sched_hangup_at(caller_leg_id, epoch_s + 1)]
        replies = self.client.api_many(batch)
        armed = replies[1]
        if commands.is_ok(armed):
            self.stats.backstops_armed += 1
            return
        if commands.is_no_such_channel(armed):
            self._vanished(leg_id)
            return
        raise SwitchCommandError(f"sched_hangup {epoch_s} {leg_id}: {commands.first_line(armed)}")

    def warn(self, leg_id: str, seconds_left: int) -> None:
        reply = self.client.api(commands.broadcast(leg_id, self.settings.warning_sound, self.settings.warning_legs))
        if not commands.is_ok(reply):
            log.warning("low-balance warning on leg %s (%d s left) not played: %s", leg_id, seconds_left,
                        commands.first_line(reply))

    # ---------------------------------------------------------------- events

    def _on_event(self, event: Event) -> None:
        """greenswitch's dispatch greenlet: translate and hand over; never block."""
        self.stats.events += 1
        for leg_event in self.translator.translate(event, self.clock.now_ms()):
            self._emit(leg_event)
        if event.name == "CHANNEL_PARK" and awaiting_authorization(event):
            self._start_authorization(event)
        if event.problems:  # headers are decoded when read: the problems of the ones we used
            self.stats.bad_events += 1
            log.warning("FreeSWITCH event %s of channel %s: %s", event.name or "?", event.get("Unique-ID") or "?",
                        "; ".join(event.problems))

    def _emit(self, leg_event: LegEvent) -> None:
        self.held.emit(leg_event)

    def _on_frame_error(self, reason: str) -> None:
        self.stats.frame_errors += 1
        log.error("%s; resetting the connection and resynchronising", reason)

    def _on_disconnected(self, reason: str) -> None:
        self.last_disconnect = reason
        self.synced.clear()
        self.engine.on_event(PbxDisconnected(PBX, self.clock.now_ms()))

    # ---------------------------------------------------------------- authorization

    def _socket_session(self, sock: socket.socket, peer: tuple[object, int]) -> None:
        """One call's authorization over the outbound socket of billing.xml's ``socket`` app:
        ``connect`` (written by :class:`AuthorizeServer` when it accepted the connection), its
        channel data, the decision's ``api`` command and the end of our stream (FreeSWITCH then
        goes on with the dialplan), its reply, close."""
        address, connect_sent = peer
        leg_id = ""
        try:
            # The call path from the connection on (agent/services/call_path.py): background
            # work that would start while FreeSWITCH sends the channel data steps aside too.
            with CALL_PATH.authorizing():
                with gevent.Timeout(self.settings.esl.command_timeout_s,
                                    EslError("FreeSWITCH sent no channel data")):
                    if connect_sent < len(CONNECT):
                        sock.sendall(CONNECT[connect_sent:])
                    event = _read_channel_data(sock)
                leg_id = event.get("Unique-ID")
                if not leg_id or not awaiting_authorization(event):
                    log.error("FreeSWITCH authorize socket from %s: channel %r is not waiting for a billing decision "
                              "(billing_destination unset or a decision already set)", address, leg_id or "?")
                    return
                if not self.held.hold(leg_id):
                    return  # a second connection for the same leg: the first decides
                request = authorize_request(event, self.clock.now_ms())
                decision = self._decide(request)  # the command is written right after, without a switch
                one_pass = bool(variable(event, VAR_REFUSAL))
                steps, informative = self._decision_commands(request, decision, one_pass=one_pass)
                with gevent.Timeout(self.settings.esl.command_timeout_s, EslError("no reply to the decision")):
                    sock.sendall(b"".join(encode_command(f"api {step}") for step in steps))
                    # Half-close at once: FreeSWITCH runs the commands, writes the replies, reads
                    # the end of the stream and goes on with the dialplan, without waiting for this
                    # greenlet to be scheduled, read the replies and close (post-dial delay, issue
                    # 13). The replies are still read below, for the log.
                    sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(self.settings.esl.command_timeout_s, EslError("no reply to the decision")):
                replies = _read_frames(sock, FrameReader(), len(steps))
            for command, reply in zip(steps, replies, strict=True):
                if not commands.is_ok(reply.text()):  # the variables did not land: the dialplan refuses
                    log.error("leg %s: %s answered %s", leg_id, command.split(" ", 1)[0],
                              commands.first_line(reply.text()))
            sock.close()
            if informative:
                gevent.sleep(INFORMATIVE_DELAY_S)  # off the post-dial path (see INFORMATIVE_DELAY_S)
            self._set_informative(leg_id, informative)
        except (EslError, FramingError, OSError, commands.UnsafeValue) as exc:
            log.error("FreeSWITCH authorize socket, leg %s: %s (the dialplan refuses the call: no decision)",
                      leg_id or "?", exc)
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _decide(self, request: AuthorizeRequest) -> AuthorizeDecision:
        """The engine's decision; the leg's events held meanwhile are released after it."""
        self.stats.authorizations += 1
        try:
            with CALL_PATH.authorizing():
                return self.engine.authorize(request)
        except Exception as exc:  # the engine must not raise; if it does, the call is refused
            log.exception("engine.authorize failed for leg %s", request.leg_id)
            return AuthorizeDecision(False, "", reason=DenyReason.STORE_UNAVAILABLE, detail=f"agent error: {exc}")
        finally:
            self.held.release(request.leg_id)

    def _decision_commands(self, request: AuthorizeRequest, decision: AuthorizeDecision, *,
                           one_pass: bool = False) -> tuple[list[str], list[str]]:
        """The variables the dialplan reads, in one command over the authorize socket, and
        those it does not read (for the admin's CDR template and logs), sent afterwards over
        the event socket. FreeSWITCH reads an outbound socket a byte at a time with a poll and
        a sched_yield after each (mod_event_socket's read_packet), so every byte sent before the
        dialplan can go on is post-dial delay.

        ``one_pass``: the channel came from a billing.xml that dials in the same pass as it
        asked, once ``billing_refusal`` is cleared; ``billing_decision`` stays empty, so that a
        later pass through the context (a transfer of the caller's leg) asks again. Otherwise
        (a parked call, an older billing.xml) ``billing_decision=allow`` lets the dial extension
        of the next pass dial.

        One pass, allowed: the caller's ceiling replaces billing.xml's 10 s guard from here
        (``sched_del`` + ``sched_hangup +ceiling``), over the event socket after the decision
        while it is up, over the authorize socket when it is not. In the dialplan these were two
        applications between the decision and the bridge (0.37 ms of post-dial delay on
        FreeSWITCH 1.11.1: every application costs two events with every channel variable); on
        the authorize socket, ~120 more bytes FreeSWITCH reads one at a time (0.16 ms).
        ``billing_ceiling_s`` is still set: an older billing.xml schedules it itself (it would
        hang up at once on an empty one)."""
        leg_id = request.leg_id
        if decision.allowed:
            backstop_s = commands.backstop_seconds(decision.pbx_backstop_ms)
            ceiling_s = backstop_s + self.settings.ring_allowance_s
            verdict = {VAR_REFUSAL: ""} if one_pass else {VAR_DECISION: "allow"}
            if decision.routes:  # the carriers in order, as billing.xml's bridge reads them
                verdict[VAR_TRUNK] = commands.failover_trunk(decision.routes, request.destination)
            critical = [commands.setvar_multi(leg_id, {
                **verdict, "billing_backstop_s": str(backstop_s), "billing_ceiling_s": str(ceiling_s)})]
            informative = [commands.setvar_multi(leg_id, {"billing_call_id": decision.call_id,
                                                          "billing_limit_ms": str(decision.limit_ms)})]
            if one_pass:
                ceiling = [commands.sched_del(leg_id), commands.sched_hangup(leg_id, ceiling_s)]
                if self.client.connected:
                    informative += ceiling
                else:
                    critical += ceiling
            return critical, informative
        reason = str(decision.reason or DenyReason.BAD_REQUEST)
        return ([commands.setvar_multi(leg_id, {
            VAR_DECISION: "deny", "billing_reason": reason,
            "billing_hangup_cause": commands.deny_cause(decision), "billing_detail": decision.detail or reason})], [])

    def _set_informative(self, leg_id: str, steps: list[str]) -> None:
        """What the dialplan does not wait for, once FreeSWITCH went on: the decision's
        variables for the CDR template and logs, and (one pass) the caller's ceiling in place of
        billing.xml's guard."""
        if not steps:
            return
        try:
            for command, reply in zip(steps, self.client.api_many(steps), strict=True):
                if not commands.is_ok(reply):
                    log.warning("leg %s: %s answered %s", leg_id, command.split(" ", 1)[0], commands.first_line(reply))
        except (EslError, OSError) as exc:  # the call goes on
            guard = any(step.startswith("sched_hangup ") for step in steps)
            log.warning("leg %s: billing_call_id and billing_limit_ms not set%s: %s", leg_id,
                        "; billing.xml's 10 s guard stays until the first slice of money moves the caller's "
                        "ceiling (a call still ringing at 10 s is ended)" if guard else "", exc)

    def _start_authorization(self, event: Event) -> None:
        leg_id = event.get("Unique-ID")
        if not leg_id or leg_id in self.held:
            return  # a duplicate park (resync and event together): one decision is enough
        attempts = self._attempts.get(leg_id, 0) + 1
        self._attempts[leg_id] = attempts
        while len(self._attempts) > MAX_TRACKED_ATTEMPTS:
            self._attempts.popitem(last=False)
        if attempts > MAX_AUTHORIZATIONS_PER_LEG:  # parked again and again: something is broken
            self._auth_pool.spawn(self._kill_quietly, leg_id, "NORMAL_TEMPORARY_FAILURE",
                                  f"parked for authorization {attempts} times")
            return
        self.held.hold(leg_id)
        request = authorize_request(event, self.clock.now_ms())
        greenlet = self._auth_pool.spawn(self._authorize, request)
        greenlet.link_exception(self._authorize_failed)

    @staticmethod
    def _authorize_failed(greenlet: gevent.Greenlet[Any, Any]) -> None:
        log.error("authorization greenlet failed: %r", greenlet.exception)

    def _authorize(self, request: AuthorizeRequest) -> None:
        decision = self._decide(request)
        try:
            if decision.allowed:
                self._allow(request, decision)
            else:
                self._deny(request, decision)
        except (EslError, commands.UnsafeValue, SwitchCommandError) as exc:
            # The channel stays parked: park_timeout ends it, or the next resync decides again.
            log.error("could not apply the decision for leg %s (%s): %s", request.leg_id,
                      "allow" if decision.allowed else decision.reason, exc)

    def _allow(self, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        """One round trip: the decision, the ceiling and the transfer, pipelined. The transfer
        can only dial if the decision landed (the parking dialplan dials on
        billing_decision=allow only; otherwise the call parks again and is asked about once
        more)."""
        leg_id = request.leg_id
        try:
            transfer = commands.transfer(leg_id, request.destination, self.settings.context)
        except commands.UnsafeValue as exc:
            self._kill_refused(leg_id, "INVALID_NUMBER_FORMAT", str(exc))
            return
        critical, informative = self._decision_commands(request, decision)
        setvar, moved, *_ = self.client.api_many([*critical, transfer, *informative])
        if commands.is_no_such_channel(setvar):
            self._vanished(leg_id)
        elif not commands.is_ok(setvar):
            self._kill_refused(leg_id, "NORMAL_TEMPORARY_FAILURE", f"uuid_setvar_multi: {commands.first_line(setvar)}")
        elif not commands.is_ok(moved):
            if commands.is_no_such_channel(moved):
                self._vanished(leg_id)
            else:
                self._kill_refused(leg_id, "NORMAL_TEMPORARY_FAILURE", f"uuid_transfer: {commands.first_line(moved)}")

    def _deny(self, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        leg_id = request.leg_id
        cause = commands.deny_cause(decision)
        reason = str(decision.reason or DenyReason.BAD_REQUEST)
        reply = self.client.api(commands.setvar_multi(leg_id, {
            "billing_decision": "deny", "billing_reason": reason, "billing_hangup_cause": cause,
            "billing_detail": decision.detail or reason,
        }))
        if commands.is_no_such_channel(reply):
            self._vanished(leg_id)
            return
        if commands.is_ok(reply):
            try:
                reply = self.client.api(commands.transfer(leg_id, request.destination, self.settings.context))
            except commands.UnsafeValue as exc:
                reply = f"-ERR {exc}"
            if commands.is_ok(reply) or commands.is_no_such_channel(reply):
                return
        self._kill_refused(leg_id, cause, commands.first_line(reply))

    def _kill_quietly(self, leg_id: str, cause: str, why: str) -> None:
        try:
            self._kill_refused(leg_id, cause, why)
        except (EslError, commands.UnsafeValue) as exc:
            log.error("could not hang up leg %s: %s", leg_id, exc)

    def _kill_refused(self, leg_id: str, cause: str, why: str) -> None:
        log.error("hanging up leg %s with %s: %s", leg_id, cause, why)
        reply = self.client.api(commands.uuid_kill(leg_id, cause))
        if commands.is_no_such_channel(reply):
            self._vanished(leg_id)

    def _vanished(self, leg_id: str) -> None:
        """FreeSWITCH does not know the leg: if we never saw it end, tell the engine it did."""
        if self.translator.has_ended(leg_id):
            return
        self.stats.vanished_legs += 1
        self.translator.mark_ended(leg_id)
        self._emit(LegHungUp(leg_id, self.clock.now_ms(), cause=VANISHED_CAUSE))

    # ---------------------------------------------------------------- resync

    def _resync(self) -> None:
        """After every (re)connect: every live channel, then one PbxConnected for the engine."""
        known_before = set(self.translator.legs)
        listed_ms = self.clock.now_ms()
        listing = self.client.api("show channels as json")
        leg_ids = channel_uuids(listing)
        dumps: list[Event] = []
        batch = max(1, self.settings.resync_batch)
        for start in range(0, len(leg_ids), batch):
            chunk = leg_ids[start:start + batch]
            replies = self.client.api_many([commands.uuid_dump(leg_id) for leg_id in chunk])
            for leg_id, reply in zip(chunk, replies, strict=True):
                if reply.startswith("-ERR"):
                    continue  # ended since the listing; its hangup event is on its way
                try:
                    dumps.append(parse_event(reply.encode(), where=f"uuid_dump {leg_id}"))
                except FramingError as exc:
                    log.error("resync: %s; channel skipped", exc)
        now_ms = self.clock.now_ms()
        live, updates = self.translator.reset_live(dumps, known_before, now_ms)
        self.stats.resyncs += 1
        log.info("FreeSWITCH resync: %d live channels", len(live))
        ended = (read_ended_calls(self.settings.cdr_file, columns=self.settings.cdr_columns)
                 if self.settings.cdr_file else ())
        reread = bool(self.settings.cdr_file)
        self.engine.on_event(PbxConnected(PBX, now_ms, tuple(live), ended, listed_ms, cdr_reread=reread))
        if reread:
            reread_later(self._cdr_rereads, PBX, self.settings.cdr_file, self.settings.cdr_columns,
                         self.clock.now_ms, self.engine.on_event)
        for update in updates:
            self.engine.on_event(update)
        for dump in dumps:
            if parked_for_billing(dump):
                self._start_authorization(dump)
        self.synced.set()


def channel_uuids(listing: str) -> list[str]:
    """The uuids of ``show channels as json`` (``{"row_count": 0}`` when there are none)."""
    try:
        data = json.loads(listing)
    except ValueError as exc:
        raise EslError(f"'show channels as json' did not return JSON ({exc}): {listing[:120]!r}") from exc
    if not isinstance(data, dict):
        raise EslError(f"'show channels as json' returned {type(data).__name__}, not an object")
    uuids = []
    for row in data.get("rows") or []:
        leg_id = row.get("uuid", "") if isinstance(row, dict) else ""
        try:
            uuids.append(commands.check_uuid(leg_id))
        except commands.UnsafeValue as exc:
            log.warning("resync: %s; skipped", exc)
    return uuids


class AuthorizeServer(StreamServer):  # type: ignore[misc]  # gevent.server has no type hints
    """The authorize listener. FreeSWITCH's ``socket`` application sends nothing until the
    agent writes ``connect``: it is written here, in the accept callback, before the session's
    greenlet is scheduled (every greenlet ahead of it in the loop would be post-dial delay).
    A fresh connection's send buffer is empty, so the write cannot block the loop; what it
    does not take (never seen) the session writes."""

    def do_handle(self, *args: Any) -> None:
        sock, address = args
        sent = 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent = os.write(sock.fileno(), CONNECT)
        except OSError:
            pass  # BlockingIOError or a connection already gone: the session writes or reports it
        super().do_handle(sock, (address, sent))


def _read_channel_data(sock: socket.socket) -> Event:
    """The reply to ``connect``: one header block (``Content-Type: command/reply``, the
    channel's caller profile and every variable, URL-encoded) and an empty line, no body.
    Read into a lazy :class:`Event` at once (the agent reads a dozen of its ~180 headers)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise EslError(f"FreeSWITCH closed the authorize socket after {len(data)} bytes of channel data")
        data += chunk
        end = data.find(b"\n\n")
        if end >= 0:
            break
        if len(data) > MAX_CHANNEL_DATA_BYTES:
            raise FramingError(f"no end to FreeSWITCH's channel data within {MAX_CHANNEL_DATA_BYTES} bytes")
    event = Event(data[:end].decode("utf-8", "replace"), where="connect")
    if event.get("Content-Type") != "command/reply":
        raise FramingError(f"FreeSWITCH answered connect with {event.get('Content-Type') or 'no Content-Type'}, "
                           "not command/reply")
    return event


def _read_frames(sock: socket.socket, reader: FrameReader, count: int) -> list[Any]:
    """``count`` frames from the outbound socket (the caller holds the deadline)."""
    frames: list[Any] = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            raise EslError(f"FreeSWITCH closed the authorize socket after {len(frames)} of {count} replies")
        frames += reader.feed(data)
    return frames[:count]
