"""Admission: concurrency limit, bounded FIFO queue, leaving frees at once, wait estimates."""

from __future__ import annotations

import anyio
import pytest

from chatstream_asgi import Admission, QueueFull

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


async def test_estimated_wait_follows_the_release_rate() -> None:
    admission = Admission(1, 5)
    assert admission.estimated_wait(1) is None  # no history yet
    assert admission.estimated_wait(0) == 0.0
    for _ in range(3):
        admission.enter().leave()
        await anyio.sleep(0.02)
    estimate = admission.estimated_wait(2)
    assert estimate is not None and 0 <= estimate < 1


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
