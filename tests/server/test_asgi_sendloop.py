"""The send loop driven over raw ASGI: disconnects, failing and blocking sends, the four states.

Every test runs under a watchdog (``anyio.fail_after``) so a stream that fails to stop itself
fails the test instead of hanging it.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from asgi_harness import SPEC_VERSIONS, Receive, Send, StateLog, chat_body, http_scope, not_found

from chatstream_asgi import ChatStream, ChatStreamMiddleware, GenerationRequest, MockEngine, MockParams
from chatstream_asgi.engines.base import GenerationStream

pytestmark = pytest.mark.anyio

WATCHDOG = 5.0
SUCCESS = "success"
WHILE = "client_disconnected_while_streaming"
BEFORE = "client_disconnected_before_streaming"
ERROR = "unknown_error_occurred"


@pytest.fixture(params=SPEC_VERSIONS)
def spec_version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[True, False], ids=["sticky", "one-shot"])
def sticky(request: pytest.FixtureRequest) -> bool:
    return request.param


class RecordingEngine(MockEngine):
    """A mock engine that keeps every stream it made (to check they were cancelled)."""

    def __init__(self, params: MockParams) -> None:
        super().__init__(params)
        self.streams: list[GenerationStream] = []
        self.generating = anyio.Event()  # set when the first stream is made

    def generate(self, request: GenerationRequest) -> GenerationStream:
        stream = super().generate(request)
        self.streams.append(stream)
        self.generating.set()
        return stream


class Service:
    """A ChatStream behind the middleware, with a state log."""

    def __init__(self, *, concurrency: int = 2, queue: int = 5, send_timeout: float = 5.0, **mock: Any) -> None:
        mock.setdefault("type", "long")
        self.engine = RecordingEngine(MockParams(**mock))
        self.log = StateLog()
        self.cs = ChatStream(
            self.engine,
            num_of_concurrent_executions=concurrency,
            max_queue_size=queue,
            max_new_tokens=20,
            callback=self.log,
            send_timeout=send_timeout,
        )
        self.app = ChatStreamMiddleware(not_found, self.cs)

    async def chat(self, receive: Receive, send: Send, *, spec_version: str = "2.4", **body: Any) -> None:
        data = chat_body(**body)
        with anyio.fail_after(WATCHDOG):
            await self.app(http_scope(body=data, spec_version=spec_version), receive, send)

    async def wait_waiting(self, n: int) -> None:
        """Wait (bounded) until ``n`` requests are queued: a poll, as admission has no public event."""
        with anyio.fail_after(WATCHDOG):
            while self.cs.admission.waiting != n:
                await anyio.sleep(0.005)

    def request(self, **body: Any) -> Receive:
        return Receive(chat_body(**body))


def text_frames_at_least(n: int) -> Any:
    return lambda send: send.text_frames >= n


async def test_success(spec_version: str, sticky: bool) -> None:
    svc = Service()
    send = Send()
    await svc.chat(Receive(chat_body(), sticky=sticky), send, spec_version=spec_version)
    assert send.status == 200
    assert send.complete
    assert len(send.body.split()) == 20
    assert svc.log.states == [SUCCESS]
    assert svc.log.replies == [send.body.decode()]
    assert svc.cs.get_load()["processing"] == 0


async def test_disconnect_right_after_last_frame_is_success(spec_version: str, sticky: bool) -> None:
    receive = Receive(chat_body(), sticky=sticky)

    def leave_after_final(message: dict[str, Any], send: Send) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            receive.disconnect()

    svc = Service()
    send = Send(on_message=leave_after_final)
    await svc.chat(receive, send, spec_version=spec_version)
    assert svc.log.states == [SUCCESS]


async def test_disconnect_while_final_frame_is_being_sent_is_success() -> None:
    """A disconnect that arrives while the final send is in flight must not cancel it."""
    svc = Service(type="echo")
    receive = Receive(chat_body())
    final_sending = anyio.Event()
    release = anyio.Event()

    class SlowFinal(Send):
        async def __call__(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                final_sending.set()
                await release.wait()
            await super().__call__(message)

    send = SlowFinal()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, receive, send)
        with anyio.fail_after(WATCHDOG):
            await final_sending.wait()
        receive.disconnect()
        await anyio.wait_all_tasks_blocked()  # the watcher has seen the disconnect; the final send still waits
        assert receive.disconnects_delivered == 1
        release.set()
    assert send.complete
    assert svc.log.states == [SUCCESS]


async def test_mid_stream_disconnect(spec_version: str, sticky: bool) -> None:
    svc = Service(time_per_token_sec=0.01)
    receive = Receive(chat_body(), sticky=sticky)
    send = Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, receive, send)
        await send.wait_until(text_frames_at_least(3))
        receive.disconnect()
    assert svc.log.states == [WHILE]
    assert not send.complete
    assert svc.log.replies[0].startswith(send.body.decode())
    assert svc.engine.streams[0].cancelled
    assert svc.cs.get_load()["processing"] == 0


async def test_disconnect_before_first_token(spec_version: str, sticky: bool) -> None:
    svc = Service(initial_wait_sec=10)
    receive = Receive(chat_body(), sticky=sticky)
    send = Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, receive, send)
        with anyio.fail_after(WATCHDOG):
            await svc.engine.generating.wait()
        receive.disconnect()
    assert svc.log.states == [BEFORE]
    assert send.messages == []
    assert svc.engine.streams[0].cancelled
    assert svc.cs.get_load()["processing"] == 0


async def test_disconnect_while_queued_frees_the_queue_place(sticky: bool) -> None:
    svc = Service(concurrency=1, queue=1, time_per_token_sec=0.02)
    first_receive, first_send = Receive(chat_body()), Send()
    queued_receive, queued_send = Receive(chat_body(), sticky=sticky), Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, first_receive, first_send)
        await first_send.wait_until(text_frames_at_least(1))
        tg.start_soon(svc.chat, queued_receive, queued_send)
        await svc.wait_waiting(1)
        queued_receive.disconnect()
        await svc.log.wait(1)
        assert svc.log.states == [BEFORE]
        assert svc.cs.get_load()["waiting"] == 0
        assert svc.cs.get_load()["processing"] == 1
        first_receive.disconnect()
    assert svc.log.states == [BEFORE, WHILE]
    assert len(svc.engine.streams) == 1  # the queued request never reached the engine
    assert svc.cs.get_load() | {"estimated_wait_seconds": 0, "generated_tokens": 0} == {
        "processing": 0,
        "waiting": 0,
        "max_processing": 1,
        "max_waiting": 1,
        "estimated_wait_seconds": 0,
        "generated_tokens": 0,
    }


@pytest.mark.parametrize(("raise_at", "state"), [(0, BEFORE), (1, BEFORE), (2, WHILE), (5, WHILE)])
async def test_send_raising_oserror_is_a_disconnect(raise_at: int, state: str) -> None:
    """Calls: 0 = response start, 1 = first text frame, 2 = second text frame, ..."""
    svc = Service()
    send = Send(raise_at=raise_at)
    await svc.chat(Receive(chat_body()), send)
    assert svc.log.states == [state]
    assert svc.engine.streams[0].cancelled
    assert svc.cs.get_load()["processing"] == 0


@pytest.mark.parametrize(("block_at", "state"), [(0, BEFORE), (1, BEFORE), (3, WHILE)])
async def test_blocked_send_times_out_as_a_disconnect(block_at: int, state: str) -> None:
    """A client that stops reading: the send never returns, the send timeout ends the request."""
    svc = Service(send_timeout=0.2)
    send = Send(block_at=block_at)
    await svc.chat(Receive(chat_body()), send)
    assert svc.log.states == [state]
    assert svc.engine.streams[0].cancelled
    assert svc.cs.get_load()["processing"] == 0


async def test_disconnect_while_send_is_blocked() -> None:
    """The disconnect watcher cancels a send stuck on flow control, long before the send timeout."""
    svc = Service(send_timeout=30)
    receive = Receive(chat_body())
    send = Send(block_at=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, receive, send)
        await send.wait_until(lambda s: s.calls > 3)
        receive.disconnect()
    assert svc.log.states == [WHILE]


@pytest.mark.parametrize(
    "messages",
    [
        [{"type": "http.disconnect"}],
        [{"type": "http.request", "body": b'{"user', "more_body": True}, {"type": "http.disconnect"}],
    ],
    ids=["no-body", "partial-body"],
)
async def test_disconnect_mid_body(messages: list[dict[str, Any]]) -> None:
    """``http.disconnect`` instead of (the rest of) the body: before streaming, no KeyError."""
    svc = Service()
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await svc.app(http_scope(body=chat_body()), Receive(messages=messages), send)
    assert svc.log.states == [BEFORE]
    assert send.messages == []
    assert svc.engine.streams == []


async def test_missing_more_body_means_the_body_is_complete() -> None:
    svc = Service(type="echo")
    send = Send()
    messages = [{"type": "http.request", "body": chat_body("one two")}]
    with anyio.fail_after(WATCHDOG):
        await svc.app(http_scope(body=chat_body("one two")), Receive(messages=messages), send)
    assert send.body == b"one two"
    assert svc.log.states == [SUCCESS]


async def test_sends_never_overlap_with_queue_events_and_tokens() -> None:
    """SSE queue updates, tokens and the final event all come from one writer."""
    svc = Service(concurrency=1, queue=3, time_per_token_sec=0.002)
    sends = [Send() for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for send in sends:
            tg.start_soon(lambda s=send: svc.chat(Receive(chat_body(format="sse")), s))
    assert all(s.overlaps == 0 for s in sends)
    assert svc.log.states == [SUCCESS] * 4
    queued = [s for s in sends if b"event: queue" in s.body]
    assert len(queued) == 3
    for send in sends:
        assert send.body.endswith(b"\n\n") and b"event: done" in send.bodies[-1]


@pytest.mark.parametrize("fmt", ["text", "chatstream", "sse", "ndjson"])
async def test_engine_failure_before_first_token_is_500_json(fmt: str) -> None:
    svc = Service(fail_after_tokens=0)
    send = Send()
    await svc.chat(Receive(chat_body(format=fmt)), send)
    assert send.status == 500
    assert send.json()["error"] == ERROR
    assert svc.log.states == [ERROR]


@pytest.mark.parametrize(
    ("fmt", "error_frame"),
    [
        ("text", b'<::ERROR::>{"error":"unknown_error_occurred"'),
        ("chatstream", b'<::ERROR::>{"error":"unknown_error_occurred"'),
        ("sse", b'event: error\ndata: {"state":"unknown_error_occurred"'),
        ("ndjson", b'{"type":"error","state":"unknown_error_occurred"'),
    ],
)
async def test_engine_failure_after_tokens_sends_an_error_frame(fmt: str, error_frame: bytes) -> None:
    svc = Service(fail_after_tokens=3)
    send = Send()
    await svc.chat(Receive(chat_body(format=fmt)), send)
    assert send.status == 200
    assert send.complete
    assert send.bodies[-1].startswith(error_frame)
    assert svc.log.states == [ERROR]
    assert svc.cs.get_load()["processing"] == 0


async def test_outer_cancellation_is_reraised_and_reported_once() -> None:
    """The server cancels the request task (its client left): the state is a disconnect."""
    svc = Service(time_per_token_sec=0.01)
    send = Send()
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(svc.chat, Receive(chat_body()), send)
            await send.wait_until(text_frames_at_least(2))
            tg.cancel_scope.cancel()
    await svc.log.wait(1)
    assert svc.log.states == [WHILE]
    assert svc.engine.streams[0].cancelled
    assert svc.cs.get_load()["processing"] == 0


async def test_cancellation_propagates_out_of_the_app() -> None:
    svc = Service(initial_wait_sec=10)
    outcome: list[str] = []

    async def serve() -> None:
        try:
            await svc.chat(Receive(chat_body()), Send())
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        outcome.append("returned")

    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await svc.engine.generating.wait()
            tg.cancel_scope.cancel()
    assert outcome == ["cancelled"]
    assert svc.log.states == [BEFORE]


async def test_callback_errors_never_reach_the_client(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    async def failing(request: Any, state: Any) -> None:
        calls.append(str(state))
        raise RuntimeError("callback bug")

    cs = ChatStream(MockEngine(MockParams(type="echo")), callback=failing)
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await ChatStreamMiddleware(not_found, cs)(http_scope(body=chat_body("hi")), Receive(chat_body("hi")), send)
    assert send.body == b"hi"
    assert calls == [SUCCESS]
    assert "completion callback failed" in caplog.text


async def test_shutdown_aborts_open_streams_with_an_error_frame() -> None:
    svc = Service(time_per_token_sec=0.02)
    send = Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, Receive(chat_body(format="ndjson")), send)
        await send.wait_until(text_frames_at_least(2))
        with anyio.fail_after(WATCHDOG):
            await svc.cs.shutdown(timeout=0)
    last = json.loads(send.bodies[-1])
    assert last["type"] == "error" and last["error"] == "server_shutting_down"
    assert send.complete
    assert svc.log.states == [ERROR]
    assert svc.engine.streams[0].cancelled
    # New requests are refused while closing.
    late = Send()
    await svc.chat(Receive(chat_body()), late)
    assert late.status == 503


async def test_two_interleaved_requests_keep_their_own_state() -> None:
    """Per-request state lives in the request, not on the middleware or the ChatStream."""
    svc = Service(type="echo", time_per_token_sec=0.005)
    a_receive, a_send = Receive(chat_body("alpha beta gamma delta")), Send()
    b_receive, b_send = Receive(chat_body("one two three four five six")), Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, a_receive, a_send)
        tg.start_soon(svc.chat, b_receive, b_send)
        await a_send.wait_until(text_frames_at_least(2))
        a_receive.disconnect()
    assert b_send.body == b"one two three four five six"
    assert sorted(svc.log.states) == [WHILE, SUCCESS]
    assert (
        a_send.headers["x-chatstream-last-generated-message-id"]
        != b_send.headers["x-chatstream-last-generated-message-id"]
    )


async def test_shutdown_turns_away_queued_requests_with_503() -> None:
    svc = Service(concurrency=1, time_per_token_sec=0.02)
    streaming, queued = Send(), Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.chat, Receive(chat_body()), streaming)
        await streaming.wait_until(text_frames_at_least(1))
        tg.start_soon(svc.chat, Receive(chat_body()), queued)
        await svc.wait_waiting(1)
        with anyio.fail_after(WATCHDOG):
            await svc.cs.shutdown(timeout=0)
    assert queued.status == 503
    assert queued.json() == {"error": "server_shutting_down", "detail": "the server is shutting down"}
    assert sorted(svc.log.states) == [ERROR, ERROR]
    assert svc.cs.get_load()["processing"] == 0 and svc.cs.get_load()["waiting"] == 0
