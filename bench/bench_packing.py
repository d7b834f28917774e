#!/usr/bin/env python3
"""Benchmark: the client's CPU to pack the balance store's commands, redis-py's packer against
the one every client of the agent uses (agent/adapters/redis/connect.py ``_HiredisFirst``).

    python bench/bench_packing.py [--runs 5] [--number 20000]

Packs, in process and with no I/O, the commands of three store steps as the store queues them:
one authorize (the index entry, the call's account hint, the EVALSHA of authorize.lua: 20
arguments), a customer three levels deep (that plus three levels' index entries and scripts:
9 commands), and one nibble of the pipeline fallback (nibble.lua, 17 arguments). Reported per
packer: microseconds per step (median of ``--runs``) and the ratio. CPU only: on 2 shared
cores read the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from agent.adapters.redis.connect import fast_packing

SHA = "3f1c9b0e5d2a7c4b8e6f1a0d9c8b7a6f5e4d3c2b"
NOW_MS = 1_796_000_000_000


def keys(account: str, call: str) -> list[str]:
    base = f"billing:acct:{{{account}}}"
    return [base, f"{base}:live", f"{base}:call:{call}", f"{base}:periods", f"{base}:periods:unposted"]


def authorize(account: str, call: str) -> list[tuple[Any, ...]]:
    base = f"billing:acct:{{{account}}}"
    return [("ZADD", "billing:calls:index", "NX", NOW_MS + 60_000, f"{account}|{call}"),
            ("SET", f"billing:call:{call}", account, "EX", 86_400),
            ("EVALSHA", SHA, 5, *keys(account, call), account, call, "node-1", 6_000, 100, NOW_MS, 60_000,
             f"{base}:period:", 0, "", "", f"{base}:spend:")]


def deep(account: str, call: str) -> list[tuple[Any, ...]]:
    commands = authorize(account, call)
    for level in (1, 2, 3):
        reseller, level_call = f"tenant:r{level}", f"{call}^{level}"
        commands += authorize(reseller, level_call)[::2]  # the index entry and the script
    return commands


def nibble(account: str, call: str) -> list[tuple[Any, ...]]:
    base = f"billing:acct:{{{account}}}"
    return [("EVALSHA", SHA, 5, *keys(account, call), call, 7, 6_000, 6_000, NOW_MS, 60_000, 0, 0,
             f"{base}:period:", f"{base}:spend:")]


def per_step_us(pack: Callable[[Sequence[tuple[Any, ...]]], object], commands: list[tuple[Any, ...]],
                number: int) -> float:
    started = time.process_time()
    for _ in range(number):
        pack(commands)
    return (time.process_time() - started) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--number", type=int, default=20_000, help="steps packed per run and packer")
    args = parser.parse_args()
    packers = {"redis-py": redis.Connection(), "agent": fast_packing(redis.Connection)()}
    steps = {"authorize": authorize("acct-42", "call-1"), "three_levels_deep": deep("acct-42", "call-1"),
             "nibble_pipeline": nibble("acct-42", "call-1")}
    for connection in packers.values():  # the same bytes, or the figures mean nothing
        assert connection.pack_commands(steps["three_levels_deep"]) == \
            packers["redis-py"].pack_commands(steps["three_levels_deep"])
    report: dict[str, Any] = {"runs": args.runs, "number": args.number}
    for step, commands in steps.items():
        figures = {}
        for name, connection in packers.items():
            runs = [per_step_us(connection.pack_commands, commands, args.number) for _ in range(args.runs)]
            figures[f"{name}_us"] = round(statistics.median(runs), 2)
        figures["ratio"] = round(figures["redis-py_us"] / figures["agent_us"], 2)
        report[step] = figures
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
