"""Admission: concurrency limit, bounded FIFO queue (one tenant), leaving frees at once, per-tenant caps,
wait estimates (on a clock the test moves)."""

from __future__ import annotations

import anyio
import pytest

from chatstream_asgi import Admission, QueueFull
from chatstream_asgi.service import admission as admission_module
from chatstream_asgi.service.admission import Claim

pytestmark = pytest.mark.anyio


async def test_grants_up_to_the_limit_then_queues_then_refuses() -> None:
    admission = Admission(2, 1)
    a, b = admission.enter(), admission.enter()
    assert a.granted and b.granted
    c = admission.enter()
    assert not c.granted and c.position == 1
    with pytest.raises(QueueFull):
        admission.enter()
    assert (admission.active, admission.waiting) == (2, 1)


async def test_release_grants_the_queue_in_fifo_order() -> None:
    admission = Admission(1, 3)
    first = admission.enter()
    queued = [admission.enter() for _ in range(3)]
    assert [t.position for t in queued] == [1, 2, 3]
    first.leave()
    assert queued[0].granted and [t.position for t in queued] == [0, 1, 2]
    queued[0].leave()
    assert queued[1].granted and queued[2].position == 1


async def test_a_queued_ticket_that_leaves_frees_its_place_at_once() -> None:
    admission = Admission(1, 1)
    running = admission.enter()
    gone = admission.enter()
    gone.leave()
    assert admission.waiting == 0
    nxt = admission.enter()  # no QueueFull: the place is free
    assert nxt.position == 1
    running.leave()
    assert nxt.granted and admission.active == 1


async def test_leave_is_idempotent() -> None:
    admission = Admission(1, 1)
    ticket = admission.enter()
    ticket.leave()
    ticket.leave()
    assert admission.active == 0
    assert admission.enter().granted


async def test_a_new_ticket_does_not_jump_the_queue() -> None:
    admission = Admission(2, 2)
    a, _ = admission.enter(), admission.enter()
    waiting = admission.enter()
    a.leave()  # waiting takes the slot; a newcomer must queue behind nobody but not jump ahead
    assert waiting.granted
    assert not admission.enter().granted


async def test_wait_reports_positions_until_granted() -> None:
    admission = Admission(1, 3)
    first = admission.enter()
    second, third = admission.enter(), admission.enter()
    seen: list[int] = []

    async def on_position(position: int, estimate: float | None) -> None:
        seen.append(position)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(third.wait, on_position)
            await anyio.wait_all_tasks_blocked()
            second.leave()
            await anyio.wait_all_tasks_blocked()
            first.leave()
    assert third.granted
    assert seen == [2, 1]  # granted ends the wait; position 0 is not reported


async def test_cancelled_waiter_can_leave() -> None:
    admission = Admission(1, 1)
    admission.enter()
    ticket = admission.enter()
    with anyio.move_on_after(0.05):
        await ticket.wait()
    ticket.leave()
    assert admission.waiting == 0


class Clock:
    """A monotonic clock the test moves by hand (admission reads ``time.monotonic`` through its module)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(admission_module, "time", clock)
    return clock


def hold(admission: Admission, clock: Clock, seconds: float, tokens: int, claim: Claim | None = None) -> None:
    """One reply that holds its slot ``seconds`` (first token after a tenth of it) and generates ``tokens``."""
    ticket = admission.enter(claim)
    assert ticket.granted
    ticket.meter = lambda: (5, tokens)
    clock.now += seconds / 10
    ticket.first_text()
    clock.now += seconds * 9 / 10
    ticket.leave()


async def test_no_estimate_before_a_reply_was_measured(clock: Clock) -> None:
    admission = Admission(1, 5)
    assert admission.estimate_new() == 0.0  # a free slot: no wait
    admission.enter()
    queued = admission.enter()
    assert admission.estimate(queued) == (1, None)
    assert admission.estimate_new() is None


async def test_idle_time_never_counts_as_service(clock: Clock) -> None:
    """Replies of 1 s, then an 8 s pause: a queue of three still waits about 1, 2 and 3 s (the old
    estimate, from the interval between releases minus the time since the last, said 0 for all)."""
    admission = Admission(1, 5)
    for _ in range(3):
        hold(admission, clock, 1.0, 10)
    clock.now += 8.0
    running = admission.enter()
    running.meter = lambda: (5, 0)
    queued = [admission.enter() for _ in range(3)]
    estimates = [admission.estimate(t) for t in queued]
    assert [position for position, _ in estimates] == [1, 2, 3]
    for i, (_, seconds) in enumerate(estimates):
        assert seconds == pytest.approx(1.0 * (i + 1) + 0.1, rel=0.01)  # slots free, plus the first token
    clock.now += 0.5  # half-way through the running reply, with half its tokens: half a reply less to wait
    running.meter = lambda: (5, 5)
    admission._notify()
    assert admission.estimate(queued[0])[1] == pytest.approx(0.5 + 0.1, rel=0.05)


async def test_speeds_come_from_replies_that_ran_with_every_slot_taken(clock: Clock) -> None:
    """A batching engine on a CPU runs replies slower at full batch: after a trickle of fast lone
    replies, a queue (which only forms when every slot is taken) is still estimated at full-batch speed."""
    admission = Admission(2, 5)
    for _ in range(2):  # two at a time: 3 s each
        pair = [admission.enter(), admission.enter()]
        for ticket in pair:
            ticket.meter = lambda: (5, 10)
        clock.now += 0.3
        for ticket in pair:
            ticket.first_text()
        clock.now += 2.7
        for ticket in pair:
            ticket.leave()
    for _ in range(5):  # then alone: 1 s each
        hold(admission, clock, 1.0, 10)
    running = [admission.enter(), admission.enter()]
    for ticket in running:
        ticket.meter = lambda: (5, 0)
    queued = admission.enter()
    assert admission.estimate(queued)[1] == pytest.approx(3.0 + 0.3, rel=0.01)


async def test_a_tenant_over_its_share_is_refused_with_its_own_retry_after(clock: Clock) -> None:
    admission = Admission(2, 8, tenant_max_active=1, tenant_max_queued=1)
    a, b = Claim("a", max_new_tokens=10), Claim("b", max_new_tokens=10)
    for _ in range(2):
        hold(admission, clock, 2.0, 10, a)
    first = admission.enter(a)
    first.meter = lambda: (5, 2)  # 0.5 s in: tokens at 0.2 and 0.4 s
    clock.now += 0.5
    second = admission.enter(a)
    assert first.granted and not second.granted  # a's cap is one reply: its second waits, a slot stays free
    with pytest.raises(QueueFull) as refused:
        admission.enter(a)
    assert refused.value.reason == "tenant_limit"
    assert refused.value.retry_after == pytest.approx(1.6, rel=0.01)  # when a's running reply ends: 8 tokens on
    other = admission.enter(b)
    assert other.granted  # b is not held back by a's queue


async def test_a_full_queue_says_when_a_place_frees(clock: Clock) -> None:
    admission = Admission(1, 1)
    hold(admission, clock, 3.0, 10)
    running = admission.enter()
    running.meter = lambda: (5, 3)  # 1 s in: tokens at 0.3, 0.6 and 0.9 s
    admission.enter()
    clock.now += 1.0
    with pytest.raises(QueueFull) as refused:
        admission.enter()
    assert refused.value.reason == "queue_full"
    assert refused.value.retry_after == pytest.approx(2.1, rel=0.01)  # 7 tokens of 0.3 s to go


async def test_the_observer_hears_each_tenant(clock: Clock) -> None:
    heard: list[tuple[object, ...]] = []

    class Observer:
        def admitted(self, tenant: str) -> None:
            heard.append(("admitted", tenant))

        def rejected(self, tenant: str, reason: str) -> None:
            heard.append(("rejected", tenant, reason))

        def started(self, tenant: str, waited: float) -> None:
            heard.append(("started", tenant, waited))

        def finished(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
            heard.append(("finished", tenant, prompt_tokens, completion_tokens))

    admission = Admission(1, 1, observer=Observer())
    running = admission.enter(Claim("a", prompt_tokens=7))
    queued = admission.enter(Claim("b"))
    with pytest.raises(QueueFull):
        admission.enter(Claim("c"))
    clock.now += 2.0
    running.meter = lambda: (0, 4)  # the engine had not counted the prompt yet: the claim's estimate stands
    running.leave()
    queued.leave()
    assert heard == [
        ("admitted", "a"),
        ("started", "a", 0.0),
        ("admitted", "b"),
        ("rejected", "c", "queue_full"),
        ("finished", "a", 7, 4),
        ("started", "b", 2.0),
        ("finished", "b", 0, 0),
    ]


async def test_wait_idle() -> None:
    admission = Admission(1, 1)
    a = admission.enter()
    b = admission.enter()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(admission.wait_idle)
            a.leave()
            b.leave()
    assert admission.active == 0


@pytest.mark.parametrize(("active", "waiting"), [(0, 1), (1, -1)])
def test_invalid_limits(active: int, waiting: int) -> None:
    with pytest.raises(ValueError):
        Admission(active, waiting)
