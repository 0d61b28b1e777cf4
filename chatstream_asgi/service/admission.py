"""Admission: generation slots and a wait queue, shared fairly between tenants, with an honest wait estimate.

``enter(claim)`` either grants a slot at once, queues the caller, or raises :class:`QueueFull` (the
queue, or the claim's tenant, is at its limit) carrying when to come back. Who goes next is
:class:`~chatstream_asgi.service.fairness.FairScheduler`'s rule (fair by tokens served, priorities
within a tenant); a :class:`Ticket` that leaves (its client went away, or the reply ended) frees its
slot or its queue place at once. With one tenant and no priorities the queue is FIFO.

The estimate a waiting ticket reports is its place in the scheduler's forecast of the serving order
and the time until its reply starts: the forecast's start time (the running replies' expected time
left, then each reply before it in its slot, from :class:`~chatstream_asgi.service.estimate.ServiceModel`,
which measures replies only while they hold a slot) plus the usual time to first token. A 429's
``Retry-After`` comes from the same forecast.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from chatstream_asgi.service.estimate import ServiceModel
from chatstream_asgi.service.fairness import FairScheduler, Refused, Request

__all__ = ["DEFAULT_TENANT", "Admission", "AdmissionObserver", "Claim", "QueueFull", "Ticket"]

DEFAULT_TENANT = "default"
"""The one tenant of a server that does not tell tenants apart."""

PositionCallback = Callable[[int, "float | None"], Awaitable[None]]
"""Called as ``await cb(position, estimated_wait_seconds)`` while a ticket waits."""

_FORECAST_TTL = 1.0
"""Seconds a forecast is reused while nothing changes (running replies drift from it as time passes)."""


@dataclass(frozen=True)
class Claim:
    """What a request asks of admission: whose it is, how urgent, and how big (for the fair share)."""

    tenant: str = DEFAULT_TENANT
    priority: int = 0
    """Lower is served first (as vLLM's ``priority``), within the tenant's own requests."""
    prompt_tokens: int = 0
    """Expected prompt tokens (charged to the tenant at the grant, corrected at the end)."""
    max_new_tokens: int = 256


class QueueFull(Exception):
    """The request cannot wait: ``reason`` is ``queue_full`` or ``tenant_limit``; ``retry_after`` is the
    expected seconds until it could (None before any reply has been measured)."""

    def __init__(self, reason: str = "queue_full", retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class AdmissionObserver(Protocol):
    """Hears each tenant's admissions, refusals, queue waits and tokens (the per-tenant metrics)."""

    def admitted(self, tenant: str) -> None: ...

    def rejected(self, tenant: str, reason: str) -> None: ...

    def started(self, tenant: str, waited: float) -> None: ...

    def finished(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None: ...


TokenMeter = Callable[[], "tuple[int, int]"]
"""``() -> (prompt_tokens, completion_tokens)`` of a reply so far (0 prompt tokens: not known yet)."""


class Ticket(Request):
    """One request's claim on a generation slot."""

    def __init__(self, admission: Admission, claim: Claim, cost: float, now: float) -> None:
        super().__init__(claim.tenant, claim.priority, cost, now)
        self.claim = claim
        self.entered_at = now
        self.granted_at: float | None = None
        self.first_text_at: float | None = None
        self.slot_seconds_at_grant = 0.0
        """The admission's busy slot-seconds when this ticket got its slot (its mean company, at the end)."""
        self.meter: TokenMeter | None = None
        """Set by whoever streams the reply: its tokens, read while it runs and when it ends."""
        self._admission = admission

    @property
    def granted(self) -> bool:
        """Whether this ticket holds a slot."""
        return self.state == "active"

    @property
    def position(self) -> int:
        """1-based place in the forecast serving order; 0 once granted (or after leaving)."""
        return self._admission.estimate(self)[0]

    def first_text(self) -> None:
        """The reply's first text went out (its time to first token feeds the estimate)."""
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()

    async def wait(self, on_position: PositionCallback | None = None, *, heartbeat: float | None = None) -> None:
        """Wait for a slot. ``on_position`` hears the position and estimate as the position changes, and
        again every ``heartbeat`` seconds without a change (a keep-alive for the stream)."""
        admission = self._admission
        last: int | None = None
        while not self.granted:
            changed = admission._changed
            if on_position is not None:
                position, estimate = admission.estimate(self)
                if position and position != last:
                    last = position
                    await on_position(position, estimate)
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
        if self.state == "active":
            self._admission._finish(self)
        elif self.state == "queued":
            self._admission._withdraw(self)

    def served(self) -> int:
        """Tokens this ticket counts for its tenant's fair share: the claim's prompt tokens (the same figure
        from grant to end, whatever the engine counts later) and the reply's tokens so far."""
        return self.claim.prompt_tokens + (self.meter()[1] if self.meter is not None else 0)

    def usage(self) -> tuple[int, int]:
        """``(prompt_tokens, completion_tokens)`` so far: the meter's, the claim's prompt estimate where
        the meter knows none yet."""
        prompt, completion = self.meter() if self.meter is not None else (0, 0)
        return prompt or self.claim.prompt_tokens, completion


class Admission:
    """At most ``max_active`` tickets granted and ``max_waiting`` queued, shared fairly between tenants.

    ``tenant_max_active`` and ``tenant_max_queued`` cap each tenant (None: only the global limits);
    ``priority_step`` is how many seconds of arrival one step of priority is worth within a tenant.
    Must be used from one event loop.
    """

    def __init__(
        self,
        max_active: int,
        max_waiting: int,
        *,
        tenant_max_active: int | None = None,
        tenant_max_queued: int | None = None,
        priority_step: float = 60.0,
        observer: AdmissionObserver | None = None,
        model: ServiceModel | None = None,
    ) -> None:
        self.scheduler = FairScheduler(
            max_active,
            max_waiting,
            tenant_max_active=tenant_max_active,
            tenant_max_queued=tenant_max_queued,
            priority_step=priority_step,
            progress=_served,
        )
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.model = model if model is not None else ServiceModel()
        self.observer = observer
        self.closed = False
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slot_seconds = 0.0
        """Seconds of slots held, summed over slots, up to ``_counted_at``: how busy replies' slots were."""
        self._counted_at = time.monotonic()
        self._forecast: tuple[float, dict[Request, tuple[int, float]]] | None = None
        """The last forecast (when, and each queued ticket's place and start), until anything changes."""

    @property
    def active(self) -> int:
        """Number of granted tickets."""
        return self.scheduler.active

    @property
    def waiting(self) -> int:
        """Number of queued tickets."""
        return self.scheduler.waiting

    def tenant_load(self, tenant: str) -> tuple[int, int]:
        """``(active, queued)`` tickets of ``tenant``."""
        return self.scheduler.tenant_load(tenant)

    def totals(self) -> tuple[int, int]:
        """``(active, queued)`` tickets of every tenant."""
        return self.scheduler.active, self.scheduler.waiting

    def tenant_report(self, tenant: str) -> dict[str, object]:
        """One tenant's share, as ``/get_load`` shows it: its name, replies and queue places, and its caps."""
        active, queued = self.scheduler.tenant_load(tenant)
        return {
            "name": tenant,
            "processing": active,
            "waiting": queued,
            "max_processing": self.scheduler.tenant_max_active,
            "max_waiting": self.scheduler.tenant_max_queued,
        }

    def enter(self, claim: Claim | None = None) -> Ticket:
        """A granted or queued ticket; raises :class:`QueueFull` when it can neither start nor wait."""
        claim = claim or Claim()
        now = time.monotonic()
        cost = claim.prompt_tokens + self.model.expected_tokens(claim.max_new_tokens)
        ticket = Ticket(self, claim, cost, now)
        self._count_slots(now)
        try:
            granted = self.scheduler.submit(ticket)
        except Refused as refused:
            if self.observer is not None:
                self.observer.rejected(claim.tenant, refused.reason)
            raise QueueFull(refused.reason, self.retry_after(claim, refused.reason)) from None
        if self.observer is not None:
            self.observer.admitted(claim.tenant)
        self._started(granted, now)
        self._notify()
        return ticket

    # -- estimates ----------------------------------------------------------------------------

    def estimate(self, ticket: Ticket) -> tuple[int, float | None]:
        """``(position, seconds until its reply starts)`` of a queued ticket; ``(0, 0.0)`` once granted
        or gone; seconds are None until a reply has been measured."""
        if ticket.state != "queued":
            return 0, 0.0
        at, forecast = self._current_forecast()
        position, start = forecast.get(ticket, (self.waiting, math.inf))
        if not self.model.ready or math.isinf(start):
            return position, None
        return position, round(max(start - (time.monotonic() - at), 0.0) + self.model.first_token_delay, 3)

    def estimate_new(self, claim: Claim | None = None) -> float | None:
        """Seconds until the reply of a request entering now with ``claim`` would start (``/get_load``);
        None before a reply has been measured, when it would have to wait."""
        claim = claim or Claim()
        active, queued = self.scheduler.tenant_load(claim.tenant)
        free = self.active < self.max_active and active < self.scheduler.tenant_max_active and not queued
        if free:
            return round(self.model.first_token_delay, 3)
        if not self.model.ready:
            return None
        now = time.monotonic()
        probe = Ticket(self, claim, claim.prompt_tokens + self.model.expected_tokens(claim.max_new_tokens), now)
        for request, start in self._run_forecast(probe):
            if request is probe:
                return round(start + self.model.first_token_delay, 3)
        return None  # pragma: no cover - every queued request is served in a forecast

    def retry_after(self, claim: Claim, reason: str) -> float | None:
        """Seconds until a refused ``claim`` could be admitted: until the queue (``queue_full``) or its
        tenant's queue (``tenant_limit``) next shrinks, or its tenant's next reply ends when it may hold
        no queue place at all; None before a reply has been measured."""
        if not self.model.ready:
            return None
        forecast = self._run_forecast()
        if reason == "tenant_limit":
            starts = [start for request, start in forecast if request.tenant == claim.tenant]
            if not starts:
                now = time.monotonic()
                ends = [self._remaining(r, now) for r in self.scheduler.running if r.tenant == claim.tenant]
                return min(ends, default=None)
            return starts[0]
        if forecast:
            return forecast[0][1]
        now = time.monotonic()
        return min((self._remaining(r, now) for r in self.scheduler.running), default=None)

    async def wait_idle(self) -> None:
        """Wait until no ticket is granted or queued."""
        await self._idle.wait()

    # -- bookkeeping --------------------------------------------------------------------------

    def _finish(self, ticket: Ticket) -> None:
        now = time.monotonic()
        prompt, completion = ticket.usage()
        served = ticket.served()
        ticket.meter = None  # it holds the reply, which holds this ticket
        granted_at = ticket.granted_at if ticket.granted_at is not None else now
        first = None if ticket.first_text_at is None else ticket.first_text_at - granted_at
        self._count_slots(now)
        held = now - granted_at
        company = (self._slot_seconds - ticket.slot_seconds_at_grant) / held if held > 0 else self.active
        busy = company >= self.max_active - 0.5  # every slot taken, on average, while it ran
        self.model.record(held, first, completion, ticket.claim.max_new_tokens, busy=busy)
        if self.observer is not None:
            self.observer.finished(ticket.tenant, prompt, completion)
        self._started(self.scheduler.finish(ticket, served), now)
        if self.scheduler.active == 0 and self.scheduler.waiting == 0:
            self._idle.set()
        self._notify()

    def _withdraw(self, ticket: Ticket) -> None:
        self.scheduler.withdraw(ticket)
        if self.scheduler.active == 0 and self.scheduler.waiting == 0:
            self._idle.set()
        self._notify()

    def _count_slots(self, now: float) -> None:
        """Add the slot-seconds since the last change (call before the number of granted tickets changes)."""
        self._slot_seconds += self.scheduler.active * (now - self._counted_at)
        self._counted_at = now

    def _started(self, granted: list[Request], now: float) -> None:
        for request in granted:
            assert isinstance(request, Ticket)
            request.granted_at = now
            request.slot_seconds_at_grant = self._slot_seconds
            self._idle.clear()
            if self.observer is not None:
                self.observer.started(request.tenant, now - request.entered_at)

    def _notify(self) -> None:
        self._forecast = None  # stale now; and it holds tickets, which must not outlive their requests
        self._changed.set()
        self._changed = asyncio.Event()

    def _current_forecast(self) -> tuple[float, dict[Request, tuple[int, float]]]:
        now = time.monotonic()
        cached = self._forecast
        if cached is None or now - cached[0] > _FORECAST_TTL:
            places = {r: (i + 1, start) for i, (r, start) in enumerate(self._run_forecast(now=now))}
            cached = self._forecast = (now, places)
        return cached

    def _run_forecast(self, extra: Request | None = None, now: float | None = None) -> list[tuple[Request, float]]:
        now = time.monotonic() if now is None else now
        remaining = {r: self._remaining(r, now) for r in self.scheduler.running}
        durations: dict[int, float] = {}

        def duration(request: Request) -> float:
            limit = request.claim.max_new_tokens if isinstance(request, Ticket) else 256
            if limit not in durations:
                durations[limit] = self.model.duration(limit)
            return durations[limit]

        return self.scheduler.forecast(remaining, duration, extra)

    def _remaining(self, request: Request, now: float) -> float:
        if not isinstance(request, Ticket):  # pragma: no cover - the scheduler holds tickets only
            return 0.0
        granted_at = request.granted_at if request.granted_at is not None else now
        _, generated = request.usage()
        return self.model.remaining(request.claim.max_new_tokens, now - granted_at, generated)


def _served(request: Request) -> float:
    """Tokens a running ticket has been served so far: its prompt, and its reply as it is generated."""
    return float(request.served()) if isinstance(request, Ticket) else request.cost
