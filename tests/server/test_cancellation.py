"""A server that *cancels* the request task when its client leaves (as Ray Serve's proxy does, often before
``http.disconnect`` arrives): every wait before admission must still end the request in
``client_disconnected_before_streaming``, reported once, and the cancellation must go on (re-raised). Ray's
proxy may instead make ``receive`` raise while the body arrives: that is a client that left too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from asgi_harness import Send, StateLog, chat_body, http_scope
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware, MockEngine, MockParams
from chatstream_asgi.sessions.store import MemorySessionStore, Session

pytestmark = pytest.mark.anyio

BEFORE = "client_disconnected_before_streaming"
WATCHDOG = 5.0


class StalledReceive:
    """Delivers the first body chunk (``more_body``), then stalls: the client is still uploading."""

    def __init__(self, first_chunk: bytes) -> None:
        self._messages = [{"type": "http.request", "body": first_chunk, "more_body": True}]
        self.stalled = anyio.Event()

    async def __call__(self) -> dict[str, Any]:
        if self._messages:
            return self._messages.pop(0)
        self.stalled.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class FailingReceive:
    """Delivers the first body chunk (``more_body``), then raises: Ray Serve's proxy raises
    ``TaskCancelledError`` from ``receive`` when the client leaves mid-body, often before it cancels the task."""

    def __init__(self, first_chunk: bytes) -> None:
        self._messages = [{"type": "http.request", "body": first_chunk, "more_body": True}]

    async def __call__(self) -> dict[str, Any]:
        if self._messages:
            return self._messages.pop(0)
        raise RuntimeError("the proxy's receive task was cancelled")


class FullReceive:
    """Delivers the whole body, then waits (a client that stays)."""

    def __init__(self, body: bytes) -> None:
        self._messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def __call__(self) -> dict[str, Any]:
        if self._messages:
            return self._messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class StalledStore(MemorySessionStore):
    """A session store whose ``load`` hangs (a slow Redis) until the test has cancelled the request."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = anyio.Event()

    async def load(self, session_id: str) -> Session | None:
        self.loading.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


def completions(cs: ChatStream, state: str) -> float:
    value = cs.metrics.registry.get_sample_value("chatstream_completions_total", {"state": state})
    return value or 0.0


async def cancel_while(app: Callable[..., Awaitable[None]], scope: Any, receive: Any, waiting: anyio.Event) -> Send:
    """Run the request as a task, cancel it once ``waiting`` is set, and check the cancellation went on."""
    send = Send()
    with anyio.fail_after(WATCHDOG):
        task = asyncio.ensure_future(app(scope, receive, send))
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return send


def endpoint_app(cs: ChatStream) -> Starlette:
    """Endpoint mode: a Starlette route that returns ``cs.handle_chat_stream_request(request)``."""

    async def chat(request: Request) -> Response:
        return await cs.handle_chat_stream_request(request)

    return Starlette(routes=[Route("/chat_stream", chat, methods=["POST"])])


def service(**options: Any) -> tuple[ChatStream, StateLog]:
    log = StateLog()
    engine = MockEngine(MockParams(type="echo", time_per_token_sec=0.0))
    return ChatStream(engine, callback=log, session_secret="s", **options), log


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_cancelled_while_the_body_is_read_reports_before_streaming_once(path: str) -> None:
    cs, log = service()
    app = ChatStreamMiddleware(Response("not found", 404), cs)
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    receive = StalledReceive(body[:10])
    send = await cancel_while(app, http_scope(path, body=body), receive, receive.stalled)
    assert log.states == [BEFORE]
    assert completions(cs, BEFORE) == 1
    assert send.messages == []
    assert cs.admission.active == cs.admission.waiting == 0


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_a_receive_that_raises_mid_body_reports_before_streaming_once(path: str) -> None:
    cs, log = service()
    app = ChatStreamMiddleware(Response("not found", 404), cs)
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(path, body=body), FailingReceive(body[:10]), send)
    assert log.states == [BEFORE]
    assert completions(cs, BEFORE) == 1
    assert send.messages == []


async def test_cancelled_while_the_session_loads_reports_before_streaming_once() -> None:
    store = StalledStore()
    cs, log = service(session_store=store)
    app = ChatStreamMiddleware(Response("not found", 404), cs)
    body = chat_body("hello")
    await cancel_while(app, http_scope(body=body), FullReceive(body), store.loading)
    assert log.states == [BEFORE]
    assert completions(cs, BEFORE) == 1


async def test_cancelled_while_queued_reports_before_streaming_once() -> None:
    """Already right before the fix (the send loop reports it); guards against a second report."""
    log = StateLog()
    cs = ChatStream(
        MockEngine(MockParams(type="long", time_per_token_sec=0.01)),
        num_of_concurrent_executions=1,
        max_queue_size=1,
        callback=log,
    )
    app = ChatStreamMiddleware(Response("not found", 404), cs)
    body = chat_body("hello", format="ndjson")
    first_send = Send()
    with anyio.fail_after(WATCHDOG):
        first = asyncio.ensure_future(app(http_scope(body=body), FullReceive(body), first_send))
        await first_send.wait_until(lambda s: s.text_frames > 0)
        queued = asyncio.ensure_future(app(http_scope(body=body), FullReceive(body), Send()))
        while cs.admission.waiting == 0:
            await cs.admission._changed.wait()
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    assert sorted(log.states) == [BEFORE, "client_disconnected_while_streaming"]
    assert completions(cs, BEFORE) == 1


async def test_endpoint_mode_cancelled_while_the_body_is_read_reports_once() -> None:
    cs, log = service()
    app = endpoint_app(cs)
    body = chat_body("hello")
    receive = StalledReceive(body[:5])
    await cancel_while(app, http_scope(body=body), receive, receive.stalled)
    assert log.states == [BEFORE]
    assert completions(cs, BEFORE) == 1


async def test_endpoint_mode_a_receive_that_raises_mid_body_reports_once() -> None:
    cs, log = service()
    app = endpoint_app(cs)
    body = chat_body("hello")
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=body), FailingReceive(body[:5]), send)
    assert log.states == [BEFORE]
    assert completions(cs, BEFORE) == 1
    assert send.messages == []


async def test_cancelled_while_the_engine_starts_reports_once_and_the_start_goes_on() -> None:
    """The first request (no lifespan) starts the engine; its client leaving must not leave it half started."""

    class SlowStart(MockEngine):
        def __init__(self) -> None:
            super().__init__(MockParams(type="echo", time_per_token_sec=0.0))
            self.loading, self.loaded, self.starts, self.started = anyio.Event(), anyio.Event(), 0, False

        async def start(self) -> None:
            self.starts += 1
            self.loading.set()
            await self.loaded.wait()
            self.started = True

        def generate(self, request: Any) -> Any:
            assert self.started, "generate on an engine whose start never finished"
            return super().generate(request)

    engine = SlowStart()
    log = StateLog()
    cs = ChatStream(engine, callback=log, session_secret="s")
    app = ChatStreamMiddleware(Response("not found", 404), cs)
    body = chat_body("hello")
    await cancel_while(app, http_scope(body=body), FullReceive(body), engine.loading)
    assert log.states == [BEFORE]
    engine.loaded.set()
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=body), FullReceive(body), send)
    assert send.status == 200 and send.body == b"hello"
    assert engine.starts == 1
    assert log.states == [BEFORE, "success"]
