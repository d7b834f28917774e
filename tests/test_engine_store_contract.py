"""One contract for the engine's store (``EngineStore``, agent/ports.py): the in-memory store of
the simulations and the adapter over the real balance stores (SQL, Redis) behave alike, so a
test or a simulation that passes on the fake says something about the real thing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent.core.events import DenyReason
from agent.core.session import NibbleStep
from agent.ports import EngineStore
from agent.services.store_port import EngineStoreAdapter
from agent.sim.memory_store import MemoryStore
from tests.balance_helpers import T0, UNIT, Engines, World, world_for


@dataclass
class Subject:
    store: EngineStore
    add_account: Callable[[str, int, int | None], None]
    balance: Callable[[str], int]
    reserved: Callable[[str], int]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("engine-store"))
    yield found
    found.dispose()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def subject(request: pytest.FixtureRequest, engines: Engines) -> Iterator[Subject]:
    if request.param == "memory":
        memory = MemoryStore()
        yield Subject(memory, lambda a, b, m: memory.add_account(a, b, max_calls=m),
                      lambda a: memory.accounts[a].balance_micros, lambda a: memory.accounts[a].reserved_micros)
        return
    for world in world_for(request, engines):
        real = world.store()

        def add(account_id: str, balance: int, max_calls: int | None, w: World = world) -> None:
            w.account(account_id, balance=balance, max_calls=max_calls)

        def balance(account_id: str, store: Any = real) -> int:
            return int(store.account_state(account_id).balance_micros)

        def reserved(account_id: str, store: Any = real) -> int:
            return int(store.account_state(account_id).reserved_micros)

        yield Subject(EngineStoreAdapter(real, node="n1", ttl_ms=30_000), add, balance, reserved)


def test_authorize_reserves_the_first_slice_or_says_why_not(subject: Subject) -> None:
    subject.add_account("alice", 3 * UNIT, None)
    subject.add_account("solo", 10 * UNIT, 1)
    first = subject.store.authorize("alice", "c1", 2 * UNIT, UNIT, T0)
    assert (first.allowed, first.granted_micros, first.available_micros) == (True, 2 * UNIT, 3 * UNIT)
    again = subject.store.authorize("alice", "c1", 2 * UNIT, UNIT, T0)  # the PBX asked twice
    assert again.allowed and again.granted_micros == 2 * UNIT and subject.reserved("alice") == 2 * UNIT
    partial = subject.store.authorize("alice", "c2", 2 * UNIT, UNIT // 2, T0)
    assert partial.allowed and partial.granted_micros == UNIT  # what is left
    broke = subject.store.authorize("alice", "c3", 2 * UNIT, 1, T0)
    assert (broke.allowed, broke.reason) == (False, DenyReason.INSUFFICIENT_FUNDS)
    assert subject.store.authorize("ghost", "c4", UNIT, UNIT, T0).reason is DenyReason.UNKNOWN_ACCOUNT
    assert subject.store.authorize("solo", "c5", UNIT, UNIT, T0).allowed
    assert subject.store.authorize("solo", "c6", UNIT, UNIT, T0).reason is DenyReason.MAX_CALLS


def test_a_customer_and_the_levels_above_it_are_authorized_together_each_as_alone(subject: Subject) -> None:
    subject.add_account("cust", 3 * UNIT, None)
    subject.add_account("tenant:r1", 5 * UNIT, None)
    subject.add_account("tenant:r2", UNIT // 4, None)
    subject.add_account("tenant:r3", 10 * UNIT, 1)
    assert subject.store.authorize("tenant:r3", "other^3", UNIT, UNIT, T0).allowed  # its one call
    customer, out = subject.store.authorize_with_levels(
        "cust", "c1", 2 * UNIT, UNIT, [("c1^1", "tenant:r1", 2 * UNIT, UNIT), ("c1^2", "tenant:r2", UNIT, UNIT),
                                       ("c1^3", "tenant:r3", UNIT, UNIT), ("c1^4", "ghost", UNIT, UNIT)], T0)
    assert (customer.allowed, customer.granted_micros, subject.reserved("cust")) == (True, 2 * UNIT, 2 * UNIT)
    assert [(o.allowed, o.reason, o.granted_micros) for o in out] == [
        (True, None, 2 * UNIT), (False, DenyReason.INSUFFICIENT_FUNDS, 0), (False, DenyReason.MAX_CALLS, 0),
        (False, DenyReason.UNKNOWN_ACCOUNT, 0)]
    assert (subject.reserved("tenant:r1"), subject.reserved("tenant:r2")) == (2 * UNIT, 0)
    again, (level,) = subject.store.authorize_with_levels("cust", "c1", 2 * UNIT, UNIT,
                                                          [("c1^1", "tenant:r1", 2 * UNIT, UNIT)], T0)  # asked twice
    assert again.allowed and level.allowed
    assert (subject.reserved("cust"), subject.reserved("tenant:r1")) == (2 * UNIT, 2 * UNIT)
    # a refused customer does not stop its levels' steps (each is its own): the caller releases them
    poor, (above,) = subject.store.authorize_with_levels("cust", "c2", 2 * UNIT, 2 * UNIT,
                                                          [("c2^1", "tenant:r1", UNIT, UNIT)], T0)
    assert (poor.allowed, poor.reason, above.allowed) == (False, DenyReason.INSUFFICIENT_FUNDS, True)
    assert subject.reserved("tenant:r1") == 3 * UNIT


def test_nibbles_debit_reserve_and_replay_and_the_settle_commits_once(subject: Subject) -> None:
    subject.add_account("alice", 5 * UNIT, None)
    assert subject.store.authorize("alice", "c1", UNIT, UNIT, T0).allowed
    (n1,) = subject.store.nibbles([NibbleStep("c1", 1, UNIT, 2 * UNIT, "alice")], T0 + 6_000)
    assert (n1.ok, n1.granted_micros, n1.debited_micros) == (True, 2 * UNIT, UNIT)
    (replayed,) = subject.store.nibbles([NibbleStep("c1", 1, UNIT, 2 * UNIT, "alice")], T0 + 6_500)
    assert (replayed.ok, replayed.granted_micros) == (True, 2 * UNIT)  # nothing changed twice
    (n2,) = subject.store.nibbles([NibbleStep("c1", 2, 2 * UNIT, 5 * UNIT, "alice")], T0 + 12_000)
    assert (n2.ok, n2.granted_micros) == (True, 2 * UNIT)  # partial: that is all there is
    subject.store.settle("c1", 3, 4 * UNIT, T0 + 14_000, "alice")
    subject.store.settle("c1", 3, 4 * UNIT, T0 + 14_500, "alice")  # replayed: charged once
    assert (subject.balance("alice"), subject.reserved("alice")) == (UNIT, 0)
    (closed,) = subject.store.nibbles([NibbleStep("c1", 4, UNIT, UNIT, "alice")], T0 + 18_000)
    assert not closed.ok and closed.granted_micros == 0  # a settled call gets no more money


def test_a_release_returns_the_reservation(subject: Subject) -> None:
    subject.add_account("alice", 5 * UNIT, None)
    assert subject.store.authorize("alice", "c1", 2 * UNIT, UNIT, T0).allowed
    subject.store.release("c1", 1, T0 + 1_000, "alice")
    subject.store.release("c1", 1, T0 + 1_500, "alice")
    assert (subject.balance("alice"), subject.reserved("alice")) == (5 * UNIT, 0)
