"""The deterministic simulation: thousands of calls, every money invariant checked."""

import pytest

from agent.core.session import CallSession
from agent.sim.simulation import SimConfig, run


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_simulation_keeps_every_invariant(seed: int) -> None:
    report = run(SimConfig(seed=seed, calls=1_500))
    assert report.violations == []
    assert report.calls_authorized > 500
    assert report.dispositions.get("CUT", 0) > 0  # exhaustion was exercised
    assert report.worst_cut_lateness_ms <= 1_000


def test_same_seed_same_result() -> None:
    first = run(SimConfig(seed=5, calls=300))
    second = run(SimConfig(seed=5, calls=300))
    assert (first.charged_micros, first.dispositions, first.nibbles) == (
        second.charged_micros, second.dispositions, second.nibbles)


def test_one_second_nibbles_and_warnings() -> None:
    report = run(SimConfig(seed=9, calls=800, nibble_seconds=1, warning_seconds=5))
    assert report.violations == []


def test_the_checks_catch_a_billing_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that bills one second too many must be caught (the checker can fail)."""
    original = CallSession.billed_ms

    def one_second_more(self: CallSession) -> int:
        billed = original(self)
        return billed + 1000 if billed else 0

    monkeypatch.setattr(CallSession, "billed_ms", one_second_more)
    report = run(SimConfig(seed=1, calls=600))
    assert report.violations, "an overcharging engine passed the simulation"
