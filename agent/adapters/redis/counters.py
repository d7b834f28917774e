"""Fraud counters in Redis, shared by every node (``redis.url`` set): the figures of
``agent/core/fraud.py`` (``LocalCounters``) kept in one place, so a rule sees an account's calls
on all nodes.

One Lua script per step, each on one account's keys (hash tag ``{ID}``: one Redis Cluster slot),
so a step is atomic and one round trip. The instants are the caller's (no Redis clock)::

    {prefix}fraud:{ID}:w:{kind}:{window_ms}:{group}:{short_ms}   zset, one per figure of the rules:
        new_calls              member call id, score ms
        distinct_destinations  member number, score ms of its last attempt
        new_country            (a hash) country prefix -> ms of its last call
        spend / short_calls    member "call id:value", score ms (value: cost, 1 when short);
                               the hash "...:agg" keeps total and count, updated as members come
                               and go, so no step sums a history
    {prefix}fraud:{ID}:live:{group}   zset: call id -> ms after which it no longer counts (a node
                                      that died cannot hold a call live for ever); group "" = all

Keys expire a minute after their window (and ``live_ttl_ms`` after the last live call).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from agent.adapters.redis.keys import KeySpace
from agent.core.fraud import SETTLE_KINDS, CallFacts, FigureKey
from agent.core.fraud_rules import Rule, RuleKind, RuleSet

KEY_GRACE_MS = 60_000

_PRUNE = """
local function prune(key, agg, cutoff)
  if agg ~= '' then
    local gone = redis.call('ZRANGEBYSCORE', key, '-inf', cutoff)
    if #gone == 0 then return end
    local total = 0
    for _, member in ipairs(gone) do
      total = total + tonumber(string.match(member, ':(%-?%d+)$'))
    end
    redis.call('HINCRBY', agg, 'total', 0 - total)  -- never -0, which HINCRBY refuses
    redis.call('HINCRBY', agg, 'count', 0 - #gone)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
end
"""

# The observe script is written for the rule set (``observe_source``): one block of straight-line
# Lua per distinct figure, its kind, window, group and key suffix written in as literals. The call
# then sends one key (the account's base, ``{prefix}fraud:{ID}:``: every figure key is the base
# and a suffix, one hash tag, one slot) and four arguments: now, call id, number, ",groups,".
# Before, every call sent all the figure keys and four arguments per figure (60 for the 10 rules
# of bench/bench_fraud.py): Redis spent more time unpacking them and looping over the figures in
# Lua than in the commands themselves, and the client as long packing them. Returns per figure
# its value, or total and count (spend, short_calls).
# A call outside a figure's group adds nothing to it: its value is read (ZCOUNT over the window),
# nothing is written, so the ordinary calls of a rule set about one group cost a read per figure.
_OBSERVE_HEAD = """
local base, now, call_id, number, groups = KEYS[1], tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local out = {}
"""


def observe_source(figures: Sequence[FigureKey], suffixes: Sequence[str], live_ttl_ms: int) -> str:
    """The observe script of one rule set: ``figures`` in order, ``suffixes`` their keys after the
    account's base (a settle figure's zset, then its ``:agg`` hash)."""
    parts = [_PRUNE, _OBSERVE_HEAD]
    slot, at = 1, 0
    for key in figures:
        window = key.window_ms
        matches = "true" if key.group == "" else f"string.find(groups, {_lua(',' + key.group + ',')}, 1, true)"
        zset = f"base .. {_lua(suffixes[at])}"
        at += 1
        if key.kind is RuleKind.NEW_COUNTRY:
            parts.append(f"""do
  local key, fresh = {zset}, 0
  if {matches} and number ~= '' then
    local country = string.sub(number, 1, {key.digits})
    local last = redis.call('HGET', key, country)
    if (not last) or tonumber(last) <= now - {window} then fresh = 1 end
    redis.call('HSET', key, country, ARGV[1])
    redis.call('PEXPIRE', key, {window + KEY_GRACE_MS})
  end
  out[{slot}] = fresh
end
""")
        elif key.kind is RuleKind.LIVE_CALLS:
            parts.append(f"""do
  local key = {zset}
  if {matches} then
    redis.call('ZADD', key, now + {live_ttl_ms}, call_id)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
    redis.call('PEXPIRE', key, {live_ttl_ms})
    out[{slot}] = redis.call('ZCARD', key)
  else
    out[{slot}] = redis.call('ZCOUNT', key, '(' .. ARGV[1], '+inf')
  end
end
""")
        elif key.kind in (RuleKind.NEW_CALLS, RuleKind.DISTINCT_DESTINATIONS):
            member = "call_id" if key.kind is RuleKind.NEW_CALLS else "number"
            parts.append(f"""do
  local key = {zset}
  if {matches} then
    redis.call('ZADD', key, ARGV[1], {member})
    prune(key, '', now - {window})
    redis.call('PEXPIRE', key, {window + KEY_GRACE_MS})
    out[{slot}] = redis.call('ZCARD', key)
  else
    out[{slot}] = redis.call('ZCOUNT', key, '(' .. (now - {window}), '+inf')
  end
end
""")
        else:  # spend, short_calls: fed at settle; here only the window slides
            agg = f"base .. {_lua(suffixes[at])}"
            at += 1
            parts.append(f"""do
  local agg = {agg}
  prune({zset}, agg, now - {window})
  local totals = redis.call('HMGET', agg, 'total', 'count')
  out[{slot}] = tonumber(totals[1] or '0')
  out[{slot + 1}] = tonumber(totals[2] or '0')
end
""")
            slot += 1
        slot += 1
    parts.append("return out\n")
    return "".join(parts)


def _lua(text: str) -> str:
    """``text`` as a Lua string literal: letters, digits and ``_.:,-`` as they are, every other
    byte as a decimal escape (rule files name the groups: nothing in them becomes code)."""
    safe = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:,-")
    return "'" + "".join(chr(b) if b in safe else f"\\{b:03d}" for b in text.encode()) + "'"


# The ended script is written for the rule set too (``ended_source``): the live groups' zsets and
# the settle figures' windows as literals; a call sends the account's base key, now, the call id
# and one value per settle figure ('' = not counted). Each figure's aggregate is read once and
# written once (HMGET, HSET) instead of two HINCRBY to add, two to prune and two HGET to answer.
# Returns per settle figure its total and count after the call.
_ENDED_HEAD = """
local base, now, call_id = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local out = {}
"""


def ended_source(live_suffixes: Sequence[str], settle: Sequence[tuple[str, int]]) -> str:
    """The ended script of one rule set: ``live_suffixes`` the live groups' zsets after the
    account's base, ``settle`` each settle figure's zset suffix and window (ms), in order."""
    parts = [_ENDED_HEAD]
    parts += [f"redis.call('ZREM', base .. {_lua(suffix)}, call_id)\n" for suffix in live_suffixes]
    for n, (suffix, window) in enumerate(settle):
        parts.append(f"""do
  local key, agg, value = base .. {_lua(suffix)}, base .. {_lua(suffix + ':agg')}, ARGV[{n + 3}]
  local got = redis.call('HMGET', agg, 'total', 'count')
  local total, count = tonumber(got[1] or '0'), tonumber(got[2] or '0')
  if value ~= '' and redis.call('ZADD', key, ARGV[1], call_id .. ':' .. value) == 1 then
    total, count = total + tonumber(value), count + 1
  end
  local gone = redis.call('ZRANGEBYSCORE', key, '-inf', now - {window})
  if #gone > 0 then
    for _, member in ipairs(gone) do total = total - tonumber(string.match(member, ':(%-?%d+)$')) end
    count = count - #gone
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - {window})
  end
  redis.call('HSET', agg, 'total', string.format('%d', total), 'count', string.format('%d', count))
  redis.call('PEXPIRE', key, {window + KEY_GRACE_MS})
  redis.call('PEXPIRE', agg, {window + KEY_GRACE_MS})
  out[{2 * n + 1}], out[{2 * n + 2}] = total, count
end
""")
    parts.append("return out\n")
    return "".join(parts)


FORGET = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""


class RedisFraudCounters:
    """The ``FraudCounters`` port on Redis. Every call may raise a redis error (the caller, the
    fraud service, lets the call through unscreened and logs it: the money is guarded by the
    balance store, not by these figures)."""

    shared = True  # a round trip: the service updates it from a worker, never from the engine loop

    def __init__(self, client: Any, *, key_prefix: str = "", live_ttl_ms: int = 4 * 3_600_000,
                 rules: RuleSet | None = None) -> None:
        self.client = client
        self.keys = KeySpace(key_prefix)  # refuses a prefix with braces
        self.prefix = key_prefix
        self.live_ttl_ms = live_ttl_ms
        self._sources: dict[str, str] = {}
        self._sha: dict[str, str] = {}  # of each source, as EVALSHA names it
        self._use_script("forget", FORGET)
        self.set_rules(rules or RuleSet())

    def _use_script(self, name: str, source: str) -> None:
        self._sources[name] = source
        self._sha[name] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        # The distinct figures, in the order of the rules (each computed once per call); their
        # kinds, windows, groups and keys are written into this rule set's scripts.
        self._figures: list[FigureKey] = list(dict.fromkeys(FigureKey.of(r) for r in rules.rules))
        self._rule_figure = [(rule, self._figures.index(FigureKey.of(rule))) for rule in rules.rules]
        base = len(self._base(""))  # the scripts name each key by its suffix after the account's base
        suffixes: list[str] = []
        for key in self._figures:
            suffix = self._window_key("", key)[base:]
            suffixes.append(suffix)
            if key.kind in SETTLE_KINDS:
                suffixes.append(suffix + ":agg")
        self._use_script("observe", observe_source(self._figures, suffixes, self.live_ttl_ms))
        # Riders only once an observe of this script went through here (it loads the script on the
        # servers): a rider cannot load it, and its NOSCRIPT reply would cost the call a second trip.
        self._observe_loaded = False
        self._live_groups = sorted({r.group for r in rules.rules if r.kind is RuleKind.LIVE_CALLS})
        self._settle = sorted({FigureKey.of(r) for r in rules.rules if r.kind in SETTLE_KINDS})
        self._use_script("ended", ended_source(
            [self._live_key("", group)[base:] for group in self._live_groups],
            [(self._window_key("", key)[base:], key.window_ms) for key in self._settle]))

    # ---------------------------------------------------------------- keys

    def _base(self, account_id: str) -> str:
        return f"{self.prefix}fraud:{{{account_id}}}:"

    def _window_key(self, account_id: str, key: FigureKey) -> str:
        if key.kind is RuleKind.LIVE_CALLS:
            return self._live_key(account_id, key.group)
        return (f"{self._base(account_id)}w:{key.kind.value}:{key.window_ms}:{key.group}:"
                f"{key.digits or key.short_call_ms}")

    def _live_key(self, account_id: str, group: str) -> str:
        return f"{self._base(account_id)}live:{group}"

    # ---------------------------------------------------------------- steps

    def observe(self, facts: CallFacts) -> dict[str, int]:
        if not self._figures:
            return {}
        figures = self._figures_of(self._run("observe", [self._base(facts.account_id)], self._observe_args(facts)))
        self._observe_loaded = True
        return figures

    def observe_rider(self, facts: CallFacts) -> _ObserveRider | None:
        """``observe`` queued in the balance store's own pipeline when the store talks through the
        same client (the daemon gives both one): one round trip for the call, not two."""
        if not self._figures or not self._observe_loaded:
            return None
        return _ObserveRider(self, facts)

    def _observe_args(self, facts: CallFacts) -> list[Any]:
        groups = facts.groups
        return [facts.at_ms, facts.call_id, facts.destination, "," + ",".join(groups) + "," if groups else ","]

    def _figures_of(self, values: Sequence[Any]) -> dict[str, int]:
        return _figures_from(values, self._figures, self._rule_figure)

    def forget(self, account_id: str, call_id: str) -> None:
        if self._live_groups:
            self._run("forget", [self._live_key(account_id, group) for group in self._live_groups], [call_id])

    def ended(self, account_id: str, call_id: str, at_ms: int, cost_micros: int, answered: bool,
              duration_ms: int) -> dict[str, int]:
        if not self._live_groups and not self._settle:
            return {}
        args: list[Any] = [at_ms, call_id]
        for key in self._settle:
            if key.kind is RuleKind.SPEND:
                args.append(str(cost_micros))
            else:
                args.append(str(int(duration_ms < key.short_call_ms)) if answered else "")
        values = self._run("ended", [self._base(account_id)], args)
        totals = {key: (int(values[2 * i]), int(values[2 * i + 1])) for i, key in enumerate(self._settle)}
        return {rule.name: _figure(rule, *totals[FigureKey.of(rule)]) for rule in self.rules.rules
                if rule.kind in SETTLE_KINDS}

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._sha[name]
        try:
            return self.client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            self.client.script_load(self._sources[name])
            return self.client.evalsha(sha, len(keys), *keys, *args)


def _figures_from(values: Sequence[Any], keys: Sequence[FigureKey], rule_figure: Sequence[tuple[Rule, int]],
                  ) -> dict[str, int]:
    """Every rule's figure by name from the observe script's reply (``keys``: its figures in order)."""
    figures: list[tuple[int, int]] = []  # (value or total, count)
    at = 0
    for key in keys:
        if key.kind in SETTLE_KINDS:
            figures.append((int(values[at]), int(values[at + 1])))
            at += 2
        else:
            figures.append((int(values[at]), 0))
            at += 1
    return {rule.name: _figure(rule, *figures[index]) for rule, index in rule_figure}


def _figure(rule: Rule, value: int, count: int) -> int:
    """A rule's figure from its window's value (spend and short_calls: total and count)."""
    if rule.kind is RuleKind.SHORT_CALLS:
        return 0 if count < rule.min_calls or not count else value * 100 // count
    return value


class _ObserveRider:
    """One call's observe, as a ``StoreRider`` (agent/ports.py): queued in the balance store's
    pipeline if that pipeline is of this counters' client, its reply turned into the figures.
    An error in the reply (the script not loaded on that server, say) gives no figures: the fraud
    service then calls ``observe``, which loads the script (and riders go on after it). The rider
    holds the script's sha of the rules it was made with, so a reload in between cannot mix them
    up."""

    __slots__ = ("_counters", "_key", "_args", "_sha", "_keys", "_rule_figure", "_reply")

    def __init__(self, counters: RedisFraudCounters, facts: CallFacts) -> None:
        self._counters = counters
        self._key = counters._base(facts.account_id)
        self._args = counters._observe_args(facts)
        self._sha = counters._sha["observe"]
        self._keys, self._rule_figure = counters._figures, counters._rule_figure  # the rules of the sha
        self._reply: object = None

    def queue(self, client: object, pipeline: Any) -> bool:
        if client is not self._counters.client:
            return False
        pipeline.evalsha(self._sha, 1, self._key, *self._args)
        return True

    def answer(self, reply: object) -> None:
        self._reply = reply
        if isinstance(reply, NoScriptError):  # the server lost its scripts: the next observe loads it
            self._counters._observe_loaded = False

    def figures(self) -> dict[str, int] | None:
        reply = self._reply
        if not isinstance(reply, list):
            return None
        return _figures_from(reply, self._keys, self._rule_figure)
