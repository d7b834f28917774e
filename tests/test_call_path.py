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


def test_stepping_aside_lets_a_connection_that_arrived_meanwhile_start_its_authorization_first() -> None:
    """A background job's next piece waits for a call whose connection arrived while its first
    piece ran: the connection's greenlet is pending (not yet in flight) when the job asks."""
    path = CallPath(max_wait_s=30.0)
    order: list[str] = []
    decided = gevent.event.Event()

    def session() -> None:  # the authorize socket's greenlet, spawned by the accept
        with path.authorizing():
            order.append("connected")
            decided.wait(5.0)
            order.append("decided")

    def job() -> None:
        order.append("piece 1")
        gevent.spawn(session)  # the accept happened during piece 1: its greenlet is only pending
        path.yield_to_calls()  # not in flight yet: this alone would not wait
        order.append("checked")
        path.step_aside()
        order.append("piece 2")

    working = gevent.spawn(job)
    gevent.sleep(0.05)
    assert order == ["piece 1", "checked", "connected"]
    decided.set()
    working.join(5.0)
    assert order == ["piece 1", "checked", "connected", "decided", "piece 2"]


def test_stepping_aside_is_bounded_on_a_loop_that_is_never_idle() -> None:
    path = CallPath(max_wait_s=0.02)
    spinning = True

    def busy() -> None:  # always ready to run: the loop is never idle
        while spinning:
            gevent.sleep(0)

    spinner = gevent.spawn(busy)
    try:
        stepping = gevent.spawn(path.step_aside)
        stepping.join(2.0)
        assert stepping.dead and stepping.successful()
    finally:
        spinning = False
        spinner.join(1.0)
