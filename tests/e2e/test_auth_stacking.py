"""Auth middleware stacked with ``ChatStreamMiddleware``, served by a real uvicorn.

Where auth goes:

- **Header auth (a token, a session cookie) goes outside** ``ChatStreamMiddleware``. The middleware
  serves its chat paths itself, so nothing placed inside it runs for them; and it buffers the body,
  which on a server that honours ``Expect: 100-continue`` (uvicorn sends ``100 Continue`` on the
  first ``receive()``) tells an unauthenticated client to upload its body. Outside, a rejected
  request never reaches admission or the engine and the client never uploads.
- **Auth that must read the body (an HMAC signature) goes inside** a replaying
  ``ChatStreamMiddleware(replay_paths=[...])``: it reads the body, and the endpoint (or an inner
  ``ChatStreamMiddleware`` serving the path) reads it again. Without the replay the body would be
  gone after the auth read it.
- Starlette's ``AuthenticationMiddleware`` goes outside too; the user it sets (``scope["user"]``)
  is what the completion callback sees as ``request.user``.
- Starlette's ``BaseHTTPMiddleware`` breaks ``Request.is_disconnected`` for what runs under it; the
  send loop watches ``receive`` itself, so a client leaving mid-stream is still seen, over or under it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from live_server import uvicorn_in_thread
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatstream_asgi import (
    ChatStream,
    ChatStreamMiddleware,
    CompletionState,
    GenerationRequest,
    GenerationStream,
    MockEngine,
    MockParams,
    get_result,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
KEY = b"hmac-key"
WATCHDOG = 10.0
REPLY = "Once upon a time, a small server streamed"  # the long mock reply, 8 tokens


class CountingEngine(MockEngine):
    """A mock engine that counts the generations it was asked for."""

    def __init__(self, per_token: float = 0.005) -> None:
        super().__init__(MockParams("long", time_per_token_sec=per_token))
        self.calls = 0

    def generate(self, request: GenerationRequest) -> GenerationStream:
        self.calls += 1
        return super().generate(request)


class Completions:
    """A completion callback that records what it was told, with the user the request carried."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str]] = []  # (state, user, reply)

    def __call__(self, request: Request, state: CompletionState) -> None:
        user = request.scope.get("user")
        result = get_result(request)
        self.seen.append((state.value, user.display_name if user else None, result.reply if result else ""))

    def wait(self, count: int = 1) -> list[tuple[str, str | None, str]]:
        deadline = time.monotonic() + WATCHDOG
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"callback called {len(self.seen)} times, expected {count}"
            time.sleep(0.02)
        return self.seen


def make_chat_stream(engine: CountingEngine, callback: Completions) -> ChatStream:
    return ChatStream(engine, num_of_concurrent_executions=1, max_queue_size=0, max_new_tokens=8, callback=callback)


async def send_401(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)


class TokenAuth:
    """Raw ASGI header auth: ``Authorization: Bearer <token>`` or 401, without touching the body."""

    def __init__(self, app: ASGIApp, paths: frozenset[str] = frozenset({"/chat_stream"})) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and scope["path"] in self.paths
        if protected and dict(scope["headers"]).get(b"authorization") != f"Bearer {TOKEN}".encode():
            await send_401(scope, receive, send)
            return
        await self.app(scope, receive, send)


class TokenAuthHTTP(BaseHTTPMiddleware):
    """The same check as :class:`TokenAuth`, written as a ``BaseHTTPMiddleware``."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path == "/chat_stream" and request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return await call_next(request)


def sign(body: bytes) -> str:
    return hmac.new(KEY, body, hashlib.sha256).hexdigest()


class HMACAuth:
    """Body-signature auth: reads the whole body, checks ``X-Signature``, then calls the app.

    It passes the *same* ``receive`` on; only a replaying ``receive`` lets the app read the body again.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/chat_stream":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        signature = dict(scope["headers"]).get(b"x-signature", b"").decode()
        if not hmac.compare_digest(signature, sign(b"".join(chunks))):
            await send_401(scope, receive, send)
            return
        await self.app(scope, receive, send)


class TokenBackend(AuthenticationBackend):
    """``Authorization: Bearer <token>`` → user ``alice``; anything else is an authentication error."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        if conn.headers.get("authorization") != f"Bearer {TOKEN}":
            raise AuthenticationError("a valid bearer token is required")
        return AuthCredentials(["authenticated"]), SimpleUser("alice")


def auth_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    return JSONResponse({"error": "unauthorized", "detail": str(exc)}, status_code=401)


def endpoint_app(chat_stream: ChatStream) -> Starlette:
    """A Starlette app whose ``POST /chat_stream`` endpoint calls ``handle_chat_stream_request``."""

    async def chat(request: Request) -> Response:
        return await chat_stream.handle_chat_stream_request(request)

    return Starlette(routes=[Route("/chat_stream", chat, methods=["POST"])])


not_found = Starlette()  # an app with no routes: 404 for everything ChatStreamMiddleware does not serve


def counters(client: httpx.Client, headers: dict[str, str] | None = None) -> list[str]:
    """The completion, rejection and token counters from ``/metrics``."""
    text = client.get("/metrics", headers=headers).text
    names = ("chatstream_completions_total", "chatstream_rejected_total", "chatstream_generated_tokens_total")
    return [line for line in text.splitlines() if line.startswith(names)]


def idle_load(client: httpx.Client, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``/get_load`` once nothing is processing or waiting (fails after the watchdog)."""
    deadline = time.monotonic() + WATCHDOG
    while True:
        load = client.get("/get_load", headers=headers).json()
        if load["processing"] == 0 and load["waiting"] == 0:
            return load
        assert time.monotonic() < deadline, f"a slot is still in use: {load}"
        time.sleep(0.02)


def completions(client: httpx.Client, state: str, headers: dict[str, str] | None = None) -> float:
    for line in counters(client, headers):
        if line.startswith(f'chatstream_completions_total{{state="{state}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no completions counter for {state}")


# -- (a) header auth in front of the chat path -------------------------------------------------


@pytest.mark.parametrize("auth", [TokenAuth, TokenAuthHTTP], ids=["raw-asgi", "base-http-middleware"])
def test_header_auth_outside_rejects_before_admission(auth: Callable[[ASGIApp], ASGIApp]) -> None:
    """A 401 from auth outside the middleware never reaches the queue or the engine."""
    engine, callback = CountingEngine(), Completions()
    chat_stream = make_chat_stream(engine, callback)
    with (
        uvicorn_in_thread(auth(ChatStreamMiddleware(not_found, chat_stream))) as url,
        httpx.Client(base_url=url) as client,
    ):
        before_load, before_counters = client.get("/get_load").json(), counters(client)
        for headers in ({}, {"authorization": "Bearer wrong"}):
            rejected = client.post("/chat_stream", json={"user_input": "hi"}, headers=headers)
            assert rejected.status_code == 401
            assert rejected.json() == {"error": "unauthorized"}
        assert client.get("/get_load").json() == before_load
        assert counters(client) == before_counters
        assert engine.calls == 0
        assert callback.seen == []

        accepted = client.post("/chat_stream", json={"user_input": "hi"}, headers=AUTH, timeout=WATCHDOG)
        assert (accepted.status_code, accepted.text) == (200, REPLY)
        assert callback.wait() == [("success", None, REPLY)]
        assert engine.calls == 1


def expect_continue_status_lines(url: str) -> list[str]:
    """POST with ``Expect: 100-continue``, sending the body only if asked; the status lines received."""
    host, port = url.removeprefix("http://").split(":")
    body = b'{"user_input": "hi"}'
    with socket.create_connection((host, int(port)), timeout=WATCHDOG) as sock:
        sock.sendall(
            b"POST /chat_stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(body)
        )
        received = b""
        while b"401" not in received:  # the final answer is a 401 in both orders
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {received!r}"
            if b"100 Continue" in chunk:
                sock.sendall(body)
            received += chunk
    return [line for line in received.decode().split("\r\n") if line.startswith("HTTP/1.1")]


def test_header_auth_outside_never_asks_for_the_body() -> None:
    """Expect: 100-continue — auth outside answers 401 before the server asks the client to upload."""
    chat_stream = make_chat_stream(CountingEngine(), Completions())
    with uvicorn_in_thread(TokenAuth(ChatStreamMiddleware(not_found, chat_stream))) as url:
        assert expect_continue_status_lines(url) == ["HTTP/1.1 401 Unauthorized"]


def test_header_auth_inside_the_buffering_asks_for_the_body_first() -> None:
    """The wrong order: buffering before auth makes uvicorn send ``100 Continue``, then the 401."""
    chat_stream = make_chat_stream(CountingEngine(), Completions())
    app = ChatStreamMiddleware(TokenAuth(endpoint_app(chat_stream)), replay_paths=["/chat_stream"])
    with uvicorn_in_thread(app) as url:
        assert expect_continue_status_lines(url) == ["HTTP/1.1 100 Continue", "HTTP/1.1 401 Unauthorized"]


# -- (b) auth that verifies a signature of the body ----------------------------------------------


def hmac_behind_replay_to_endpoint(chat_stream: ChatStream) -> ASGIApp:
    """Replay outside, HMAC auth inside, an endpoint calling ``handle_chat_stream_request``."""
    return ChatStreamMiddleware(
        HMACAuth(endpoint_app(chat_stream)), chat_stream, paths=[], replay_paths=["/chat_stream"]
    )


def hmac_behind_replay_to_middleware(chat_stream: ChatStream) -> ASGIApp:
    """Replay outside, HMAC auth inside, an inner ``ChatStreamMiddleware`` serving the path."""
    return ChatStreamMiddleware(HMACAuth(ChatStreamMiddleware(not_found, chat_stream)), replay_paths=["/chat_stream"])


@pytest.mark.parametrize("build", [hmac_behind_replay_to_endpoint, hmac_behind_replay_to_middleware])
def test_body_signature_auth_works_because_of_the_replay(build: Callable[[ChatStream], ASGIApp]) -> None:
    engine, callback = CountingEngine(), Completions()
    chat_stream = make_chat_stream(engine, callback)
    body = json.dumps({"user_input": "signed"}).encode()
    with uvicorn_in_thread(build(chat_stream)) as url, httpx.Client(base_url=url, timeout=WATCHDOG) as client:
        before = counters(client)
        forged = client.post("/chat_stream", content=body, headers={"x-signature": sign(b"other")})
        assert (forged.status_code, forged.json()) == (401, {"error": "unauthorized"})
        assert counters(client) == before
        assert engine.calls == 0

        signed = client.post("/chat_stream", content=body, headers={"x-signature": sign(body)})
        assert (signed.status_code, signed.text) == (200, REPLY)
        assert callback.wait() == [("success", None, REPLY)]
        assert engine.calls == 1
        assert idle_load(client)["processing"] == 0


# -- (c) Starlette's AuthenticationMiddleware ----------------------------------------------------


def test_authentication_middleware_user_reaches_the_callback() -> None:
    engine, callback = CountingEngine(), Completions()
    chat_stream = make_chat_stream(engine, callback)
    app = Starlette(
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenBackend(), on_error=auth_error),
            Middleware(ChatStreamMiddleware, chat_stream=chat_stream),
        ]
    )
    with uvicorn_in_thread(app) as url, httpx.Client(base_url=url, timeout=WATCHDOG) as client:
        before = counters(client, AUTH)
        rejected = client.post("/chat_stream", json={"user_input": "hi"})
        assert rejected.status_code == 401
        assert rejected.json()["error"] == "unauthorized"
        assert counters(client, AUTH) == before
        assert engine.calls == 0

        accepted = client.post("/chat_stream", json={"user_input": "hi"}, headers=AUTH)
        assert (accepted.status_code, accepted.text) == (200, REPLY)
        assert callback.wait() == [("success", "alice", REPLY)]


# -- BaseHTTPMiddleware over and under: a client leaving mid-stream is still seen --------------


def base_http_over(chat_stream: ChatStream) -> ASGIApp:
    return TokenAuthHTTP(ChatStreamMiddleware(not_found, chat_stream))


def base_http_under(chat_stream: ChatStream) -> ASGIApp:
    return ChatStreamMiddleware(
        TokenAuthHTTP(endpoint_app(chat_stream)), chat_stream, paths=[], replay_paths=["/chat_stream"]
    )


@pytest.mark.parametrize("build", [base_http_over, base_http_under], ids=["over", "under"])
def test_disconnect_mid_stream_through_base_http_middleware(build: Callable[[ChatStream], ASGIApp]) -> None:
    callback = Completions()
    chat_stream = ChatStream(CountingEngine(per_token=0.02), num_of_concurrent_executions=1, callback=callback)
    with uvicorn_in_thread(build(chat_stream)) as url, httpx.Client(base_url=url, timeout=WATCHDOG) as client:
        leaving = httpx.Client(base_url=url, timeout=WATCHDOG)
        with leaving, leaving.stream("POST", "/chat_stream", json={"user_input": "long"}, headers=AUTH) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            assert next(chunks)
        # The connection is closed mid-stream (256 tokens at 20 ms would take 5 s).
        [(state, _, reply)] = callback.wait()
        assert state == "client_disconnected_while_streaming"
        assert REPLY.startswith(reply)
        assert idle_load(client)["processing"] == 0
        assert completions(client, "client_disconnected_while_streaming") == 1
