"""Input defects found from outside ("every bad input a clear 4xx, no data lost"), one test or more each.

Each test was written first and failed on the code it describes; the sections are numbered by defect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import httpx
import pytest
from asgi_harness import Receive, Send, StateLog, chat_body, http_scope, not_found, read_whole_body
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from litestar import Litestar, post
from litestar import Request as LitestarRequest
from quart import Quart
from quart import request as quart_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatstream_asgi import (
    ChatStream,
    ChatStreamMiddleware,
    CompletionState,
    GenerationRequest,
    GenerationStream,
    MemorySessionStore,
    MockEngine,
    MockParams,
    Session,
    get_result,
)
from chatstream_asgi.server.middleware import route_path
from chatstream_asgi.sessions.redis_store import RedisSessionStore
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio

WATCHDOG = 10.0
SECRET = "test-secret"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test", timeout=WATCHDOG)


def chat_stream(**options: Any) -> ChatStream:
    options.setdefault("session_secret", SECRET)
    if "engine" not in options:
        options.setdefault("use_mock_response", True)
    return ChatStream(options.pop("engine", None), **options)


def rejected(cs: ChatStream, reason: str) -> float:
    return cs.metrics.registry.get_sample_value("chatstream_rejected_total", {"reason": reason}) or 0.0


# -- 1. body replay hands the body once per reader, then waits for the disconnect ------------------


class BodyReadingAuth:
    """Raw ASGI middleware that reads the whole body (an HMAC check, say), then calls the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append(await read_whole_body(receive))
        await self.app(scope, receive, send)


def starlette_echo() -> Any:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"body": (await request.body()).decode(), "json": await request.json()})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


def fastapi_echo() -> Any:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: FastAPIRequest) -> dict[str, Any]:
        return {"body": (await request.body()).decode(), "json": await request.json()}

    return app


def quart_echo() -> Any:
    app = Quart(__name__)

    @app.post("/echo")
    async def echo() -> dict[str, Any]:
        return {"body": (await quart_request.get_data()).decode(), "json": await quart_request.get_json()}

    return app


def litestar_echo() -> Any:
    @post("/echo", status_code=200)
    async def echo(request: LitestarRequest) -> dict[str, Any]:
        return {"body": (await request.body()).decode(), "json": await request.json()}

    return Litestar([echo])


FRAMEWORKS: dict[str, Callable[[], Any]] = {
    "starlette": starlette_echo,
    "fastapi": fastapi_echo,
    "quart": quart_echo,
    "litestar": litestar_echo,
}


def wrap_replay(framework: str, app: Any, *, auth: bool) -> tuple[Any, BodyReadingAuth | None]:
    """The framework's app behind a replaying middleware (Quart wraps ``asgi_app``, as the examples do)."""
    if framework == "quart":
        inner = app.asgi_app
        reader = BodyReadingAuth(inner) if auth else None
        app.asgi_app = ChatStreamMiddleware(reader or inner, replay_paths=["/echo"])
        return app, reader
    reader = BodyReadingAuth(app) if auth else None
    return ChatStreamMiddleware(reader or app, replay_paths=["/echo"]), reader


@pytest.mark.parametrize("auth", [False, True], ids=["alone", "after-a-body-reading-auth"])
@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
async def test_every_framework_reads_a_replayed_body_exactly_once(framework: str, auth: bool) -> None:
    payload = {"text": "ten bytes!"}
    raw = json.dumps(payload).encode()
    app, reader = wrap_replay(framework, FRAMEWORKS[framework](), auth=auth)
    async with client(app) as c:
        with anyio.fail_after(WATCHDOG):
            response = await c.post("/echo", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json() == {"body": raw.decode(), "json": payload}
    if reader is not None:
        assert reader.seen == [raw]


async def test_a_reader_that_keeps_reading_waits_for_the_disconnect() -> None:
    """Quart's way of reading, in raw ASGI: after ``more_body=False`` the next call blocks until the client leaves."""
    received: list[dict[str, Any]] = []

    async def looping_reader(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "http.disconnect":
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    upstream = Receive(b"0123456789")
    app = ChatStreamMiddleware(looping_reader, replay_paths=["/echo"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope("/echo", body=b"0123456789"), upstream, Send())
        with anyio.fail_after(WATCHDOG):
            while upstream.calls < 2:  # the body, then a read that waits on the server
                await anyio.sleep(0.001)
        upstream.disconnect()
    assert [m["type"] for m in received] == ["http.request", "http.disconnect"]
    assert received[0]["body"] == b"0123456789"


# -- 2. pathological JSON is a counted 400, never a 500 ------------------------------------------

DEEP = b'{"user_input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b'{"user_input": "x", "generation_params": {"top_k": ' + b"9" * 5000 + b"}}"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat_stream", DEEP),
        ("/chat_stream", HUGE_INT),
        ("/chat_stream", b'{"user_input": "x", "format": ["sse"]}'),
        ("/chat_stream", b'{"messages": [{"role": ["user"], "content": "x"}]}'),
        ("/chat_stream", b'{"user_input": "\\ud800"}'),
        ("/chat_stream", b'{"\\udfff": 1, "user_input": "x"}'),
        ("/chat_stream", b'{"user_input": "x", "generation_params": {"temperature": NaN}}'),
        ("/chat_stream", b'{"user_input": "x", "generation_params": {"top_p": 1e999}}'),
        ("/v1/chat/completions", DEEP),
        ("/v1/chat/completions", b'{"messages": [{"role": {"a": 1}, "content": "x"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
        ("/set_generation_params", HUGE_INT.replace(b'"user_input": "x", ', b"")),
        ("/set_generation_params", b'{"\\ud800\\n": 1}'),
        ("/set_feedback", b'{"message_id": "m", "feedback": ["like"]}'),
        ("/set_feedback", b'{"message_id": "\\ud800", "feedback": "like"}'),
        ("/clear_context", DEEP),
    ],
)
async def test_pathological_json_is_a_counted_400(path: str, body: bytes) -> None:
    cs = chat_stream()
    app = ChatStreamMiddleware(not_found, cs, max_body_size=1 << 20)
    async with client(app) as c:
        response = await c.post(path, content=body)
        after = await c.post("/chat_stream", json={"user_input": "still serving"})
    assert response.status_code == 400, response.text
    data = response.json()
    error = data["error"]["code"] if path.startswith("/v1/") else data["error"]
    assert error == "invalid_request"
    assert rejected(cs, "invalid_request") == 1
    assert after.status_code == 200


async def test_a_stored_history_never_holds_what_cannot_be_encoded() -> None:
    cs = chat_stream()
    async with client(create_app(cs)) as c:
        await c.post("/chat_stream", content=b'{"user_input": "a\\udc80b"}')
        prompt = await c.get("/get_prompt")
    assert prompt.status_code == 200 and prompt.json()["messages"] == []


# -- 3. a session token with a non-ASCII character starts a fresh session ------------------------


@pytest.mark.parametrize("where", ["header", "cookie"])
async def test_a_non_ascii_session_token_starts_a_fresh_session(where: str) -> None:
    token = "café.signature".encode().decode("latin-1")
    headers = {"x-session-id": token} if where == "header" else {"cookie": f"chatstream_session={token}"}
    raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    cs = chat_stream()
    async with client(create_app(cs)) as c:
        params = await c.get("/get_generation_params", headers=raw_headers)
        chat = await c.post("/chat_stream", json={"user_input": "hi"}, headers=raw_headers)
    assert params.status_code == 200 and chat.status_code == 200, (params.text, chat.text)
    assert params.headers["x-session-id"].isascii() and chat.headers["x-session-id"].isascii()


# -- 4. user text in a log line never starts a line of its own -----------------------------------


async def test_a_parameter_name_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    forged = "x\n[0123456789abcdef] completed: success (10 tokens)"
    cs = chat_stream()
    async with client(create_app(cs)) as c:
        with caplog.at_level(logging.INFO, logger="chatstream_asgi"):
            response = await c.post("/chat_stream", json={"user_input": "hi", "generation_params": {forged: 1}})
    assert response.status_code == 400
    lines = caplog.text.splitlines()
    assert not [line for line in lines if "completed: success" in line and "rejected" not in line]
    assert [line for line in lines if "rejected: invalid_request" in line and "\\n[0123456789abcdef]" in line]


# -- 5. nothing is stored for a client that said nothing; creation cannot evict conversations ------


async def test_anonymous_requests_store_nothing_and_cannot_evict_a_conversation() -> None:
    store = MemorySessionStore(max_sessions=20)
    cs = chat_stream(session_store=store)
    async with client(create_app(cs)) as owner:
        await owner.post("/chat_stream", json={"user_input": "remember me"})
        assert len(store) == 1
        for _ in range(30):  # a fresh client every time: no cookie kept
            async with client(create_app(cs)) as anonymous:
                await anonymous.post("/set_generation_params", json={})
                await anonymous.post("/clear_context")
                await anonymous.get("/get_prompt")
        assert len(store) == 1
        for _ in range(60):
            async with client(create_app(cs)) as anonymous:
                assert (await anonymous.post("/set_generation_params", json={"temperature": 0.1})).status_code == 200
        history = (await owner.get("/get_prompt")).json()["messages"]
    assert [m["content"] for m in history][:1] == ["remember me"]
    assert len(store) <= 20


# -- 6. a prompt the template cannot render is a JSON answer, never a bare 500 -------------------


class PickyTemplate(MockEngine):
    """A chat template like SmolLM2's: it rejects an empty conversation and a given word."""

    def render_prompt(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not messages:
            raise IndexError("list object has no element 0")
        if any("forbidden" in m["content"] for m in messages):
            raise ValueError("the template cannot render this")
        return super().render_prompt(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return len(self.render_prompt(messages).split())


async def test_get_prompt_under_a_template_that_refuses_an_empty_conversation() -> None:
    async with client(create_app(chat_stream(engine=PickyTemplate()))) as c:
        response = await c.get("/get_prompt")
        await c.post("/chat_stream", json={"user_input": "hi"})
        after = await c.get("/get_prompt")
    assert response.status_code == 200
    assert response.json() == {"prompt": "", "messages": []}
    assert after.status_code == 200 and "hi" in after.json()["prompt"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat_stream", {"user_input": "forbidden"}),
        ("/chat_stream", {"messages": [{"role": "user", "content": "forbidden"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "forbidden"}]}),
    ],
)
async def test_a_template_error_is_a_json_400(path: str, body: dict[str, Any]) -> None:
    cs = chat_stream(engine=PickyTemplate())
    async with client(create_app(cs)) as c:
        response = await c.post(path, json=body)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert "template" in json.dumps(response.json())
    assert rejected(cs, "invalid_request") == 1


# -- 7. root_path is matched on a path-segment boundary ------------------------------------------


def test_root_path_is_stripped_only_on_a_segment_boundary() -> None:
    assert route_path({"path": "/chat_stream", "root_path": "/chat"}) == "/chat_stream"
    assert route_path({"path": "/chat/chat_stream", "root_path": "/chat"}) == "/chat_stream"
    assert route_path({"path": "/chat", "root_path": "/chat"}) == "/"
    assert route_path({"path": "/chat/", "root_path": "/chat/"}) == "/"


async def test_a_mount_at_chat_still_serves_chat_stream() -> None:
    app = ChatStreamMiddleware(not_found, chat_stream())
    send = Send()
    scope = http_scope("/chat_stream", body=chat_body(), root_path="/chat")
    with anyio.fail_after(WATCHDOG):
        await app(scope, Receive(chat_body()), send)
    assert send.status == 200 and send.complete


# -- 8. an engine-side cancellation is an error, not a clean end ---------------------------------


class CutStream(GenerationStream):
    """Two tokens, then the engine ends the stream with ``cancelled`` (it is shutting down)."""

    def __init__(self, request: GenerationRequest) -> None:
        super().__init__(request.request_id)
        self._tokens = ["Hello", " there"]

    async def __anext__(self) -> str:
        await asyncio.sleep(0)
        if self._tokens:
            self.completion_tokens += 1
            return self._tokens.pop(0)
        self.finish_reason = "cancelled"
        raise StopAsyncIteration


class CuttingEngine(MockEngine):
    def generate(self, request: GenerationRequest) -> GenerationStream:
        return CutStream(request)


@pytest.mark.parametrize("fmt", ["text", "sse"])
async def test_an_engine_side_cancel_ends_with_an_error_frame(fmt: str) -> None:
    log = StateLog()
    cs = chat_stream(engine=CuttingEngine(), callback=log)
    async with client(create_app(cs)) as c:
        response = await c.post("/chat_stream", json={"user_input": "hi", "format": fmt})
    assert await log.wait() == ["unknown_error_occurred"]
    assert "Hello" in response.text
    assert ("<::ERROR::>" if fmt == "text" else "event: error") in response.text
    assert "event: done" not in response.text


# -- 9. token counts of a client that left mid-stream on the transformers engine ----------------


async def test_tokens_are_counted_for_a_client_that_left_mid_stream(tiny_engine: Any) -> None:
    log = StateLog()
    cs = chat_stream(engine=tiny_engine, callback=log, max_new_tokens=64)
    app = ChatStreamMiddleware(not_found, cs)
    body = chat_body("count me", generation_params={"max_new_tokens": 64, "temperature": 0})
    receive = Receive(body)

    def leave_after_text(message: dict[str, Any], send: Send) -> None:
        if send.text_frames >= 2:
            receive.disconnect()

    results = []

    def callback(request: Request, state: CompletionState) -> None:
        results.append(get_result(request))
        log(request, state)

    cs.callback = callback
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=body), receive, Send(on_message=leave_after_text))
    assert log.states == ["client_disconnected_while_streaming"]
    assert results[0].completion_tokens >= 2
    generated = cs.metrics.registry.get_sample_value("chatstream_generated_tokens_total")
    assert generated == results[0].completion_tokens


# -- 10. endpoint mode reads the body under the same size limit -----------------------------------


async def test_endpoint_mode_refuses_a_body_over_the_limit() -> None:
    cs = chat_stream(max_body_size=1000)

    async def endpoint(request: Request) -> Any:
        return await cs.handle_chat_stream_request(request)

    app = Starlette(routes=[Route("/chat", endpoint, methods=["POST"])])
    big = chat_body("x" * 5000)

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse early
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    async with client(app) as c:
        declared = await c.post("/chat", content=big)
        streamed = await c.post("/chat", content=chunks())
        small = await c.post("/chat", content=chat_body("fits"))
    for response in (declared, streamed):
        assert response.status_code == 413 and response.json()["error"] == "body_too_large"
    assert small.status_code == 200
    assert rejected(cs, "body_too_large") == 2


# -- 11. session read-modify-write is serialized ---------------------------------------------------


class SlowStore:
    """A store whose reads and writes take a network round trip (any user-written store)."""

    def __init__(self) -> None:
        self.inner = MemorySessionStore()

    async def load(self, session_id: str) -> Session | None:
        await anyio.sleep(0.01)
        return await self.inner.load(session_id)

    async def save(self, session: Session) -> None:
        await anyio.sleep(0.01)
        await self.inner.save(session)

    async def delete(self, session_id: str) -> None:
        await self.inner.delete(session_id)


async def concurrent_updates(cs: ChatStream) -> dict[str, Any]:
    """Two tabs of one session set two parameters at once, and like a reply while another streams."""
    async with client(create_app(cs)) as c:
        first = await c.post("/chat_stream", json={"user_input": "one"})
        message_id = first.headers["x-chatstream-last-generated-message-id"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: c.post("/set_generation_params", json={"temperature": 0.1}))
            tg.start_soon(lambda: c.post("/set_generation_params", json={"top_k": 3}))
            tg.start_soon(lambda: c.post("/set_feedback", json={"message_id": message_id, "feedback": "like"}))
            tg.start_soon(lambda: c.post("/chat_stream", json={"user_input": "two"}))
        return {
            "params": (await c.get("/get_generation_params")).json(),
            "messages": (await c.get("/get_prompt")).json()["messages"],
        }


def check_nothing_lost(state: dict[str, Any]) -> None:
    assert (state["params"]["temperature"], state["params"]["top_k"]) == (0.1, 3)
    assert [m["content"] for m in state["messages"] if m["role"] == "user"] == ["one", "two"]
    assert state["messages"][1].get("feedback") == "like"


async def test_concurrent_updates_of_one_session_lose_nothing_on_any_store() -> None:
    check_nothing_lost(await concurrent_updates(chat_stream(session_store=SlowStore(), mock_params={"type": "echo"})))


# -- 12. stored history is capped, carries token counts, and is fitted off the event loop ---------


class CountingEngine(MockEngine):
    """Records every ``count_tokens`` call: how many messages, on which thread."""

    def __init__(self) -> None:
        super().__init__(MockParams(type="echo"))
        self.counted: list[tuple[int, str]] = []

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        self.counted.append((len(messages), threading.current_thread().name))
        return super().count_tokens(messages)


async def test_a_long_history_is_capped_counted_once_and_fitted_off_the_loop() -> None:
    engine = CountingEngine()
    store = MemorySessionStore()
    cs = chat_stream(engine=engine, session_store=store, max_history_messages=40)
    words = " ".join(["word"] * 60)
    async with client(create_app(cs)) as c:
        for i in range(30):
            reply = await c.post("/chat_stream", json={"user_input": f"{i} {words}"})
        token = reply.headers["x-session-id"]
        session = await store.load(token.partition(".")[0])
        engine.counted.clear()
        await c.post("/chat_stream", json={"user_input": "and now?"})
    assert session is not None and len(session.messages) == 40
    assert all(isinstance(m.get("tokens"), int) for m in session.messages)
    loop_thread = threading.main_thread().name
    assert engine.counted and all(thread != loop_thread for _, thread in engine.counted)
    assert len(engine.counted) <= 3  # estimated from the stored counts, checked exactly, not bisected


async def set_in_a_thread(event: threading.Event) -> None:
    """Wait (bounded) for ``event``, which a worker thread sets, without blocking the loop."""
    assert await anyio.to_thread.run_sync(event.wait, WATCHDOG)


class SlowTokenizer(MockEngine):
    """A long prompt's ``prepare`` (its tokenization) blocks until released, recording on which thread."""

    def __init__(self) -> None:
        super().__init__(MockParams(type="long", time_per_token_sec=0.005))
        self.release = threading.Event()
        self.started = threading.Event()
        self.threads: list[tuple[int, str]] = []
        self.generated: list[str] = []

    def generate(self, request: GenerationRequest) -> GenerationStream:
        self.generated.append(request.request_id)
        return super().generate(request)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        chars = len(request.prompt or "")
        self.threads.append((chars, threading.current_thread().name))
        if chars > 4096:
            self.started.set()
            self.release.wait(WATCHDOG)
        return request


async def test_other_streams_flow_while_a_long_prompt_is_tokenized() -> None:
    """Tokenizing a long prompt (``Engine.prepare``) runs in a worker thread: a running stream keeps
    getting text meanwhile, where tokenizing it in ``generate`` on the loop held every stream."""
    engine = SlowTokenizer()
    app = ChatStreamMiddleware(not_found, chat_stream(engine=engine))
    short, long = Send(), Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope(body=chat_body("hi")), Receive(chat_body("hi")), short)
        await short.wait_until(lambda s: len(s.bodies) >= 2, WATCHDOG)
        body = chat_body("word " * 2000)
        tg.start_soon(app, http_scope(body=body), Receive(body), long)
        await set_in_a_thread(engine.started)
        seen = len(short.bodies)
        await short.wait_until(lambda s: len(s.bodies) >= seen + 3, WATCHDOG)  # while the long one tokenizes
        engine.release.set()
        await long.wait_until(lambda s: any(not m.get("more_body", True) for m in s.messages[1:]), WATCHDOG)
        tg.cancel_scope.cancel()
    loop = threading.current_thread().name
    assert [thread != loop for _, thread in engine.threads] == [False, True]  # the short one on the loop
    assert long.status == 200


async def test_a_client_gone_while_its_prompt_is_tokenized_starts_no_generation() -> None:
    """The worker thread is waited for, not abandoned, when the client leaves meanwhile: the reply ends
    ``client_disconnected_before_streaming`` with its slot freed, and nothing is handed to the engine."""
    engine, log = SlowTokenizer(), StateLog()
    cs = chat_stream(engine=engine, callback=log)
    body = chat_body("word " * 2000)
    receive = Receive(body)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ChatStreamMiddleware(not_found, cs), http_scope(body=body), receive, Send())
        await set_in_a_thread(engine.started)
        receive.disconnect()
        with anyio.fail_after(WATCHDOG):
            while not all(reply.disconnected for reply in cs.replies._open):
                await anyio.sleep(0.001)
        engine.release.set()
        states = await log.wait(1, WATCHDOG)
    assert states == ["client_disconnected_before_streaming"]
    assert cs.admission.active == 0 and engine.generated == []


class GatedFitting(MockEngine):
    """Counting a long conversation (fitting it, before admission) blocks while ``gate`` is shut;
    ``prepared_long`` is set once a long prompt was prepared (tokenized, once admitted)."""

    def __init__(self) -> None:
        super().__init__(MockParams(type="round", time_per_token_sec=0.001))
        self.gate, self.counting = threading.Event(), threading.Event()
        self.gate.set()
        self.prepared_long = threading.Event()

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        if sum(len(m["content"]) for m in messages) > 4096 and not self.gate.is_set():
            self.counting.set()
            self.gate.wait(WATCHDOG)
        return super().count_tokens(messages)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        if len(request.prompt or "") > 4096:
            self.prepared_long.set()
        return request


async def test_an_admitted_long_prompt_is_not_tokenized_behind_the_fitting_of_queued_ones() -> None:
    """An admitted request holds a slot: its prompt's tokenization does not queue behind the fitting of a
    request that has none yet (one worker thread for both held the slot idle meanwhile)."""
    engine, log = GatedFitting(), StateLog()
    cs = chat_stream(engine=engine, callback=log, num_of_concurrent_executions=1)
    app = ChatStreamMiddleware(not_found, cs)
    short, first, second = chat_body("hi"), chat_body("first " * 1000), chat_body("second " * 1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope(body=short), Receive(short), Send())  # holds the one slot a while
        with anyio.fail_after(WATCHDOG):
            while cs.admission.active < 1:
                await anyio.sleep(0.001)
            tg.start_soon(app, http_scope(body=first), Receive(first), Send())  # fitted, then queued
            while cs.admission.waiting < 1:
                await anyio.sleep(0.001)
            engine.gate.clear()
            tg.start_soon(app, http_scope(body=second), Receive(second), Send())  # its fitting blocks
        await set_in_a_thread(engine.counting)
        await set_in_a_thread(engine.prepared_long)  # the first one's, once admitted, while that blocks
        engine.gate.set()
        states = await log.wait(3, WATCHDOG)
    assert states == ["success"] * 3


# -- 13. every callback gets the request's ChatResult ---------------------------------------------


async def test_a_client_that_left_while_sending_its_body_has_a_result() -> None:
    results: list[Any] = []

    def callback(request: Request, state: CompletionState) -> None:
        result = request.state.chatstream  # as README shows
        results.append((state, result.state, result.reply))

    app = ChatStreamMiddleware(not_found, chat_stream(callback=callback))
    receive = Receive(messages=[{"type": "http.request", "body": b'{"user_in', "more_body": True}])
    receive.disconnect()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=b"x" * 20), receive, Send())
    assert results == [(CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING,) * 2 + ("",)]


# -- 14. smaller: Retry-After, OpenAI-shaped 405/413, nosniff, admin endpoints, keep-alive ----------


async def test_every_429_has_retry_after_even_on_a_fresh_server() -> None:
    cs = chat_stream(num_of_concurrent_executions=1, max_queue_size=0, mock_params={"initial_wait_sec": 1.0})
    app = ChatStreamMiddleware(not_found, cs)
    first_receive = Receive(chat_body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope(body=chat_body()), first_receive, Send())
        with anyio.fail_after(WATCHDOG):
            while cs.admission.active < 1:
                await anyio.sleep(0.001)
        responses = []
        openai_body = b'{"messages": [{"role": "user", "content": "x"}]}'
        for path, body in (("/chat_stream", chat_body()), ("/v1/chat/completions", openai_body)):
            send = Send()
            await app(http_scope(path, body=body), Receive(body), send)
            responses.append(send)
        first_receive.disconnect()
    for send in responses:
        assert send.status == 429 and int(send.headers["retry-after"]) >= 1


async def test_openai_paths_answer_405_and_413_in_openai_shape() -> None:
    app = ChatStreamMiddleware(not_found, chat_stream(), max_body_size=100)
    async with client(app) as c:
        wrong_method = await c.get("/v1/chat/completions")
        too_large = await c.post("/v1/chat/completions", content=b"x" * 200)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "body_too_large"


async def test_text_replies_are_not_sniffed() -> None:
    async with client(create_app(chat_stream())) as c:
        reply = await c.post("/chat_stream", json={"user_input": "<script>alert(1)</script>"})
        error = await c.post("/chat_stream", content=b"{")
        metrics = await c.get("/metrics")
    for response in (reply, error, metrics):
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_admin_endpoints_can_be_protected_or_turned_off() -> None:
    cs = chat_stream()
    protected = ChatStreamMiddleware(not_found, cs, admin_token="sesame")
    off = ChatStreamMiddleware(not_found, cs, admin_endpoints=False)
    async with client(protected) as c, client(off) as o:
        for path in ("/get_resource_usage", "/get_prompt"):
            assert (await c.get(path)).status_code == 401
            assert (await c.get(path, headers={"authorization": "Bearer wrong"})).status_code == 401
            assert (await c.get(path, headers={"authorization": "Bearer sesame"})).status_code == 200
            assert (await o.get(path)).status_code == 404
        assert (await c.get("/get_load")).status_code == 200


def test_the_cli_has_the_admin_switches() -> None:
    from chatstream_asgi.cli import build_parser

    args = build_parser().parse_args(["serve", "--admin-token", "t", "--no-admin-endpoints"])
    assert args.admin_token == "t" and args.admin_endpoints is False


async def test_a_long_queue_wait_sends_sse_keep_alives() -> None:
    cs = chat_stream(
        num_of_concurrent_executions=1,
        max_queue_size=1,
        keepalive_interval=0.05,
        mock_params={"type": "long", "time_per_token_sec": 0.01},
    )
    app = ChatStreamMiddleware(not_found, cs)
    busy_receive = Receive(chat_body())
    queued_send = Send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope(body=chat_body()), busy_receive, Send())
        with anyio.fail_after(WATCHDOG):
            while cs.admission.active < 1:
                await anyio.sleep(0.001)
        queued_body = chat_body(format="sse")
        queued_receive = Receive(queued_body)
        tg.start_soon(app, http_scope(body=queued_body), queued_receive, queued_send)
        await queued_send.wait_until(lambda s: s.body.count(b"event: queue") >= 3)
        busy_receive.disconnect()
        queued_receive.disconnect()


async def test_concurrent_updates_of_one_session_lose_nothing_on_redis(redis_url: str) -> None:
    store = RedisSessionStore.from_url(redis_url, prefix="chatstream:race:")
    try:
        check_nothing_lost(await concurrent_updates(chat_stream(session_store=store, mock_params={"type": "echo"})))
    finally:
        await store.close()


# -- 6 (all paths). a failure inside an extra endpoint is a JSON answer -----------------------------


class UnreachableStore(MemorySessionStore):
    async def load(self, session_id: str) -> Session | None:
        raise ConnectionError("store unreachable")


async def test_api_endpoints_answer_json_when_the_store_or_the_handler_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_usage() -> dict[str, Any]:
        raise RuntimeError("no /proc here")

    monkeypatch.setattr("chatstream_asgi.server.chat_api.resource_usage", broken_usage)
    async with client(create_app(chat_stream(session_store=UnreachableStore()))) as c:
        prompt = await c.get("/get_prompt")
        params = await c.post("/set_generation_params", json={"temperature": 0.2})
        usage = await c.get("/get_resource_usage")
        load = await c.get("/get_load")
    for response in (prompt, params):
        assert response.status_code == 503 and response.json()["error"] == "session_store_unavailable"
    assert usage.status_code == 500 and usage.json()["error"] == "internal_error"
    assert load.status_code == 200


@pytest.mark.smollm2
def test_get_prompt_on_the_default_server_with_smollm2(smollm2_engine: Any) -> None:
    """The case as found: ``serve`` with SmolLM2 and no system prompt, a fresh client asks for its prompt."""
    cs = ChatStream(smollm2_engine, session_secret=SECRET)

    async def main() -> list[httpx.Response]:
        async with client(create_app(cs)) as c:
            empty = await c.get("/get_prompt")
            await c.post("/chat_stream", json={"user_input": "Hi", "generation_params": {"max_new_tokens": 4}})
            return [empty, await c.get("/get_prompt")]

    empty, after = anyio.run(main)
    assert empty.status_code == 200 and empty.json()["messages"] == []
    assert after.status_code == 200 and "Hi" in after.json()["prompt"]
