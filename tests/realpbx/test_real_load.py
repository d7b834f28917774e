"""200 real calls at 20 calls/s through a real PBX: every one billed by §4 of its real duration,
every cut on time, the ledger exact; and no call waits on the agent before it is dialled.

Figures (medians over runs, wire timing) come from bench/bench_realpbx.py; this only holds the
line: no stalled authorization (the 5 s pipelining stall of issue 13 would fail it at once).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from agent.sim.freeswitch import STAMP_TICK_US
from tests.realpbx.conftest import Lab
from tests.realpbx.lab import STATIC_PREFIX, PbxBuild, run_customers
from tests.realpbx.test_real_calls import DECK, NUMBER, billed_leg, micros, ms

CALLS = 200
RATE = 20.0


@pytest.fixture(scope="module")
def lab(build: PbxBuild, lab_factory: Any) -> Lab:
    lab: Lab = lab_factory(build, "load")
    lab.carrier.start()
    lab.pbx.start()
    lab.agent.prepare(DECK, [("3000", "100000")] + [(f"3{i:04d}", "0.035") for i in range(1, CALLS + 1)])
    lab.agent.start()
    return lab


def test_200_calls_at_20_per_second_are_billed_exactly(lab: Lab) -> None:
    run = run_customers(lab.folder, lab.pbx.sip_port, [("3000", NUMBER)] * CALLS, hold_ms=4_000, rate_per_s=RATE,
                        name="load")
    answered = [c for c in run.result.values() if c.answered_tick is not None]
    assert len(answered) == CALLS, [c for c in run.result.values() if c.answered_tick is None][:3]
    cdrs = lab.agent.wait_cdrs(CALLS, "3000", timeout_s=60)
    assert len(cdrs) == CALLS and len({c["call_id"] for c in cdrs}) == CALLS
    wrong = [c for c in cdrs if micros(c["rating"]["cost"]) != math.ceil(c["duration_ms"] / 1000) * 10_000]
    assert wrong == []
    # FreeSWITCH 1.11.1 under load (2026-12-05, beside a CI run) failed one answered call itself
    # 20 ms after the carrier's answer (INCOMPATIBLE_DESTINATION, as in the cut test below): billed
    # to the ms of its real duration (``wrong`` above). Every other call lasts what the caller held.
    failed_by_pbx = [c for c in cdrs if c["hangup_cause"] not in ("NORMAL_CLEARING", "16", "ALLOTTED_TIMEOUT")]
    assert len(failed_by_pbx) <= 2, failed_by_pbx
    durations = sorted(c["duration_ms"] for c in cdrs if c not in failed_by_pbx)
    assert 3_900 <= durations[0] and durations[-1] <= 4_600, (durations[:3], durations[-3:])
    ok, report = lab.agent.ledger_check()
    assert ok, report


def test_200_calls_are_each_cut_when_their_money_runs_out(lab: Lab) -> None:
    calls = [(f"3{i:04d}", NUMBER) for i in range(1, CALLS + 1)]
    run = run_customers(lab.folder, lab.pbx.sip_port, calls, hold_ms=6_000, rate_per_s=RATE, name="loadcut")
    assert sum(1 for c in run.result.values() if c.hung_up_by_pbx) == CALLS
    every = [c for c in lab.agent.wait_cdrs(2 * CALLS, timeout_s=60) if c["account_id"] != "3000"]
    assert len(every) == CALLS
    # Seen once in 200 on FreeSWITCH 1.11.1 under this load: the carrier answers and FreeSWITCH
    # fails the call 40 ms later itself (INCOMPATIBLE_DESTINATION, a media negotiation): billed
    # as the ANSWERED call it was, to the ms. Anything else must be a cut.
    failed_by_pbx = [c for c in every if c["disposition"] == "ANSWERED" and c["hangup_cause"] not in (
        "NORMAL_CLEARING", "16", "ALLOTTED_TIMEOUT")]
    assert len(failed_by_pbx) <= 2, failed_by_pbx
    for cdr in failed_by_pbx:
        assert micros(cdr["rating"]["cost"]) == 10_000 * -(-cdr["duration_ms"] // 1000), cdr
    cdrs = [c for c in every if c not in failed_by_pbx]
    assert {c["disposition"] for c in cdrs} == {"CUT"}, {c["disposition"] for c in cdrs}
    late = sorted(ms(billed_leg(c)["ended_at"]) - (ms(billed_leg(c)["answered_at"]) + 3_000) for c in cdrs)
    # FreeSWITCH stamps from a clock that moves every 20 ms (agent/adapters/freeswitch/translate.py):
    # a hangup that runs just ahead of the tick carries the tick before it (-20 ms, -21 with the
    # two stamps' ms), seen once in 200 cut calls (2026-12-05). Asterisk stamps the real instant.
    earliest_ms = -(STAMP_TICK_US // 1000 + 2) if lab.pbx.build.kind == "freeswitch" else -20
    assert late[0] >= earliest_ms and late[int(0.99 * len(late)) - 1] <= 100, (late[:3], late[-5:])  # p99 ≤ 100 ms
    assert all(micros(c["rating"]["cost"]) == 30_000 for c in cdrs)
    ok, report = lab.agent.ledger_check()
    assert ok, report


def test_no_call_waits_on_the_agent_before_it_is_dialled(lab: Lab) -> None:
    """Post-dial delay with the agent against the same PBX dialling with no agent. Not a timing
    figure (bench/bench_realpbx.py has those): a stalled authorization would add seconds."""
    static = run_customers(lab.folder, lab.pbx.sip_port, [("3000", STATIC_PREFIX + NUMBER)] * 40, hold_ms=300,
                           rate_per_s=RATE, name="pdd-static")
    billed = run_customers(lab.folder, lab.pbx.sip_port, [("3000", NUMBER)] * 40, hold_ms=300, rate_per_s=RATE,
                           name="pdd-billed")
    base = sorted(c.post_dial_delay_ms or 0 for c in static.result.values())
    with_agent = sorted(c.post_dial_delay_ms or 0 for c in billed.result.values())
    assert len(with_agent) == 40 and all(c.answered_tick is not None for c in billed.result.values())
    assert with_agent[-1] - base[-1] < 1_000, (base[-5:], with_agent[-5:])
