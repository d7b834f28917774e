"""Small interfaces between the services and the edge (DESIGN §2).

Services depend on these protocols; adapters implement them; tests substitute fakes that keep
the same semantics (a fake clock, an in-memory store) rather than mocks.
"""

from __future__ import annotations

from typing import Protocol

from agent.core.events import AuthorizeDecision, AuthorizeRequest, LegEvent
from agent.core.session import RatedCall


class Clock(Protocol):
    """Time for the services; the core never reads a clock, it is given instants."""

    def now_ms(self) -> int:
        """Wall-clock milliseconds since the Unix epoch (for timestamps in CDRs)."""
        ...

    def monotonic_ms(self) -> int:
        """Milliseconds from an arbitrary origin that never goes backwards (for timers)."""
        ...


class Switch(Protocol):
    """One PBX connection as the engine sees it (an Asterisk AMI client, a FreeSWITCH socket)."""

    name: str  # "asterisk" | "freeswitch"

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        """Ask the PBX to hang up a leg. Raises on refusal or timeout; the engine then
        verifies the hangup through the leg's hangup event, and escalates if it never comes."""
        ...

    def warn(self, leg_id: str, seconds_left: int) -> None:
        """Play the low-balance warning on a leg (best effort)."""
        ...

    def connected(self) -> bool:
        ...


class CallEngine(Protocol):
    """What a switch adapter drives: the call session engine (agent/services)."""

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        """Decide a call before it is dialled. Blocks the calling greenlet for a bounded time
        (store and rating deadlines); never raises for a business refusal (allowed=False)."""
        ...

    def on_event(self, event: LegEvent) -> None:
        """Feed one leg event. Never blocks; the engine queues and processes it in order."""
        ...


class Rater(Protocol):
    """Rates a destination for an account (the account's plan, the plan's in-memory table)."""

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        """Return the tariff of the call, or raise ``RatingRefused`` with the reason."""
        ...
