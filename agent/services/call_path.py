"""The call path first: background work steps aside while a call is being authorized.

A PBX waits for the decision before it dials (post-dial delay), and everything the daemon does
runs on one gevent loop: an authorization whose store reply has arrived still waits for the
greenlet that holds the loop (the PBX event reader parsing a burst of events, the CDR writer's
batch, the ledger poster, the live-call publisher, the sweeper). gevent has no priorities, so the
background loops ask here before each piece of work and wait, at most ``MAX_WAIT_S``, while an
authorization is in flight. Supervision is not delayed in substance: PBX events carry the PBX's
own time stamps, and the cut timers and switch commands do not wait here.

One per process (one gevent hub per process): a module-level instance, as the hub is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gevent
import gevent.event

MAX_WAIT_S = 0.005
"""The longest a piece of background work waits for authorizations: under a steady stream of
calls (1,000/s) the loop is rarely free of one, and background work must still progress."""


class CallPath:
    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self._in_flight = 0
        self._quiet = gevent.event.Event()
        self._quiet.set()
        self.waits = 0  # pieces of background work that waited (tests, debugging)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def authorizing(self) -> Iterator[None]:
        """Around an authorization, from the PBX's request to the decision sent; never around
        anything that waits for background work (an event-socket reply: the reader waits here)."""
        self._in_flight += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._quiet.set()

    def yield_to_calls(self) -> None:
        """Called by background loops before each piece of work."""
        if self._in_flight:
            self.waits += 1
            self._quiet.wait(self.max_wait_s)

    def step_aside(self) -> None:
        """Between the pieces of one long background job (a CDR batch: its rows, then the spool;
        the live-call publisher's tables): whatever the loop has pending runs first, then as
        :meth:`yield_to_calls`. Without the first part a PBX connection that arrived during the
        job's first piece is accepted only after the whole job, and its authorization is not in
        flight yet when the job asks (seen on FreeSWITCH: the slowest calls' sockets were
        accepted after a CDR batch or a publish that had started just after their INVITE).
        ``gevent.idle`` waits for a loop with nothing else to do, which a busy loop may never
        be: bounded by ``max_wait_s`` as the rest."""
        with gevent.Timeout(self.max_wait_s, False):
            gevent.idle()
        self.yield_to_calls()


CALL_PATH = CallPath()
