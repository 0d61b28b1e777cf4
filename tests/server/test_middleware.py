"""ChatStreamMiddleware: body replay for endpoints and auth below it, size limits, pass-through.

Happy paths go through httpx's ASGITransport; what depends on message order (413 before the app
runs, chunked bodies, unknown send messages, interleaved requests) is driven over raw ASGI.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from asgi_harness import Receive, Send, StateLog, chat_body, http_scope, not_found, read_whole_body
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware, MockEngine, MockParams

pytestmark = pytest.mark.anyio

SECRET = b"test-secret"
WATCHDOG = 5.0


def echo_stream(**kwargs: Any) -> ChatStream:
    return ChatStream(MockEngine(MockParams(type="echo")), **kwargs)


def sign(body: bytes) -> str:
    return hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def endpoint_app(cs: ChatStream, log: StateLog, *, explicit: bool = False) -> Starlette:
    """A Starlette route that reads the body twice before handing the request to ChatStream."""

    async def chat(request: Request) -> Response:
        raw = await request.body()
        again = await request.body()
        data = await request.json()
        assert raw == again and data["user_input"]
        body = data if explicit else None
        return await cs.handle_chat_stream_request(request, body, callback=log)

    return Starlette(routes=[Route("/chat", chat, methods=["POST"])])


async def post(app: Any, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with anyio.fail_after(WATCHDOG):
            return await client.post(path, content=content, headers=headers or {})


# -- body replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit", [False, True], ids=["replayed", "request_body"])
@pytest.mark.parametrize("with_middleware", [True, False], ids=["middleware", "no-middleware"])
async def test_endpoint_reads_the_body_then_streams(explicit: bool, with_middleware: bool) -> None:
    cs, log = echo_stream(), StateLog()
    app: Any = endpoint_app(cs, log, explicit=explicit)
    if with_middleware:
        app = ChatStreamMiddleware(app, replay_paths=["/chat"])
    response = await post(app, "/chat", chat_body("read me twice"))
    assert response.status_code == 200
    assert response.text == "read me twice"
    assert response.headers["x-chatstream-last-generated-message-id"]
    assert log.states == ["success"]
    assert log.replies == ["read me twice"]


class RawHMACAuth:
    """A raw ASGI middleware that reads the whole body and checks its HMAC before calling the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await read_whole_body(receive)
        signature = dict(scope["headers"]).get(b"x-signature", b"").decode()
        if not hmac.compare_digest(signature, sign(body)):
            response = JSONResponse({"error": "bad_signature"}, status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class StarletteHMACAuth(BaseHTTPMiddleware):
    """The same check as a Starlette ``BaseHTTPMiddleware``."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        body = await request.body()
        if not hmac.compare_digest(request.headers.get("x-signature", ""), sign(body)):
            return JSONResponse({"error": "bad_signature"}, status_code=401)
        return await call_next(request)


AUTHS: list[Callable[[Any], Any]] = [RawHMACAuth, lambda app: StarletteHMACAuth(app)]


@pytest.mark.parametrize("auth", AUTHS, ids=["raw-asgi", "base-http-middleware"])
@pytest.mark.parametrize("mode", ["endpoint", "middleware"])
async def test_body_signature_auth_under_the_middleware(auth: Callable[[Any], Any], mode: str) -> None:
    """Auth reads and verifies the body, then the chat reads it again (replayed)."""
    cs, log = echo_stream(callback=None), StateLog()
    if mode == "endpoint":
        inner: Any = endpoint_app(cs, log)
        path = "/chat"
    else:  # an inner ChatStreamMiddleware serves the path after the auth
        inner = ChatStreamMiddleware(not_found, cs, paths=["/chat"], callback=log)
        path = "/chat"
    app = ChatStreamMiddleware(auth(inner), replay_paths=[path])
    body = chat_body("signed words")
    ok = await post(app, path, body, {"x-signature": sign(body)})
    assert ok.status_code == 200 and ok.text == "signed words"
    bad = await post(app, path, body, {"x-signature": "0" * 64})
    assert bad.status_code == 401
    assert log.states == ["success"]  # the rejected request never reached the chat
    assert cs.get_load()["processing"] == 0


async def test_interleaved_replay_requests_keep_their_own_bodies() -> None:
    """Per-request state is not on the middleware: two requests wait inside the app at once."""
    both_inside = anyio.Event()
    inside = 0

    async def read(receive: Any) -> Any:  # a second reader (a new Request, say) of the same request
        return await receive()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal inside
        first = await receive()
        inside += 1
        if inside == 2:
            both_inside.set()
        await both_inside.wait()
        second = await read(receive)
        assert first["body"] == second["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": first["body"]})

    mw = ChatStreamMiddleware(app, replay_paths=["/echo"])
    sends = [Send(), Send()]
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as tg:
            for body, send in zip([b"first body", b"second body"], sends, strict=True):
                tg.start_soon(mw, http_scope("/echo", body=body), Receive(body), send)
    assert [s.body for s in sends] == [b"first body", b"second body"]


async def test_unknown_send_messages_pass_through_on_replay_paths() -> None:
    sent = [
        {"type": "http.response.start", "status": 200, "headers": [], "trailers": True},
        {"type": "http.response.debug", "info": {"template": "x"}},
        {"type": "http.response.body", "body": b"x", "more_body": True},
        {"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")], "more_trailers": False},
        {"type": "http.response.pathsend", "path": "/dev/null"},
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        for message in sent:
            await send(message)

    send = Send()
    with anyio.fail_after(WATCHDOG):
        await ChatStreamMiddleware(app, replay_paths=["/x"])(http_scope("/x", body=b"b"), Receive(b"b"), send)
    start, *rest = send.messages
    assert rest == sent[1:]
    assert {**start, "headers": []} == sent[0] and [name for name, _ in start["headers"]] == [b"x-request-id"]


async def test_replay_path_passes_a_disconnect_through_after_the_body() -> None:
    """A handler waiting for ``http.disconnect`` after reading the body gets it (no busy loop)."""
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (message := await receive())["type"] != "http.disconnect":
            got.append(message["type"])
        got.append("http.disconnect")

    receive = Receive(b"body", sticky=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ChatStreamMiddleware(app, replay_paths=["/x"]), http_scope("/x", body=b"body"), receive, Send())
        await anyio.wait_all_tasks_blocked()
        receive.disconnect()
    assert got == ["http.disconnect"]


# -- size limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat_stream", "/replayed"])
async def test_declared_content_length_too_large_is_413_before_the_app(path: str) -> None:
    cs, log = echo_stream(), StateLog()
    app = ChatStreamMiddleware(not_found, cs, replay_paths=["/replayed"], max_body_size=100, callback=log)
    receive, send = Receive(b"x" * 200), Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(path, body=b"x" * 200), receive, send)
    assert send.status == 413
    assert send.json()["error"] == "body_too_large"
    assert receive.calls == 0
    assert log.states == []
    assert 'chatstream_rejected_total{reason="body_too_large"} 1.0' in cs.metrics.render().decode()


async def test_chunked_body_growing_too_large_is_413() -> None:
    cs, log = echo_stream(), StateLog()
    app = ChatStreamMiddleware(not_found, cs, max_body_size=100, callback=log)
    receive, send = Receive([b"x" * 60, b"x" * 60, b"x" * 60]), Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=b"", content_length=False), receive, send)
    assert send.status == 413
    assert receive.calls == 2
    assert log.states == []
    assert 'chatstream_rejected_total{reason="body_too_large"} 1.0' in cs.metrics.render().decode()
    assert cs.get_load()["processing"] == 0


async def test_chunked_body_within_the_limit_is_served() -> None:
    body = chat_body("in pieces")
    cs, log = echo_stream(), StateLog()
    receive, send = Receive([body[:5], body[5:12], body[12:], b""]), Send()
    with anyio.fail_after(WATCHDOG):
        await ChatStreamMiddleware(not_found, cs, callback=log)(http_scope(body=None), receive, send)
    assert send.body == b"in pieces"
    assert log.states == ["success"]


# -- Expect: 100-continue and where auth goes --------------------------------------------------------


def header_auth(app: Any) -> Any:
    """Header auth: rejects without reading the body (so no ``100 Continue`` is ever sent)."""

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != b"Bearer ok":
            await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
            return
        await app(scope, receive, send)

    return auth


async def test_header_auth_outside_rejects_before_the_body_is_read_or_queued() -> None:
    """Outside the middleware, a 401 never calls ``receive`` (servers send 100 Continue on it)."""
    cs, log = echo_stream(), StateLog()
    app = header_auth(ChatStreamMiddleware(not_found, cs, callback=log))
    headers = [(b"expect", b"100-continue")]
    receive, send = Receive(chat_body()), Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=chat_body(), headers=headers), receive, send)
    assert send.status == 401
    assert receive.calls == 0
    assert log.states == [] and cs.get_load()["processing"] == 0
    # Authorised: served.
    ok_receive, ok_send = Receive(chat_body("fine")), Send()
    await app(
        http_scope(body=chat_body("fine"), headers=[*headers, (b"authorization", b"Bearer ok")]), ok_receive, ok_send
    )
    assert ok_send.body == b"fine"


async def test_header_auth_inside_a_replay_path_reads_the_body_first() -> None:
    """Inside the middleware the body is buffered before auth runs: the upload is requested."""
    app = ChatStreamMiddleware(header_auth(not_found), replay_paths=["/x"])
    receive, send = Receive(b"payload"), Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope("/x", body=b"payload", headers=[(b"expect", b"100-continue")]), receive, send)
    assert send.status == 401
    assert receive.calls == 1


# -- routing and pass-through ------------------------------------------------------------------------


async def test_other_paths_pass_through_untouched() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(receive)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    receive = Receive(b"not buffered")
    send = Send()
    await ChatStreamMiddleware(app, echo_stream())(http_scope("/elsewhere", body=b"not buffered"), receive, send)
    assert seen == [receive]  # the server's own receive, not a wrapper
    assert receive.calls == 0
    assert send.status == 204


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_websocket_and_lifespan_reach_the_app(scope_type: str) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await ChatStreamMiddleware(app)({"type": scope_type, "path": "/chat_stream"}, Receive(), Send())
    assert seen == [scope_type]


async def test_lifespan_starts_and_stops_the_chat_stream() -> None:
    calls: list[str] = []

    class Engine(MockEngine):
        async def start(self) -> None:
            calls.append("start")

        async def shutdown(self) -> None:
            calls.append("shutdown")

    cs = ChatStream(Engine())
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await ChatStreamMiddleware(not_found, cs)({"type": "lifespan"}, Receive(messages=messages), send)
    assert calls == ["start", "shutdown"]
    assert [m["type"] for m in send.messages] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


class GatedStart(MockEngine):
    """An echo engine whose ``start`` waits for ``gate`` (a model loading) and fails while ``failures`` last;
    ``generate`` on an engine that has not started is an error the test sees."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(MockParams(type="echo", time_per_token_sec=0.0))
        self.gate = anyio.Event()
        self.starts = 0
        self.started = False
        self.failures = failures
        self.unstarted_generates = 0

    async def start(self) -> None:
        self.starts += 1
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the model did not load")
        self.started = True

    def generate(self, request: Any) -> Any:
        self.unstarted_generates += not self.started
        return super().generate(request)


async def test_first_requests_without_a_lifespan_wait_for_one_engine_start() -> None:
    engine = GatedStart()
    cs = ChatStream(engine)
    app = ChatStreamMiddleware(not_found, cs)
    sends = [Send(), Send()]
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as tg:
            for index, send in enumerate(sends):
                body = chat_body(f"hello {index}")
                tg.start_soon(app, http_scope(body=body), Receive(body), send)
            while cs.admission.active < 2 or engine.starts < 1:  # both admitted while the engine loads
                await anyio.sleep(0)
            for _ in range(10):
                await anyio.sleep(0)  # both reach the start
            engine.gate.set()
    assert [send.status for send in sends] == [200, 200]
    assert [send.body for send in sends] == [b"hello 0", b"hello 1"]
    assert engine.starts == 1
    assert engine.unstarted_generates == 0


async def test_a_failed_start_fails_its_requests_and_the_next_request_starts_again() -> None:
    engine = GatedStart(failures=1)
    engine.gate.set()
    log = StateLog()
    app = ChatStreamMiddleware(not_found, ChatStream(engine, callback=log))
    first, second = Send(), Send()
    with anyio.fail_after(WATCHDOG):
        await app(http_scope(body=chat_body("one")), Receive(chat_body("one")), first)
        await app(http_scope(body=chat_body("two")), Receive(chat_body("two")), second)
    assert first.status == 500
    assert second.status == 200 and second.body == b"two"
    assert engine.starts == 2
    assert log.states == ["unknown_error_occurred", "success"]


async def test_a_shutdown_while_the_first_request_starts_the_engine_stops_it_after_the_start() -> None:
    """The shared start goes on when a shutdown comes (no lifespan: a signal handler calls it): the engine
    must be shut down after its start ended, not under it (a start that ends then leaves it running)."""
    order: list[str] = []

    class Recording(GatedStart):
        async def start(self) -> None:
            await super().start()
            order.append("started")

        async def shutdown(self) -> None:
            order.append("shutdown")

    engine = Recording()
    cs = ChatStream(engine)
    app = ChatStreamMiddleware(not_found, cs)
    body = chat_body("hello")
    send = Send()
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, http_scope(body=body), Receive(body), send)
            while not engine.starts:
                await anyio.sleep(0)
            tg.start_soon(cs.shutdown)
            for _ in range(20):  # the shutdown's drain and engine stop get every chance to run first
                await anyio.sleep(0)
            engine.gate.set()
    assert order == ["started", "shutdown"]


async def test_a_start_that_never_ends_does_not_hold_the_shutdown() -> None:
    engine = GatedStart()  # its gate is never opened: a model load that hangs
    cs = ChatStream(engine)
    app = ChatStreamMiddleware(not_found, cs)
    body = chat_body("hello")
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, http_scope(body=body), Receive(body), Send())
            while not engine.starts:
                await anyio.sleep(0)
            await cs.shutdown(timeout=0.05)
            tg.cancel_scope.cancel()  # the request still waits for the start; its client gives up
        assert cs.closing and not engine.started
        engine.gate.set()  # let the start end, so that no task outlives the test
        await cs.start()


async def test_wrong_method_is_405() -> None:
    send = Send()
    await ChatStreamMiddleware(not_found, echo_stream())(http_scope(method="GET"), Receive(), send)
    assert send.status == 405
    assert send.headers["allow"] == "POST"


@pytest.mark.parametrize("path", ["/api/chat_stream", "/chat_stream"], ids=["uvicorn-style", "hypercorn-style"])
async def test_root_path_is_stripped_when_the_server_included_it(path: str) -> None:
    send = Send()
    scope = http_scope(path, body=chat_body("mounted"), root_path="/api")
    await ChatStreamMiddleware(not_found, echo_stream())(scope, Receive(chat_body("mounted")), send)
    assert send.body == b"mounted"


async def test_get_load_and_metrics() -> None:
    cs = echo_stream(num_of_concurrent_executions=3, max_queue_size=7)
    transport = httpx.ASGITransport(app=ChatStreamMiddleware(not_found, cs))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        load = (await client.get("/get_load")).json()
        assert load | {"estimated_wait_seconds": 0} == {
            "processing": 0,
            "waiting": 0,
            "max_processing": 3,
            "max_waiting": 7,
            "estimated_wait_seconds": 0,
            "generated_tokens": 0,
        }
        await client.post("/chat_stream", content=chat_body("count me"))
        metrics = (await client.get("/metrics")).text
        assert (await client.get("/get_load")).json()["generated_tokens"] == 2  # "count me", echoed
    assert 'chatstream_completions_total{state="success"} 1.0' in metrics
    assert "chatstream_time_to_first_token_seconds_count 1.0" in metrics
