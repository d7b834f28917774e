"""The deterministic simulation with free-minute bundles (DESIGN §9, issue 16)."""

from __future__ import annotations

import pytest

import agent.sim.memory_store as memory_store
from agent.core.bundles import BundleTariff
from agent.core.session import CallSession
from agent.sim.simulation import START_MS, SimConfig, _section9, run

# A minute before local midnight of 2026-01-01 in UTC: the monthly and weekly periods of the UTC
# accounts roll during these short runs.
CONFIG = SimConfig(seed=1, calls=1_500, start_ms=START_MS - 60_000)


def test_bundles_in_the_random_traffic_keep_every_invariant() -> None:
    report = run(CONFIG)
    assert report.violations == []
    assert report.bundle_accounts > 0 and report.bundle_grants > report.bundle_accounts
    assert report.bundle_calls > 20 and report.bundle_seconds > 0
    assert report.bundle_then_money > 0  # calls that started in their bundle and finished in money
    assert report.bundle_rollovers > 0
    assert report.dispositions.get("CUT", 0) > 0


def test_another_seed_with_one_second_nibbles() -> None:
    report = run(SimConfig(seed=4, calls=800, nibble_seconds=1, start_ms=START_MS - 30_000))
    assert report.violations == []
    assert report.bundle_calls > 0


def test_no_bundles_when_the_share_is_zero() -> None:
    report = run(SimConfig(seed=2, calls=300, bundle_share=0))
    assert report.violations == []
    assert (report.bundle_accounts, report.bundle_calls, report.bundle_periods) == (0, 0, 0)


def test_a_store_that_commits_twice_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = memory_store.commit
    monkeypatch.setattr(memory_store, "commit", lambda held, covered: [2 * s for s in original(held, covered)])
    report = run(CONFIG)
    assert any("bundle" in violation for violation in report.violations), report.violations[:3]


def test_a_store_that_commits_a_second_too_many_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not enough to go below zero: the check that each period's usage is its calls' sum catches it."""
    original = memory_store.commit

    def one_more(held: list[int], covered: int) -> list[int]:
        used = original(held, covered)
        if covered and used:
            used[0] += 1
        return used

    monkeypatch.setattr(memory_store, "commit", one_more)
    report = run(CONFIG)
    assert any("committed" in violation or "below zero" in violation for violation in report.violations)


def test_a_store_that_gives_bundle_seconds_away_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_store, "commit", lambda held, covered: [0 for _ in held])
    report = run(CONFIG)
    assert any("committed 0 bundle seconds" in violation for violation in report.violations)


def test_a_session_that_charges_money_inside_the_bundle_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BundleTariff, "cost_micros", lambda self, duration_ms: self.row.cost_micros(duration_ms))
    report = run(CONFIG)
    assert report.violations


def test_a_session_that_forgets_the_seconds_a_nibble_got_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = CallSession.on_nibble_result

    def forgetful(self: CallSession, *args: object, **kwargs: object) -> object:
        kwargs["bundle_granted_s"] = 0
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CallSession, "on_nibble_result", forgetful)
    report = run(CONFIG)
    assert any("the session held" in violation for violation in report.violations)


def test_the_independent_formula() -> None:
    from agent.core.rating import RateRow

    row = RateRow("33", "fr", rate_micros=60_000, connect_fee_micros=50_000, initial_increment=30, increment=6,
                  minimum_seconds=0, grace_seconds=3)
    assert _section9(row, 3_000, 100) == (0, 0)  # grace
    assert _section9(row, 3_001, 0) == (50_000 + 30_000, 0)  # 4 s: the 30 s first block and the fee
    assert _section9(row, 10_000, 100) == (0, 30)  # inside the bundle: no fee
    assert _section9(row, 40_000, 20) == (22_000, 20)  # b = 42, 22 s of money, no fee


def test_the_memory_store_replays_an_authorization_with_its_bundle_seconds() -> None:
    """As the Redis and SQL stores do: a PBX that asks twice gets the call rated in its bundle again."""
    from agent.core.bundles import BundleSlot
    from agent.sim.memory_store import MemoryStore

    store = MemoryStore()
    store.add_account("a", 0)
    slots = (BundleSlot(1, 0, 100, 10**12),)
    first = store.authorize("a", "c1", 1_000, 10, 0, bundle_slots=slots, bundle_want_s=6)
    again = store.authorize("a", "c1", 1_000, 10, 0, bundle_slots=slots, bundle_want_s=6)
    assert (first.bundle_granted_s, first.bundle_available_s) == (6, 100)
    assert (again.allowed, again.bundle_granted_s, again.bundle_available_s) == (True, 6, 100)
    assert store.periods[(1, 0)].reserved_s == 6  # taken once
