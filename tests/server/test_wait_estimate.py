"""The wait estimate after an idle pause, on a live server: idle time is not service.

The estimate this replaced came from the interval between recent slot releases minus the time since
the last one, so after a pause it told every queued client 0 (measured from outside: 10 queued
clients told 0.0 waited 0.5-2.5 s). Only a lower bound is asserted, which a loaded machine cannot
break: a reply of the steady mock engine takes at least TOKENS x TIME_PER_TOKEN, so a client third in
line waits at least two whole replies, and the estimate comes from replies measured at least that long.
"""

from __future__ import annotations

import asyncio

import httpx
from live_server import serve_in_thread
from test_queue_position import TOKENS, WATCHDOG, make_chat_stream, sse_events, wait_until

from chatstream_asgi.web.app import create_app

PAUSE = 1.5
"""Longer than three replies: the old estimate's time since the last release outgrew three intervals."""


def test_after_an_idle_pause_the_estimate_still_counts_the_replies_ahead() -> None:
    cs = make_chat_stream([])
    reply = TOKENS * 0.03  # the mock's least time per reply (test_queue_position's TIME_PER_TOKEN)

    async def scenario(url: str) -> list[float | None]:
        async with httpx.AsyncClient(base_url=url, timeout=WATCHDOG) as c:
            for _ in range(3):
                await sse_events(c, [])
            await asyncio.sleep(PAUSE)  # the pause is what is tested
            events: list[list] = [[] for _ in range(4)]
            tasks = []
            for i in range(4):
                tasks.append(asyncio.create_task(sse_events(c, events[i])))
                await wait_until(c, processing=1, waiting=i)
            await asyncio.wait_for(asyncio.gather(*tasks), WATCHDOG)
        return [next(data for _, event, data in e if event == "queue")["estimated_wait_seconds"] for e in events[1:]]

    with serve_in_thread(create_app(cs)) as url:
        estimates = asyncio.run(scenario(url))
    assert all(e is not None for e in estimates), estimates
    for place, estimate in enumerate(estimates):  # place 0 waits for the running reply's rest, place k for k more
        assert estimate >= place * reply * 0.9, (place, estimates)
