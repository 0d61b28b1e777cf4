"""Who gets the next generation slot: fair queuing across tenants by service received, in tokens.

In the spirit of the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): every tenant has a counter of the tokens it was served, prompt and generated,
its running replies' tokens counted as they come (``progress``). When a slot frees, the backlogged
tenant with the least counter goes next, so a tenant that floods the queue holds another tenant's
request back by about one reply per slot, not by its backlog. A tenant that becomes backlogged has
its counter lifted to the least counter of the backlogged tenants (or, when nobody waits, to the
counter of the tenant granted last, as fair queuing's virtual time runs on while nobody contends):
idleness, and asking less while nobody waited, bank no credit. Each reply counts at least one token,
so a run of empty replies cannot hold the slots.

Within one tenant, requests are served by ``arrival + priority * priority_step`` (lower first, as
vLLM's ``priority``): a request of priority -1 goes ahead of the same tenant's requests that came
up to ``priority_step`` seconds before it. Priorities never cross tenants (a tenant cannot buy
another's turn) and never starve: a request is passed over only by requests that arrived within a
bounded window after it.

Work-conserving: no slot idles while a request waits whose tenant is under its own active cap.
Per-tenant caps (``tenant_max_active``, ``tenant_max_queued``) and the global ``max_waiting``
refuse with a :class:`Refused` that says which limit was hit.

Plain Python, no I/O and no clock of its own: :class:`~chatstream_asgi.service.admission.Admission`
drives it on the event loop; :meth:`FairScheduler.forecast` replays the same rule forward, each
reply counted at its expected ``cost``, to predict the serving order and start times (the wait
estimate).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["FairScheduler", "Refused", "Request"]

_SWEEP_EVERY = 64
"""Every this many finished requests, idle tenants the virtual time has passed are forgotten."""


class Refused(Exception):
    """The request cannot wait: ``reason`` is ``queue_full`` (the global queue) or ``tenant_limit``
    (its tenant's queue places, or its active cap with no queue place)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Request:
    """One request as the scheduler sees it (identity, not value, equality)."""

    tenant: str = "default"
    priority: int = 0
    cost: float = 1.0
    """Its expected tokens, prompt and reply: what the forecast counts it as."""
    arrival: float = 0.0
    """When it came (seconds, any clock): with ``priority``, its place in its tenant's queue."""
    state: str = field(default="new", init=False)
    """``new``, ``queued``, ``active`` or ``done``."""
    _order: tuple[float, int] = field(default=(0.0, 0), init=False, repr=False)


@dataclass
class _Tenant:
    settled: float = 0.0
    """Tokens of its ended replies (and lifts); its counter adds its running replies' progress."""
    running: list[Request] = field(default_factory=list)
    queue: list[tuple[tuple[float, int], Request]] = field(default_factory=list)
    """Sorted by (arrival + priority * step, sequence number)."""


def _expected(request: Request) -> float:
    return request.cost


class FairScheduler:
    """At most ``max_active`` granted and ``max_waiting`` queued requests, served fairly by tenant.

    ``progress(request)`` is the tokens a running request has been served so far (at least one is
    counted); by default its whole ``cost``, charged at the grant.
    """

    def __init__(
        self,
        max_active: int,
        max_waiting: int,
        *,
        tenant_max_active: int | None = None,
        tenant_max_queued: int | None = None,
        priority_step: float = 60.0,
        progress: Callable[[Request], float] = _expected,
    ) -> None:
        if max_active < 1:
            raise ValueError("max_active must be at least 1")
        if max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        if tenant_max_active is not None and tenant_max_active < 1:
            raise ValueError("tenant_max_active must be at least 1 (or None)")
        if tenant_max_queued is not None and tenant_max_queued < 0:
            raise ValueError("tenant_max_queued must not be negative (or None)")
        if not priority_step >= 0 or priority_step == float("inf"):  # NaN fails the first test
            raise ValueError("priority_step must be a finite number of seconds, not negative")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.tenant_max_active = tenant_max_active or max_active
        self.tenant_max_queued = max_waiting if tenant_max_queued is None else tenant_max_queued
        self.priority_step = priority_step
        self.progress = progress
        self.active = 0
        self.waiting = 0
        self._tenants: dict[str, _Tenant] = {}
        self._running: set[Request] = set()
        self._seq = itertools.count()
        self._last_granted = 0.0
        """The counter of the tenant granted last, just after: where a tenant comes back when nobody waits."""
        self._finished = 0

    # -- reading ----------------------------------------------------------------------------

    def counter(self, tenant: str) -> float:
        """Tokens served to ``tenant`` (lifts included); 0 for a tenant the scheduler holds nothing of."""
        state = self._tenants.get(tenant)
        return self._counter(state) if state is not None else 0.0

    def tenant_load(self, tenant: str) -> tuple[int, int]:
        """``(active, queued)`` requests of ``tenant``."""
        state = self._tenants.get(tenant)
        return (len(state.running), len(state.queue)) if state is not None else (0, 0)

    @property
    def running(self) -> frozenset[Request]:
        """The granted requests."""
        return frozenset(self._running)

    def queued(self) -> list[Request]:
        """Every queued request (in no particular order; :meth:`forecast` gives the serving order)."""
        return [request for state in self._tenants.values() for _, request in state.queue]

    # -- changing ---------------------------------------------------------------------------

    def submit(self, request: Request) -> list[Request]:
        """Grant or queue ``request``; the requests granted by this call (``[request]`` or ``[]``).

        Raises :class:`Refused` when it can neither start nor wait.
        """
        if request.state != "new":
            raise ValueError("a request is submitted once")
        state = self._tenants.get(request.tenant)
        if state is None:
            state = self._tenants[request.tenant] = _Tenant()
        settled = state.settled if state.queue else self._lifted(state)
        if self.active < self.max_active and len(state.running) < self.tenant_max_active and not state.queue:
            state.settled = settled  # nobody it could pass waits: every queued request's tenant is at its cap
            self._grant(request, state)
            return [request]
        if len(state.queue) >= self.tenant_max_queued or self.waiting >= self.max_waiting:
            self._forget_if_idle(request.tenant, state)
            raise Refused("queue_full" if self.waiting >= self.max_waiting else "tenant_limit")
        state.settled = settled
        request._order = (request.arrival + request.priority * self.priority_step, next(self._seq))
        bisect.insort(state.queue, (request._order, request), key=lambda item: item[0])
        request.state = "queued"
        self.waiting += 1
        return self._dispatch()

    def finish(self, request: Request, used: float | None = None) -> list[Request]:
        """End a granted request that used ``used`` tokens (default: its progress); the requests it let in."""
        if request.state != "active":
            raise ValueError("only a granted request finishes")
        state = self._tenants[request.tenant]
        state.settled += max(self.progress(request) if used is None else used, 1.0)
        request.state = "done"
        self._running.discard(request)
        state.running.remove(request)
        self.active -= 1
        granted = self._dispatch()
        self._forget_if_idle(request.tenant, state)
        self._finished += 1
        if self._finished % _SWEEP_EVERY == 0:
            for name, other in list(self._tenants.items()):
                self._forget_if_idle(name, other)
        return granted

    def withdraw(self, request: Request) -> None:
        """Take a queued request out of the queue (its client left): its place is free at once."""
        if request.state != "queued":
            raise ValueError("only a queued request is withdrawn")
        request.state = "done"
        state = self._tenants[request.tenant]
        index = bisect.bisect_left(state.queue, request._order, key=lambda item: item[0])
        del state.queue[index]
        self.waiting -= 1
        self._forget_if_idle(request.tenant, state)

    # -- the rule -----------------------------------------------------------------------------

    def _counter(self, state: _Tenant) -> float:
        return state.settled + sum(max(self.progress(r), 1.0) for r in state.running)

    def _lifted(self, state: _Tenant) -> float:
        """``state.settled``, raised so that its counter is at least the virtual time (exactly, without
        running replies: a lifted tenant ties with the one it was lifted to, and ties go by arrival)."""
        virtual = self._virtual_time()
        if not state.running:
            return max(state.settled, virtual)
        return state.settled + max(virtual - self._counter(state), 0.0)

    def _virtual_time(self) -> float:
        counters = [self._counter(state) for state in self._tenants.values() if state.queue]
        return min(counters) if counters else self._last_granted

    def _grant(self, request: Request, state: _Tenant) -> None:
        request.state = "active"
        state.running.append(request)
        self.active += 1
        self._running.add(request)
        self._last_granted = self._counter(state)

    def _dispatch(self) -> list[Request]:
        granted = []
        while self.active < self.max_active:
            counters = {name: self._counter(s) for name, s in self._tenants.items() if s.queue}
            tenant = _pick(self._tenants, counters, self.tenant_max_active)
            if tenant is None:
                break
            state = self._tenants[tenant]
            _, request = state.queue.pop(0)
            self.waiting -= 1
            self._grant(request, state)
            granted.append(request)
        return granted

    def _forget_if_idle(self, name: str, state: _Tenant) -> None:
        """Drop a tenant that holds nothing and would be lifted on return anyway: memory holds the tenants
        with requests, and idle ones only until the virtual time passes their counter."""
        if not state.running and not state.queue and state.settled <= self._virtual_time():
            del self._tenants[name]

    # -- the forecast -----------------------------------------------------------------------------

    def forecast(
        self,
        remaining: Mapping[Request, float],
        duration: Callable[[Request], float],
        extra: Request | None = None,
    ) -> list[tuple[Request, float]]:
        """Replay the rule forward: every queued request (and ``extra``, as if submitted now) with the
        time from now at which it would be granted, in serving order.

        ``remaining`` gives each running request's expected time left, ``duration`` a queued one's
        expected time in its slot; every reply counts as its ``cost`` (a running one: its progress, if
        more) from its grant, and nobody new arrives. Nothing here changes.
        """
        cap = self.tenant_max_active
        counters: dict[str, float] = {}
        running: dict[str, int] = {}
        queues: dict[str, list[Request]] = {}
        for name, state in self._tenants.items():
            counters[name] = state.settled + sum(max(self.progress(r), r.cost, 1.0) for r in state.running)
            running[name] = len(state.running)
            queues[name] = [request for _, request in state.queue]
        if extra is not None:
            name = extra.tenant
            if not queues.get(name):
                counters[name] = max(counters.get(name, 0.0), self._virtual_time())
            extra._order = (extra.arrival + extra.priority * self.priority_step, next(self._seq))
            queues[name] = sorted([*queues.get(name, []), extra], key=lambda r: r._order)
            running.setdefault(name, 0)
        # _pick's choice, from a heap: serving a tenant changes only that tenant's key.
        heads = dict.fromkeys(queues, 0)
        ready: list[tuple[float, int, str]] = []
        blocked: set[str] = set()

        def offer(name: str) -> None:
            """The tenant's next request becomes a candidate, or waits for one of its replies to end."""
            if heads[name] < len(queues[name]):
                if running[name] < cap:
                    heapq.heappush(ready, (counters[name], queues[name][heads[name]]._order[1], name))
                else:
                    blocked.add(name)

        for name in queues:
            offer(name)
        ends = [(remaining.get(r, 0.0), i, r) for i, r in enumerate(self._running)]
        heapq.heapify(ends)
        free = self.max_active - len(ends)
        serial = itertools.count(len(ends))
        served: list[tuple[Request, float]] = []
        now = 0.0
        while True:
            while free > 0 and ready:
                _, _, name = heapq.heappop(ready)
                request = queues[name][heads[name]]
                heads[name] += 1
                running[name] += 1
                counters[name] += max(request.cost, 1.0)
                free -= 1
                served.append((request, now))
                heapq.heappush(ends, (now + duration(request), next(serial), request))
                offer(name)
            if not ends or not (ready or blocked):
                return served
            now, _, ended = heapq.heappop(ends)
            running[ended.tenant] -= 1
            free += 1
            if ended.tenant in blocked:
                blocked.discard(ended.tenant)
                offer(ended.tenant)


def _pick(tenants: Mapping[str, _Tenant], counters: Mapping[str, float], cap: int) -> str | None:
    """The backlogged tenant under ``cap`` with the least counter (ties: the head queued first)."""
    best: tuple[float, int] | None = None
    chosen = None
    for name, state in tenants.items():
        if state.queue and len(state.running) < cap:
            key = (counters[name], state.queue[0][0][1])
            if best is None or key < best:
                best, chosen = key, name
    return chosen
