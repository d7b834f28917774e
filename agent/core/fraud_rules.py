"""Fraud rules as data: validating a rules document (DESIGN §8).

Pure (no I/O, no clock): the loader in ``agent/adapters/fraud_rules_file.py`` reads the YAML
with the line of every value (:class:`Node`) and the prefix files of the destination groups;
this module checks every key and returns a :class:`RuleSet`, or every problem found as
:class:`RuleError` values naming the line and the key (like a rate deck, one pass reports all).

The document::

    groups:                        # destination groups: prefixes in international format
      high_risk: {file: high_risk_prefixes.txt}     # a file next to the rules file, or
      premium_uk: {prefixes: ["4470", "449"]}       # a list
    rules:
      - name: irsf_parallel        # unique, letters, digits, _ . -
        kind: live_calls           # new_calls | live_calls | distinct_destinations | spend | short_calls
        group: high_risk           # optional for new_calls, live_calls, distinct_destinations
        threshold: 5               # fires when the figure, counting this call, exceeds it
        action: suspend            # alert | deny | suspend
        when: 'hour < 7'           # optional CEL condition (see CEL_FIELDS), compiled here once

``window_s`` (1..86400; up to 90 days for ``new_country``) is required by every kind but
``live_calls`` (which has none). ``new_country`` gives 1 when no call of the account went to the
number's first ``prefix_digits`` (default 3) digits within the window (0 otherwise). ``spend``
takes its threshold as money (a decimal string, micro-units inside); ``short_calls`` as a
percentage (1..100) of the settled answered calls of the window shorter than ``short_call_s``
(default 6), once there are ``min_calls`` (default 10) of them. ``deny: group`` (with a group)
refuses only calls to the rule's group; ``deny: all`` (the default) every new call of the account.
``tenant`` (a tenant's name, or a list of them; DESIGN §11) limits the rule to the accounts of
those tenants and of every tenant below them (a reseller's customers and its sub-resellers'):
the figures stay per account, and a rule without ``tenant`` applies to every account. With
``count: tenant`` (and exactly one ``tenant``) the figure is that tenant's: the calls of all the
accounts under it counted together (a reseller's customers opening 30 calls to a premium range
between them, each only a few); such a rule alerts or denies (the calls of the tenant's
accounts while the figure is over), it does not suspend one account for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.core.money import MoneyError, parse_amount

MAX_WINDOW_S = 86_400
MAX_NEW_COUNTRY_WINDOW_S = 90 * 86_400  # "not called in N days"
MAX_PREFIX_DIGITS = 32
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # as tenants are named (adapters/sql/tenants.py)


class RuleKind(StrEnum):
    NEW_CALLS = "new_calls"  # call attempts of the account in the window
    LIVE_CALLS = "live_calls"  # calls of the account live now (allowed, not yet ended)
    DISTINCT_DESTINATIONS = "distinct_destinations"  # different numbers dialled in the window
    SPEND = "spend"  # money of the calls settled in the window (micro-units)
    SHORT_CALLS = "short_calls"  # percentage of short calls among the answered calls settled in the window
    NEW_COUNTRY = "new_country"  # 1 when the call's country (first prefix_digits digits) was not called in the window


class Action(StrEnum):
    ALERT = "alert"
    DENY = "deny"
    SUSPEND = "suspend"


WINDOWED = frozenset({RuleKind.NEW_CALLS, RuleKind.DISTINCT_DESTINATIONS, RuleKind.SPEND, RuleKind.SHORT_CALLS,
                      RuleKind.NEW_COUNTRY})
GROUPABLE = frozenset({RuleKind.NEW_CALLS, RuleKind.LIVE_CALLS, RuleKind.DISTINCT_DESTINATIONS, RuleKind.NEW_COUNTRY})
RULE_KEYS = frozenset({"name", "kind", "threshold", "window_s", "group", "action", "deny", "when", "description",
                       "short_call_s", "min_calls", "prefix_digits", "tenant", "count"})

# What a CEL condition can read (the activation built by ``agent.core.fraud``).
CEL_FIELDS: dict[str, str] = {
    "account": "the account id (string)",
    "destination": "the dialled number, digits only (string)",
    "caller": "the caller id (string)",
    "pbx": "asterisk or freeswitch (string)",
    "groups": "the destination groups the number is in (list of strings)",
    "figure": "the rule's figure for this call (int; micro-units for spend)",
    "threshold": "the rule's threshold (int; micro-units for spend)",
    "hour": "the hour of the call in the timezone of the account's rate plan (int, 0-23)",
    "weekday": "the ISO weekday of the call in the timezone of the account's rate plan (int, 1 = Monday)",
}
LOCAL_TIME_FIELDS = frozenset({"hour", "weekday"})  # need the account's timezone
_CEL_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


@dataclass(frozen=True, slots=True)
class Node:
    """A value of the YAML document with the line it starts on (1-based): a scalar, a list of
    nodes or a dict of key -> node (keys are the document's strings)."""

    value: Any
    line: int


@dataclass(frozen=True, slots=True)
class RuleError:
    line: int
    key: str
    reason: str

    def describe(self, source: str) -> str:
        """``FILE:LINE: key K: reason`` (``key`` left out when the whole entry is at fault)."""
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: key {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}"


class Condition:
    """A CEL expression compiled once; ``holds`` evaluates it on one call's activation."""

    def __init__(self, source: str, program: Any, names: frozenset[str] = frozenset()) -> None:
        self.source = source
        self._program = program
        self.names = names  # the fields of CEL_FIELDS it reads

    @property
    def reads_local_time(self) -> bool:
        return bool(self.names & LOCAL_TIME_FIELDS)

    def holds(self, activation: dict[str, Any]) -> bool:
        """True or False; raises ``ValueError`` with CEL's reason when the evaluation fails or does
        not give a bool (the caller decides what a broken condition means)."""
        from celpy.evaluation import CELEvalError

        try:
            result = self._program.evaluate(_cel_values(activation))
        except CELEvalError as exc:
            raise ValueError(f"CEL {self.source!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises is this condition's failure
            raise ValueError(f"CEL {self.source!r}: {exc.__class__.__name__}: {exc}") from None
        if isinstance(result, CELEvalError):
            raise ValueError(f"CEL {self.source!r}: {result}")
        from celpy import celtypes

        if not isinstance(result, celtypes.BoolType | bool):
            raise ValueError(f"CEL {self.source!r} gave {result!r}, not a bool")
        return bool(result)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: RuleKind
    threshold: int  # micro-units for spend, percent for short_calls, a count otherwise
    action: Action
    line: int
    window_s: int = 0  # 0 for live_calls
    group: str = ""
    deny_group_only: bool = False
    short_call_s: int = 6
    min_calls: int = 10
    prefix_digits: int = 3  # new_country: the first digits that stand for the country
    condition: Condition | None = field(default=None, compare=False)
    description: str = ""
    tenants: frozenset[str] = frozenset()  # empty: every account; else accounts under one of these tenants
    per_tenant: bool = False  # count: tenant: the figure counts every account under the (one) tenant

    @property
    def owner(self) -> str:
        """Whose figure a ``count: tenant`` rule reads: its tenant's, under a key no account id
        can take (account ids are printable)."""
        return tenant_owner(next(iter(self.tenants))) if self.per_tenant else ""

    @property
    def window_ms(self) -> int:
        return self.window_s * 1000


def tenant_owner(tenant: str) -> str:
    """The counters' owner of a tenant's figures (``count: tenant``)."""
    return f"\x1f{tenant}"


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    groups: dict[str, frozenset[str]] = field(default_factory=dict)  # name -> prefixes (digits)
    _by_prefix: dict[str, frozenset[str]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _longest: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_prefix: dict[str, set[str]] = {}
        for name, prefixes in self.groups.items():
            for prefix in prefixes:
                by_prefix.setdefault(prefix, set()).add(name)
        # Frozen: the lookup tables are set once here (object.__setattr__ is the dataclass idiom).
        object.__setattr__(self, "_by_prefix", {prefix: frozenset(names) for prefix, names in by_prefix.items()})
        object.__setattr__(self, "_longest", max(map(len, by_prefix), default=0))

    @property
    def has_tenant_rules(self) -> bool:
        return any(rule.tenants for rule in self.rules)

    def split(self) -> tuple[RuleSet, RuleSet]:
        """(the rules counted per account, the rules counted per tenant), each with the groups."""
        return (RuleSet(tuple(r for r in self.rules if not r.per_tenant), self.groups),
                RuleSet(tuple(r for r in self.rules if r.per_tenant), self.groups))

    @property
    def reads_local_time(self) -> bool:
        """Whether a condition reads ``hour`` or ``weekday`` (then each call needs its account's timezone)."""
        return any(rule.condition is not None and rule.condition.reads_local_time for rule in self.rules)

    def groups_of(self, digits: str) -> frozenset[str]:
        """The groups whose prefix list holds a prefix of ``digits``."""
        found: frozenset[str] = frozenset()
        for n in range(1, min(len(digits), self._longest) + 1):
            names = self._by_prefix.get(digits[:n])
            if names is not None:
                found = found | names
        return found


GroupFileReader = Callable[[str], list[str]]  # path as written -> its lines; raises ValueError(reason)


def parse_rules(doc: Node | None, read_group_file: GroupFileReader) -> RuleSet | list[RuleError]:
    """Check a whole rules document; a :class:`RuleSet`, or every error found."""
    errors: list[RuleError] = []
    if doc is None or doc.value is None:
        return RuleSet()
    if not isinstance(doc.value, dict):
        return [RuleError(doc.line, "", "the file must be a mapping with the keys groups and rules")]
    for key in doc.value:
        if key not in ("groups", "rules"):
            errors.append(RuleError(doc.value[key].line, str(key), "unknown key (expected groups, rules)"))
    groups = _parse_groups(doc.value.get("groups"), read_group_file, errors)
    rules: list[Rule] = []
    raw_rules = doc.value.get("rules")
    if raw_rules is not None and raw_rules.value is not None:
        if not isinstance(raw_rules.value, list):
            errors.append(RuleError(raw_rules.line, "rules", "must be a list of rules"))
        else:
            seen: dict[str, int] = {}
            for entry in raw_rules.value:
                rule = _parse_rule(entry, groups, errors)
                if rule is None:
                    continue
                if rule.name in seen:
                    errors.append(RuleError(rule.line, "name", f"{rule.name!r} is already the name of the rule "
                                                               f"on line {seen[rule.name]}"))
                    continue
                seen[rule.name] = rule.line
                rules.append(rule)
    if errors:
        return sorted(errors, key=lambda e: e.line)
    return RuleSet(tuple(rules), groups)


def _parse_groups(node: Node | None, read_group_file: GroupFileReader,
                  errors: list[RuleError]) -> dict[str, frozenset[str]]:
    groups: dict[str, frozenset[str]] = {}
    if node is None or node.value is None:
        return groups
    if not isinstance(node.value, dict):
        errors.append(RuleError(node.line, "groups", "must be a mapping of group name -> {prefixes | file}"))
        return groups
    for name, spec in node.value.items():
        key = f"groups.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            errors.append(RuleError(spec.line, key, "a group name is 1-64 letters, digits, _ . -"))
            continue
        if not isinstance(spec.value, dict) or len(spec.value) != 1 or not {"prefixes", "file"} & spec.value.keys():
            errors.append(RuleError(spec.line, key, "must be {prefixes: [...]} or {file: PATH}"))
            continue
        prefixes: set[str] = set()
        if "prefixes" in spec.value:
            listed = spec.value["prefixes"]
            if not isinstance(listed.value, list) or not listed.value:
                errors.append(RuleError(listed.line, f"{key}.prefixes", "must be a non-empty list of prefixes"))
                continue
            for item in listed.value:
                reason = _prefix_problem(str(item.value))
                if reason:
                    errors.append(RuleError(item.line, f"{key}.prefixes", reason))
                else:
                    prefixes.add(str(item.value).lstrip("+"))
        else:
            path = spec.value["file"]
            try:
                lines = read_group_file(str(path.value))
            except ValueError as exc:
                errors.append(RuleError(path.line, f"{key}.file", str(exc)))
                continue
            for number, text in enumerate(lines, start=1):
                cell = text.split("#", 1)[0].strip()
                if not cell:
                    continue
                reason = _prefix_problem(cell)
                if reason:
                    errors.append(RuleError(path.line, f"{key}.file", f"{path.value}:{number}: {reason}"))
                else:
                    prefixes.add(cell.lstrip("+"))
            if not prefixes:
                errors.append(RuleError(path.line, f"{key}.file", f"{path.value} lists no prefix"))
        groups[name] = frozenset(prefixes)
    return groups


def _prefix_problem(text: str) -> str:
    digits = text[1:] if text.startswith("+") else text
    if not digits.isdigit() or not digits.isascii() or len(digits) > MAX_PREFIX_DIGITS:
        return f"prefix {text!r} must be 1-{MAX_PREFIX_DIGITS} digits (a leading + allowed)"
    return ""


def _parse_rule(entry: Node, groups: dict[str, frozenset[str]], errors: list[RuleError]) -> Rule | None:
    if not isinstance(entry.value, dict):
        errors.append(RuleError(entry.line, "", "a rule must be a mapping (name, kind, threshold, action...)"))
        return None
    found = len(errors)
    values: dict[str, Node] = entry.value
    for key, node in values.items():
        if key not in RULE_KEYS:
            errors.append(RuleError(node.line, str(key),
                                    f"unknown key (expected one of {', '.join(sorted(RULE_KEYS))})"))
    for key in ("name", "kind", "threshold", "action"):
        if key not in values:
            errors.append(RuleError(entry.line, key, "missing"))
    if len(errors) > found:
        return None

    def text(key: str) -> str:
        return str(values[key].value) if key in values and values[key].value is not None else ""

    def fail(key: str, reason: str) -> None:
        errors.append(RuleError(values[key].line if key in values else entry.line, key, reason))

    name = text("name")
    if not NAME.fullmatch(name):
        fail("name", f"{name!r} must be 1-64 letters, digits, _ . -")
    try:
        kind = RuleKind(text("kind"))
    except ValueError:
        fail("kind", f"unknown kind {text('kind')!r} (expected {', '.join(k.value for k in RuleKind)})")
        return None
    try:
        action = Action(text("action"))
    except ValueError:
        fail("action", f"unknown action {text('action')!r} (expected alert, deny or suspend)")
        action = Action.ALERT
    window_s = 0
    if kind in WINDOWED:
        if "window_s" not in values:
            fail("window_s", f"missing (a {kind} rule counts over a window of seconds)")
        else:
            most = MAX_NEW_COUNTRY_WINDOW_S if kind is RuleKind.NEW_COUNTRY else MAX_WINDOW_S
            window_s = _whole(values["window_s"], "window_s", 1, most, errors)
    elif "window_s" in values:
        fail("window_s", f"a {kind} rule has no window (it counts the calls live now)")
    threshold = _threshold(kind, values["threshold"], errors)
    group = text("group")
    if "group" in values:
        if kind not in GROUPABLE:
            fail("group", f"a {kind} rule counts every call of the account, it takes no group")
        elif group not in groups:
            fail("group", f"unknown group {group!r} (define it under groups:)")
    deny_group_only = False
    if "deny" in values:
        scope = text("deny")
        if action is not Action.DENY:
            fail("deny", "only a rule whose action is deny takes deny: group | all")
        elif scope not in ("group", "all"):
            fail("deny", f"{scope!r} must be group or all")
        elif scope == "group" and not group:
            fail("deny", "deny: group needs the rule's group")
        deny_group_only = scope == "group"
    short_call_s, min_calls, prefix_digits = 6, 10, 3
    if "prefix_digits" in values:
        if kind is not RuleKind.NEW_COUNTRY:
            fail("prefix_digits", "only a new_country rule takes prefix_digits")
        else:
            prefix_digits = _whole(values["prefix_digits"], "prefix_digits", 1, 6, errors)
    for key in ("short_call_s", "min_calls"):
        if key in values and kind is not RuleKind.SHORT_CALLS:
            fail(key, f"only a short_calls rule takes {key}")
    if kind is RuleKind.SHORT_CALLS:
        if "short_call_s" in values:
            short_call_s = _whole(values["short_call_s"], "short_call_s", 1, 3600, errors)
        if "min_calls" in values:
            min_calls = _whole(values["min_calls"], "min_calls", 1, 1_000_000, errors)
    tenants = _tenants(values["tenant"], errors) if "tenant" in values else frozenset()
    per_tenant = False
    if "count" in values:
        counted = text("count")
        if counted not in ("account", "tenant"):
            fail("count", f"{counted!r} must be account or tenant")
        elif counted == "tenant":
            per_tenant = True
            if len(tenants) != 1:
                fail("count", "count: tenant needs exactly one tenant (tenant: NAME): whose calls are counted")
            if action is Action.SUSPEND:
                fail("count", "a rule counting a tenant's calls alerts or denies; it cannot suspend one account "
                              "for all of them")
    condition = None
    if "when" in values:
        condition = compile_condition(values["when"], errors)
    if len(errors) > found:
        return None
    return Rule(name=name, kind=kind, threshold=threshold, action=action, line=entry.line, window_s=window_s,
                group=group, deny_group_only=deny_group_only, short_call_s=short_call_s, min_calls=min_calls,
                prefix_digits=prefix_digits,
                condition=condition, description=text("description"), tenants=tenants, per_tenant=per_tenant)


def _tenants(node: Node, errors: list[RuleError]) -> frozenset[str]:
    """``tenant: acme`` or ``tenant: [acme, globex]``: the names, each as tenants are named."""
    items = node.value if isinstance(node.value, list) else [node]
    names: set[str] = set()
    if not items:
        errors.append(RuleError(node.line, "tenant", "an empty list (leave the key out for every account)"))
    for item in items:
        name = item.value
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            errors.append(RuleError(item.line, "tenant", f"{name!r} must be a tenant's name (1-64 letters, digits, "
                                                         "_ . -, starting with a letter or digit)"))
            continue
        names.add(name)
    return frozenset(names)


def _whole(node: Node, key: str, least: int, most: int, errors: list[RuleError]) -> int:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(RuleError(node.line, key, f"{value!r} must be a whole number from {least} to {most}"))
        return 0
    if not least <= value <= most:
        errors.append(RuleError(node.line, key, f"{value} must be from {least} to {most}"))
        return 0
    return value


def _threshold(kind: RuleKind, node: Node, errors: list[RuleError]) -> int:
    if kind is RuleKind.SPEND:
        if isinstance(node.value, float):  # YAML 20.5 is a float: money is never parsed from one
            errors.append(RuleError(node.line, "threshold", f"write the amount as a string, \"{node.value}\""))
            return 0
        try:
            return parse_amount(str(node.value), what="threshold")
        except MoneyError as exc:
            errors.append(RuleError(node.line, "threshold", str(exc)))
            return 0
    if kind is RuleKind.SHORT_CALLS:
        return _whole(node, "threshold", 1, 100, errors)
    if isinstance(node.value, int) and not isinstance(node.value, bool) and node.value < 0:
        errors.append(RuleError(node.line, "threshold", f"{node.value} must not be negative"))
        return 0
    return _whole(node, "threshold", 0, 1_000_000_000, errors)


def compile_condition(node: Node, errors: list[RuleError]) -> Condition | None:
    """Compile a CEL condition once; a syntax error or a name outside ``CEL_FIELDS`` is an error."""
    import celpy
    from celpy.celparser import CELParseError
    from lark import Tree

    source = node.value
    if not isinstance(source, str) or not source.strip():
        errors.append(RuleError(node.line, "when", "must be a CEL expression (a string)"))
        return None
    env = celpy.Environment()
    try:
        ast = env.compile(source)
    except CELParseError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        errors.append(RuleError(node.line, "when", f"CEL does not compile: {first} in {source!r}"))
        return None
    names = set(_identifiers(ast)) - set(_bound_names(ast, Tree))
    unknown = sorted(names - CEL_FIELDS.keys())
    if unknown:
        errors.append(RuleError(node.line, "when", f"CEL names unknown field(s) {', '.join(unknown)} "
                                                   f"(known: {', '.join(CEL_FIELDS)})"))
        return None
    return Condition(source, env.program(ast), frozenset(names))


def _identifiers(tree: Any) -> Iterable[str]:
    for sub in tree.iter_subtrees():
        if sub.data == "ident" and sub.children:
            yield str(sub.children[0])


def _bound_names(tree: Any, tree_type: Any) -> Iterable[str]:
    """Variables a macro binds (``groups.exists(g, g == "x")`` binds ``g``)."""
    for sub in tree.iter_subtrees():
        if sub.data == "member_dot_arg" and len(sub.children) >= 3 and str(sub.children[1]) in _CEL_MACROS:
            args: Any = sub.children[2]
            if isinstance(args, tree_type) and args.children:
                first: Any = args.children[0]
                for inner in first.iter_subtrees():
                    if inner.data == "ident" and inner.children:
                        yield str(inner.children[0])
                        break


def _cel_values(activation: dict[str, Any]) -> dict[str, Any]:
    from celpy import celtypes

    out: dict[str, Any] = {}
    for key, value in activation.items():
        if isinstance(value, bool):
            out[key] = celtypes.BoolType(value)
        elif isinstance(value, int):
            out[key] = celtypes.IntType(value)
        elif isinstance(value, str):
            out[key] = celtypes.StringType(value)
        else:
            out[key] = celtypes.ListType([celtypes.StringType(v) for v in sorted(value)])
    return out
