"""Fraud rules evaluated on a call (DESIGN §8): counters, figures, verdicts.

Pure (no I/O, no clock): every instant is an argument. :class:`LocalCounters` keeps the
figures of one node in memory (sliding windows of exact timestamps, pruned to the longest
window of the rules); :func:`evaluate` turns the figures of one call into a :class:`Verdict`.
The service (``agent/services/fraud.py``) feeds the counters from authorize and settle and
carries the actions out.

A rule fires on a call when its figure, counting this call, exceeds its threshold (``>``), the
call is in the rule's scope, and its CEL condition (evaluated only then, it costs ~0.3 ms) holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent.core.fraud_rules import Action, Rule, RuleKind, RuleSet

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000


def destination_digits(destination: str) -> str:
    """The dialled number as group prefixes are written (international, country code first): a
    leading ``+`` or ``00`` removed, then digits only."""
    number = destination.strip()
    if number.startswith("+"):
        number = number[1:]
    elif number.startswith("00"):
        number = number[2:]
    return "".join(ch for ch in number if ch.isdigit())


@dataclass(frozen=True, slots=True)
class CallFacts:
    account_id: str
    call_id: str
    destination: str  # digits (destination_digits)
    groups: frozenset[str]
    at_ms: int
    caller: str = ""
    pbx: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    """A rule that fired on a call, with the figure that crossed its threshold."""

    rule: Rule
    figure: int

    def describe(self) -> str:
        rule = self.rule
        window = f" in {rule.window_s}s" if rule.window_s else ""
        group = f" to {rule.group}" if rule.group else ""
        unit = "%" if rule.kind is RuleKind.SHORT_CALLS else ""
        return f"{rule.kind}{group}{window} = {self.figure}{unit} > {rule.threshold}{unit}"


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One row of the ``alerts`` table: a rule that fired, the figures that crossed, the action."""

    at_ms: int
    node: str
    account_id: str
    rule: str
    kind: str
    figure: int
    threshold: int
    window_s: int
    action: str
    call_id: str = ""
    destination: str = ""
    detail: str = ""

    @classmethod
    def of(cls, hit: Hit, facts: CallFacts, node: str, action: str) -> AlertRecord:
        rule = hit.rule
        return cls(facts.at_ms, node, facts.account_id, rule.name, rule.kind.value, hit.figure, rule.threshold,
                   rule.window_s, action, facts.call_id, facts.destination, hit.describe())


@dataclass(frozen=True, slots=True)
class Verdict:
    hits: tuple[Hit, ...] = ()
    deny: Hit | None = None  # the first deny or suspend hit that refuses this call
    suspend: Hit | None = None
    errors: tuple[str, ...] = ()  # CEL conditions that failed at run time (counted as not met)


@dataclass(slots=True)
class _Account:
    attempts: deque[tuple[int, str, frozenset[str]]] = field(default_factory=deque)  # (ms, digits, groups)
    live: dict[str, frozenset[str]] = field(default_factory=dict)  # call id -> groups
    settled: deque[tuple[int, int, bool, int]] = field(default_factory=deque)  # (ms, cost, answered, duration_ms)


class LocalCounters:
    """One node's counters (a node-local first version: with several nodes each counts its own
    calls; see README "Fraud rules")."""

    def __init__(self, keep_ms: int) -> None:
        self.keep_ms = keep_ms  # the longest window of the rules
        self._accounts: dict[str, _Account] = {}

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account()
        return account

    def attempt(self, facts: CallFacts) -> None:
        """A new call was asked for (counted whatever the decision: a denied attacker keeps being denied)."""
        account = self._account(facts.account_id)
        account.attempts.append((facts.at_ms, facts.destination, facts.groups))
        self._prune(account, facts.at_ms)

    def started(self, account_id: str, call_id: str, groups: frozenset[str]) -> None:
        self._account(account_id).live[call_id] = groups

    def ended(self, account_id: str, call_id: str, at_ms: int, cost_micros: int, answered: bool,
              duration_ms: int) -> None:
        account = self._account(account_id)
        account.live.pop(call_id, None)
        account.settled.append((at_ms, cost_micros, answered, duration_ms))
        self._prune(account, at_ms)

    def forget(self, account_id: str, call_id: str) -> None:
        """A call counted live that was denied after all."""
        account = self._accounts.get(account_id)
        if account is not None:
            account.live.pop(call_id, None)

    def _prune(self, account: _Account, now_ms: int) -> None:
        oldest = now_ms - self.keep_ms
        while account.attempts and account.attempts[0][0] < oldest:
            account.attempts.popleft()
        while account.settled and account.settled[0][0] < oldest:
            account.settled.popleft()

    def sweep(self, now_ms: int) -> int:
        """Drop accounts with nothing left in any window; returns how many remain."""
        for account_id in list(self._accounts):
            account = self._accounts[account_id]
            self._prune(account, now_ms)
            if not account.attempts and not account.settled and not account.live:
                del self._accounts[account_id]
        return len(self._accounts)

    def figure(self, rule: Rule, facts: CallFacts) -> int:
        """The rule's figure for this call (the call itself counted: ``attempt`` ran before)."""
        account = self._accounts.get(facts.account_id)
        if account is None:
            return 0
        since = facts.at_ms - rule.window_ms
        if rule.kind is RuleKind.NEW_CALLS:
            count = 0
            for at_ms, _, groups in reversed(account.attempts):
                if at_ms <= since:
                    break
                if not rule.group or rule.group in groups:
                    count += 1
            return count
        if rule.kind is RuleKind.DISTINCT_DESTINATIONS:
            seen: set[str] = set()
            for at_ms, digits, groups in reversed(account.attempts):
                if at_ms <= since:
                    break
                if not rule.group or rule.group in groups:
                    seen.add(digits)
            return len(seen)
        if rule.kind is RuleKind.LIVE_CALLS:
            live = sum(1 for groups in account.live.values() if not rule.group or rule.group in groups)
            mine = facts.call_id not in account.live and (not rule.group or rule.group in facts.groups)
            return live + (1 if mine else 0)
        if rule.kind is RuleKind.SPEND:
            total = 0
            for at_ms, cost, _, _ in reversed(account.settled):
                if at_ms <= since:
                    break
                total += cost
            return total
        answered = short = 0
        for at_ms, _, was_answered, duration_ms in reversed(account.settled):
            if at_ms <= since:
                break
            if was_answered:
                answered += 1
                short += duration_ms < rule.short_call_s * 1000
        if answered < rule.min_calls:
            return 0
        return short * 100 // answered


def in_scope(rule: Rule, facts: CallFacts) -> bool:
    """Whether the rule's action applies to this call (``deny: group`` spares calls elsewhere)."""
    return not rule.deny_group_only or rule.group in facts.groups


def evaluate(rules: RuleSet, counters: LocalCounters, facts: CallFacts) -> Verdict:
    """Every rule on one call; ``counters.attempt(facts)`` has counted the call already."""
    hits: list[Hit] = []
    errors: list[str] = []
    deny: Hit | None = None
    suspend: Hit | None = None
    for rule in rules.rules:
        figure = counters.figure(rule, facts)
        if figure <= rule.threshold or not in_scope(rule, facts):
            continue
        if rule.condition is not None:
            try:
                if not rule.condition.holds(activation(rule, facts, figure)):
                    continue
            except ValueError as exc:
                errors.append(f"rule {rule.name}: {exc}")
                continue
        hit = Hit(rule, figure)
        hits.append(hit)
        if rule.action is Action.SUSPEND and suspend is None:
            suspend = hit
        if rule.action in (Action.DENY, Action.SUSPEND) and deny is None:
            deny = hit
    return Verdict(tuple(hits), deny, suspend, tuple(errors))


def activation(rule: Rule, facts: CallFacts, figure: int) -> dict[str, object]:
    """What a CEL condition sees (the names of ``agent.core.fraud_rules.CEL_FIELDS``)."""
    return {
        "account": facts.account_id, "destination": facts.destination, "caller": facts.caller, "pbx": facts.pbx,
        "groups": facts.groups, "figure": figure, "threshold": rule.threshold,
        "hour": (facts.at_ms % MS_PER_DAY) // MS_PER_HOUR,
        "weekday": (facts.at_ms // MS_PER_DAY + 3) % 7 + 1,  # 1970-01-01 was a Thursday (4)
    }


class AlertThrottle:
    """One alert per (account, rule) per period: an attack that fires a rule on every call gives
    one alert row, not thousands (the calls are still denied)."""

    def __init__(self, period_ms: int = 60_000) -> None:
        self.period_ms = period_ms
        self._last: dict[tuple[str, str], int] = {}

    def allow(self, account_id: str, rule: str, now_ms: int) -> bool:
        key = (account_id, rule)
        last = self._last.get(key)
        if last is not None and now_ms - last < self.period_ms:
            return False
        self._last[key] = now_ms
        if len(self._last) > 100_000:  # bounded: forget the stale ones
            self._last = {k: v for k, v in self._last.items() if now_ms - v < self.period_ms}
        return True
