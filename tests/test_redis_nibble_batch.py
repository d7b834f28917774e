"""Nibbles as runs of one script (nibbles.lua) give exactly what a pipeline of nibble.lua gives.

The same seeded scenario runs twice on one Redis (or cluster), on two sets of accounts: once with
the batched script, once with the pipeline of one script per nibble. Every outcome, round by
round, and every account's state at the end must be the same: money, spend caps, bundle seconds,
replays, stale and unknown steps, expiries, a call whose account ran out.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from agent.adapters.redis.store import RedisBalanceStore
from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import transaction
from agent.core.balance import NibbleRequest, NibbleStatus
from tests.balance_helpers import T0, UNIT, Engines, World, world_for
from tests.test_balance_store_contract import BTTL, grant, periods, slot

ACCOUNTS = 12


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("nibble-batch"))
    yield found
    found.dispose()


@pytest.fixture(params=["redis", "redis-cluster"])
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def _store(w: World, *, batched: bool) -> RedisBalanceStore:
    store = w.store()
    assert isinstance(store, RedisBalanceStore)
    store._batched = batched
    return store


def _play(w: World, store: RedisBalanceStore, tag: str, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded scenario on accounts ``{tag}{i}``: outcomes of every round, then the end state."""
    rng = random.Random(seed)
    calls: dict[str, str] = {}
    bundle_calls: set[str] = set()
    short: set[str] = set()  # reserved for 30 s and not nibbled in the first round: expired at the second
    for i in range(ACCOUNTS):
        account = f"{tag}{i}"
        w.account(account, balance=rng.choice((UNIT // 2, 3 * UNIT, 40 * UNIT)), credit=rng.choice((0, UNIT)))
        if i % 4 == 1:
            with transaction(w.sessions) as s:
                repo.set_limits(s, account, daily_micros=4 * UNIT, max_call_cost_micros=3 * UNIT)
        for k in range(2):
            call = f"{account}-c{k}"
            if i % 4 == 2 and k == 0:
                g = grant(w, account, 150)
                out = store.authorize(account, call, "n1", UNIT // 2, UNIT // 4, T0, BTTL,
                                      bundle_slots=[slot(g, 150)], bundle_want_s=60)
                bundle_calls.add(call)
            else:
                out = store.authorize(account, call, "n1", UNIT // 2, UNIT // 4, T0, BTTL if i % 5 else 30_000)
                if i % 5 == 0:
                    short.add(call)
            if out.allowed:
                calls[call] = account
    seq = dict.fromkeys(calls, 1)
    rounds: list[Any] = []
    for step in range(1, 7):
        now = T0 + step * 20_000
        requests: list[NibbleRequest] = []
        for call, account in calls.items():
            if step == 1 and call in short:
                continue
            if call in bundle_calls:
                requests.append(NibbleRequest(call, seq[call], 0, UNIT // 2, now, BTTL, account,
                                              bundle_used_s=20 * step, bundle_want_s=60))
            else:
                requests.append(NibbleRequest(call, seq[call], rng.choice((UNIT // 4, UNIT // 2, 3 * UNIT // 4)),
                                              UNIT // 2, now, BTTL, account))
        replayed = rng.sample(sorted(calls), 3)
        requests += [NibbleRequest(c, seq[c] - 1, UNIT // 4, UNIT // 2, now, BTTL, calls[c]) for c in replayed
                     if seq[c] > 1]  # the step before, sent again
        requests.append(NibbleRequest(f"{tag}-ghost", 1, UNIT, UNIT, now, BTTL))
        rng.shuffle(requests)
        outcomes = store.debit_and_reserve_many(requests)
        rounds.append(sorted((o.call_id.removeprefix(tag), o.seq, o.status.value, o.granted_micros, o.debited_micros,
                              o.total_debited_micros, o.overrun_micros, o.bundle_granted_s, o.bundle_held_s)
                             for o in outcomes))
        for o in outcomes:
            if o.status in (NibbleStatus.GRANTED,) and o.seq == seq.get(o.call_id):
                seq[o.call_id] += 1
    states = []
    for i in range(ACCOUNTS):
        state = store.account_state(f"{tag}{i}")
        states.append((i, state.balance_micros, state.reserved_micros, state.overrun_micros, state.live_calls,
                       sorted(periods(w, f"{tag}{i}").values())))
    return rounds, states


def test_batched_nibbles_give_exactly_what_the_pipeline_gives(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    batched, pipelined = _store(w, batched=True), _store(w, batched=False)
    runs: list[str] = []
    real_run_on = batched._scripts.run_on

    def counting(server: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        runs.append(name)
        return real_run_on(server, name, keys, args)

    monkeypatch.setattr(batched._scripts, "run_on", counting)
    got = _play(w, batched, "b", seed=5)
    want = _play(w, pipelined, "p", seed=5)
    assert got == want
    assert batched._batched and runs.count("nibbles") >= 6, runs  # every round went through the batch
    statuses = {status for rnd in got[0] for (_, _, status, *_) in rnd}
    assert {"granted", "replayed", "unknown_call", "expired"} <= statuses, statuses  # the scenario has them all


def test_a_redis_that_refuses_the_batch_gets_the_pipeline(w: World, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Redis before 7.0 knows no script flags: the store says so once and sends one script per
    nibble from then on."""
    w.account("alice", balance=10 * UNIT)
    w.account("bob", balance=10 * UNIT)
    store = _store(w, batched=True)
    assert store.authorize("alice", "a1", "n1", UNIT, UNIT, T0, BTTL).allowed
    assert store.authorize("bob", "b1", "n1", UNIT, UNIT, T0, BTTL).allowed

    def refused(server: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        raise redis.ResponseError("Error compiling script (new function): Unknown lua shebang option: flags")

    monkeypatch.setattr(store._scripts, "run_on", refused)
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            outs = store.debit_and_reserve_many([NibbleRequest("a1", step, UNIT, UNIT, T0 + step * 1000, BTTL),
                                                 NibbleRequest("b1", step, UNIT, UNIT, T0 + step * 1000, BTTL)])
            assert [o.status for o in outs] == [NibbleStatus.GRANTED, NibbleStatus.GRANTED]
    assert not store._batched and caplog.text.count("nibbles run one script each") == 1
    assert store.account_state("alice").balance_micros == 8 * UNIT


def test_a_batch_refused_for_a_moving_slot_or_a_demoted_master_goes_by_pipeline_this_time_only(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w.account("carol", balance=10 * UNIT)
    w.account("dave", balance=10 * UNIT)
    store = _store(w, batched=True)
    assert store.authorize("carol", "c1", "n1", UNIT, UNIT, T0, BTTL).allowed
    assert store.authorize("dave", "d1", "n1", UNIT, UNIT, T0, BTTL).allowed
    errors = [redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
              redis.ResponseError("Script attempted to access a non local key in a cluster node script")]
    real_run_on = store._scripts.run_on

    def flaky(server: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "nibbles" and errors:
            raise errors.pop(0)
        return real_run_on(server, name, keys, args)

    monkeypatch.setattr(store._scripts, "run_on", flaky)
    for step in (1, 2, 3):
        outs = store.debit_and_reserve_many([NibbleRequest("c1", step, UNIT, UNIT, T0 + step * 1000, BTTL),
                                             NibbleRequest("d1", step, UNIT, UNIT, T0 + step * 1000, BTTL)])
        assert [o.status for o in outs] == [NibbleStatus.GRANTED, NibbleStatus.GRANTED]
    assert store._batched and not errors
    assert store.account_state("carol").balance_micros == 7 * UNIT


def test_a_key_prefix_with_a_newline_is_refused() -> None:
    """nibbles.lua reads newline-ended fields, keys among them."""
    from agent.adapters.redis.keys import KeySpace

    with pytest.raises(ValueError, match="printable"):
        KeySpace("billing\n")


def test_a_nibble_argument_that_is_not_15_fields_is_refused_by_name(w: World) -> None:
    """nibbles.lua's guard: a malformed argument (never built by the store) is an error naming
    the nibble. The nibbles before it were applied, each its own step, as in a pipeline: sent
    again they answer 'replayed'."""
    w.account("erin", balance=10 * UNIT)
    store = _store(w, batched=True)
    assert store.authorize("erin", "e1", "n1", UNIT, UNIT, T0, BTTL).allowed
    ak = store._keys.of("erin")
    good = (f"{ak.account}\n{ak.live}\n{ak.call('e1')}\n{ak.periods}\n{ak.periods_unposted}\n"
            f"e1\n1\n{UNIT}\n{UNIT}\n{T0 + 1000}\n{BTTL}\n0\n0\n{ak.period_prefix}\n{ak.spend_prefix}\n")
    client: Any = store._client
    server = client.get_redis_connection(client.get_node_from_key(ak.account)) if w.kind == "redis-cluster" else client
    with pytest.raises(redis.ResponseError, match="nibble 2 is not 15 fields"):
        store._scripts.run_on(server, "nibbles", [], [good, good.rstrip("\n")])
    assert store.account_state("erin").balance_micros == 9 * UNIT
    (again,) = store._scripts.run_on(server, "nibbles", [], [good])
    assert str(again[0]) == "replayed"
