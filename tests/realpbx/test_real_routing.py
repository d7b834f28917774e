"""Least-cost routing with failover on a real PBX (issue 17, DESIGN §10): the agent hands the PBX
its carriers in order (Asterisk BILLING_ROUTE_n, FreeSWITCH a '|' failover bridge) and the
shipped dialplan tries the next only when one cannot take the call.

Carriers: ``down`` (its own sipp, answering every INVITE 503) is the cheapest to the US and
dearest to 486 numbers; ``carrier`` (the lab's carrier: answers, or 486 for 486 numbers) the
other way round. The sell deck is 0.60/min; both buy decks are below it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.realpbx.conftest import Lab
from tests.realpbx.lab import PbxBuild, run_customers
from tests.realpbx.test_real_calls import DECK, NUMBER, check_exact, micros

BUY_DECKS = {
    "down": "prefix,destination,rate\n1,US (down),0.10\n486,Busy (down),0.50\n",
    "carrier": "prefix,destination,rate\n1,US (carrier),0.20\n486,Busy (carrier),0.20\n",
}


@pytest.fixture(scope="module")
def lab(build: PbxBuild, lab_factory: Any) -> Lab:
    lab: Lab = lab_factory(build, "routing", congested_carriers=("down",))
    lab.carrier.start()
    for carrier in lab.congested:
        carrier.start()
    lab.pbx.start()
    lab.agent.prepare(DECK, [("3001", "100")])
    for name, deck in BUY_DECKS.items():
        lab.agent.cli("carriers", "create", name, "--trunk", lab.pbx.trunk_of(name))
        path = lab.folder / f"buy-{name}.csv"
        path.write_text(deck)
        lab.agent.cli("rates", "import", str(path), "--carrier", name)
    lab.agent.start()
    return lab


def test_a_carrier_that_answers_503_is_skipped_and_the_next_carries_the_call(lab: Lab) -> None:
    (down,) = lab.congested
    run = run_customers(lab.folder, lab.pbx.sip_port, [("3001", NUMBER)], hold_ms=2_500, name="failover")
    (call,) = run.result.values()
    assert call.answered_tick is not None and not call.hung_up_by_pbx, call
    assert len(down.invited_call_ids()) == 1  # the cheapest was tried first
    (listed,) = lab.agent.wait_cdrs(1, "3001")
    cdr = lab.agent.cdr(listed["call_id"])
    assert cdr["disposition"] == "ANSWERED"
    check_exact(cdr)
    outbound = [leg for leg in cdr["legs"] if leg["direction"] == "outbound"]
    assert [(leg["peer"], leg["billed"]) for leg in outbound] == [("down", False), ("carrier", True)], cdr["legs"]
    route = cdr["rating"]["route"]
    assert route["carrier"] == "carrier" and route["buy_rate_per_minute"] == "0.200000", cdr
    seconds = cdr["rating"]["billed_seconds"]
    assert micros(route["buy_cost"]) == -(-200_000 * seconds // 60)
    assert micros(route["margin"]) == micros(cdr["rating"]["cost"]) - micros(route["buy_cost"]) > 0
    ok, report = lab.agent.ledger_check()
    assert ok, report


def test_a_busy_carrier_ends_the_call_without_trying_the_next(lab: Lab) -> None:
    (down,) = lab.congested
    tried_before = len(down.invited_call_ids())
    run = run_customers(lab.folder, lab.pbx.sip_port, [("3001", "48612345")], hold_ms=1_000, name="busy")
    (call,) = run.result.values()
    assert call.final_code == 486, call  # the first carrier's busy reaches the caller
    assert len(down.invited_call_ids()) == tried_before  # busy is the callee's answer: no other carrier
    cdrs = lab.agent.wait_cdrs(2, "3001")
    busy = next(c for c in cdrs if c["destination"] == "48612345")
    assert busy["disposition"] == "BUSY" and micros(busy["rating"]["cost"]) == 0, busy


def test_no_carrier_for_the_destination_refuses_the_call_with_cause_34(lab: Lab) -> None:
    run = run_customers(lab.folder, lab.pbx.sip_port, [("3001", "50312345")], hold_ms=1_000, name="noroute")
    (call,) = run.result.values()
    assert call.answered_tick is None and call.final_code in (500, 503), call  # Q.850 34 maps to 503 (500 on chan_sip)
    assert "no_route" in lab.agent.log_text()
