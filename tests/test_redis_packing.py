"""Every Redis client of the agent packs its commands with hiredis in one C call
(agent/adapters/redis/connect.py ``_HiredisFirst``): the bytes on the wire must be exactly
redis-py's, and what redis-py refuses must still be refused the same way."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.exceptions import DataError
from redis.sentinel import SentinelManagedConnection

from agent.adapters.redis.connect import fast_packing
from agent.adapters.redis.store import make_client

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "billing:acct:{ü-1}", "billing:acct:{ü-1}:live", "call-1^2", 6_000, -15, 0,
     2**53 - 1, 10**20, ""),
    ("ZADD", "idx", "NX", 1_796_000_000_000, "acct|call"),
    ("SET", b"raw\x00bytes", memoryview(b"view"), "EX", 86_400),
    ("ZADD", "z", 1.5, "m", 1e20, "n", 0.1, "o"),
    ("CLIENT SETNAME", "billing-agent"),  # redis-py splits a first argument with a space
    ("SET", bytearray(b"k"), "v"),  # hiredis refuses a bytearray: redis-py packs it
]


@pytest.mark.parametrize("command", COMMANDS, ids=[str(c[0]) for c in COMMANDS])
def test_the_bytes_are_redis_pys(command: tuple[Any, ...]) -> None:
    def wire(connection: redis.Connection) -> bytes:  # redis-py sends a memoryview as its own chunk
        return b"".join(bytes(chunk) for chunk in connection.pack_command(*command))

    assert wire(fast_packing(redis.Connection)()) == wire(redis.Connection())


@pytest.mark.parametrize("value", [True, None, object()])
def test_what_redis_py_refuses_is_refused_as_it_does(value: object) -> None:
    with pytest.raises(DataError):
        redis.Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        fast_packing(redis.Connection)().pack_command("SET", "k", value)


def test_one_class_per_original() -> None:
    assert fast_packing(redis.Connection) is fast_packing(redis.Connection)
    assert issubclass(fast_packing(SentinelManagedConnection), SentinelManagedConnection)


@pytest.mark.parametrize("deployment", ["single", "cluster", "sentinel"])
def test_every_client_make_client_gives_packs_this_way(deployment: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(f"redis_url_{deployment}" if deployment == "single" else f"redis_{deployment}_url")
    client: Any = make_client(url, 2000)
    try:
        pool = (client.get_default_node().redis_connection.connection_pool if deployment == "cluster"
                else client.connection_pool)
        assert pool.connection_class.__name__.startswith("FastPacking"), pool.connection_class
        key = "test:packing:{ü}"
        assert client.set(key, "é", ex=60) and client.get(key) == "é"
        client.delete(key)
    finally:
        client.close()
