"""Clocks for the services: the system clock, and a manual one for tests and the simulation."""

from __future__ import annotations

import time


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (deterministic tests and simulation)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms
        self._wall_offset_ms = 0  # what step_wall() moved the wall clock by

    def now_ms(self) -> int:
        return self._now_ms + self._wall_offset_ms

    def monotonic_ms(self) -> int:
        return self._now_ms

    def step_wall(self, delta_ms: int) -> None:
        """An NTP step: the wall clock jumps, the monotonic one does not."""
        self._wall_offset_ms += delta_ms

    def advance(self, delta_ms: int) -> None:
        if delta_ms < 0:
            raise ValueError("a clock does not go backwards")
        self._now_ms += delta_ms

    def set(self, now_ms: int) -> None:
        self.advance(now_ms - self.now_ms())
