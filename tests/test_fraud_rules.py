"""Fraud rules: the file is validated like a rate deck (file, line, key, reason), and the pure
evaluation gives the figures and verdicts an operator expects (fake instants, no I/O)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.adapters.fraud_rules_file import RulesFileError, load_rules
from agent.core.fraud import CallFacts, LocalCounters, Verdict, destination_digits, evaluate
from agent.core.fraud_rules import Action, RuleKind, RuleSet

SHIPPED = Path(__file__).resolve().parents[1] / "fraud" / "rules.yaml"


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(RulesFileError) as caught:
        load_rules(path)
    return caught.value.errors


def test_the_shipped_rules_load_with_their_prefix_file() -> None:
    rules = load_rules(SHIPPED)
    by_name = {r.name: r for r in rules.rules}
    assert by_name["irsf_parallel"].kind is RuleKind.LIVE_CALLS
    assert by_name["irsf_parallel"].action is Action.SUSPEND
    assert by_name["spend_velocity"].threshold == 50_000_000  # "50.00" in micro-units
    assert "high_risk" in rules.groups_of("88213")
    assert rules.groups_of("33140000000") == frozenset()


def test_every_error_names_the_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, """
        groups:
          premium: {prefixes: ["882", "12a"]}
        rules:
          - name: a
            kind: calls_per_fortnight
            threshold: 1
            action: alert
          - name: b
            kind: new_calls
            window_s: 0
            threshold: 5
            action: deny
          - name: c
            kind: live_calls
            threshold: -3
            action: suspend
          - name: d
            kind: new_calls
            window_s: 60
            threshold: 5
            action: alert
            when: 'hour >= '
          - name: e
            kind: new_calls
            window_s: 60
            threshold: 5
            action: alert
            when: 'country == "CU"'
          - name: f
            kind: spend
            window_s: 60
            threshold: "-1.00"
            action: alert
          - name: g
            kind: live_calls
            group: nowhere
            threshold: 1
            action: alert
          - {name: h, kind: live_calls, threshold: 1, action: alert, colour: red}
          - {name: i, kind: new_country, window_s: 8000000, threshold: 0, action: alert}
          - {name: j, kind: new_calls, window_s: 60, threshold: 0, action: alert, prefix_digits: 2}
        """)
    errors = errors_of(path)
    src = str(path)
    assert f"{src}:2: key groups.premium.prefixes: prefix '12a' must be 1-32 digits (a leading + allowed)" in errors
    assert any(e.startswith(f"{src}:5: key kind: unknown kind 'calls_per_fortnight'") for e in errors)
    assert f"{src}:10: key window_s: 0 must be from 1 to 86400" in errors
    assert f"{src}:15: key threshold: -3 must not be negative" in errors
    assert any(e.startswith(f"{src}:22: key when: CEL does not compile") for e in errors)
    assert any(e.startswith(f"{src}:28: key when: CEL names unknown field(s) country") for e in errors)
    assert any(e.startswith(f"{src}:32: key threshold:") and "negative" in e for e in errors)
    assert f"{src}:36: key group: unknown group 'nowhere' (define it under groups:)" in errors
    assert any(e.startswith(f"{src}:39: key colour: unknown key") for e in errors)
    assert f"{src}:40: key window_s: 8000000 must be from 1 to 7776000" in errors
    assert f"{src}:41: key prefix_digits: only a new_country rule takes prefix_digits" in errors


def test_bad_files_and_group_files_are_named(tmp_path: Path) -> None:
    assert errors_of(tmp_path / "missing.yaml") == [f"{tmp_path / 'missing.yaml'}: no such file"]
    path = write(tmp_path, "rules: [\n")
    assert errors_of(path)[0].startswith(f"{path}:2: not valid YAML")
    write(tmp_path, "882\n# comment\n+53 # Cuba\n9x9\n", name="list.txt")
    path = write(tmp_path, """
        groups:
          hr: {file: list.txt}
          gone: {file: nope.txt}
        rules:
          - {name: a, kind: live_calls, threshold: 1, action: deny, deny: group}
          - {name: a, kind: live_calls, threshold: 1, action: alert, window_s: 5}
        """)
    errors = errors_of(path)
    assert f"{path}:2: key groups.hr.file: list.txt:4: prefix '9x9' must be 1-32 digits (a leading + allowed)" in errors
    assert any(e.startswith(f"{path}:3: key groups.gone.file:") and "no such file" in e for e in errors)
    assert f"{path}:5: key deny: deny: group needs the rule's group" in errors
    assert f"{path}:6: key window_s: a live_calls rule has no window (it counts the calls live now)" in errors


def test_cel_condition_accepts_macro_variables_and_reads_the_call(tmp_path: Path) -> None:
    path = write(tmp_path, """
        rules:
          - name: night
            kind: new_calls
            window_s: 60
            threshold: 0
            action: alert
            when: 'hour < 6 && groups.exists(g, g == "hr") && destination.startsWith("882")'
        groups:
          hr: {prefixes: ["882"]}
        """)
    rules = load_rules(path)
    counters = LocalCounters(rules)
    night = facts("a", "n1", "+88212345", rules, at_ms=3 * 3_600_000)
    assert [h.rule.name for h in check(rules, counters, night).hits] == ["night"]
    day = facts("a", "d1", "+88212345", rules, at_ms=13 * 3_600_000)
    assert check(rules, counters, day).hits == ()


def check(rules: RuleSet, counters: LocalCounters, call: CallFacts) -> Verdict:
    return evaluate(rules, counters.observe(call), call)


def facts(account: str, call_id: str, number: str, rules: RuleSet, at_ms: int) -> CallFacts:
    digits = destination_digits(number)
    return CallFacts(account, call_id, digits, rules.groups_of(digits), at_ms)



def test_a_condition_that_fails_at_run_time_is_not_met_and_says_why(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, """
        rules:
          - {name: typo, kind: new_calls, window_s: 60, threshold: 0, action: deny, when: 'destination > 5'}
        """))
    call = facts("a", "c1", "+3314", rules, 0)
    verdict = check(rules, LocalCounters(rules), call)
    assert verdict.deny is None and verdict.hits == ()  # a broken condition never refuses a call
    (error,) = verdict.errors
    assert error.startswith("rule typo: CEL 'destination > 5'") and "no matching overload" in error
