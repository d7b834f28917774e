"""Reconnect delays shared by the PBX clients (AMI, event socket)."""

from __future__ import annotations

import random

STABLE_CONNECTION_S = 10.0  # a connection that lived this long is retried at once when it drops


class Backoff:
    """Capped exponential backoff with jitter; reset after a connection that lived."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next_s = initial_s

    def next(self) -> float:
        delay = self._next_s
        self._next_s = min(self.max_s, self._next_s * 2)
        return min(self.max_s, delay * random.uniform(0.8, 1.2))  # jitter, not security

    def reset(self) -> None:
        self._next_s = self.initial_s

    def after_connection(self, lived_s: float) -> float:
        """The delay before reconnecting once a logged-in connection ended: a connection that
        lived is retried at once (from the initial delay); a flapping one keeps backing off."""
        if lived_s >= STABLE_CONNECTION_S:
            self.reset()
        return self.next()
