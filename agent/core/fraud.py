"""Fraud rules evaluated on a call (DESIGN §8): counters, figures, verdicts.

Pure (no I/O, no clock): every instant is an argument. :class:`LocalCounters` keeps the
figures of one node in memory (sliding windows of exact timestamps, pruned to the longest
window of the rules); :func:`evaluate` turns the figures of one call into a :class:`Verdict`.
The service (``agent/services/fraud.py``) feeds the counters from authorize and settle and
carries the actions out; ``agent/adapters/redis/counters.py`` keeps the same figures in Redis,
shared by every node.

A rule fires on a call when its figure, counting this call, exceeds its threshold (``>``), the
call is in the rule's scope, and its CEL condition (evaluated only then, it costs ~0.3 ms) holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.core.fraud_rules import GROUPABLE, Action, Rule, RuleKind, RuleSet

SETTLE_KINDS = frozenset({RuleKind.SPEND, RuleKind.SHORT_CALLS})  # figures fed by settles
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000

# Alerts that are not fraud rules (``kind`` and ``rule`` of their AlertRecord): the account's
# available money fell below its threshold, or ran out (agent/services/balance_alerts.py).
LOW_BALANCE = "low_balance"
BALANCE_EXHAUSTED = "balance_exhausted"
BALANCE_KINDS = frozenset({LOW_BALANCE, BALANCE_EXHAUSTED})
# Wholesale (DESIGN §10, agent/services/routes.py): the margin of a call below its plan's floor,
# predicted at authorization (the first route, a 60 s call) or actual at settle. ``figure`` is
# the margin, ``threshold`` the floor's money for the same seconds (0 for a percentage floor).
MARGIN_PREDICTED = "margin_predicted"
MARGIN_ACTUAL = "margin_actual"
MARGIN_KINDS = frozenset({MARGIN_PREDICTED, MARGIN_ACTUAL})
# figure/threshold are money
MONEY_KINDS = frozenset({RuleKind.SPEND.value, LOW_BALANCE, BALANCE_EXHAUSTED, *MARGIN_KINDS})


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
    timezone: str = "UTC"  # of the account's rate plan: CEL's hour and weekday are read in it
    # The tenants the account is under (its own and every one above, the operator's included);
    # None: not looked up (no rule with a tenant crossed its threshold on this call).
    tenants: frozenset[str] | None = None


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
    """One row of the ``alerts`` table: a rule that fired (or a balance alert: ``kind`` in
    ``BALANCE_KINDS``), the figures that crossed, the action. ``event_id`` names the alert in
    every delivery (webhook, Redis Stream), so a receiver can drop a repeat."""

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
    event_id: str = ""

    @classmethod
    def of(cls, hit: Hit, facts: CallFacts, node: str, action: str) -> AlertRecord:
        rule = hit.rule
        return cls(facts.at_ms, node, facts.account_id, rule.name, rule.kind.value, hit.figure, rule.threshold,
                   rule.window_s, action, facts.call_id, facts.destination, hit.describe())

    def with_event_id(self, event_id: str) -> AlertRecord:
        return replace(self, event_id=event_id)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertRecord:
        """Inverse of :meth:`to_dict`; raises ValueError naming what is wrong."""
        try:
            record = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except TypeError as exc:  # a required field missing
            raise ValueError(f"malformed alert: {exc}") from None
        for name in ("at_ms", "figure", "threshold", "window_s"):
            value = getattr(record, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"malformed alert: {name} {value!r} is not an integer")
        for name in ("node", "account_id", "rule", "kind", "action", "call_id", "destination", "detail",
                     "event_id"):
            if not isinstance(getattr(record, name), str):
                raise ValueError(f"malformed alert: {name} is not a string")
        return record


@dataclass(frozen=True, slots=True)
class Verdict:
    hits: tuple[Hit, ...] = ()
    deny: Hit | None = None  # the first deny or suspend hit that refuses this call
    suspend: Hit | None = None
    errors: tuple[str, ...] = ()  # CEL conditions that failed at run time (counted as not met)


class FigureKey(NamedTuple):
    """What one figure counts; rules that count the same thing share its window (a tuple: it is
    hashed on every call)."""

    kind: RuleKind
    window_ms: int
    group: str
    short_call_ms: int
    digits: int = 0  # new_country: how many first digits stand for the country

    @classmethod
    def of(cls, rule: Rule) -> FigureKey:
        short = rule.short_call_s * 1000 if rule.kind is RuleKind.SHORT_CALLS else 0
        group = rule.group if rule.kind in GROUPABLE else ""
        digits = rule.prefix_digits if rule.kind is RuleKind.NEW_COUNTRY else 0
        return cls(rule.kind, rule.window_ms, group, short, digits)


class _Window:
    """One sliding window of one account, kept up to date as entries come and go (amortised O(1)
    per event: an authorization never scans a history). ``value`` is what the entry adds: 1 for a
    call, the cost for spend, 1 for a short call; ``tag`` the number for distinct destinations."""

    __slots__ = ("entries", "total", "count", "tags")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, int, str]] = deque()  # (ms, value, tag)
        self.total = 0  # sum of the values
        self.count = 0  # entries
        self.tags: dict[str, int] = {}  # tag -> entries with it

    def add(self, at_ms: int, value: int, tag: str = "") -> None:
        self.entries.append((at_ms, value, tag))
        self.total += value
        self.count += 1
        if tag:
            self.tags[tag] = self.tags.get(tag, 0) + 1

    def prune(self, since_ms: int) -> None:
        """Drop entries at or before ``since_ms`` (the window is ``(since, now]``)."""
        entries = self.entries
        while entries and entries[0][0] <= since_ms:
            _, value, tag = entries.popleft()
            self.total -= value
            self.count -= 1
            if tag:
                left = self.tags[tag] - 1
                if left:
                    self.tags[tag] = left
                else:
                    del self.tags[tag]


@dataclass(slots=True)
class _Account:
    windows: dict[FigureKey, _Window] = field(default_factory=dict)
    live: dict[str, frozenset[str]] = field(default_factory=dict)  # call id -> groups
    # new_country: per figure, country prefix -> last call ms, and this call's answer (call id, 0|1)
    countries: dict[FigureKey, dict[str, int]] = field(default_factory=dict)
    fresh: dict[FigureKey, tuple[str, int]] = field(default_factory=dict)


class LocalCounters:
    """One node's counters (a node-local first version: with several nodes each counts its own
    calls; see README "Fraud rules"). Only the figures the rules need are kept; new rules (a
    reload) start their windows empty."""

    shared = False  # in memory: updated inline, never a round trip

    def __init__(self, rules: RuleSet) -> None:
        self._accounts: dict[str, _Account] = {}
        self.keys: frozenset[FigureKey] = frozenset()
        self.set_rules(rules)

    def set_rules(self, rules: RuleSet) -> None:
        self._rules = rules
        self._key_of = {r.name: FigureKey.of(r) for r in rules.rules}
        self.keys = frozenset(FigureKey.of(r) for r in rules.rules if r.kind is not RuleKind.LIVE_CALLS)
        self._attempt_keys = [k for k in self.keys if k.kind in (RuleKind.NEW_CALLS, RuleKind.DISTINCT_DESTINATIONS)]
        self._country_keys = [k for k in self.keys if k.kind is RuleKind.NEW_COUNTRY]
        self._settle_keys = [k for k in self.keys if k.kind in (RuleKind.SPEND, RuleKind.SHORT_CALLS)]
        for account in self._accounts.values():
            for gone in set(account.windows) - self.keys:
                del account.windows[gone]
            for gone in set(account.countries) - self.keys:
                del account.countries[gone]

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account()
        return account

    @staticmethod
    def _window(windows: dict[FigureKey, _Window], key: FigureKey) -> _Window:
        window = windows.get(key)
        if window is None:
            window = windows[key] = _Window()
        return window

    def observe(self, facts: CallFacts) -> dict[str, int]:
        """Count a new call (an attempt, and live until ``forget`` or ``ended``) and return every
        rule's figure for it, by rule name."""
        self.attempt(facts)
        self.started(facts.account_id, facts.call_id, facts.groups)
        return {rule.name: self.figure(rule, facts) for rule in self._rules.rules}

    def attempt(self, facts: CallFacts) -> None:
        """A new call was asked for (counted whatever the decision: a denied attacker keeps being denied)."""
        account = self._account(facts.account_id)
        for key in self._country_keys:
            if key.group and key.group not in facts.groups or not facts.destination:
                continue
            seen = account.countries.setdefault(key, {})
            country = facts.destination[:key.digits]
            last = seen.get(country)
            account.fresh[key] = (facts.call_id, int(last is None or last <= facts.at_ms - key.window_ms))
            seen[country] = facts.at_ms
        for key in self._attempt_keys:
            if key.group and key.group not in facts.groups:
                continue
            window = self._window(account.windows, key)
            window.add(facts.at_ms, 1, facts.destination if key.kind is RuleKind.DISTINCT_DESTINATIONS else "")
            window.prune(facts.at_ms - key.window_ms)

    def started(self, account_id: str, call_id: str, groups: frozenset[str]) -> None:
        self._account(account_id).live[call_id] = groups

    def ended(self, account_id: str, call_id: str, at_ms: int, cost_micros: int, answered: bool,
              duration_ms: int) -> dict[str, int]:
        """A settled call: no longer live, counted in the settle figures; returns the figures of
        the rules fed by settles (spend, short_calls) by rule name, so they act at once."""
        self._settle_call(account_id, call_id, at_ms, cost_micros, answered, duration_ms)
        probe = CallFacts(account_id, call_id, "", frozenset(), at_ms)
        return {rule.name: self.figure(rule, probe) for rule in self._rules.rules if rule.kind in SETTLE_KINDS}

    def _settle_call(self, account_id: str, call_id: str, at_ms: int, cost_micros: int, answered: bool,
                     duration_ms: int) -> None:
        account = self._account(account_id)
        account.live.pop(call_id, None)
        for key in self._settle_keys:
            if key.kind is RuleKind.SPEND:
                window = self._window(account.windows, key)
                window.add(at_ms, cost_micros)
            elif answered:
                window = self._window(account.windows, key)
                window.add(at_ms, 1 if duration_ms < key.short_call_ms else 0)
            else:
                continue
            window.prune(at_ms - key.window_ms)

    def observe_rider(self, facts: CallFacts) -> None:
        """In memory ``observe`` costs no round trip: nothing to ride in the store's."""
        return None

    def forget(self, account_id: str, call_id: str) -> None:
        """A call counted live that was denied after all."""
        account = self._accounts.get(account_id)
        if account is not None:
            account.live.pop(call_id, None)

    def sweep(self, now_ms: int) -> int:
        """Drop accounts with nothing left in any window; returns how many remain."""
        for account_id in list(self._accounts):
            account = self._accounts[account_id]
            for key, window in list(account.windows.items()):
                window.prune(now_ms - key.window_ms)
                if not window.count:
                    del account.windows[key]
            for key, seen in list(account.countries.items()):
                for country, last in list(seen.items()):
                    if last <= now_ms - key.window_ms:
                        del seen[country]
                if not seen:
                    del account.countries[key]
                    account.fresh.pop(key, None)
            if not account.windows and not account.live and not account.countries:
                del self._accounts[account_id]
        return len(self._accounts)

    def figure(self, rule: Rule, facts: CallFacts) -> int:
        """The rule's figure for this call (the call itself counted: ``attempt`` ran before)."""
        account = self._accounts.get(facts.account_id)
        if account is None:
            return 0
        if rule.kind is RuleKind.LIVE_CALLS:
            return sum(1 for groups in account.live.values() if not rule.group or rule.group in groups)
        key = self._key_of.get(rule.name) or FigureKey.of(rule)
        if rule.kind is RuleKind.NEW_COUNTRY:
            call_id, fresh = account.fresh.get(key, ("", 0))
            return fresh if call_id == facts.call_id else 0
        window = account.windows.get(key)
        if window is None:
            return 0
        window.prune(facts.at_ms - key.window_ms)
        if rule.kind is RuleKind.NEW_CALLS:
            return window.count
        if rule.kind is RuleKind.DISTINCT_DESTINATIONS:
            return len(window.tags)
        if rule.kind is RuleKind.SPEND:
            return window.total
        if window.count < rule.min_calls:  # short_calls: total = short ones, count = answered ones
            return 0
        return window.total * 100 // window.count


def in_scope(rule: Rule, facts: CallFacts) -> bool:
    """Whether the rule applies to this call: ``tenant`` spares accounts under other tenants (and
    every account whose tenants were not looked up), ``deny: group`` calls elsewhere."""
    if rule.tenants and (facts.tenants is None or rule.tenants.isdisjoint(facts.tenants)):
        return False
    return not rule.deny_group_only or rule.group in facts.groups


def evaluate(rules: RuleSet, figures: Mapping[str, int], facts: CallFacts) -> Verdict:
    """Every rule on one call, from its figures (``observe``: the call itself counted)."""
    hits: list[Hit] = []
    errors: list[str] = []
    deny: Hit | None = None
    suspend: Hit | None = None
    for rule in rules.rules:
        figure = figures.get(rule.name, 0)
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
    """What a CEL condition sees (the names of ``agent.core.fraud_rules.CEL_FIELDS``); ``hour``
    and ``weekday`` in the timezone of the account's rate plan (``facts.timezone``)."""
    hour, weekday = local_hour_weekday(facts.at_ms, facts.timezone)
    return {
        "account": facts.account_id, "destination": facts.destination, "caller": facts.caller, "pbx": facts.pbx,
        "groups": facts.groups, "figure": figure, "threshold": rule.threshold, "hour": hour, "weekday": weekday,
    }


def local_hour_weekday(at_ms: int, timezone: str) -> tuple[int, int]:
    """(hour 0-23, ISO weekday 1 = Monday) of the instant in ``timezone``; an unknown zone reads
    as UTC (the plan itself is refused when it is loaded, so this is only a safety net)."""
    zone = _zone(timezone) if timezone and timezone != "UTC" else None
    if zone is None:
        return (at_ms % MS_PER_DAY) // MS_PER_HOUR, (at_ms // MS_PER_DAY + 3) % 7 + 1  # 1970-01-01: a Thursday
    local = datetime.fromtimestamp(at_ms // 1000, UTC).astimezone(zone)
    return local.hour, local.isoweekday()


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


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
