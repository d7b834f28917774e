"""redis-py's readiness check under gevent: a zero-timeout poll must not go through the hub.

Run in a child process, monkey-patched as the daemon is (the test process is not patched).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
from gevent import monkey
monkey.patch_all()
import os, gevent
import redis._parsers.hiredis as parser
from agent.adapters.redis.store import make_client
client = make_client(os.environ["REDIS_URL"], 500)
client.ping()
connection = client.connection_pool.get_connection()
switches = []
def other():
    while True:
        switches.append(1)
        gevent.sleep(0)
watcher = gevent.spawn(other)
gevent.sleep(0.01)
switches.clear()
for _ in range(1000):
    connection.can_read()  # what the pool asks before every command
watcher.kill()
print(len(switches))
"""


def test_the_pools_readiness_check_does_not_yield_to_other_greenlets(redis_client: object) -> None:
    from tests.conftest import REDIS_URL as url
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False,
                            env={"REDIS_URL": url, "PATH": "/usr/bin:/bin"})
    if result.returncode != 0:
        pytest.fail(result.stderr[-2000:])
    assert int(result.stdout.strip().splitlines()[-1]) <= 2  # not one trip through the hub per check
