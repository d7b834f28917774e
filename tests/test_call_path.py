"""Background work steps aside while a call is being authorized (agent/services/call_path.py)."""

from __future__ import annotations

import gevent
import gevent.event

from agent.services.call_path import CallPath


def test_background_work_waits_for_the_authorization_in_flight() -> None:
    path = CallPath(max_wait_s=30.0)
    decided = gevent.event.Event()
    order: list[str] = []

    def authorize() -> None:
        with path.authorizing():
            order.append("asked")
            decided.wait(5.0)
            order.append("decided")

    def background() -> None:
        path.yield_to_calls()
        order.append("background")

    asking = gevent.spawn(authorize)
    gevent.sleep(0)
    working = gevent.spawn(background)
    gevent.sleep(0.05)
    assert order == ["asked"] and path.in_flight == 1  # the background piece has not run
    decided.set()
    gevent.joinall([asking, working], timeout=5.0)
    assert order == ["asked", "decided", "background"]
    assert path.in_flight == 0 and path.waits == 1


def test_nested_and_overlapping_authorizations_hold_it_until_the_last_ends() -> None:
    path = CallPath(max_wait_s=30.0)
    with path.authorizing():
        with path.authorizing():
            assert path.in_flight == 2
        assert path.in_flight == 1
        waiting = gevent.spawn(path.yield_to_calls)
        gevent.sleep(0.02)
        assert not waiting.dead
    assert waiting.join(5.0) is None and waiting.dead
    assert path.in_flight == 0


def test_background_work_is_never_starved() -> None:
    """Under a steady stream of calls the loop is rarely free of one: the wait is capped."""
    path = CallPath(max_wait_s=0.01)
    with path.authorizing():
        waiting = gevent.spawn(path.yield_to_calls)
        waiting.join(5.0)
        assert waiting.dead and waiting.successful()


def test_no_wait_when_no_call_is_being_authorized() -> None:
    path = CallPath(max_wait_s=30.0)
    path.yield_to_calls()  # returns at once: no greenlet switch needed
    assert path.waits == 0
