"""Helpers for driving the pure call session in tests."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.events import Direction
from agent.core.session import CallSession, Leg, RatingInfo, SessionSettings


@dataclass(frozen=True)
class FlatTariff:
    """DESIGN §4 for one rate row, written out independently of agent/core/rating.py."""

    rate_micros: int  # per minute
    connect_fee_micros: int = 0
    initial_increment: int = 1
    increment: int = 1
    minimum: int = 0
    grace: int = 0

    def cost_micros(self, duration_ms: int) -> int:
        d = -(-duration_ms // 1000)
        if d == 0 or d <= self.grace:
            return 0
        b = max(d, self.minimum)
        if b <= self.initial_increment:
            b = self.initial_increment
        else:
            b = self.initial_increment + -(-(b - self.initial_increment) // self.increment) * self.increment
        return self.connect_fee_micros + -(-(self.rate_micros * b) // 60)

    def max_seconds(self, budget_micros: int) -> int:
        best = 0
        for d in range(1, 100_000):
            if self.cost_micros(d * 1000) <= budget_micros:
                best = d
            elif d > self.grace + self.minimum + self.initial_increment + self.increment:
                break
        return best if self.cost_micros(best * 1000) > 0 or best > self.grace else 0


def make_session(tariff: FlatTariff, *, granted: int, nibble_s: int = 6, warning_ms: int = 0,
                 verify_ms: int = 3000, a_leg: str = "A1", at_ms: int = 1_000_000, max_call_ms: int = 0,
                 limit_ms: int | None = None, nibble_lead_ms: int = 0) -> CallSession:
    return CallSession(
        call_id="node1-" + a_leg, node="node1", pbx="asterisk", account_id="alice", destination="33123",
        caller="100", a_leg=Leg(a_leg, Direction.INBOUND, at_ms), authorized_ms=at_ms, tariff=tariff,
        rating=RatingInfo(plan_name="retail", prefix="33", rate_micros=tariff.rate_micros),
        settings=SessionSettings(nibble_ms=nibble_s * 1000, warning_ms=warning_ms, verify_ms=verify_ms,
                                 max_call_ms=max_call_ms, nibble_lead_ms=nibble_lead_ms),
        granted_micros=granted, limit_ms=tariff.max_seconds(granted) * 1000 if limit_ms is None else limit_ms,
    )
