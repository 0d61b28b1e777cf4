"""Helpers of the remote-engine tests: a chatstream-asgi server with a mock engine in a thread, a front
``ChatStream`` over httpx's ASGITransport, and a completion recorder (shared by the engine and e2e tests)."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
from live_server import serve_in_thread
from starlette.requests import Request

from chatstream_asgi import (
    ChatStream,
    CompletionState,
    GenerationParams,
    GenerationRequest,
    MockEngine,
    MockParams,
    get_result,
)
from chatstream_asgi.engines.base import Engine
from chatstream_asgi.engines.mock import LONG_TEXT, tokenize
from chatstream_asgi.web.app import create_app

WATCHDOG = 10.0
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
WHILE_STREAMING = CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING.value


class Recorder:
    """A completion callback recording states, usage and request headers; waits are bounded."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.usage: list[tuple[int, int]] = []
        self.headers: list[dict[str, str]] = []
        self._changed = threading.Condition()

    def __call__(self, request: Request, state: CompletionState) -> None:
        result = get_result(request)
        assert result is not None
        with self._changed:
            self.states.append(state.value)
            self.usage.append((result.prompt_tokens, result.completion_tokens))
            self.headers.append(dict(request.headers))
            self._changed.notify_all()

    def wait(self, count: int) -> list[str]:
        """The states once there are ``count`` of them."""
        with self._changed:
            done = self._changed.wait_for(lambda: len(self.states) >= count, WATCHDOG)
            assert done, f"{len(self.states)} of {count} completions: {self.states}"
            return list(self.states)

    async def wait_async(self, count: int) -> list[str]:
        return await anyio.to_thread.run_sync(self.wait, count)


def chat_stream(recorder: Recorder, engine: Engine, concurrency: int = 4, queue: int = 4) -> ChatStream:
    return ChatStream(
        engine,
        num_of_concurrent_executions=concurrency,
        max_queue_size=queue,
        max_new_tokens=2000,
        callback=recorder,
        session_secret="test",
        send_timeout=5.0,
        shutdown_timeout=0.5,
    )


@contextlib.contextmanager
def remote(concurrency: int = 4, queue: int = 4, **mock: Any) -> Iterator[tuple[str, Recorder]]:
    """A chatstream-asgi server with a mock engine (``long`` reply unless told) in a thread."""
    recorder = Recorder()
    engine = MockEngine(MockParams(**{"type": "long", **mock}))
    with serve_in_thread(create_app(chat_stream(recorder, engine, concurrency, queue))) as url:
        yield url, recorder


@contextlib.asynccontextmanager
async def front(engine: Engine) -> AsyncIterator[tuple[httpx.AsyncClient, Recorder]]:
    """A front ChatStream on ``engine``, through httpx's ASGITransport (happy paths and errors before streaming)."""
    recorder = Recorder()
    cs = chat_stream(recorder, engine)
    transport = httpx.ASGITransport(app=create_app(cs))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://front", timeout=WATCHDOG) as client:
            yield client, recorder
    finally:
        await cs.shutdown()


def request(request_id: str = "req-1", max_new_tokens: int = 500, **params: Any) -> GenerationRequest:
    return GenerationRequest(request_id, list(MESSAGES), GenerationParams(max_new_tokens=max_new_tokens, **params))


def processing(url: str) -> int:
    return httpx.get(url + "/get_load", timeout=WATCHDOG).json()["processing"]


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def long_text(tokens: int) -> str:
    return "".join(itertools.islice(itertools.cycle(tokenize(LONG_TEXT)), tokens))
