"""Clients for a Redis Cluster and a Sentinel-managed master, and the start-up check of a deployment.

Both clients fail fast like the single-server one (``store.make_client``): socket timeouts of
``redis.timeout_ms`` and no retries of their own, so a dead node becomes ``StoreUnavailable``
for the failure policy within one deadline. The cluster client follows MOVED/ASK redirections
(after a failover the slot map is read again) and sends each pipeline's commands to the nodes
that own their keys; every script touches the keys of one account, i.e. one slot (keys.py).

``check_deployment`` runs once at start (agent/adapters/balance.py) and refuses a deployment that
would lose money or cannot take writes: an eviction policy other than ``noeviction``, a replica as
the write endpoint, a cluster node behind a single-server URL, a cluster whose slots are not all
assigned. A deployment that does not answer is left to the failure policy, as before.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import hiredis
import redis
from redis._parsers.commands import CommandPolicies, RequestPolicy, ResponsePolicy
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.policies import BasePolicyResolver, PolicyResolver, StaticPolicyResolver
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from agent.core.errors import InvalidInput
from agent.redis_url import RedisTarget

log = logging.getLogger(__name__)

SLOTS = 16384

# One server (through a Sentinel or not) or a cluster: the store uses the commands both have.
RedisClient = redis.Redis | RedisCluster


class RedisSetupError(InvalidInput):
    """The configured Redis cannot hold the balances (the message names redis.url and why)."""


# ---------------------------------------------------------------------------- command packing


class _HiredisFirst:
    """Packs a command with hiredis in one C call. redis-py 8's own hiredis packer first encodes
    every argument in Python (a generator, isinstance checks, ``Encoder.encode``): 12.6 us for
    one 20-argument EVALSHA against 1.6 us here (`bench/bench_packing.py`), 9 commands and 110 us
    of CPU for a customer three levels deep, on every authorization. hiredis takes str (UTF-8),
    int, float (as ``repr``) and bytes, the encodings redis-py's default encoder gives them; for
    anything else (bool, None, bytearray, an int subclass) it raises TypeError and redis-py's
    packer decides, with its own errors. A first argument with a space (``"CLIENT SETNAME"``) is
    redis-py's too: it splits it."""

    __slots__ = ("_standard",)

    def __init__(self, standard: Any) -> None:
        self._standard = standard

    def pack(self, *args: Any) -> list[bytes]:
        first = args[0]
        if type(first) is str and " " not in first:
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, UnicodeError):
                pass
        packed: list[bytes] = self._standard.pack(*args)
        return packed


class _FastPacking:
    """Mixed into a redis-py connection class: its commands are packed by ``_HiredisFirst``. Only
    for connections with redis-py's default encoder (UTF-8, strict), as every client here has."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return _HiredisFirst(super()._construct_command_packer(packer))  # type: ignore[misc]


@cache
def fast_packing(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` with its commands packed in one C call (one class per original)."""
    return type(f"FastPacking{connection_class.__name__}", (_FastPacking, connection_class), {})


def _setup_error(target: RedisTarget, reason: str) -> RedisSetupError:
    return RedisSetupError(f"redis.url ({target.describe()}): {reason}")


def _node_options(target: RedisTarget, timeout_ms: int) -> dict[str, Any]:
    seconds = timeout_ms / 1000
    return {"username": target.username, "password": target.password, "socket_timeout": seconds,
            "socket_connect_timeout": seconds, "decode_responses": True, "retry": Retry(NoBackoff(), 0)}


def _seed_report(target: RedisTarget, timeout_ms: int) -> str:
    """Why each seed node did not give a slot map (redis-py reports only the last one)."""
    options = _node_options(target, timeout_ms)
    reports = []
    for host, port in target.hosts:
        client = redis.Redis(host=host, port=port, **options)
        try:
            info = client.info("cluster")
            reports.append(f"{host}:{port} answers" + ("" if info.get("cluster_enabled") else
                                                       " but is not a cluster node (cluster-enabled no)"))
        except redis.RedisError as exc:
            reports.append(f"{host}:{port}: {exc}")
        finally:
            client.close()
    return "; ".join(reports)


class _ScriptsByKeys(BasePolicyResolver):
    """EVALSHA routed by its keys, read locally from ``numkeys``. Without this, redis-py's cluster
    pipeline asks the default node ``COMMAND GETKEYS`` for every EVALSHA it queues: one more round
    trip per script, and once that node is dead (a master killed) no pipeline runs at all, even
    after its replica took over (the lookup fails before the slot map is ever refreshed)."""

    def __init__(self, fallback: PolicyResolver | None = None) -> None:
        keyed = CommandPolicies(RequestPolicy.DEFAULT_KEYED, ResponsePolicy.DEFAULT_KEYED)
        super().__init__({"core": {"evalsha": keyed, "eval": keyed}}, fallback)

    def with_fallback(self, fallback: PolicyResolver) -> PolicyResolver:
        return _ScriptsByKeys(fallback)


class _Cluster(RedisCluster):
    """redis-py's cluster client whose pipelines use its policy resolver too (redis-py 8.1 builds
    each pipeline with the default resolver, ignoring the client's)."""

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        pipe: ClusterPipeline = super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        pipe._policy_resolver = self._policy_resolver
        return pipe


def make_cluster_client(target: RedisTarget, timeout_ms: int) -> RedisCluster:
    """A cluster client; needs one seed that answers (the slot map comes from it)."""
    try:
        seeds = [ClusterNode(h, p) for h, p in target.hosts]  # type: ignore[no-untyped-call]
        return _Cluster(startup_nodes=seeds, require_full_coverage=True,
                        policy_resolver=_ScriptsByKeys(StaticPolicyResolver()),
                        connection_class=fast_packing(redis.Connection), **_node_options(target, timeout_ms))
    except RedisClusterException as exc:
        text = str(exc)
        if "not covered" in text:
            raise _setup_error(target, f"the cluster does not serve every slot yet ({text}); a cluster still "
                                       "forming is refused: wait until `redis-cli --cluster check` passes") from None
        raise _setup_error(target, f"no seed node gave the cluster's slot map: {_seed_report(target, timeout_ms)}"
                           ) from None


def make_sentinel_client(target: RedisTarget, timeout_ms: int) -> redis.Redis:
    """The master the Sentinels name; each new connection asks them where it is now, so a
    failover is followed (a connection to a demoted master is dropped on its READONLY reply).
    Its pool grows as needed (redis-py's Sentinel pool cannot block like BlockingConnectionPool)."""
    seconds = timeout_ms / 1000
    # redis-py up to 8.1 leaves Sentinel and master_for untyped (8.2 types them)
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs={  # type: ignore[no-untyped-call, unused-ignore]
        "socket_timeout": seconds, "socket_connect_timeout": seconds}, **_node_options(target, timeout_ms))
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.master_name, db=target.db, connection_class=fast_packing(SentinelManagedConnection),
        **_node_options(target, timeout_ms))
    return client


# ---------------------------------------------------------------------------- start-up check


def _check_server(target: RedisTarget, where: str, info: dict[str, Any], *, in_cluster: bool) -> None:
    role = str(info.get("role", "master"))
    if role != "master":
        upstream = f"{info.get('master_host')}:{info.get('master_port')}"
        raise _setup_error(target, f"{where} is a replica (role {role} of {upstream}): the balance store writes, "
                                   "give the master (or a redis+sentinel:// URL, which follows failovers)")
    if info.get("cluster_enabled") and not in_cluster:
        raise _setup_error(target, f"{where} is a Redis Cluster node (cluster_enabled:1): use "
                                   "redis+cluster://host:port[,host:port...] so keys reach the node that owns them")
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        raise _setup_error(target, f"{where} has maxmemory-policy {policy}: the balance store needs noeviction "
                                   "(an evicted key is money forgotten); set `maxmemory-policy noeviction` in its "
                                   "redis.conf (and CONFIG SET it now)")


def check_deployment(client: RedisClient, target: RedisTarget) -> None:
    """Refuse what would lose money or cannot take writes; a Redis that does not answer now is
    logged and left to the failure policy (the store guard), as a Redis lost later would be."""
    try:
        if isinstance(client, RedisCluster):
            _check_cluster(client, target)
        else:
            _check_server(target, target.describe(), client.info(), in_cluster=False)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("redis.url (%s) does not answer at start (%s): the failure policy applies until it does; "
                    "its eviction policy and role are not checked", target.describe(), exc)


def _check_cluster(client: RedisCluster, target: RedisTarget) -> None:
    full_coverage: list[str] = []
    for node in client.get_primaries():  # type: ignore[no-untyped-call]
        where = f"cluster node {node.host}:{node.port}"
        info = client.get_redis_connection(node).info()
        _check_server(target, where, info, in_cluster=True)
        if _requires_full_coverage(client.get_redis_connection(node)):
            full_coverage.append(f"{node.host}:{node.port}")
        state = client.get_redis_connection(node).cluster("info")
        assigned = int(state.get("cluster_slots_assigned", 0))
        if assigned < SLOTS:
            raise _setup_error(target, f"{where}: {assigned} of {SLOTS} slots assigned; a cluster still forming is "
                                       "refused: wait until `redis-cli --cluster check` passes")
        if state.get("cluster_state") != "ok":
            log.warning("redis.url (%s): %s reports cluster_state %s (a master down, failover under way?): the "
                        "failure policy applies to the slots it cannot serve", target.describe(), where,
                        state.get("cluster_state"))
    if full_coverage:
        log.warning("redis.url (%s): cluster-require-full-coverage is yes on %s: while one master is down and not "
                    "replaced yet, every master refuses every command (CLUSTERDOWN), so all accounts' calls meet "
                    "the failure policy for the failover, not only the dead master's; set "
                    "`cluster-require-full-coverage no` on every node to keep the other masters' calls going",
                    target.describe(), ", ".join(full_coverage))


def _requires_full_coverage(node: redis.Redis) -> bool:
    """Redis' default (yes) stops the whole cluster while any slot is unserved. Unknown (CONFIG
    renamed or refused, as managed services do) counts as no: nothing to say."""
    try:
        setting = node.config_get("cluster-require-full-coverage")
    except redis.ResponseError:
        return False
    return str(setting.get("cluster-require-full-coverage", "no")).lower() == "yes"
