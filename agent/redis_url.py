"""``redis.url``: which Redis deployment the balance store talks to, parsed without connecting.

Three forms (README, agent.yaml.example):

* ``redis://[[user]:password@]host:port/db`` (also ``rediss://``, ``unix://``): one server, as
  redis-py's ``from_url`` reads it;
* ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster; the nodes are
  seeds only (any one that answers gives the whole slot map), database 0 (a cluster has no other);
* ``redis+sentinel://[[user]:password@]host:port[,host:port...]/master_name[/db]``: the master
  that the Sentinels name ``master_name``; the password is the data nodes' (the Sentinels are
  asked without one).

Checked when the configuration is read (``agent/config.py``), so a typo stops the start with the
key before anything connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from agent.core.errors import InvalidInput

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
SINGLE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    mode: Literal["single", "cluster", "sentinel"]
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The deployment without its password, for logs and errors."""
        if self.mode == "single":
            return _hide_password(self.url)
        seeds = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"Redis Cluster (seeds {seeds})" if self.mode == "cluster" else (
            f"Sentinel master {self.master_name!r} (sentinels {seeds})")


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, where = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{where}"


class RedisUrlError(InvalidInput):
    """A ``redis.url`` that cannot be read; ``reason`` is the message without the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"redis.url {_hide_password(url)!r}: {reason}")
        self.reason = reason


def _bad(url: str, reason: str) -> RedisUrlError:
    return RedisUrlError(url, reason)


def _hosts(url: str, text: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"{part.strip() or '(empty)'!r} is not host:port (a comma separates several)")
        hosts.append((host.strip("[]"), int(port)))
    return tuple(hosts)


def parse_redis_url(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _bad(url, "not a URL; expected redis://host:port/db, redis+cluster://host:port,... or "
                        "redis+sentinel://host:port,.../master_name")
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url)
    if scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        known = ", ".join((*SINGLE_SCHEMES, CLUSTER_SCHEME, SENTINEL_SCHEME))
        raise _bad(url, f"unknown scheme {scheme!r} (known: {known})")
    credentials, at, location = rest.rpartition("@")
    username = password = None
    if at:
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    where, _, path = location.partition("/")
    if "?" in where or "?" in path:
        raise _bad(url, "query options are not read for a cluster or sentinel URL; use the redis section's keys")
    hosts = _hosts(url, where)
    segments = [s for s in path.split("/") if s]
    if scheme == CLUSTER_SCHEME:
        if segments not in ([], ["0"]):
            raise _bad(url, "a Redis Cluster has database 0 only: nothing may follow the host list")
        return RedisTarget("cluster", url, hosts, username=username, password=password)
    if not segments or len(segments) > 2:
        raise _bad(url, "a sentinel URL ends with /master_name (the name the Sentinels monitor), "
                        "optionally /db")
    if len(segments) == 2 and not segments[1].isdigit():
        raise _bad(url, f"database {segments[1]!r} is not a number")
    db = int(segments[1]) if len(segments) == 2 else 0
    return RedisTarget("sentinel", url, hosts, unquote(segments[0]), db, username, password)
