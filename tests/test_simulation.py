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


@pytest.mark.parametrize("seed", [2, 3])
def test_resellers_customers_are_charged_at_every_level_and_the_resellers_money_cuts_them(seed: int) -> None:
    """DESIGN §11 in the simulation: operator > r1 > r2, each reseller with limited prepaid money."""
    from agent.sim.simulation import Simulation

    sim = Simulation(SimConfig(seed=seed, calls=1_500))
    report = sim.run()
    assert report.violations == []
    assert report.tenant_customers > 0 and report.level_charges > 100
    # r2 (8.00) spent (nearly) all of its money: its customers' calls were refused or cut by it,
    # whatever their own balances. No level below its floor but by what a call whose PBX ignored
    # the cut talked on (the simulation's violations name any other overspend).
    for account_id in ("tenant:r1", "tenant:r2"):
        account = sim.store.accounts[account_id]
        assert account.balance_micros >= -account.overspent_micros, (account_id, account)
    assert sim.store.accounts["tenant:r2"].balance_micros < 800_000


def test_the_level_checks_catch_a_level_charged_the_customers_price(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain rated at the wrong seller's price must be caught (the level checks can fail)."""
    from agent.core.session import LevelRated
    from agent.sim.simulation import _Rater

    original = _Rater.rate_chain

    def customer_price(self: _Rater, account_id: str, destination: str, at_ms: int) -> tuple[LevelRated, ...]:
        own = self.rate(account_id, destination, at_ms)
        return tuple(LevelRated(lv.level, lv.tenant, lv.seller, lv.account_id, own)
                     for lv in original(self, account_id, destination, at_ms))

    monkeypatch.setattr(_Rater, "rate_chain", customer_price)
    report = run(SimConfig(seed=2, calls=600))
    assert any("level 1" in violation for violation in report.violations), report.violations
