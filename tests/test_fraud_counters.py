"""The figures of the fraud rules, one contract for both counters: in memory (one node) and in Redis
(shared by every node; a real Redis, a key prefix of this test's own). Instants are given, never
read: windows slide on fake milliseconds."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.adapters.fraud_rules_file import load_rules
from agent.adapters.redis.counters import RedisFraudCounters, _lua
from agent.adapters.redis.store import make_client
from agent.core.fraud import CallFacts, LocalCounters, Verdict, destination_digits, evaluate
from agent.core.fraud_rules import RuleSet
from agent.ports import FraudCounters

Make = Callable[[RuleSet], FraudCounters]


@pytest.fixture(params=["memory", "redis", "cluster"])
def make(request: pytest.FixtureRequest) -> Make:
    if request.param == "memory":
        return LocalCounters
    if request.param == "cluster":  # the script reaches its figure keys from the one key it is given
        client = make_client(request.getfixturevalue("redis_cluster_url"), 2000)
        prefix = f"test:{uuid.uuid4().hex[:8]}:"
        return lambda rules: RedisFraudCounters(client, key_prefix=prefix, rules=rules)
    client = request.getfixturevalue("redis_client")
    prefix = request.getfixturevalue("redis_prefix")
    return lambda rules: RedisFraudCounters(client, key_prefix=prefix, rules=rules)


def rules_from(tmp_path: Path, text: str) -> RuleSet:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return load_rules(path)


def facts(account: str, call_id: str, number: str, rules: RuleSet, at_ms: int) -> CallFacts:
    digits = destination_digits(number)
    return CallFacts(account, call_id, digits, rules.groups_of(digits), at_ms)


def check(rules: RuleSet, counters: FraudCounters, call: CallFacts) -> Verdict:
    """As the service does: observe, evaluate, and forget a refused call."""
    verdict = evaluate(rules, counters.observe(call), call)
    if verdict.deny is not None:
        counters.forget(call.account_id, call.call_id)
    return verdict


def test_new_calls_per_second_slide_and_deny(make: Make, tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        rules:
          - {name: cps, kind: new_calls, window_s: 1, threshold: 2, action: deny}
        """)
    counters = make(rules)
    verdicts = [check(rules, counters, facts("a", f"c{i}", "+3314", rules, at))
                for i, at in enumerate([0, 100, 200, 1150, 1180])]
    assert [v.deny is not None for v in verdicts] == [False, False, True, False, True]
    assert verdicts[2].deny is not None and verdicts[2].deny.figure == 3
    assert check(rules, counters, facts("b", "x", "+3314", rules, 210)).deny is None  # b has its own counters


def test_live_calls_to_a_group_suspend_only_for_group_calls(make: Make, tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        groups: {hr: {prefixes: ["882"]}}
        rules:
          - {name: irsf, kind: live_calls, group: hr, threshold: 2, action: suspend}
        """)
    counters = make(rules)
    for i in range(2):
        assert check(rules, counters, facts("a", f"p{i}", "0088299", rules, i)).suspend is None
    assert check(rules, counters, facts("a", "dom", "+3314", rules, 5)).hits == ()  # 2 live to the group
    verdict = check(rules, counters, facts("a", "p2", "+88299", rules, 6))
    assert verdict.suspend is not None and verdict.suspend.figure == 3 and verdict.deny is verdict.suspend
    counters.ended("a", "p0", 7, 0, True, 1000)
    again = check(rules, counters, facts("a", "p3", "+88299", rules, 8))
    assert again.suspend is None  # p0 ended, p2 was refused: 2 with this one


def test_distinct_destinations_spend_and_short_calls(make: Make, tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        rules:
          - {name: scan, kind: distinct_destinations, window_s: 60, threshold: 2, action: alert}
          - {name: velocity, kind: spend, window_s: 3600, threshold: "1.50", action: alert}
          - {name: wangiri, kind: short_calls, window_s: 600, threshold: 50, min_calls: 4, action: deny}
        """)
    counters = make(rules)
    for i, number in enumerate(["+331", "+331", "+332"]):
        assert check(rules, counters, facts("a", f"c{i}", number, rules, i)).hits == ()  # 2 distinct: not over 2
    assert counters.ended("a", "c0", 10, 1_000_000, True, 2_000) == {"velocity": 1_000_000, "wangiri": 0}
    assert counters.ended("a", "c1", 11, 600_000, True, 3_000) == {"velocity": 1_600_000, "wangiri": 0}
    counters.ended("a", "c2", 12, 0, False, 0)  # unanswered calls are not in the short-call share
    verdict = check(rules, counters, facts("a", "c3", "+333", rules, 20))
    assert {h.rule.name: h.figure for h in verdict.hits} == {"scan": 3, "velocity": 1_600_000}
    assert verdict.deny is None  # 2 answered calls: under min_calls, no short-call share yet
    counters.ended("a", "c3", 30, 0, True, 60_000)
    assert counters.ended("a", "c4", 31, 0, True, 1_000) == {"velocity": 1_600_000, "wangiri": 75}
    verdict = check(rules, counters, facts("a", "c5", "+331", rules, 40))
    assert verdict.deny is not None and verdict.deny.rule.name == "wangiri" and verdict.deny.figure == 75
    # An hour later the first calls have left every window: spend 0.10 (not 1.70), one answered
    # call (under min_calls), one number.
    counters.ended("a", "c5", 3_600_011, 100_000, True, 20_000)
    assert check(rules, counters, facts("a", "c6", "+331", rules, 3_600_012)).hits == ()


def test_two_nodes_on_one_redis_see_each_others_calls(redis_client: object, redis_prefix: str,
                                                       tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        groups: {hr: {prefixes: ["882"]}}
        rules:
          - {name: irsf, kind: live_calls, group: hr, threshold: 3, action: suspend}
        """)
    node1 = RedisFraudCounters(redis_client, key_prefix=redis_prefix, rules=rules)
    node2 = RedisFraudCounters(redis_client, key_prefix=redis_prefix, rules=rules)
    local1, local2 = LocalCounters(rules), LocalCounters(rules)
    verdicts, local_verdicts = [], []
    for i in range(4):  # an attack spread over two nodes: 2 calls each
        shared, alone = (node1, local1) if i % 2 == 0 else (node2, local2)
        call = facts("a", f"n{i % 2 + 1}-c{i}", "+88212", rules, 1000 + i)
        verdicts.append(check(rules, shared, call))
        local_verdicts.append(check(rules, alone, call))
    assert [v.suspend is not None for v in verdicts] == [False, False, False, True]
    assert all(v.suspend is None for v in local_verdicts)  # node-local counters see 2 each: never over 3


def test_memory_counters_forget_accounts_whose_windows_emptied(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        rules:
          - {name: cpm, kind: new_calls, window_s: 60, threshold: 100, action: alert}
          - {name: velocity, kind: spend, window_s: 600, threshold: "9.00", action: alert}
        """)
    counters = LocalCounters(rules)
    for n in range(50):
        call = facts(f"acct{n}", f"c{n}", "+331", rules, n)
        counters.observe(call)
        counters.ended(call.account_id, call.call_id, n + 1, 10, True, 1_000)
    assert counters.sweep(30_000) == 50  # spend still in its 10-minute window
    assert counters.sweep(700_000) == 0  # every window empty, no live call: nothing kept


def test_first_call_to_a_country_not_called_in_the_window(make: Make, tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        rules:
          - {name: new_country, kind: new_country, window_s: 2592000, prefix_digits: 2, threshold: 0,
             action: alert, when: 'hour < 6'}
        """)
    counters = make(rules)
    day_ms = 86_400_000
    night = 3 * 3_600_000

    def fired(call_id: str, number: str, at_ms: int) -> bool:
        return bool(check(rules, counters, facts("a", call_id, number, rules, at_ms)).hits)

    assert fired("c1", "+5371234567", night)  # Cuba, never called: fires (at night)
    assert not fired("c2", "+5379999999", night + 60_000)  # called a minute ago
    assert not fired("c3", "+4930123456", 13 * 3_600_000)  # a new country, but by day: the condition
    assert not fired("c4", "+4930123457", day_ms + night)  # Germany called yesterday
    assert fired("c5", "+5371234567", 31 * day_ms + night)  # Cuba again after 31 days: new again
    assert check(rules, counters, facts("b", "x", "+5371234567", rules, night)).hits  # b has its own history


def test_new_rules_take_effect_on_the_same_counters(make: Make, tmp_path: Path) -> None:
    """A SIGHUP gives the counters new rules (``set_rules``): in Redis the observe script is
    written for the rule set, so the new one must be the one that runs."""
    one_s = rules_from(tmp_path, "rules:\n  - {name: cps, kind: new_calls, window_s: 1, threshold: 1, action: deny}\n")
    counters = make(one_s)
    assert check(one_s, counters, facts("a", "c1", "+3314", one_s, 0)).deny is None
    assert check(one_s, counters, facts("a", "c2", "+3314", one_s, 1_500)).deny is None  # c1 left the 1 s window
    ten_s = rules_from(tmp_path, "rules:\n  - {name: cps, kind: new_calls, window_s: 10, threshold: 1, action: deny}\n")
    counters.set_rules(ten_s)
    assert check(ten_s, counters, facts("a", "c3", "+3314", ten_s, 3_000)).deny is None  # a new window starts empty
    verdict = check(ten_s, counters, facts("a", "c4", "+3314", ten_s, 4_000))  # 1 s after c3: the 1 s rule would let it
    assert verdict.deny is not None and verdict.deny.figure == 2


def test_a_group_name_reaches_the_script_as_the_same_bytes(redis_client: object) -> None:
    """Group names and key suffixes are written into the observe script as Lua literals: any byte
    reads back as itself (a rule file never becomes code)."""
    text = "hr-1.x,:_'\"\\\n]]--é"
    assert redis_client.eval(f"return {_lua(text)}", 0) == text.encode()  # type: ignore[attr-defined]
