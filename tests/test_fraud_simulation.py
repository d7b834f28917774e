"""The IRSF attack in the deterministic simulation (fake clock, real call logic and fraud rules):
with the rule, a hijacked account loses at most one nibble per call it had live and its calls end
within a second of the suspension; without it, the attack drains the account. Every money
invariant of the simulation holds either way."""

from __future__ import annotations

from agent.sim.simulation import SimConfig, run


def test_irsf_attack_is_stopped_by_the_rule_and_drains_the_account_without_it() -> None:
    guarded = run(SimConfig(seed=3, calls=300, irsf_calls=20, irsf_threshold=5))
    assert guarded.ok, guarded.violations
    assert guarded.irsf_allowed == 5  # the 6th call fired the rule: it and the rest were refused
    assert guarded.denials.get("fraud_rule") == 15
    one_nibble = 6 * 50_000  # 6 s at 3.00/min
    assert 0 < guarded.irsf_loss_micros <= guarded.irsf_allowed * one_nibble
    assert guarded.irsf_worst_cut_ms is not None and guarded.irsf_worst_cut_ms <= 1_000
    assert guarded.irsf_fired_after_ms == 5 * 500  # the 6th call, 500 ms apart

    unguarded = run(SimConfig(seed=3, calls=300, irsf_calls=20, irsf_rules=False))
    assert unguarded.ok, unguarded.violations
    assert unguarded.irsf_allowed == 20
    assert unguarded.irsf_loss_micros == 1_000_000_000  # the whole balance of the hijacked account
