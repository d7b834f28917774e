"""A carrier's channel limit counted on every node (DESIGN §10): live calls per carrier in Redis,
written and read off the call path (agent/adapters/redis/carrier_channels.py), and the router's
view of them (agent/services/routes.py ``ChannelView``)."""

from __future__ import annotations

from typing import Any

from agent.adapters.redis.carrier_channels import RedisCarrierChannels
from agent.core.rating import RateRow
from agent.core.routing import CarrierState, RoutePolicy, select_routes
from agent.services.routes import ChannelView


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def node(redis_client: Any, prefix: str, clock: Clock, live: dict[str, str]) -> RedisCarrierChannels:
    return RedisCarrierChannels(redis_client, key_prefix=prefix, now_ms=clock, carriers=lambda: ["acme", "globex"],
                                live=lambda: live, ttl_ms=60_000)


def test_every_node_sees_the_calls_of_the_others_and_ended_calls_free_their_channel(
        redis_client: Any, redis_prefix: str) -> None:
    clock = Clock()
    live_a: dict[str, str] = {}
    live_b: dict[str, str] = {}
    a, b = node(redis_client, redis_prefix, clock, live_a), node(redis_client, redis_prefix, clock, live_b)
    for call_id in ("a1", "a2"):
        live_a[call_id] = "acme"
        a.claim("acme", call_id)
    live_b["b1"] = "acme"
    b.claim("acme", "b1")
    a.flush_once()
    assert dict(a.counts()) == {"acme": 2, "globex": 0}  # b's claim is still queued on b
    b.flush_once()
    a.flush_once()
    assert a.counts()["acme"] == b.counts()["acme"] == 3

    del live_a["a1"]
    a.release("acme", "a1")
    a.flush_once()
    assert a.counts()["acme"] == 2


def test_the_calls_of_a_node_that_died_stop_counting_and_live_calls_are_renewed(
        redis_client: Any, redis_prefix: str) -> None:
    clock = Clock()
    live_a: dict[str, str] = {"a1": "acme"}
    a = node(redis_client, redis_prefix, clock, live_a)
    dead = node(redis_client, redis_prefix, clock, {})
    a.claim("acme", "a1")
    dead.claim("acme", "d1")  # its node dies: never released, never renewed
    dead.flush_once()
    a.flush_once()
    assert a.counts()["acme"] == 2
    for _ in range(4):  # 80 s later: a renewed its live call every 20 s, the dead node's call expired
        clock.ms += 20_000
        a.flush_once()
    assert a.counts()["acme"] == 1


def test_a_redis_that_is_away_keeps_the_steps_queued_and_the_last_counts(redis_client: Any,
                                                                          redis_prefix: str) -> None:
    class Away:
        def pipeline(self, transaction: bool = False) -> Any:
            raise ConnectionError("Redis is away")

    clock = Clock()
    channels = node(redis_client, redis_prefix, clock, {})
    channels.claim("acme", "c1")
    channels.flush_once()
    channels.client = Away()
    channels.claim("acme", "c2")
    try:
        channels.flush_once()
    except ConnectionError:
        pass
    assert channels.counts()["acme"] == 1 and len(channels._pending) == 1  # the steps stay queued
    channels.client = redis_client
    channels.flush_once()
    assert channels.counts()["acme"] == 2 and not channels._pending


def test_the_router_leaves_out_a_carrier_full_on_any_node() -> None:
    sell = RateRow("1", "US", 60_000)
    buy = RateRow("1", "US", 10_000)
    local = {"acme": 1}
    shared = {"acme": 2, "globex": 4}
    view = ChannelView(local, lambda: shared)
    assert (view["acme"], view["globex"], view.get("other", 0)) == (2, 4, 0)
    local["acme"] = 3  # this node's newest call is not in the shared snapshot yet
    assert view["acme"] == 3
    offers = [(CarrierState("acme", "PJSIP/acme", max_channels=3, live_channels=view.get("acme", 0)), buy),
              (CarrierState("globex", "PJSIP/globex", max_channels=5, live_channels=view.get("globex", 0)), buy)]
    choice = select_routes(sell, offers, RoutePolicy.PRIORITY)
    assert [r.carrier for r in choice.routes] == ["globex"]
    assert "3 of 3 channels in use" in choice.detail()
