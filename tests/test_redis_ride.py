"""The fraud counters' observe rides in the Redis balance store's authorize round trip.

On one Redis and on a Redis Cluster: the figures the store brings back are the ones ``observe``
gives; a call is counted once whatever the store reruns (its account loaded from SQL first, the
scripts flushed from the server); a store on another client does not take the rider, and a
reseller's customer carries it in the chain's one pipeline.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.fraud_rules_file import load_rules
from agent.adapters.redis.counters import RedisFraudCounters
from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.core.balance import AuthorizeStep
from agent.core.fraud import CallFacts, destination_digits
from agent.core.fraud_rules import RuleSet
from tests.balance_helpers import T0, UNIT, Engines, World, world_for

TTL = 600_000


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("ride"))
    yield found
    found.dispose()


@pytest.fixture(params=["redis", "redis-cluster"])
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


@pytest.fixture
def ruleset(tmp_path: Path) -> RuleSet:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent("""
        groups: {hr: {prefixes: ["882"]}}
        rules:
          - {name: per_minute, kind: new_calls, window_s: 60, threshold: 100, action: alert}
          - {name: irsf, kind: live_calls, group: hr, threshold: 5, action: suspend}
          - {name: new_country, kind: new_country, window_s: 86400, prefix_digits: 3, threshold: 0, action: alert}
        """).lstrip())
    return load_rules(path)


def _facts(rules: RuleSet, account: str, call_id: str, number: str, at_ms: int) -> CallFacts:
    digits = destination_digits(number)
    return CallFacts(account, call_id, digits, rules.groups_of(digits), at_ms)


def _pair(w: World, rules: RuleSet) -> tuple[RedisBalanceStore, RedisFraudCounters]:
    store = w.store()
    assert isinstance(store, RedisBalanceStore)
    return store, RedisFraudCounters(store.client, key_prefix=f"{w.redis_prefix}f:", rules=rules)


def test_the_store_brings_back_what_observe_gives_and_counts_each_call_once(w: World, ruleset: RuleSet) -> None:
    store, counters = _pair(w, ruleset)
    w.account("acme", balance=10 * UNIT)  # in SQL only: the first authorize loads it and runs again
    # No rider before an observe of this rule set went through (it loads the script on the servers)
    assert counters.observe_rider(_facts(ruleset, "other", "c0", "+3314", T0)) is None
    assert counters.observe(_facts(ruleset, "other", "c0", "+3314", T0))["per_minute"] == 1
    first = counters.observe_rider(_facts(ruleset, "acme", "c1", "+88212345", T0))
    assert first is not None
    assert store.authorize("acme", "c1", "n1", UNIT, UNIT, T0, TTL, rider=first).allowed
    assert first.figures() == {"per_minute": 1, "irsf": 1, "new_country": 1}  # counted once, not per run
    second = counters.observe_rider(_facts(ruleset, "acme", "c2", "+88212399", T0 + 10))
    assert second is not None
    assert store.authorize("acme", "c2", "n1", UNIT, UNIT, T0 + 10, TTL, rider=second).allowed
    assert second.figures() == {"per_minute": 2, "irsf": 2, "new_country": 0}
    # observe on its own round trip sees the same counters: the third call
    assert counters.observe(_facts(ruleset, "acme", "c3", "+3314", T0 + 20)) == {
        "per_minute": 3, "irsf": 2, "new_country": 1}  # France: a country not called yet


def test_scripts_flushed_from_the_server_the_rider_gets_an_error_and_observes_once_on_its_own(
        w: World, ruleset: RuleSet) -> None:
    store, counters = _pair(w, ruleset)
    w.account("acme", balance=10 * UNIT)
    assert store.authorize("acme", "c0", "n1", UNIT, UNIT, T0, TTL).allowed  # the account is in Redis now
    assert counters.observe(_facts(ruleset, "other", "c0", "+3314", T0))["per_minute"] == 1
    store.client.script_flush()  # type: ignore[no-untyped-call]
    rider = counters.observe_rider(_facts(ruleset, "acme", "c1", "+3314", T0))
    assert rider is not None
    assert store.authorize("acme", "c1", "n1", UNIT, UNIT, T0, TTL, rider=rider).allowed  # reloaded, rerun
    assert rider.figures() is None  # NOSCRIPT in its place: the fraud service observes on its own
    assert counters.observe_rider(_facts(ruleset, "acme", "c2", "+3314", T0)) is None  # until it loaded it
    assert counters.observe(_facts(ruleset, "acme", "c1", "+3314", T0))["per_minute"] == 1  # not twice
    assert counters.observe_rider(_facts(ruleset, "acme", "c2", "+3314", T0)) is not None


def test_a_store_on_another_client_leaves_the_rider(w: World, ruleset: RuleSet) -> None:
    store, _ = _pair(w, ruleset)
    other = RedisFraudCounters(make_client(w.redis_url, 2000), key_prefix=f"{w.redis_prefix}f:", rules=ruleset)
    assert other.observe(_facts(ruleset, "other", "c0", "+3314", T0))["per_minute"] == 1
    w.account("acme", balance=10 * UNIT)
    rider = other.observe_rider(_facts(ruleset, "acme", "c1", "+3314", T0))
    assert rider is not None
    assert store.authorize("acme", "c1", "n1", UNIT, UNIT, T0, TTL, rider=rider).allowed
    assert rider.figures() is None
    assert other.observe(_facts(ruleset, "acme", "c1", "+3314", T0))["per_minute"] == 1


def test_a_resellers_customer_carries_the_rider_in_the_chains_one_pipeline(w: World, ruleset: RuleSet) -> None:
    store, counters = _pair(w, ruleset)
    assert counters.observe(_facts(ruleset, "other", "c0", "+3314", T0))["per_minute"] == 1
    w.account("cust", balance=10 * UNIT)
    w.account("resell", balance=10 * UNIT)
    rider = counters.observe_rider(_facts(ruleset, "cust", "c1", "+3314", T0))
    assert rider is not None
    outcomes = store.authorize_many([AuthorizeStep("cust", "c1", "n1", UNIT, UNIT, T0, TTL),
                                     AuthorizeStep("resell", "c1^L1", "n1", UNIT, UNIT, T0, TTL)], rider=rider)
    assert [o.allowed for o in outcomes] == [True, True]
    assert rider.figures() == {"per_minute": 1, "irsf": 0, "new_country": 1}
