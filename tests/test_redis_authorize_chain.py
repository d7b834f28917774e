"""A reseller's customer and its levels as one run of authorizes.lua give exactly what the
pipeline of one authorize.lua per level gives (issue 18).

The same seeded scenario runs twice on one Redis, on two sets of accounts: once through the one
script, once through the pipeline. Every outcome and every account's state at the end must be
the same: grants, refusals (money, a spend cap, a suspended level, too many calls, an account
never loaded), replays, the sweeper's index entries and the call -> account hints.
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
from agent.core.balance import AuthorizeStep
from tests.balance_helpers import T0, UNIT, Engines, World, world_for
from tests.test_balance_store_contract import BTTL

ACCOUNTS = 10
CHAINS = 40


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("authorize-chain"))
    yield found
    found.dispose()


@pytest.fixture(params=["redis", "redis-cluster"])
def w(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def _store(w: World, *, chained: bool, runs: list[str] | None = None,
           monkeypatch: pytest.MonkeyPatch | None = None) -> RedisBalanceStore:
    store = w.store()
    assert isinstance(store, RedisBalanceStore)
    if not chained:
        store._scripts.refused["authorizes"] = "this test's pipeline twin"
    if runs is not None and monkeypatch is not None:
        real_call = store._scripts.call

        def counting(client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
            runs.append(name)
            return real_call(client, name, keys, args)

        monkeypatch.setattr(store._scripts, "call", counting)
    return store


def _play(w: World, store: RedisBalanceStore, tag: str, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded chains on accounts ``{tag}{i}``: the outcomes, then every account's end state."""
    rng = random.Random(seed)
    accounts = [f"{tag}{i}" for i in range(ACCOUNTS)]
    for i, account in enumerate(accounts):
        if i == ACCOUNTS - 1:
            continue  # never created: unknown at every level it appears in
        w.account(account, balance=rng.choice((UNIT // 2, 3 * UNIT, 40 * UNIT)), credit=rng.choice((0, UNIT)),
                  max_calls=3 if i % 4 == 3 else None, status="suspended" if i == 5 else "active")
        if i % 4 == 1:
            with transaction(w.sessions) as s:
                repo.set_limits(s, account, daily_micros=4 * UNIT)
    loaded = accounts[:4]  # in Redis before the chains; the others are loaded by the chains themselves
    for account in loaded:
        store.authorize(account, f"{account}-warm", "n1", UNIT // 4, 1, T0, BTTL)
    outcomes: list[Any] = []
    made: list[tuple[str, str]] = []
    for n in range(CHAINS):
        levels = rng.sample(accounts, rng.choice((2, 3, 4)))
        call = f"{tag}-call{n}"
        steps = [AuthorizeStep(account, call if depth == 0 else f"{call}^{depth}", "n1",
                               rng.choice((UNIT // 2, UNIT, 2 * UNIT)), UNIT // 4, T0 + n, BTTL)
                 for depth, account in enumerate(levels)]
        if made and n % 7 == 6:  # a retried authorization: the first level's step again, replayed
            account, again = made[-1]
            steps[0] = AuthorizeStep(account, again, "n1", UNIT, UNIT // 4, T0 + n, BTTL)
        for out, st in zip(store.authorize_many(steps), steps, strict=True):
            outcomes.append((st.call_id.removeprefix(tag), st.account_id.removeprefix(tag), out.allowed,
                             out.reason, out.granted_micros, out.available_micros, out.replayed))
            if out.allowed and not out.replayed and "^" not in st.call_id:
                made.append((st.account_id, st.call_id))
    keys = store._keys
    states = []
    for account in accounts[:-1]:
        state = store.account_state(account)
        states.append((account.removeprefix(tag), state.balance_micros, state.reserved_micros, state.live_calls))
    client: Any = store._client
    hints = sorted((call.removeprefix(tag), client.get(keys.call_account(call)) is not None) for _, call in made)
    indexed = sorted(call.removeprefix(tag) for account, call in made
                     if client.zscore(keys.index_of(account), keys.member(account, call)) is not None)
    return outcomes, [states, hints, indexed]


def test_a_chain_in_one_script_gives_exactly_what_the_pipeline_gives(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    chained = _store(w, chained=True, runs=runs, monkeypatch=monkeypatch)
    got = _play(w, chained, "c", seed=7)
    want = _play(w, _store(w, chained=False), "p", seed=7)
    assert got == want
    outcomes = got[0]
    reasons = {str(o[3]) for o in outcomes if o[3] is not None}
    assert {"insufficient_funds", "suspended", "unknown_account"} <= reasons, reasons
    assert any(o[6] for o in outcomes)  # a replay among them
    if w.kind == "redis":  # one script per chain on one server
        assert runs.count("authorizes") >= CHAINS - 5 and runs.count("authorize") < CHAINS, runs
    else:  # a Cluster spreads a chain's accounts over its masters: the pipeline, one script per level
        assert "authorizes" not in runs


@pytest.mark.parametrize("w", ["redis"], indirect=True)
def test_a_redis_that_refuses_the_chain_script_gets_the_pipeline(w: World, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Redis before 7.0 knows no script flags: SCRIPT LOAD of authorizes.lua fails (noted, the
    other scripts load), or a run is refused: the store says so once and sends one script per
    level from then on."""
    w.account("amy", balance=10 * UNIT)
    w.account("tenant:r1", balance=10 * UNIT)
    store = _store(w, chained=True)
    client: Any = store._client
    real_execute = client.execute_command

    def old_redis(*args: Any, **kwargs: Any) -> Any:
        if args[:1] == ("SCRIPT LOAD",) or (args[:2] == ("SCRIPT", "LOAD")):
            if str(args[-1]).startswith("#!lua"):
                raise redis.ResponseError("Error compiling script (new function): Unknown lua shebang option: flags")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", old_redis)
    store._scripts.load(client)
    assert "authorizes" in store._scripts.refused and "nibbles" in store._scripts.refused
    out = store.authorize_many([AuthorizeStep("amy", "a1", "n1", UNIT, UNIT, T0, BTTL),
                                AuthorizeStep("tenant:r1", "a1^1", "n1", UNIT, UNIT, T0, BTTL)])
    assert [o.allowed for o in out] == [True, True]
    monkeypatch.undo()

    fresh = _store(w, chained=True)
    sha = fresh._scripts.sha["authorizes"]
    real_call = fresh._scripts.call

    def refused(pipe: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "authorizes":
            return pipe.execute_command("EVAL", "return redis.error_reply('Unknown lua shebang option: flags')", 0)
        return real_call(pipe, name, keys, args)

    monkeypatch.setattr(fresh._scripts, "call", refused)
    with caplog.at_level(logging.WARNING):
        for n in (2, 3):
            out = fresh.authorize_many([AuthorizeStep("amy", f"a{n}", "n1", UNIT, UNIT, T0, BTTL),
                                        AuthorizeStep("tenant:r1", f"a{n}^1", "n1", UNIT, UNIT, T0, BTTL)])
            assert [o.allowed for o in out] == [True, True]
    assert "authorizes" in fresh._scripts.refused and sha
    assert caplog.text.count("a chain's levels run one script each") == 1
    assert fresh.account_state("amy").reserved_micros == 3 * UNIT
    assert fresh.account_state("tenant:r1").reserved_micros == 3 * UNIT


@pytest.mark.parametrize("w", ["redis"], indirect=True)
def test_a_level_argument_that_is_not_a_key_count_and_fields_is_refused_by_name(w: World) -> None:
    """authorizes.lua's guard: a malformed argument (never built by the store) is an error naming
    the level; the levels before it were applied, each its own step: sent again they replay."""
    w.account("bea", balance=10 * UNIT)
    store = _store(w, chained=True)
    store._scripts.load(store._client)
    keys, args = store._authorize_arguments(AuthorizeStep("bea", "b1", "n1", UNIT, UNIT, T0, BTTL), [], hint=True)
    assert store.authorize("bea", "warm", "n1", UNIT, UNIT, T0, BTTL).allowed  # in Redis now
    good = "".join(f"{field}\n" for field in (len(keys), *keys, *args))
    client: Any = store._client
    with pytest.raises(redis.ResponseError, match="level 2 is not a key count"):
        client.evalsha(store._scripts.sha["authorizes"], 0, good, "99\nx\n")
    assert store.account_state("bea").reserved_micros == 2 * UNIT
    (again,) = client.evalsha(store._scripts.sha["authorizes"], 0, good)
    assert str(again[0]) == "replay"
