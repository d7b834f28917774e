"""Small interfaces between the services and the edge (DESIGN §2).

Services depend on these protocols; adapters implement them; tests substitute fakes that keep
the same semantics (a fake clock, an in-memory store) rather than mocks.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    """Time for the services; the core never reads a clock, it is given instants."""

    def now_ms(self) -> int:
        """Wall-clock milliseconds since the Unix epoch (for timestamps in CDRs)."""
        ...

    def monotonic_ms(self) -> int:
        """Milliseconds from an arbitrary origin that never goes backwards (for timers)."""
        ...
