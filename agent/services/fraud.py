"""Fraud rules at authorize (DESIGN §8): the engine's call screen, and the actions off the call path.

``FraudGuard.screen`` runs inside ``Engine.authorize``, before the balance store (counters in
memory), or ``FraudGuard.ride`` around it (counters in Redis, see ``round_trip``: the counters'
script rides in the store's round trip, ``StoreRider`` in agent/ports.py): it counts the
call, evaluates the rules (pure, ``agent/core/fraud.py``) and refuses it (``DenyReason.FRAUD_RULE``)
when a deny or suspend rule fires. It never waits: an alert goes to the alert service
(``agent/services/alerts.py``: the ``alerts`` table through a durable queue, the webhook, the
Redis Stream, the counter and the log line); the SQL side of a suspension goes on a queue served
by one worker greenlet (``FraudActions``: the account's status, hangups queued for other nodes),
retried with a backoff while the database is away; the account's live calls on this node are cut
at once through the engine. Counters are in memory (``LocalCounters``, one node) or in Redis
(``RedisFraudCounters``, every node), see README. CEL conditions read ``hour`` and ``weekday`` in
the timezone of the account's rate plan (``timezone_of``). A rule limited to some tenants
(``tenant:``) asks ``tenants_of`` which tenants the account is under, only once its figure
crossed the threshold (the cached chain of the rater: no database on ordinary calls).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import gevent
import gevent.event
import gevent.queue

from agent.core.cdr import CallRecord, Disposition
from agent.core.events import AuthorizeDecision, AuthorizeRequest, DenyReason
from agent.core.fraud import AlertRecord, CallFacts, Hit, LocalCounters, destination_digits, evaluate
from agent.core.fraud_rules import Action, Rule, RuleSet
from agent.ports import Clock, FraudActions, FraudCounters, ObserveRider
from agent.services.alerts import Alerts
from agent.services.metrics import Metrics

log = logging.getLogger(__name__)

MAX_QUEUED_COUNTER_UPDATES = 100_000
COUNTER_RETRIES = 6  # about 6 s of backoff before a shared counter update is given up
RETRY_MAX_S = 30.0
SUSPENDED_HOLD_MS = 5_000  # kept locally this long after the SQL status is written
SWEEP_EVERY_MS = 60_000  # in-memory counters: accounts with empty windows are dropped this often


@dataclass(slots=True)
class _Suspension:
    account_id: str
    rule: str
    at_ms: int
    call_id: str
    written_ms: int | None = None  # when SQL (and the store) had the status


TimezoneOf = Callable[[str, str], str]  # (account, its plan if known, else "") -> IANA zone
TenantsOf = Callable[[str], frozenset[str]]  # account -> the tenants it is under (its own and above)


class FraudRide:
    """One call's screen split around the balance store's authorize (``FraudGuard.ride``)."""

    __slots__ = ("_guard", "refused", "_facts", "rider")

    def __init__(self, guard: FraudGuard, refused: AuthorizeDecision | None, facts: CallFacts | None,
                 rider: ObserveRider | None) -> None:
        self._guard, self._facts = guard, facts
        self.refused = refused  # known before the store: an account suspended here
        self.rider: ObserveRider | None = rider  # for the store to queue; None: nothing to ride

    def finish(self) -> AuthorizeDecision | None:
        """The screen's verdict, as ``FraudGuard.screen`` gives it: from the figures the store
        brought back, else by an observe of its own (one round trip, bounded like ``screen``)."""
        if self._facts is None:
            return self.refused
        figures = self.rider.figures() if self.rider is not None else None
        self._guard.metrics.fraud_observes.labels("alone" if figures is None else "with_store").inc()
        return self._guard._judge(self._facts, figures)


class FraudGuard:
    """``alerts``: the node's alert service (the daemon's, durable); without one the guard keeps
    its own, in memory, writing through ``actions.record_alerts`` (tests, benches).
    ``timezone_of``: the timezone of an account's rate plan, for CEL's ``hour`` and ``weekday``
    (asked only when a condition reads them; without it they are UTC). ``tenants_of``: the
    tenants an account is under, for rules with ``tenant:`` (without it such rules never apply)."""

    def __init__(self, rules: RuleSet, *, node: str, actions: FraudActions, clock: Clock,
                 metrics: Metrics | None = None, alert_period_ms: int = 60_000,
                 counters: FraudCounters | None = None, alerts: Alerts | None = None,
                 timezone_of: TimezoneOf | None = None, tenants_of: TenantsOf | None = None,
                 tenant_counters: FraudCounters | None = None) -> None:
        self.node = node
        self.actions = actions
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._own_alerts = alerts is None
        self.alerts = alerts if alerts is not None else Alerts(actions, node=node, clock=clock, metrics=self.metrics,
                                                               period_ms=alert_period_ms)
        self.timezone_of = timezone_of
        self.tenants_of = tenants_of
        self.counters: FraudCounters = counters if counters is not None else LocalCounters(RuleSet())
        # ``count: tenant`` rules: their figures under each tenant's owner key (fraud_rules.tenant_owner),
        # in counters of their own (the same kind: with Redis, shared by every node).
        self.tenant_counters: FraudCounters = (tenant_counters if tenant_counters is not None
                                               else LocalCounters(RuleSet()))
        self._use_rules(rules)  # gives each its rules
        self._owners_of: dict[str, tuple[str, ...]] = {}  # call -> the tenant owners it was counted under
        # Updates of shared counters (Redis) after the decision: a worker makes the round trips,
        # never the engine loop (``finished`` runs in it).
        self._counter_jobs: gevent.queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = gevent.queue.Queue()
        self._counter_worker: gevent.Greenlet[[], None] | None = None
        self._counter_failures = 0
        # Cuts the account's live calls on this node; returns their call ids (the engine's cut_account).
        self.cut_local: Callable[[str, str], list[str]] = lambda account_id, reason: []
        self.suspended: dict[str, _Suspension] = {}
        # Told (account, rule) once a suspension is written, from the worker (the Redis bus that
        # has every other node cut its calls at once).
        self.on_suspension_written: list[Callable[[str, str], None]] = []
        self._suspensions: deque[_Suspension] = deque()
        self._wake = gevent.event.Event()
        self._worker: gevent.Greenlet[[], None] | None = None
        self._running = False

    # ---------------------------------------------------------------- rules

    def replace_rules(self, rules: RuleSet) -> None:
        """New rules (SIGHUP): the figures they share with the old ones go on; new ones start empty."""
        self._use_rules(rules)
        log.info("fraud rules: %d rules, %d destination groups", len(rules.rules), len(rules.groups))

    def _use_rules(self, rules: RuleSet) -> None:
        """The rules, split between the accounts' counters and the tenants' (``count: tenant``)."""
        self.rules = rules
        self._time_rules = _time_rules(rules)
        own, shared = rules.split()
        self.counters.set_rules(own)
        self.tenant_counters.set_rules(shared)
        self._tenant_rules = shared.rules

    # ---------------------------------------------------------------- the call path (engine screen)

    @property
    def round_trip(self) -> bool:
        """Shared counters (Redis) cost a round trip: the engine then screens beside the balance
        store's authorize (one round trip for the call, not two) and releases the reservation of a
        call the rules refuse. In memory the screen runs first: a refused call never reaches the
        store."""
        return self.counters.shared and bool(self.rules.rules)

    def screen(self, request: AuthorizeRequest, call_id: str, now_ms: int) -> AuthorizeDecision | None:
        """None to go on with the call, or the refusal. In memory it never waits; with Redis
        counters it makes one round trip (``redis.timeout_ms`` at most), and a Redis that fails
        lets the call through unscreened (logged and counted: money is the balance store's).
        The engine uses ``ride`` instead when the counters are shared."""
        early, facts = self._begin(request, call_id, now_ms)
        if facts is None:
            return early
        return self._judge(facts, None)

    def ride(self, request: AuthorizeRequest, call_id: str, now_ms: int) -> FraudRide:
        """``screen`` in two halves around the balance store's authorize: the counters' observe
        rides in the store's round trip (``FraudRide.rider``, agent/ports.py ``StoreRider``), and
        ``FraudRide.finish`` judges the figures it brought back, or observes on its own round trip
        when the store did not take it (SQL, an open circuit, a call refused before the store)."""
        early, facts = self._begin(request, call_id, now_ms)
        if facts is None:
            return FraudRide(self, early, None, None)
        try:
            rider = self.counters.observe_rider(facts)
        except Exception as exc:  # noqa: BLE001 - as a failed observe: the call goes on unscreened
            self._counters_failed("observe", exc)
            return FraudRide(self, None, None, None)
        return FraudRide(self, None, facts, rider)

    def _begin(self, request: AuthorizeRequest, call_id: str, now_ms: int,
               ) -> tuple[AuthorizeDecision | None, CallFacts | None]:
        """(the decision, None) when the rules need not be asked: a suspended account, no rules;
        else (None, the call's facts)."""
        account_id = request.account_id
        held = self.suspended.get(account_id)
        if held is not None:
            if held.written_ms is None or now_ms - held.written_ms < SUSPENDED_HOLD_MS:
                return AuthorizeDecision(False, call_id, reason=DenyReason.FRAUD_RULE,
                                         detail=f"account suspended by fraud rule {held.rule}"), None
            del self.suspended[account_id]  # the balance store refuses it now (status suspended)
        if not self.rules.rules:
            return None, None
        digits = destination_digits(request.destination)
        return None, CallFacts(account_id, call_id, digits, self.rules.groups_of(digits), now_ms, request.caller,
                               request.pbx)

    def _judge(self, facts: CallFacts, figures: dict[str, int] | None) -> AuthorizeDecision | None:
        """Count the call (``figures``: the account's, already counted by a ride; None: observe
        now), then every rule: alerts, a suspension, the refusal."""
        call_id, account_id = facts.call_id, facts.account_id
        try:
            if figures is None:
                figures = self.counters.observe(facts)
            if self._tenant_rules:
                facts, figures = self._observe_tenants(facts, figures)
        except Exception as exc:  # noqa: BLE001 - fraud figures are advisory; the call goes to the store
            self._counters_failed("observe", exc)
            return None
        facts = self._with_tenants(self._with_timezone(facts, figures, ""), figures)
        verdict = evaluate(self.rules, figures, facts)
        for error in verdict.errors:
            log.warning("fraud %s (counted as not met) call=%s account=%s", error, call_id, account_id)
        for hit in verdict.hits:
            self._alert(hit, facts)
        if verdict.suspend is not None:
            self._suspend(verdict.suspend, facts)
        if verdict.deny is not None:
            self._update(self.counters.forget, account_id, call_id)
            self._forget_owners(call_id)
            rule = verdict.deny.rule
            return AuthorizeDecision(False, call_id, reason=DenyReason.FRAUD_RULE,
                                     detail=f"fraud rule {rule.name}: {verdict.deny.describe()}")
        # ``observe`` counted the call live already, not once the store answered: the parallel
        # calls of an attack must see each other.
        return None

    def decided(self, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        """The engine's final decision on a call the screen let through."""
        if not decision.allowed:
            self._update(self.counters.forget, request.account_id, decision.call_id)
            self._forget_owners(decision.call_id)
            return
        held = self.suspended.get(request.account_id)
        if held is not None:  # suspended while this call waited for the store: cut it too
            self.cut_local(request.account_id, f"account suspended by fraud rule {held.rule}")

    def finished(self, record: CallRecord) -> None:
        """A settled call (the engine's on_finished): spend and short-call figures, and the rules
        they feed act at once (an alert or a suspension now, not at the account's next call)."""
        self._update(self._settled, record)

    def _settled(self, record: CallRecord) -> None:
        at_ms = record.settled_ms or record.ended_ms or 0
        answered = record.disposition is Disposition.ANSWERED
        figures = self.counters.ended(record.account_id, record.call_id, at_ms, record.rating.cost_micros,
                                      answered, record.duration_ms)
        for owner in self._owners_of.pop(record.call_id, ()):
            got = self.tenant_counters.ended(owner, record.call_id, at_ms, record.rating.cost_micros, answered,
                                             record.duration_ms)
            figures = {**figures, **{rule.name: got[rule.name] for rule in self._tenant_rules
                                     if rule.owner == owner and rule.name in got}}
        if not figures:
            return
        digits = destination_digits(record.destination)
        facts = self._with_timezone(CallFacts(record.account_id, record.call_id, digits, self.rules.groups_of(digits),
                                              at_ms, record.caller, record.pbx), figures, record.rating.plan_name)
        verdict = evaluate(self.rules, figures, self._with_tenants(facts, figures))
        for hit in verdict.hits:
            if hit.rule.action is not Action.DENY:  # a deny rule refuses the account's next calls itself
                self._alert(hit, facts)
        if verdict.suspend is not None:
            self._suspend(verdict.suspend, facts)

    def _with_timezone(self, facts: CallFacts, figures: Mapping[str, int], plan: str) -> CallFacts:
        """The facts with the account's timezone when a rule whose CEL condition reads the local
        time crossed its threshold (its condition is evaluated then); otherwise the timezone is
        not looked up (it costs nothing on ordinary calls and never waits on the database in the
        engine loop)."""
        if self.timezone_of is None or not any(figures.get(rule.name, 0) > rule.threshold
                                               for rule in self._time_rules):
            return facts
        try:
            return replace(facts, timezone=self.timezone_of(facts.account_id, plan))
        except Exception as exc:  # noqa: BLE001 - a plan that cannot be read: the call's rating says so
            log.warning("fraud: timezone of account %s unknown (%s): CEL hour and weekday read in UTC",
                        facts.account_id, exc)
            return facts

    def _observe_tenants(self, facts: CallFacts, figures: dict[str, int]) -> tuple[CallFacts, dict[str, int]]:
        """Count the call under each tenant a ``count: tenant`` rule names and the account is
        under (the account's tenants are looked up on every call then: the rater's cached
        chains), and add those rules' figures. A lookup that fails counts nothing for the
        tenants (logged): the rules counted per account still apply."""
        if self.tenants_of is None:
            return facts, figures
        try:
            tenants = self.tenants_of(facts.account_id)
        except Exception as exc:  # noqa: BLE001 - the database does not answer and the chain was never read
            log.warning("fraud: tenants of account %s unknown (%s): call %s not counted for its tenants",
                        facts.account_id, exc, facts.call_id)
            return facts, figures
        owners = tuple(sorted({rule.owner for rule in self._tenant_rules if not rule.tenants.isdisjoint(tenants)}))
        if owners:
            if len(self._owners_of) >= MAX_QUEUED_COUNTER_UPDATES:
                self._owners_of.clear()
            self._owners_of[facts.call_id] = owners
            figures = dict(figures)
            for owner in owners:
                got = self.tenant_counters.observe(replace(facts, account_id=owner))
                figures.update({rule.name: got.get(rule.name, 0) for rule in self._tenant_rules
                                if rule.owner == owner})
        return replace(facts, tenants=tenants), figures

    def _forget_owners(self, call_id: str) -> None:
        for owner in self._owners_of.pop(call_id, ()):
            self._update(self.tenant_counters.forget, owner, call_id)

    def _with_tenants(self, facts: CallFacts, figures: Mapping[str, int]) -> CallFacts:
        """The facts with the tenants the account is under, when a rule limited to some tenants
        crossed its threshold; otherwise not looked up. A lookup that fails leaves the rule out
        (logged): like a counter that fails, a fraud rule never refuses a call for lack of data."""
        if facts.tenants is not None or self.tenants_of is None or not any(
                rule.tenants and figures.get(rule.name, 0) > rule.threshold for rule in self.rules.rules):
            return facts
        try:
            return replace(facts, tenants=self.tenants_of(facts.account_id))
        except Exception as exc:  # noqa: BLE001 - the database does not answer and the chain was never read
            log.warning("fraud: tenants of account %s unknown (%s): rules limited to tenants left out for call %s",
                        facts.account_id, exc, facts.call_id)
            return facts

    def _update(self, step: Callable[..., None], *args: Any) -> None:
        if not self.counters.shared:
            step(*args)
            return
        if self._counter_jobs.qsize() >= MAX_QUEUED_COUNTER_UPDATES:
            log.error("fraud counter updates queued beyond %d (Redis away?): %s%r dropped",
                      MAX_QUEUED_COUNTER_UPDATES, getattr(step, "__name__", step), args)
            return
        self._counter_jobs.put_nowait((step, args))

    def _counters_failed(self, what: str, exc: Exception) -> None:
        self._counter_failures += 1
        self.metrics.alerts.labels("fraud_counters_unavailable").inc()
        if self._counter_failures == 1 or self._counter_failures % 100 == 0:
            log.error("fraud counters: %s failed (%s; %d failures so far): calls go on unscreened by the rules",
                      what, exc, self._counter_failures)

    def _run_counter_jobs(self) -> None:
        while True:
            step, args = self._counter_jobs.get()
            for attempt in range(COUNTER_RETRIES):
                try:
                    step(*args)
                    break
                except Exception as exc:  # noqa: BLE001 - retried, then logged: a lost update only skews a figure
                    self._counters_failed(getattr(step, "__name__", "update"), exc)
                    gevent.sleep(min(0.2 * 2 ** attempt, 5.0))

    # ---------------------------------------------------------------- actions

    def _alert(self, hit: Hit, facts: CallFacts) -> None:
        """One alert (the alert service throttles: one per account and rule per period)."""
        rule = hit.rule
        action = rule.action.value
        if action == "deny" and rule.deny_group_only:
            action = "deny_group"
        self.alerts.submit(AlertRecord.of(hit, facts, self.node, action))

    def _suspend(self, hit: Hit, facts: CallFacts) -> None:
        if facts.account_id in self.suspended:
            return
        suspension = _Suspension(facts.account_id, hit.rule.name, facts.at_ms, facts.call_id)
        self.suspended[facts.account_id] = suspension
        reason = f"account suspended by fraud rule {hit.rule.name}"
        cut = self.cut_local(facts.account_id, reason)
        log.warning("FRAUD SUSPEND account=%s rule=%s: new calls refused, %d live calls cut on node %s%s",
                    facts.account_id, hit.rule.name, len(cut), self.node, f" ({', '.join(cut)})" if cut else "")
        self._suspensions.append(suspension)
        self._wake.set()

    # ---------------------------------------------------------------- the worker

    def start(self) -> None:
        self._running = True
        if self._own_alerts:
            self.alerts.start()
        self._worker = gevent.spawn(self._work)
        self._worker.link_exception(lambda g: log.critical("fraud actions worker died: %r", g.exception))
        if self.counters.shared:
            self._counter_worker = gevent.spawn(self._run_counter_jobs)
            self._counter_worker.link_exception(
                lambda g: log.critical("fraud counters worker died: %r", g.exception))

    def stop(self, timeout_s: float = 2.0) -> None:
        """Write the queued suspensions (at most ``timeout_s``), then stop (and the guard's own
        alert service, when it has one; the daemon stops its own)."""
        self._running = False
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=timeout_s)
            self._worker.kill(timeout=1)
        if self._counter_worker is not None:
            with gevent.Timeout(timeout_s, False):
                while self._counter_jobs.qsize():
                    gevent.sleep(0.01)
            self._counter_worker.kill(timeout=1)
        if self._suspensions:
            log.error("fraud: %d suspensions not written to SQL at shutdown", len(self._suspensions))
        if self._own_alerts:
            self.alerts.stop(timeout_s)

    def _work(self) -> None:
        failures = 0
        next_sweep_ms = self.clock.monotonic_ms() + SWEEP_EVERY_MS
        while self._running or self._suspensions:
            if self.clock.monotonic_ms() >= next_sweep_ms:
                next_sweep_ms = self.clock.monotonic_ms() + SWEEP_EVERY_MS
                self.sweep()
            if not self._suspensions:
                self._wake.clear()
                self._wake.wait(timeout=1.0)
                continue
            if self.flush_once():
                failures = 0
                continue
            failures += 1
            delay = min(0.5 * 2 ** min(failures - 1, 10), RETRY_MAX_S)
            if not self._running:
                return
            self._wake.clear()
            self._wake.wait(timeout=delay)

    def sweep(self) -> None:
        """Forget in-memory figures of accounts with nothing left in any window (bounded memory)."""
        for counters in (self.counters, self.tenant_counters):
            sweep = getattr(counters, "sweep", None)
            if sweep is not None:
                left = sweep(self.clock.now_ms())
                log.debug("fraud counters: %d accounts or tenants with figures in memory", left)

    def flush_once(self) -> bool:
        """Write the queued suspensions; False (they stay queued) when the database failed. (Alerts
        are the alert service's: ``self.alerts.flush_once``.)"""
        try:
            while self._suspensions:
                suspension = self._suspensions[0]
                reason = f"account suspended by fraud rule {suspension.rule}"
                changed = self.actions.suspend(suspension.account_id, suspension.rule, suspension.at_ms)
                elsewhere = self.actions.cut_elsewhere(suspension.account_id, self.node, reason)
                suspension.written_ms = self.clock.now_ms()
                self._suspensions.popleft()
                for hook in self.on_suspension_written:
                    try:
                        hook(suspension.account_id, suspension.rule)
                    except Exception as exc:  # noqa: BLE001 - the other nodes still cut at their next publish
                        log.error("fraud: telling the other nodes of the suspension of %s failed: %s",
                                  suspension.account_id, exc)
                log.warning("FRAUD SUSPEND account=%s rule=%s written (%s); %d live calls on other nodes asked "
                            "to hang up", suspension.account_id, suspension.rule,
                            "suspended" if changed else "was not active", len(elsewhere))
        except Exception as exc:  # noqa: BLE001 - the database comes back; the queue keeps them
            log.error("fraud: writing %d suspensions failed (%s); retrying", len(self._suspensions), exc)
            return False
        return True

    def queued(self) -> int:
        """Suspensions not written to SQL yet (alerts: ``self.alerts.queued()``)."""
        return len(self._suspensions)


def _time_rules(rules: RuleSet) -> tuple[Rule, ...]:
    """The rules whose CEL condition reads ``hour`` or ``weekday``."""
    return tuple(rule for rule in rules.rules if rule.condition is not None and rule.condition.reads_local_time)
