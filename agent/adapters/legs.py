"""Leg bookkeeping both switch adapters need, in one place (pure: no I/O, no clock).

* ``EndedLegs``: the legs that ended lately, with their call group and hangup. A late event of
  a gone leg is dropped instead of resurrecting it, and a "No such channel" reply is told apart
  from a hangup we missed. Bounded: the oldest are forgotten first.
* ``HeldEvents``: the events of a call that is being authorized. The engine does not know the
  call until it has decided, so what the PBX reports meanwhile (the caller's leg already exists
  and may even hang up) waits and is delivered, in order, right after the decision.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from agent.core.events import LegEvent, LegHungUp

ENDED_MEMORY = 20_000


class EndedLegs:
    def __init__(self, limit: int = ENDED_MEMORY) -> None:
        self.limit = limit
        self._groups: OrderedDict[str, str] = OrderedDict()  # leg id -> group id, oldest first
        self._hangups: dict[str, LegHungUp] = {}  # the hangup told to the engine, when the PBX reported one

    def add(self, leg_id: str, group_id: str = "", hangup: LegHungUp | None = None) -> None:
        self._groups[leg_id] = group_id
        self._groups.move_to_end(leg_id)
        if hangup is not None:
            self._hangups[leg_id] = hangup
        while len(self._groups) > self.limit:
            gone, _ = self._groups.popitem(last=False)
            self._hangups.pop(gone, None)

    def discard(self, leg_id: str) -> None:
        """The leg is live again (a PBX reuses nothing, but a resync may list it)."""
        self._groups.pop(leg_id, None)
        self._hangups.pop(leg_id, None)

    def hangup_of(self, leg_id: str) -> LegHungUp | None:
        """The hangup the PBX reported for the leg (its instant and cause), to tell it again to
        an engine that could not place it at the time (see the Asterisk adapter's resync)."""
        return self._hangups.get(leg_id)

    def group_of(self, leg_id: str) -> str:
        return self._groups.get(leg_id, "")

    def __contains__(self, leg_id: object) -> bool:
        return leg_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)


class HeldEvents:
    def __init__(self, deliver: Callable[[LegEvent], None]) -> None:
        self.deliver = deliver
        self._held: dict[str, list[LegEvent]] = {}  # the caller's leg -> its events, in order

    def hold(self, leg_id: str) -> bool:
        """Start holding the events of ``leg_id``; False when they are held already (a second
        authorization of the same leg is under way)."""
        if leg_id in self._held:
            return False
        self._held[leg_id] = []
        return True

    def emit(self, event: LegEvent) -> None:
        """Deliver now, or keep for after the decision when its leg is being authorized."""
        held = self._held.get(getattr(event, "leg_id", ""))
        if held is not None:
            held.append(event)
        else:
            self.deliver(event)

    def release(self, leg_id: str) -> None:
        """The decision is made: deliver what was held, in order, and stop holding."""
        for event in self._held.pop(leg_id, []):
            self.deliver(event)

    def __contains__(self, leg_id: object) -> bool:
        return leg_id in self._held
