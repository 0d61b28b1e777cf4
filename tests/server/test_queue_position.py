"""Queue position and expected wait: ``queue`` SSE events while a request waits, and ``/get_load``."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from live_server import serve_in_thread
from starlette.requests import Request

from chatstream_asgi import ChatStream, CompletionState
from chatstream_asgi.web.app import create_app

WATCHDOG = 20.0
TOKENS = 12
TIME_PER_TOKEN = 0.03  # a steady engine: each reply takes about TOKENS * TIME_PER_TOKEN


def make_chat_stream(states: list[CompletionState]) -> ChatStream:
    def record(request: Request, state: CompletionState) -> None:
        states.append(state)

    return ChatStream(
        use_mock_response=True,
        mock_params={"type": "long", "time_per_token_sec": TIME_PER_TOKEN},
        max_new_tokens=TOKENS,
        num_of_concurrent_executions=1,
        max_queue_size=5,
        stream_format="sse",
        callback=record,
        session_secret="s",
    )


async def wait_until(c: httpx.AsyncClient, **load: int) -> dict[str, Any]:
    """Poll ``/get_load`` until it shows ``load`` (bounded by the watchdog)."""
    deadline = time.monotonic() + WATCHDOG
    while True:
        current = (await c.get("/get_load")).json()
        if all(current[k] == v for k, v in load.items()):
            return current
        assert time.monotonic() < deadline, f"load never reached {load}: {current}"
        await asyncio.sleep(0.005)


async def sse_events(c: httpx.AsyncClient, events: list[tuple[float, str, dict[str, Any]]]) -> None:
    """Stream one SSE chat request, appending (time, event, data) until ``done``."""
    async with c.stream("POST", "/chat_stream", json={"messages": [{"role": "user", "content": "hi"}]}) as r:
        async for block in _blocks(r):
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((time.monotonic(), lines["event"], json.loads(lines["data"])))


async def _blocks(response: httpx.Response) -> Any:
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield block


def test_a_queued_client_sees_its_position_fall_then_tokens() -> None:
    states: list[CompletionState] = []
    cs = make_chat_stream(states)

    async def scenario(url: str) -> list[tuple[float, str, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=url, timeout=WATCHDOG) as c:
            for _ in range(3):  # warm up: the estimate comes from the recent release rate
                await sse_events(c, [])
            events: list[list[tuple[float, str, dict[str, Any]]]] = [[] for _ in range(4)]
            tasks = []
            for i in range(4):  # one generating, then three queued in order
                tasks.append(asyncio.create_task(sse_events(c, events[i])))
                await wait_until(c, processing=1, waiting=i)
            load = (await c.get("/get_load")).json()
            await asyncio.wait_for(asyncio.gather(*tasks), WATCHDOG)
            assert load["estimated_wait_seconds"] is not None and load["estimated_wait_seconds"] > 0
            return events[3]

    with serve_in_thread(create_app(cs)) as url:
        last = asyncio.run(scenario(url))

    queue = [(t, data) for t, event, data in last if event == "queue"]
    assert [data["position"] for _, data in queue] == [3, 2, 1]
    assert [event for _, event, _ in last[3:]] == ["delta"] * TOKENS + ["done"]
    first_queue_at, first = queue[0]
    actual_wait = last[3][0] - first_queue_at
    estimate = first["estimated_wait_seconds"]
    assert estimate is not None
    assert actual_wait / 2 <= estimate <= actual_wait * 2, (estimate, actual_wait)
    assert states == [CompletionState.SUCCESS] * 7


def test_leaving_with_only_queue_events_sent_is_before_streaming() -> None:
    states: list[CompletionState] = []
    cs = make_chat_stream(states)

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=WATCHDOG) as c:
            blocker = asyncio.create_task(sse_events(c, []))
            await wait_until(c, processing=1)
            async with c.stream("POST", "/chat_stream", json={"user_input": "waiting"}) as response:
                first = await anext(_blocks(response))
            assert first.startswith("event: queue\n")
            await wait_until(c, waiting=0)  # the queue place was given back at once
            await asyncio.wait_for(blocker, WATCHDOG)
            prompt = (await c.get("/get_prompt", headers={"x-session-id": response.headers["x-session-id"]})).json()
            assert prompt["messages"] == []  # nothing saved for a reply never streamed

    with serve_in_thread(create_app(cs)) as url:
        asyncio.run(scenario(url))
    assert sorted(states) == sorted([CompletionState.SUCCESS, CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING])
