"""Admission: a concurrency limit in front of a bounded FIFO wait queue.

``enter()`` either grants a slot at once, queues the caller, or raises :class:`QueueFull`
when the queue is at its limit. A :class:`Ticket` that leaves (its client went away, or the
reply ended) frees its slot or its place in the queue immediately, so the next waiter moves up.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["Admission", "QueueFull", "Ticket"]

PositionCallback = Callable[[int, "float | None"], Awaitable[None]]
"""Called as ``await cb(position, estimated_wait_seconds)`` while a ticket waits."""


class QueueFull(Exception):
    """Every slot is busy and the wait queue is at ``max_waiting``."""


class Ticket:
    """One request's claim on a generation slot."""

    __slots__ = ("_admission", "_granted", "_left", "_waiter")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._granted = False
        self._left = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def granted(self) -> bool:
        """Whether this ticket holds a slot."""
        return self._granted

    @property
    def position(self) -> int:
        """1-based place in the queue; 0 once granted (or after leaving)."""
        if self._granted or self._left:
            return 0
        return self._admission._queue.index(self) + 1

    async def wait(self, on_position: PositionCallback | None = None, *, heartbeat: float | None = None) -> None:
        """Wait for a slot. ``on_position`` hears the position and estimate as they change, and
        again every ``heartbeat`` seconds without a change (a keep-alive for the stream)."""
        admission = self._admission
        last: int | None = None
        while not self._granted:
            changed = admission._changed
            position = self.position
            if on_position is not None and position != last:
                last = position
                await on_position(position, admission.estimated_wait(position))
                continue  # the queue may have moved while we were reporting
            if on_position is None or heartbeat is None:
                await changed.wait()
                continue
            with anyio.move_on_after(heartbeat) as quiet:
                await changed.wait()
            if quiet.cancelled_caught:
                last = None  # report the same position again

    def leave(self) -> None:
        """Give back the slot or the queue place. Idempotent."""
        if self._left:
            return
        self._left = True
        admission = self._admission
        if self._granted:
            self._granted = False
            admission._release()
        else:
            admission._queue.remove(self)
            admission._notify()


class Admission:
    """At most ``max_active`` tickets granted, at most ``max_waiting`` queued, FIFO.

    Must be used from one event loop. The wait estimate comes from the recent rate at which
    slots were freed.
    """

    def __init__(self, max_active: int, max_waiting: int, *, rate_window: int = 32) -> None:
        if max_active < 1:
            raise ValueError("max_active must be at least 1")
        if max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.active = 0
        self.closed = False
        self._queue: collections.deque[Ticket] = collections.deque()
        self._changed = asyncio.Event()
        self._releases: collections.deque[float] = collections.deque(maxlen=rate_window)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        """Number of queued tickets."""
        return len(self._queue)

    def enter(self) -> Ticket:
        """A granted or queued ticket; raises :class:`QueueFull` when it cannot wait."""
        ticket = Ticket(self)
        if self.active < self.max_active and not self._queue:
            self._grant(ticket)
        elif len(self._queue) >= self.max_waiting:
            raise QueueFull
        else:
            self._queue.append(ticket)
            self._notify()
        return ticket

    def estimated_wait(self, position: int) -> float | None:
        """Seconds until ``position`` gets a slot, at the recent release rate; None if unknown."""
        if position <= 0:
            return 0.0
        if len(self._releases) < 2:
            return None
        span = self._releases[-1] - self._releases[0]
        if span <= 0:
            return None
        interval = span / (len(self._releases) - 1)
        # Releases that happened since the last one count against the first interval.
        since_last = time.monotonic() - self._releases[-1]
        return max(0.0, position * interval - since_last)

    async def wait_idle(self) -> None:
        """Wait until no ticket is granted or queued."""
        await self._idle.wait()

    def _grant(self, ticket: Ticket) -> None:
        ticket._granted = True
        self.active += 1
        self._idle.clear()

    def _release(self) -> None:
        self._releases.append(time.monotonic())
        self.active -= 1
        if self._queue:
            self._grant(self._queue.popleft())
        elif self.active == 0:
            self._idle.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
