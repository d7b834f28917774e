"""The Lua scripts of the balance store: loaded once per server (SCRIPT LOAD), run by SHA.

A server that lost its script cache (restart, failover, SCRIPT FLUSH) answers NOSCRIPT; the
store then loads every script again and retries the call once.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from agent.adapters.redis.connect import RedisClient

NAMES = ("authorize", "nibble", "settle", "close", "mark_posted", "rebuild", "openings", "periods")
# Scripts of their own (no prelude): a shebang with flags must be a script's first line.
STANDALONE = ("sweep",)
# Scripts with a shebang (Redis 7.0+) that wrap the prelude themselves, loaded where they run.
BATCHED = ("nibbles", "authorizes")
# The script each batched one runs once per item, and the marker its body replaces.
_BATCHED_BODY = {"nibbles": ("nibble", "nibble_one", "--NIBBLE_BODY--"),
                 "authorizes": ("authorize", "authorize_one", "--AUTHORIZE_BODY--")}
CROSS_SLOT = "#!lua flags=allow-cross-slot-keys\n"


def _source(name: str) -> str:
    package = resources.files("agent.adapters.redis")
    own = (package / f"{name}.lua").read_text(encoding="utf-8")
    if name in STANDALONE:
        return own
    prelude = (package / "prelude.lua").read_text(encoding="utf-8")
    if name in _BATCHED_BODY:  # e.g. nibble.lua's body as a function of its KEYS and ARGV (nibbles.lua)
        script, function_name, marker = _BATCHED_BODY[name]
        body = (package / f"{script}.lua").read_text(encoding="utf-8")
        function = f"local function {function_name}(KEYS, ARGV)\n{body}\nend"
        return CROSS_SLOT + prelude + "\n" + own.replace(marker, function, 1)
    return prelude + "\n" + own


class Scripts:
    def __init__(self) -> None:
        self.source = {name: _source(name) for name in NAMES + STANDALONE + BATCHED}
        self.sha = {name: hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
                    for name, text in self.source.items()}
        self._loaded = False
        self.refused: dict[str, str] = {}  # batched scripts a server would not load, and why

    def load(self, client: RedisClient) -> None:
        """SCRIPT LOAD every script (idempotent: the SHA is the content's). One command each, not
        a pipeline: a cluster client sends SCRIPT LOAD to every master, a pipeline cannot. (The
        standalone scripts are loaded where they run: ``run_on``; on one server the batched ones
        too, for they run in pipelines there, unless the server refuses their shebang: a Redis
        older than 7.0, noted in ``refused``.)"""
        for name in NAMES:
            self._load_one(client, name)
        if not isinstance(client, RedisCluster):
            for name in BATCHED:
                try:
                    self._load_one(client, name)
                except ResponseError as exc:
                    self.refused[name] = str(exc)
        self._loaded = True

    def _load_one(self, client: RedisClient, name: str) -> None:
        sha = client.script_load(self.source[name])
        if sha != self.sha[name]:
            raise RuntimeError(f"Redis returned SHA {sha} for script {name}, expected {self.sha[name]}")

    def ensure_loaded(self, client: RedisClient) -> None:
        if not self._loaded:
            self.load(client)

    def call(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        """Queue one EVALSHA on a pipeline (the caller handles NOSCRIPT). Through
        ``execute_command``: redis-py's cluster pipeline blocks its ``evalsha`` method, yet routes
        the command by its keys (all of one slot here) like any other."""
        return client.execute_command("EVALSHA", self.sha[name], len(keys), *keys, *args)

    def run(self, client: RedisClient, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script now; load the scripts and retry once if the server lost them."""
        self.ensure_loaded(client)
        try:
            return client.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            self.load(client)
            return client.evalsha(self.sha[name], len(keys), *keys, *args)

    def run_on(self, server: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script on one server (a cluster master's own client), loading it there if needed."""
        try:
            return server.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            server.script_load(self.source[name])
            return server.evalsha(self.sha[name], len(keys), *keys, *args)
