"""The call session engine on gevent: the ``CallEngine`` the switch adapters drive.

One loop greenlet owns the pure :class:`CallRegistry`: it applies leg events, fires timers and
applies store results, in order, so no lock is needed. Everything that waits (the balance
store, the switch, the CDR sink) runs in an owned pool of worker greenlets, each with a
deadline, and reports back to the loop through its inbox. Nibbles that fall due together are
sent to the store as one batch (one pipeline on Redis).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.pool
import gevent.queue

from agent.core.balance import LiveCall
from agent.core.events import (
    ArmBackstop,
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    Direction,
    HangupLeg,
    LegEvent,
    LiveLeg,
    PbxConnected,
    WarnLeg,
)
from agent.core.registry import CallRegistry
from agent.core.session import (
    Alert,
    Command,
    Effect,
    Finished,
    NibbleStep,
    RatingRefused,
    ReleaseStep,
    SessionSettings,
    SettleStep,
)
from agent.ports import Clock, Rater, Switch
from agent.services.authorize import StoreAuthorization, decide
from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

CALL_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@-]")
SETTLE_RETRY_MAX_S = 30.0


class DeadlineExceeded(Exception):
    """A store or switch call ran past its deadline (raised by our own gevent.Timeout, so an
    outer timeout of the caller is never mistaken for it)."""


@dataclass(frozen=True, slots=True)
class StoreNibble:
    granted_micros: int
    debited_micros: int
    ok: bool = True


class EngineStore(Protocol):
    """The balance-store operations the engine needs, in money terms (see services/store_port.py
    for the adapter from the BalanceStore port)."""

    def authorize(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                  now_ms: int) -> StoreAuthorization: ...

    def nibbles(self, steps: list[NibbleStep], now_ms: int) -> list[StoreNibble]: ...

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int) -> None: ...

    def release(self, call_id: str, seq: int, now_ms: int) -> None: ...


class CdrSubmit(Protocol):
    def submit(self, record: Any) -> None: ...


@dataclass(frozen=True)
class EngineSettings:
    node: str
    nibble_seconds: int = 6
    warning_seconds: int = 0
    hangup_verify_ms: int = 3_000
    store_timeout_s: float = 0.25
    switch_timeout_s: float = 5.0
    worker_pool_size: int = 256
    max_call_seconds: int = 14_400  # no call is authorized for longer, whatever the balance
    nibble_chunk: int = 250  # nibbles per store round trip (Redis pipeline, SQL transactions)
    reservation_ttl_ms: int = 30_000  # as the store adapter renews them (adoption dates nibbles by it)


@dataclass(frozen=True, slots=True)
class _NibbleResults:
    steps: list[NibbleStep]
    results: list[StoreNibble]


@dataclass(frozen=True, slots=True)
class _Settled:
    call_id: str
    cost_micros: int | None


@dataclass(frozen=True, slots=True)
class _OperatorCut:
    call_id: str
    reason: str


_Internal = _NibbleResults | _Settled | _OperatorCut


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
        )
        self._inbox: gevent.queue.Queue[LegEvent | _Internal] = gevent.queue.Queue()
        self._wake = gevent.event.Event()
        self._group = gevent.pool.Group()
        self._workers = gevent.pool.Pool(settings.worker_pool_size)
        self._accepting = True
        self._running = False
        self._nibble_batch: list[NibbleStep] = []
        self.on_finished: list[Callable[[Any], None]] = []
        self.lateness_samples: list[int] | None = None  # benchmarks set a list to get raw samples
        # Open reservations an earlier run of this node left (the daemon fills it at start); a
        # resync that shows their legs live on the PBX adopts them (agent restart, hand-over).
        self.adoptable: dict[str, LiveCall] = {}

    # ---------------------------------------------------------------- lifecycle

    def add_switch(self, switch: Switch) -> None:
        self.switches[switch.name] = switch

    def start(self) -> None:
        self._running = True
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
        self._workers.join(timeout=timeout_s)
        self._workers.kill(timeout=1)
        self._group.kill(timeout=timeout_s)

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
        log.info("authorize call=%s account=%s dest=%s node=%s allowed=%s limit_ms=%d reason=%s %s",
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

    # ---------------------------------------------------------------- authorization

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
            effects = self.registry.adopt(
                call_id=call_id, node=self.settings.node, pbx=event.pbx, account_id=held.account_id, a_leg=a_leg,
                others=others, tariff=rated.tariff, rating=rated.info, settings=self.session_settings,
                debited_micros=held.debited_micros, reserved_micros=held.reserved_micros, seq=held.seq,
                now_ms=now_ms, last_renewal_ms=held.expires_ms - self.settings.reservation_ttl_ms)
            self.metrics.live_calls.set(self.registry.live_count())
            log.warning("adopted call=%s account=%s dest=%s from an earlier run: %d legs live, %d micro-units "
                        "already debited", call_id, held.account_id, a_leg.callee, 1 + len(others),
                        held.debited_micros)
            self._run_effects(effects)

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

        def store_authorize(account_id: str, want: int, minimum: int) -> StoreAuthorization:
            try:
                with gevent.Timeout(self.settings.store_timeout_s, DeadlineExceeded):
                    return self.store.authorize(account_id, call_id, want, minimum, now_ms)
            except DeadlineExceeded:
                return StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE,
                                          detail=f"balance store did not answer within "
                                                 f"{self.settings.store_timeout_s}s")
            except Exception as exc:  # a store that is down denies the call (fail closed), never hangs it
                log.error("balance store failed during authorize of %s: %s", call_id, exc, exc_info=True)
                return StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE,
                                          detail=f"balance store error: {exc}")

        outcome = decide(request, call_id=call_id, node=self.settings.node, rater=self.rater,
                         store_authorize=store_authorize, settings=self.session_settings,
                         max_call_seconds=self.settings.max_call_seconds, now_ms=now_ms)
        if outcome.release_reservation:
            self._spawn(self._release_quietly, call_id)
        if outcome.session is not None:
            self._run_effects(self.registry.add(outcome.session))
            self.metrics.live_calls.set(self.registry.live_count())
            self._wake.set()
        return outcome.decision

    def _release_quietly(self, call_id: str) -> None:
        try:
            with gevent.Timeout(self.settings.store_timeout_s * 4, DeadlineExceeded):
                self.store.release(call_id, 1, self.clock.now_ms())
        except Exception:  # the reservation expires by itself
            log.warning("release of %s failed; its reservation will expire", call_id, exc_info=True)

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while self._running:
            next_ms = self.registry.next_timer_ms()
            wait_s = 0.5 if next_ms is None else max(0.0, (next_ms - self.clock.now_ms()) / 1000)
            try:
                item = self._inbox.get(timeout=min(wait_s, 0.5))
            except gevent.queue.Empty:
                item = None
            if item is not None:
                self._apply(item)
                while not self._inbox.empty():
                    self._apply(self._inbox.get_nowait())
            now_ms = self.clock.now_ms()
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
                session = self.registry.sessions.get(step.call_id)
                if session is None:
                    continue
                if trace:
                    log.debug("nibble call=%s account=%s seq=%d debit_micros=%d granted_micros=%d ok=%s node=%s",
                              step.call_id, session.account_id, step.seq, step.debit_micros, result.granted_micros,
                              result.ok, self.settings.node)
                if result.ok and step.debit_micros:
                    self.metrics.nibble_debits.inc()
                effects = session.on_nibble_result(step.seq, result.granted_micros, result.debited_micros,
                                                   now_ms, store_ok=result.ok)
                self._run_effects(self.registry.schedule(effects))
            return
        if isinstance(item, _OperatorCut):
            session = self.registry.sessions.get(item.call_id)
            if session is not None:
                log.info("operator cut call=%s account=%s reason=%s", item.call_id, session.account_id, item.reason)
                self._run_effects(self.registry.schedule(session.operator_cut(self.clock.now_ms(), item.reason)))
            return
        if isinstance(item, _Settled):
            session = self.registry.sessions.get(item.call_id)
            if session is not None:
                self._run_effects(session.on_settled(self.clock.now_ms(), item.cost_micros))
            return
        if isinstance(item, PbxConnected) and self.adoptable:
            self._adopt(item)
        before = self.registry.stats.unknown_events
        self._run_effects(self.registry.feed(item))
        if self.registry.stats.unknown_events != before:
            self.metrics.unknown_events.inc()

    # ---------------------------------------------------------------- effects

    def _run_effects(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, NibbleStep):
                self._nibble_batch.append(effect)
            elif isinstance(effect, SettleStep):
                self._spawn(self._settle, effect)
            elif isinstance(effect, ReleaseStep):
                self._spawn(self._release, effect)
            elif isinstance(effect, Command):
                self._spawn(self._command, effect)
            elif isinstance(effect, Alert):
                self._alert(effect)
            elif isinstance(effect, Finished):
                self._finished(effect)

    def _spawn(self, func: Callable[..., None], *args: Any) -> None:
        greenlet = self._workers.spawn(func, *args)
        greenlet.link_exception(self._worker_failed)

    @staticmethod
    def _worker_failed(greenlet: gevent.Greenlet[Any, Any]) -> None:
        log.error("engine worker failed: %r", greenlet.exception)

    def _flush_nibbles(self) -> None:
        if not self._nibble_batch:
            return
        batch, self._nibble_batch = self._nibble_batch, []
        # Chunks, each with its own deadline: a store that takes a while per step (the embedded
        # SQL store does one transaction per nibble) must not fail a whole second's nibbles of
        # thousands of calls, which would cut them all at the end of their slice.
        chunk = self.settings.nibble_chunk
        for start in range(0, len(batch), chunk):
            self._spawn(self._run_nibbles, batch[start:start + chunk])

    def _run_nibbles(self, steps: list[NibbleStep]) -> None:
        try:
            with gevent.Timeout(self.settings.store_timeout_s * 4, DeadlineExceeded):
                results = self.store.nibbles(steps, self.clock.now_ms())
        except Exception:  # fail closed: no new money
            log.error("nibble batch of %d calls failed; cutting them at the end of their slice",
                      len(steps), exc_info=True)
            results = [StoreNibble(0, 0, ok=False) for _ in steps]
        self._inbox.put_nowait(_NibbleResults(steps, results))

    def _settle(self, step: SettleStep) -> None:
        delay = 0.2
        while True:
            try:
                with gevent.Timeout(self.settings.store_timeout_s * 8, DeadlineExceeded):
                    self.store.settle(step.call_id, step.seq, step.cost_micros, self.clock.now_ms())
                break
            except Exception:  # retried: the money must be settled
                self.metrics.settle_retries.inc()
                log.error("settle of %s (%d micro-units) failed; retrying in %.1fs", step.call_id,
                          step.cost_micros, delay, exc_info=True)
                if not self._running:
                    return  # shutdown: the reservation's expiry settles what was debited
                gevent.sleep(delay)
                delay = min(delay * 2, SETTLE_RETRY_MAX_S)
        self._inbox.put_nowait(_Settled(step.call_id, step.cost_micros))

    def _release(self, step: ReleaseStep) -> None:
        self._release_quietly(step.call_id)
        self._inbox.put_nowait(_Settled(step.call_id, 0))

    def _command(self, effect: Command) -> None:
        session = self.registry.sessions.get(effect.call_id)
        switch = self.switches.get(session.pbx) if session is not None else None
        if switch is None:
            log.error("no %s switch to carry %s for call %s", session.pbx if session else "?", effect.command,
                      effect.call_id)
            return
        command = effect.command
        try:
            with gevent.Timeout(self.settings.switch_timeout_s, DeadlineExceeded):
                if isinstance(command, HangupLeg):
                    if not command.escalate:
                        self.metrics.cutoffs.inc()
                    log.info("cut call=%s account=%s leg=%s escalate=%s reason=%s node=%s", effect.call_id,
                             session.account_id if session else "?", command.leg_id, command.escalate,
                             command.reason, self.settings.node)
                    switch.hangup(command.leg_id, command.cause, escalate=command.escalate)
                elif isinstance(command, WarnLeg):
                    switch.warn(command.leg_id, command.seconds_left)
                elif isinstance(command, ArmBackstop):
                    switch.arm_backstop(command.leg_id, command.at_ms, command.caller_leg_id)
        except Exception:  # verification escalates if it mattered
            log.warning("switch command %s for call %s failed", command, effect.call_id, exc_info=True)

    def _alert(self, alert: Alert) -> None:
        self.metrics.alerts.labels(alert.kind).inc()
        if alert.kind == "hangup_not_confirmed":
            self.metrics.failed_cutoffs.inc()
        log.error("ALERT %s call=%s: %s", alert.kind, alert.call_id, alert.detail)

    def _finished(self, effect: Finished) -> None:
        record = effect.record
        self.registry.remove(record.call_id)
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


def _same_call(leg: LiveLeg, a_leg: LiveLeg) -> bool:
    if a_leg.leg_id in (leg.parent_leg_id, leg.bridged_to):
        return True
    return bool(a_leg.group_id) and leg.group_id == a_leg.group_id
