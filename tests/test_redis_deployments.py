"""Redis deployments other than one server: Sentinel, and what is refused at start.

The cluster runs the whole balance-store contract (test_balance_store_contract.py, kind
"redis-cluster"); here the Sentinel-managed master runs a smoke part of it, and each deployment
that would lose money or cannot take writes is refused with redis.url and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tests.test_balance_store_contract as contract
from agent.adapters.balance import make_balance_store
from agent.adapters.redis.connect import RedisSetupError
from agent.adapters.redis.store import RedisBalanceStore
from agent.adapters.sql import accounts as accounts_repo
from agent.adapters.sql.engine import make_engine, transaction
from agent.adapters.sql.migrate import upgrade
from agent.config import Config, ConfigError, load_config
from tests.balance_helpers import T0, UNIT, Engines, World, world_for
from tests.redis_servers import Cluster, SentinelSetup, free_port, start_cluster_node, start_server

# ------------------------------------------------------------------------------ Sentinel


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    found = Engines(tmp_path_factory.mktemp("deployments"))
    yield found
    found.dispose()


@pytest.fixture(params=["redis-sentinel"])
def sw(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


SMOKE: list[Callable[[World], None]] = [
    contract.test_authorize_grants_what_is_left_and_denies_below_the_minimum,
    contract.test_settle_charges_the_cost_once_and_releases_the_rest,
    contract.test_max_concurrent_calls_are_counted_across_nodes,
    contract.test_concurrent_calls_on_many_nodes_never_overspend,
]


@pytest.mark.parametrize("contract_test", SMOKE, ids=lambda t: t.__name__.removeprefix("test_"))
def test_the_master_named_by_the_sentinels_holds_the_balances(sw: World, contract_test: Callable[[World], None]
                                                             ) -> None:
    contract_test(sw)


def test_the_sentinel_master_is_the_one_written(sw: World, redis_sentinel: SentinelSetup) -> None:
    sw.account("alice", balance=10 * UNIT)
    sw.store().authorize("alice", "c1", "n1", UNIT, UNIT, T0, contract.TTL)
    keys = redis_sentinel.master.client().keys(f"{sw.redis_prefix}acct:{{alice}}:*")
    assert keys, "the reservation is not on the master the Sentinel names"


# ------------------------------------------------------------------------- refused at start


def _config(url: str) -> Config:
    return load_config(None, environ={}, overrides={"redis": {"url": url, "timeout_ms": 500}})


def _refusal(url: str, tmp_path: Path) -> str:
    """What the start-up check (agent/adapters/balance.py, run by the daemon) says of ``url``."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with pytest.raises(RedisSetupError) as caught:
            make_balance_store(_config(url), engine).close()
    finally:
        engine.dispose()
    return str(caught.value)


@pytest.fixture(params=["redis-cluster"])
def cw(request: pytest.FixtureRequest, engines: Engines) -> Iterator[World]:
    yield from world_for(request, engines)


def test_a_cluster_url_works_while_one_seed_is_dead(cw: World, redis_cluster: Cluster) -> None:
    cw.redis_url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{redis_cluster.masters[1].port}"
    cw.account("alice", balance=10 * UNIT)
    store = make_balance_store(_config(cw.redis_url), cw.engine)  # the start-up check passes
    try:
        assert store.authorize("alice", "c1", "n1", UNIT, UNIT, T0, contract.TTL).granted_micros == UNIT
        assert store.settle("c1", 1, 400_000, T0 + 1000).ledger_posted
    finally:
        store.close()
    assert cw.sql_balance("alice") == 9_600_000


def test_a_cluster_url_none_of_whose_seeds_answers_is_refused_naming_each(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    message = _refusal(f"redis+cluster://127.0.0.1:{first},127.0.0.1:{second}", tmp_path)
    assert message.startswith("redis.url (Redis Cluster (seeds ")
    assert "no seed node gave the cluster's slot map" in message
    assert f"127.0.0.1:{first}: Error 111" in message and f"127.0.0.1:{second}: Error 111" in message


def test_a_refusal_never_prints_the_password(tmp_path: Path) -> None:
    message = _refusal(f"redis+cluster://billing:s3cret@127.0.0.1:{free_port()}", tmp_path)
    assert "s3cret" not in message and "no seed node" in message
    with pytest.raises(ConfigError) as caught:
        _config("redis+sentinel://billing:s3cret@127.0.0.1:26379")
    assert "s3cret" not in str(caught.value)
    from agent.redis_url import RedisUrlError, parse_redis_url

    with pytest.raises(RedisUrlError, match=r"'redis\+sentinel://billing:\*\*\*@127.0.0.1:26379'") as parsed:
        parse_redis_url("redis+sentinel://billing:s3cret@127.0.0.1:26379")
    assert "s3cret" not in str(parsed.value)


def test_a_cluster_still_forming_is_refused(tmp_path: Path) -> None:
    node = start_cluster_node(tmp_path / "forming")
    try:
        node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 5000)  # the other slots not yet assigned
        message = _refusal(f"redis+cluster://127.0.0.1:{node.port}", tmp_path)
    finally:
        node.stop()
    assert "does not serve every slot yet" in message and "5001 of 16384 covered" in message
    assert "still forming is refused" in message


def test_a_cluster_node_behind_a_single_server_url_is_refused(redis_cluster: Cluster, tmp_path: Path) -> None:
    message = _refusal(f"redis://127.0.0.1:{redis_cluster.masters[0].port}/0", tmp_path)
    assert "is a Redis Cluster node" in message and "redis+cluster://" in message


def test_a_replica_given_as_the_write_endpoint_is_refused(redis_sentinel: SentinelSetup, tmp_path: Path) -> None:
    message = _refusal(f"redis://127.0.0.1:{redis_sentinel.replica.port}/0", tmp_path)
    assert f"is a replica (role slave of 127.0.0.1:{redis_sentinel.master.port})" in message
    assert message.startswith("redis.url ")


def test_redis_that_may_evict_keys_is_refused_naming_the_setting(tmp_path: Path) -> None:
    server = start_server(tmp_path / "lru", "--maxmemory-policy", "allkeys-lru")
    try:
        message = _refusal(f"redis://127.0.0.1:{server.port}/0", tmp_path)
    finally:
        server.stop()
    assert "maxmemory-policy allkeys-lru" in message and "needs noeviction" in message


def test_one_cluster_master_that_may_evict_keys_is_refused(redis_cluster: Cluster, tmp_path: Path) -> None:
    master = redis_cluster.masters[2].client()
    master.config_set("maxmemory-policy", "volatile-lru")
    try:
        message = _refusal(redis_cluster.url, tmp_path)
    finally:
        master.config_set("maxmemory-policy", "noeviction")
    assert f"cluster node 127.0.0.1:{redis_cluster.masters[2].port} has maxmemory-policy volatile-lru" in message


def test_a_cluster_that_stops_whole_when_a_master_dies_is_named_at_start(
        redis_cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis' default cluster-require-full-coverage yes makes every master refuse every command
    while one is down: the per-master failure isolation of the store guard cannot help then."""
    master = redis_cluster.masters[1]
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade(engine)
    master.client().config_set("cluster-require-full-coverage", "yes")
    try:
        make_balance_store(_config(redis_cluster.url), engine).close()  # started, with a warning
    finally:
        master.client().config_set("cluster-require-full-coverage", "no")
        engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if "cluster-require-full-coverage" in r.getMessage()]
    assert len(warnings) == 1 and f"is yes on 127.0.0.1:{master.port}:" in warnings[0]
    caplog.clear()
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    make_balance_store(_config(redis_cluster.url), engine).close()
    engine.dispose()
    assert not [r for r in caplog.records if "cluster-require-full-coverage" in r.getMessage()]


def test_a_redis_that_does_not_answer_at_start_is_left_to_the_failure_policy(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = make_balance_store(_config(f"redis://127.0.0.1:{free_port()}/0"), engine)  # no refusal
    store.close()
    engine.dispose()


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+cluster://127.0.0.1", "'127.0.0.1' is not host:port"),
    ("redis+cluster://127.0.0.1:7000/3", "database 0 only"),
    ("redis+sentinel://127.0.0.1:26379", "ends with /master_name"),
    ("redis+sentinel://127.0.0.1:26379/billing/x", "database 'x' is not a number"),
    ("memcached://127.0.0.1:11211", "unknown scheme 'memcached'"),
])
def test_a_redis_url_that_cannot_be_read_stops_the_configuration(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.url: .*" + reason.replace("(", r"\(")):
        _config(url)


def test_the_daemon_refuses_to_start_on_a_replica(redis_sentinel: SentinelSetup, postgres_url: str,
                                                  tmp_path: Path) -> None:
    from agent.daemon import Daemon, StartupError

    engine = make_engine(postgres_url)
    upgrade(engine)  # the schema check passes: the store step is the one that refuses
    engine.dispose()
    config = load_config(None, environ={}, cwd=tmp_path, overrides={
        "database": {"url": postgres_url}, "metrics": {"port": 0},
        "cdr": {"spool_dir": str(tmp_path / "spool")},
        "redis": {"url": f"redis://127.0.0.1:{redis_sentinel.replica.port}/0"}})
    agent = Daemon(config)
    try:
        with pytest.raises(StartupError, match=r"redis.url .* is a replica"):
            agent.start()
    finally:
        agent.shutdown()


# ----------------------------------------------------------------------- cluster failover

SLICE = 100_000
TOPUP = 3 * UNIT  # a top-up the promoted replica did not receive


def _owner(cluster: Cluster, key: str) -> int:
    """Index in ``cluster.masters`` of the master serving ``key`` (the others answer MOVED)."""
    import redis

    for i, master in enumerate(cluster.masters):
        try:
            master.client().exists(key)
            return i
        except redis.ResponseError:
            continue
    raise AssertionError(f"no master serves {key}")


def test_a_master_killed_while_calls_nibble_loses_no_money(cw: World, redis_cluster: Cluster) -> None:
    import time

    from agent.core.balance import NibbleRequest, NibbleStatus, StoreUnavailable
    from tests.redis_servers import wait_for

    accounts = [f"acct{i}" for i in range(9)]  # spread over the three masters' slots
    for account in accounts:
        cw.account(account, balance=100 * UNIT)
    store = cw.store()
    calls = {f"call-{a}": a for a in accounts}
    for call_id, account in calls.items():
        assert store.authorize(account, call_id, "n1", SLICE, SLICE, T0, contract.TTL).allowed
    seq = dict.fromkeys(calls, 1)

    def nibble_round(now_ms: int) -> list[NibbleStatus]:
        """One batch: every call's next slice, across the masters (one pipeline, split by node)."""
        outcomes = store.debit_and_reserve_many([NibbleRequest(c, seq[c], SLICE, SLICE, now_ms, contract.TTL, a)
                                                 for c, a in calls.items()])
        for out in outcomes:
            if out.applied:
                seq[out.call_id] += 1
        return [out.status for out in outcomes]

    for step in range(3):
        assert set(nibble_round(T0 + 1000 * step)) == {NibbleStatus.GRANTED}
    assert store.expire(T0 + 2500).rebuilt == 0  # the sweep notes each master's replication id
    balance_key = f"{cw.redis_prefix}acct:{{{accounts[0]}}}:bal"
    victim_index = _owner(redis_cluster, balance_key)
    victim, heir = redis_cluster.masters[victim_index], redis_cluster.replicas[victim_index]
    with transaction(cw.sessions) as s:  # a top-up just before the master dies
        accounts_repo.topup(s, accounts[0], TOPUP, reference="before-the-kill")
    assert isinstance(store, RedisBalanceStore) and store.refresh(accounts[0])
    topped_up = store.account_state(accounts[0]).balance_micros
    last_round = {c: seq[c] - 1 for c in calls}
    victim.stop()  # kill -9 of a master while its calls are live
    killed = time.monotonic()
    refused = 0
    statuses: list[NibbleStatus] = []

    def nibbles_go_on() -> bool:
        nonlocal refused, statuses
        try:
            statuses = nibble_round(T0 + 10_000)
        except StoreUnavailable:  # the failure policy's case: the store guard journals and retries
            refused += 1
            return False
        return True

    wait_for("nibbles go on after the replica's promotion", nibbles_go_on, timeout_s=15)
    outage_s = time.monotonic() - killed
    # A batch refused half-way (the other masters applied their part) was sent again whole:
    # those parts answer REPLAYED, the rest GRANTED; none is applied twice (checked below).
    assert set(statuses) <= {NibbleStatus.GRANTED, NibbleStatus.REPLAYED}
    try:
        # Replication is asynchronous: the promoted replica may not have had the top-up (done
        # here on the heir by hand, as the lost write would leave it). The next sweep sees the
        # slots' new replication id and rebuilds the accounts changed in SQL from the ledger.
        heir.client().hincrby(balance_key, "balance", -TOPUP)
        assert store.account_state(accounts[0]).balance_micros == topped_up - SLICE - TOPUP
        report = store.expire(T0 + 10_000)
        assert 1 <= report.rebuilt < len(accounts), report  # the dead master's accounts, not the others
        assert store.account_state(accounts[0]).balance_micros == topped_up - SLICE, "the top-up is back"
        assert store.expire(T0 + 10_001).rebuilt == 0, "once per promotion"
        # The step a node sent just before the kill, sent again: applied once, never twice.
        replays = store.debit_and_reserve_many([NibbleRequest(c, n, SLICE, SLICE, T0 + 10_000, contract.TTL, a)
                                                for (c, a), n in zip(calls.items(), last_round.values(), strict=True)])
        assert {out.status for out in replays} <= {NibbleStatus.REPLAYED, NibbleStatus.STALE}
        for account in accounts:  # the rebuild path (accounts rebuild-cache) keeps what live calls took
            before = store.account_state(account)
            after = store.rebuild(account)
            assert (after.balance_micros, after.reserved_micros) == (before.balance_micros, before.reserved_micros)
        for call_id in calls:
            out = store.settle(call_id, seq[call_id], (seq[call_id] - 1) * SLICE, T0 + 20_000)
            assert out.ledger_posted and out.debited_micros == (seq[call_id] - 1) * SLICE
        for account in accounts:
            contract.assert_books_balance(cw, account)
            topup = TOPUP if account == accounts[0] else 0
            assert cw.sql_balance(account) == 100 * UNIT + topup - 4 * SLICE  # four slices used, charged once
            assert store.account_state(account).balance_micros == cw.sql_balance(account)
    finally:
        # The old master comes back as a replica of its heir: the session's cluster is whole again.
        victim.restart()
        redis_cluster.masters[victim_index], redis_cluster.replicas[victim_index] = heir, victim
        wait_for("cluster whole again", lambda: redis_cluster.state_ok() and victim.client().info(
            "replication").get("master_link_status") == "up")
    print(f"failover: store unavailable for {outage_s:.2f}s ({refused} nibble batches refused)")


def test_a_sentinel_failover_is_followed_and_nibbles_go_on(sw: World, redis_sentinel: SentinelSetup) -> None:
    from agent.core.balance import NibbleStatus, StoreUnavailable
    from tests.redis_servers import wait_for

    sw.account("alice", balance=10 * UNIT)
    store = sw.store()
    assert store.authorize("alice", "c1", "n1", SLICE, SLICE, T0, contract.TTL).allowed
    assert store.debit_and_reserve("c1", 1, SLICE, SLICE, T0 + 1000, contract.TTL).status is NibbleStatus.GRANTED
    assert store.expire(T0 + 1500).rebuilt == 0  # the sweep notes the master's replication id
    with transaction(sw.sessions) as s:  # a top-up just before the master dies
        accounts_repo.topup(s, "alice", TOPUP, reference="before-the-kill")
    assert isinstance(store, RedisBalanceStore) and store.refresh("alice")
    old, heir = redis_sentinel.master, redis_sentinel.replica
    wait_for("the replica has the reservation", lambda: heir.client().exists(f"{sw.redis_prefix}acct:{{alice}}:bal"))
    old.stop()
    seq = 2

    def nibble() -> bool:
        nonlocal seq
        try:
            out = store.debit_and_reserve("c1", seq, SLICE, SLICE, T0 + 2000, contract.TTL)
        except StoreUnavailable:  # the Sentinels have not promoted the replica yet
            return False
        assert out.status is NibbleStatus.GRANTED
        return True

    try:
        wait_for("nibbles go on on the promoted replica", nibble, timeout_s=20)
        assert heir.client().info("replication")["role"] == "master"
        # The promoted replica without the top-up (a lost write, made by hand): the next sweep
        # sees the new replication id and rebuilds the accounts changed in SQL from the ledger.
        heir.client().hincrby(f"{sw.redis_prefix}acct:{{alice}}:bal", "balance", -TOPUP)
        assert store.expire(T0 + 2500).rebuilt == 1
        assert store.account_state("alice").balance_micros == 10 * UNIT + TOPUP - 2 * SLICE
        out = store.settle("c1", 3, 2 * SLICE, T0 + 3000)
        assert out.ledger_posted and out.debited_micros == 2 * SLICE
        contract.assert_books_balance(sw, "alice")
        assert sw.sql_balance("alice") == 10 * UNIT + TOPUP - 2 * SLICE
        assert store.account_state("alice").balance_micros == sw.sql_balance("alice")
    finally:
        # Back as a replica of its heir at once (the Sentinel would do it too, within ~10 s).
        old.restart("--replicaof", "127.0.0.1", str(heir.port))
        redis_sentinel.master, redis_sentinel.replica = heir, old
        wait_for("old master back as a replica", lambda: old.client().info("replication").get(
            "master_link_status") == "up")


def test_while_a_master_is_down_the_other_masters_accounts_authorize_settle_and_are_swept(
        cw: World, redis_cluster: Cluster) -> None:
    """The sweeper's index is split by slot (keys.py): no key outside an account's own master is
    needed by its steps. The victim is the master of the single index earlier versions wrote to,
    whose death stopped every authorization and settle of the cluster."""
    import redis

    from agent.core.balance import StoreUnavailable
    from tests.redis_servers import wait_for

    assert cw.redis_prefix is not None
    victim_index = _owner(redis_cluster, f"{cw.redis_prefix}calls:index")
    accounts = [f"acct{i}" for i in range(12)]
    for account in accounts:
        cw.account(account, balance=10 * UNIT)
    on_victim = [a for a in accounts if _owner(redis_cluster, f"{cw.redis_prefix}acct:{{{a}}}:bal") == victim_index]
    healthy = [a for a in accounts if a not in on_victim]
    assert on_victim and healthy, "twelve accounts spread over three masters"
    store = cw.store()
    for account in accounts:  # loaded into Redis before the kill (loading needs only SQL and its master)
        store.account_state(account)
    victim, heir = redis_cluster.masters[victim_index], redis_cluster.replicas[victim_index]
    victim.stop()
    try:
        for i, account in enumerate(healthy):
            call_id = f"live-{account}"
            assert store.authorize(account, call_id, "n1", SLICE, SLICE, T0, contract.TTL).allowed
            out = store.settle(call_id, 1, SLICE // 2, T0 + 3000)
            assert out.ledger_posted and cw.sql_balance(account) == 10 * UNIT - SLICE // 2
            assert store.authorize(account, f"left-{i}", "n2", SLICE, SLICE, T0, contract.TTL).allowed
        with pytest.raises((StoreUnavailable, redis.RedisError)):
            store.authorize(on_victim[0], "on-the-dead-master", "n1", SLICE, SLICE, T0, contract.TTL)
        # A node died with the 'left-' calls open: the sweeper expires them on the masters that answer.
        report = store.expire(T0 + contract.TTL + 1)
        assert sorted(report.expired) == sorted(f"left-{i}" for i in range(len(healthy)))
        for account in healthy:
            assert store.account_state(account).reserved_micros == 0
    finally:
        wait_for("the replica promoted", lambda: heir.client().info("replication").get("role") == "master")
        victim.restart()
        redis_cluster.masters[victim_index], redis_cluster.replicas[victim_index] = heir, victim
        wait_for("cluster whole again", lambda: redis_cluster.state_ok() and victim.client().info(
            "replication").get("master_link_status") == "up")


def test_a_dead_master_stops_only_its_own_accounts_calls_behind_the_failure_policy(
        cw: World, redis_cluster: Cluster) -> None:
    """The daemon's view (StoreGuard, fail_closed): the batch after the kill grants every call of
    the other masters at once and journals the dead master's; their settles post at once while
    the dead master's wait in the journal behind its nibbles, and are replayed, once and in order,
    when the replica has taken over. One circuit for the whole cluster cut every call of every
    node for the 2-5 s of the failover (bench_nodes.py --kill-master-at)."""
    from agent.core.balance import NibbleRequest, NibbleStatus, SettleStatus
    from agent.services.clock import SystemClock
    from agent.services.store_guard import StoreGuard
    from tests.redis_servers import wait_for

    accounts = [f"acct{i}" for i in range(12)]
    for account in accounts:
        cw.account(account, balance=10 * UNIT)
    store = cw.store()
    guard = StoreGuard(store, clock=SystemClock(), timeout_ms=250, probe_interval_ms=100)
    calls = {f"call-{a}": a for a in accounts}
    for call_id, account in calls.items():
        assert guard.authorize(account, call_id, "n1", SLICE, SLICE, T0, contract.TTL).allowed
    victim_index = _owner(redis_cluster, f"{cw.redis_prefix}acct:{{{accounts[0]}}}:bal")
    victim, heir = redis_cluster.masters[victim_index], redis_cluster.replicas[victim_index]
    on_victim = {a for a in accounts
                 if _owner(redis_cluster, f"{cw.redis_prefix}acct:{{{a}}}:bal") == victim_index}
    assert 0 < len(on_victim) < len(accounts)
    assert {guard.shard_of(a) for a in on_victim} == {f"127.0.0.1:{victim.port}"}
    assert victim.client().execute_command("WAIT", 1, 5000) == 1  # the replica has the reservations
    victim.stop()  # kill -9 of a master while its calls are live
    try:
        outcomes = guard.debit_and_reserve_many([NibbleRequest(c, 1, SLICE, SLICE, T0 + 1000, contract.TTL, a)
                                                 for c, a in calls.items()])
        for call_id, out in zip(calls, outcomes, strict=True):
            expected = NibbleStatus.STORE_UNAVAILABLE if calls[call_id] in on_victim else NibbleStatus.GRANTED
            assert out.status is expected, call_id
        assert guard.down_shards() == [f"127.0.0.1:{victim.port}"]
        for call_id, account in calls.items():
            out = guard.settle(call_id, 2, SLICE + SLICE // 2, T0 + 1500, account_id=account)
            if account in on_victim:
                assert out.status is SettleStatus.JOURNALED
            else:
                assert out.ledger_posted, call_id
                assert cw.sql_balance(account) == 10 * UNIT - SLICE - SLICE // 2
        assert len(guard.journal) == 2 * len(on_victim)  # a nibble and a settle each, kept in order

        def replayed() -> bool:
            guard.recover()
            return len(guard.journal) == 0

        wait_for("the dead master's steps replayed on its heir", replayed, timeout_s=20)
        assert guard.available
        for account in accounts:
            contract.assert_books_balance(cw, account)
            assert cw.sql_balance(account) == 10 * UNIT - SLICE - SLICE // 2, account  # charged once
    finally:
        wait_for("the replica promoted", lambda: heir.client().info("replication").get("role") == "master")
        victim.restart()
        redis_cluster.masters[victim_index], redis_cluster.replicas[victim_index] = heir, victim
        wait_for("cluster whole again", lambda: redis_cluster.state_ok() and victim.client().info(
            "replication").get("master_link_status") == "up")
