"""The leg bookkeeping both switch adapters share (agent/adapters/legs.py)."""

from agent.adapters.legs import EndedLegs, HeldEvents
from agent.core.events import LegAnswered, LegHungUp


def test_ended_legs_remember_their_group_and_forget_the_oldest_first() -> None:
    ended = EndedLegs(limit=2)
    ended.add("a", "g1")
    ended.add("b", "g2")
    ended.add("a", "g1")  # seen again: now the newest
    ended.add("c", "g3")
    assert "b" not in ended and "a" in ended and "c" in ended and len(ended) == 2
    assert ended.group_of("a") == "g1" and ended.group_of("b") == ""
    ended.discard("a")
    assert "a" not in ended


def test_events_of_a_call_being_authorized_wait_for_the_decision_in_order() -> None:
    delivered: list[object] = []
    held = HeldEvents(delivered.append)
    assert held.hold("A1") and not held.hold("A1")  # one authorization at a time per leg
    held.emit(LegAnswered("A1", 1))
    held.emit(LegAnswered("B9", 2))  # another call's event goes through at once
    held.emit(LegHungUp("A1", 3))
    assert delivered == [LegAnswered("B9", 2)] and "A1" in held
    held.release("A1")
    assert delivered == [LegAnswered("B9", 2), LegAnswered("A1", 1), LegHungUp("A1", 3)]
    held.emit(LegHungUp("A1", 4))
    assert delivered[-1] == LegHungUp("A1", 4) and "A1" not in held
