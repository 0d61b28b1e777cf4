"""The app that real-server tests start as a subprocess (``chat_app:app`` with ``tests/support/apps`` on the path).

Several ChatStreams sit behind stacked middlewares, each with its own admission, so one server
process covers every scenario (paths by prefix):

- ``/chat_stream`` and endpoint-mode ``/chat``: 1 slot, 1 queue place, long mock reply, 20 ms/token;
- ``/soft``: 1 slot, no queue, a full queue answered with 200 (the original library's default);
- ``/slow``: the first token comes after 30 s (a client leaves during the initial wait);
- ``/fail0``, ``/fail3``: the engine raises before the first token / after 3 tokens.

Every completion state is recorded; ``GET /_test/states``, ``GET /_test/wait?count=N&timeout=S``
(long-poll) and ``POST /_test/reset`` expose them, and ``CS_STATE_FILE`` (if set) gets one line per
state, so a test can read the states of a server that has exited.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware, CompletionState, MockEngine, MockParams


class StateRecorder:
    """A completion callback that records states and wakes long-polls."""

    def __init__(self, path: str | None) -> None:
        self.states: list[str] = []
        self.path = path
        self._changed: asyncio.Event | None = None

    def __call__(self, request: Request, state: CompletionState) -> None:
        self.states.append(state.value)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(state.value + "\n")
        if self._changed is not None:
            self._changed.set()

    async def wait(self, count: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.states) < count and (left := deadline - loop.time()) > 0:
            self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break


recorder = StateRecorder(os.environ.get("CS_STATE_FILE"))
MAX_BODY = int(os.environ.get("CS_MAX_BODY", "65536"))
SEND_TIMEOUT = float(os.environ.get("CS_SEND_TIMEOUT", "5"))


def chat_stream(concurrency: int = 1, queue: int = 1, *, http_error: bool = True, **mock: Any) -> ChatStream:
    return ChatStream(
        MockEngine(MockParams(**{"type": "long", "time_per_token_sec": 0.02, **mock})),
        num_of_concurrent_executions=concurrency,
        max_queue_size=queue,
        too_many_request_as_http_error=http_error,
        max_new_tokens=2000,
        callback=recorder,
        send_timeout=SEND_TIMEOUT,
        shutdown_timeout=float(os.environ.get("CS_SHUTDOWN_TIMEOUT", "0.5")),
    )


main = chat_stream()
others = {
    "/soft": chat_stream(queue=0, http_error=False),
    "/slow": chat_stream(initial_wait_sec=30),
    "/fail0": chat_stream(2, 2, fail_after_tokens=0),
    "/fail3": chat_stream(2, 2, fail_after_tokens=3),
}


async def endpoint_chat(request: Request) -> Response:
    """Endpoint mode: read the body twice, then hand the request over."""
    first = await request.body()
    data = await request.json()
    assert data == json.loads(first)
    return await main.handle_chat_stream_request(request)


async def plain(request: Request) -> Response:
    return PlainTextResponse("ok")


async def states(request: Request) -> Response:
    return JSONResponse({"states": recorder.states})


async def wait(request: Request) -> Response:
    count = int(request.query_params.get("count", "1"))
    await recorder.wait(count, float(request.query_params.get("timeout", "10")))
    return JSONResponse({"states": recorder.states})


async def reset(request: Request) -> Response:
    recorder.states.clear()
    return JSONResponse({"states": []})


inner = Starlette(
    routes=[
        Route("/chat", endpoint_chat, methods=["POST"]),
        Route("/plain", plain),
        Route("/_test/states", states),
        Route("/_test/wait", wait),
        Route("/_test/reset", reset, methods=["POST"]),
    ]
)

app: Any = inner
for prefix, cs in others.items():
    app = ChatStreamMiddleware(
        app,
        cs,
        paths=[f"{prefix}/chat_stream"],
        endpoints={"get_load": f"{prefix}/get_load", "metrics": None},
        max_body_size=MAX_BODY,
    )
app = ChatStreamMiddleware(app, main, replay_paths=["/chat"], max_body_size=MAX_BODY)
