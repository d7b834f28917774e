"""A switch and a CDR sink for driving the real ``Engine`` in tests, shared by the test files
that need no more than this (hangups recorded with their instant, records kept in order)."""

from __future__ import annotations

from agent.core.cdr import CallRecord
from agent.core.events import LegHungUp
from agent.services.clock import SystemClock
from agent.services.engine import Engine


class Switch:
    """Hangs up at once (the leg's hang-up event 5 ms later) and records ``(leg, ms)``."""

    name = "asterisk"

    def __init__(self, engine: Engine, clock: SystemClock) -> None:
        self.engine = engine
        self.clock = clock
        self.hangups: list[tuple[str, int]] = []

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        self.hangups.append((leg_id, self.clock.now_ms()))
        self.engine.on_event(LegHungUp(leg_id, self.clock.now_ms() + 5, cause="NORMAL_CLEARING"))

    def warn(self, leg_id: str, seconds_left: int) -> None:
        pass

    def arm_backstop(self, leg_id: str, at_ms: int, caller_leg_id: str = "") -> None:
        pass

    def connected(self) -> bool:
        return True


class Cdrs:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def submit(self, record: CallRecord) -> None:
        self.records.append(record)
