"""The fair scheduler, by property (hypothesis): caps hold, work conservation, no starvation, a leaving
request frees its place at once, and the forecast (the wait estimate's order) is the serving order.

Time is logical here (each submit arrives one unit after the last), so nothing depends on the machine.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chatstream_asgi.service.fairness import FairScheduler, Refused, Request

TENANTS = ["a", "b", "c", "d"]
PRIORITIES = st.integers(-2, 2)
COSTS = st.floats(1.0, 50.0)

limits = st.tuples(
    st.integers(1, 4),  # max_active
    st.integers(0, 8),  # max_waiting
    st.one_of(st.none(), st.integers(1, 3)),  # tenant_max_active
    st.one_of(st.none(), st.integers(0, 4)),  # tenant_max_queued
)


def check_invariants(s: FairScheduler) -> None:
    """Caps hold, the books balance, and no slot idles while someone it could serve waits."""
    queued = s.queued()
    assert s.active == len(s.running) <= s.max_active
    assert s.waiting == len(queued) <= s.max_waiting
    for tenant in TENANTS:
        active, waiting = s.tenant_load(tenant)
        assert active <= s.tenant_max_active
        assert waiting <= s.tenant_max_queued
    if s.active < s.max_active:  # work conservation
        for request in queued:
            assert s.tenant_load(request.tenant)[0] == s.tenant_max_active
    assert all(r.state == "active" for r in s.running) and all(r.state == "queued" for r in queued)


class SchedulerMachine(RuleBasedStateMachine):
    """Random submits, finishes and withdrawals against the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.s: FairScheduler | None = None
        self.clock = itertools.count()

    @initialize(limits=limits)
    def configure(self, limits: tuple[int, int, int | None, int | None]) -> None:
        max_active, max_waiting, tenant_active, tenant_queued = limits
        self.s = FairScheduler(
            max_active, max_waiting, tenant_max_active=tenant_active, tenant_max_queued=tenant_queued, priority_step=3
        )

    @rule(tenant=st.sampled_from(TENANTS), priority=PRIORITIES, cost=COSTS)
    def submit(self, tenant: str, priority: int, cost: float) -> None:
        s = self.s
        assert s is not None
        request = Request(tenant, priority, cost, float(next(self.clock)))
        active, queued = s.tenant_load(tenant)
        room = s.active < s.max_active and active < s.tenant_max_active and not queued
        try:
            s.submit(request)
        except Refused as refused:
            assert not room  # refused only when it could neither start...
            if refused.reason == "tenant_limit":  # ...nor wait: its tenant's queue, or the queue, was full
                assert queued >= s.tenant_max_queued
            else:
                assert s.waiting >= s.max_waiting
            assert request.state == "new" and s.tenant_load(tenant) == (active, queued)
            return
        assert request.state == ("active" if room else "queued")

    @precondition(lambda self: self.s is not None and self.s.running)
    @rule(data=st.data(), used=st.floats(0.0, 80.0))
    def finish(self, data: st.DataObject, used: float) -> None:
        s = self.s
        assert s is not None
        request = data.draw(st.sampled_from(sorted(s.running, key=lambda r: r.arrival)))
        granted = s.finish(request, used)
        assert request.state == "done"
        assert all(r.state == "active" for r in granted)

    @precondition(lambda self: self.s is not None and self.s.waiting)
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        """A client that leaves while queued frees its place at once, and is never granted later."""
        s = self.s
        assert s is not None
        request = data.draw(st.sampled_from(sorted(s.queued(), key=lambda r: r.arrival)))
        waiting, (active, queued) = s.waiting, s.tenant_load(request.tenant)
        s.withdraw(request)
        assert request.state == "done" and request not in s.queued()
        assert s.waiting == waiting - 1 and s.tenant_load(request.tenant) == (active, queued - 1)

    @invariant()
    def holds(self) -> None:
        if self.s is not None:
            check_invariants(self.s)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limits=limits,
    target_priority=PRIORITIES,
    flood=st.lists(st.tuples(st.sampled_from(TENANTS), PRIORITIES, COSTS, st.floats(0.0, 80.0)), min_size=1),
)
def test_no_request_starves_under_a_flood(
    limits: tuple[int, int, int | None, int | None],
    target_priority: int,
    flood: list[tuple[str, int, float, float]],
) -> None:
    """A queued request is granted within a bounded number of replies, however the others flood.

    Replies end oldest first and after each end every tenant submits as much as it may, cycling
    through ``flood``'s tenants, priorities, costs and used tokens. The bound: every other tenant is
    served at most until its counter passes the target tenant's (each grant charges at least one
    token), and within the target's tenant only requests that arrived within the priority window
    after it can pass it.
    """
    max_active, max_waiting, tenant_active, tenant_queued = limits
    assume(max_waiting >= 1 and (tenant_queued is None or tenant_queued >= 1))
    s = FairScheduler(max_active, max_waiting, tenant_max_active=tenant_active, tenant_max_queued=tenant_queued)
    s.priority_step = 3
    clock = itertools.count()
    running: list[Request] = []
    used: dict[Request, float] = {}
    source = itertools.cycle(flood)

    def fill() -> None:
        for _ in range(len(TENANTS) * (max_waiting + max_active)):
            tenant, priority, cost, spent = next(source)
            request = Request(tenant, priority, cost, float(next(clock)))
            try:
                granted = s.submit(request)
            except Refused:
                continue
            used[request] = spent
            running.extend(granted)

    fill()
    target = Request("a", target_priority, 10.0, float(next(clock)))
    try:
        running.extend(s.submit(target))
    except Refused:  # full of "a": make room by ending replies until it gets in
        for _ in range(10_000):
            done = running.pop(0)
            running.extend(s.finish(done, used.get(done)))
            try:
                running.extend(s.submit(target))
                break
            except Refused:
                continue
    assert target.state in ("active", "queued")
    for _ in range(2_000):
        if target.state == "active":
            return
        done = running.pop(0)
        running.extend(s.finish(done, used.get(done)))
        fill()
        check_invariants(s)
    pytest.fail("the target request starved")


@settings(max_examples=300, deadline=None)
@given(
    limits=limits,
    requests=st.lists(st.tuples(st.sampled_from(TENANTS), PRIORITIES, st.integers(1, 50)), min_size=1, max_size=20),
    exponents=st.permutations(range(40)),
)
def test_the_forecast_is_the_serving_order(
    limits: tuple[int, int, int | None, int | None],
    requests: list[tuple[str, int, int]],
    exponents: list[int],
) -> None:
    """With replies as long as expected and nobody new, requests are granted in the forecast's order at
    the forecast's times; and forecasting changes nothing. Durations are distinct powers of two, so no
    two slots ever free at the same time (sums of distinct powers never tie), and costs are whole tokens,
    so counters summed in another order are still equal (ties between tenants go the same way)."""
    times = [2.0 ** (k - 20) for k in exponents]
    max_active, max_waiting, tenant_active, tenant_queued = limits
    s = FairScheduler(max_active, max_waiting, tenant_max_active=tenant_active, tenant_max_queued=tenant_queued)
    for i, (tenant, priority, cost) in enumerate(requests):
        with contextlib.suppress(Refused):
            s.submit(Request(tenant, priority, cost, float(i)))
    durations = dict(zip(s.queued(), times[len(s.running) :], strict=False))
    remaining = dict(zip(sorted(s.running, key=lambda r: r.arrival), times, strict=False))
    before = (s.active, s.waiting, {t: (s.counter(t), s.tenant_load(t)) for t in TENANTS})
    forecast = s.forecast(remaining, durations.__getitem__)
    assert (s.active, s.waiting, {t: (s.counter(t), s.tenant_load(t)) for t in TENANTS}) == before
    assert sorted(map(id, (r for r, _ in forecast))) == sorted(map(id, s.queued()))

    ends = {r: t for r, t in remaining.items()}
    served: list[tuple[Request, float]] = []
    while ends:
        done = min(ends, key=ends.__getitem__)
        now = ends.pop(done)
        for request in s.finish(done, done.cost):
            served.append((request, now))
            ends[request] = now + durations[request]
    assert [r for r, _ in served] == [r for r, _ in forecast]
    assert [t for _, t in served] == pytest.approx([t for _, t in forecast])


def test_a_flooding_tenant_holds_another_back_by_about_one_reply_per_slot() -> None:
    """A has 20 queued; B's one request goes next when a slot frees (its counter is lifted to A's, and
    A is charged on every grant)."""
    s = FairScheduler(2, 30)
    a = [Request("a", 0, 100.0, float(i)) for i in range(22)]
    for request in a:
        s.submit(request)
    b = Request("b", 0, 100.0, 22.0)
    s.submit(b)
    assert b.state == "queued"
    first = s.finish(a[0], 100.0)
    assert first == [a[2]] or first == [b]
    if first != [b]:
        assert s.finish(a[1], 100.0) == [b]


def test_priority_orders_a_tenants_own_requests_within_the_window() -> None:
    s = FairScheduler(1, 10, priority_step=10.0)
    running = Request("a", 0, 1.0, 0.0)
    s.submit(running)
    old = Request("a", 0, 1.0, 1.0)
    urgent = Request("a", -1, 1.0, 5.0)  # 5 - 10 < 1: ahead of old
    late = Request("a", 0, 1.0, 2.0)
    lazy = Request("a", 1, 1.0, 3.0)  # 3 + 10 > 2: behind late
    for request in (old, urgent, late, lazy):
        s.submit(request)
    order = [r for r, _ in s.forecast({running: 1.0}, lambda r: 1.0)]
    assert order == [urgent, old, late, lazy]


def test_idle_tenants_are_forgotten_and_bank_no_credit() -> None:
    s = FairScheduler(1, 10)
    busy = Request("a", 0, 50.0, 0.0)
    s.submit(busy)
    s.submit(waiting := Request("a", 0, 50.0, 1.0))
    s.finish(busy, 50.0)
    newcomer = Request("b", 0, 1.0, 2.0)
    s.submit(newcomer)  # b was never served: it is lifted to a's level, not below it
    assert s.counter("b") >= s.counter("a") - 50.0 - 1e-9
    s.finish(waiting, 50.0)
    s.finish(newcomer, 1.0)
    for i in range(200):  # many tenants come once and go: memory keeps only what it must
        r = Request(f"t{i}", 0, 5.0, 10.0 + i)
        s.submit(r)
        s.finish(r, 5.0)
    assert len(s._tenants) < 10


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf")])
def test_a_priority_step_that_would_reverse_or_break_the_order_is_refused(step: float) -> None:
    with pytest.raises(ValueError, match="priority_step"):
        FairScheduler(2, 4, priority_step=step)
