"""``ChatStreamMiddleware``: the raw ASGI layer in front of any app.

For its chat paths it buffers the body (bounded by ``max_body_size``) and serves the chat itself;
for ``replay_paths`` it buffers the body and calls the wrapped app with a replaying ``receive``,
so that auth middleware and endpoints below can each read the whole body. Every other request,
lifespan and websocket scope passes straight through: no buffering, no extra task.

Place header-based auth *outside* this middleware: it buffers bodies, and on servers that honour
``Expect: 100-continue`` that reading is what asks the client to upload. Auth that must read the
body (an HMAC signature, say) goes *inside* it, on a replay path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from starlette.requests import Request

from chatstream_asgi.asgi.replay import BodyTooLarge, ClientDisconnected, ReplayReceive, SharedReceive, read_body
from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.protocols.chat_api import Endpoint
from chatstream_asgi.protocols.chat_api import endpoints as _endpoints
from chatstream_asgi.service.chatstream import SHARED_RECEIVE_KEY, Callback, ChatStream

__all__ = ["DEFAULT_ENDPOINTS", "ChatStreamMiddleware", "route_path"]

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_ENDPOINTS: Mapping[str, str] = {
    "clear_context": "/clear_context",
    "get_prompt": "/get_prompt",
    "get_load": "/get_load",
    "set_generation_params": "/set_generation_params",
    "get_generation_params": "/get_generation_params",
    "set_feedback": "/set_feedback",
    "get_resource_usage": "/get_resource_usage",
    "metrics": "/metrics",
    "chat_completions": "/v1/chat/completions",
    "models": "/v1/models",
}
"""The extra endpoints served beside the chat paths: name → path. Their methods and JSON are
documented in :mod:`chatstream_asgi.api` and :mod:`chatstream_asgi.openai_api`."""


def route_path(scope: Scope) -> str:
    """The path relative to ``root_path`` (uvicorn includes ``root_path`` in ``path``, hypercorn not)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


_CHAT_METHODS = frozenset({"POST"})


class ChatStreamMiddleware:
    """Serve ``chat_stream`` on ``paths`` in front of ``app``; replay bodies on ``replay_paths``.

    ``endpoints`` maps extra endpoint names to paths (``None`` drops one); ``callback`` overrides
    the ChatStream's completion callback for requests served here. Without ``chat_stream`` the
    middleware only buffers and replays bodies.
    """

    def __init__(
        self,
        app: ASGIApp,
        chat_stream: ChatStream | None = None,
        *,
        paths: Iterable[str] = ("/chat_stream",),
        endpoints: Mapping[str, str | None] | None = None,
        replay_paths: Iterable[str] = (),
        max_body_size: int = 1 << 20,
        callback: Callback | None = None,
    ) -> None:
        self.app = app
        self.chat_stream = chat_stream
        self.max_body_size = max_body_size
        self.callback = callback
        self.replay_paths = frozenset(replay_paths)
        self.routes: dict[str, Endpoint] = {}
        if chat_stream is not None:
            known = _endpoints(chat_stream)
            for name, path in {**DEFAULT_ENDPOINTS, **(endpoints or {})}.items():
                if name not in known:
                    raise ValueError(f"unknown endpoint {name!r}; known: {sorted(known)}")
                if path is not None:
                    self.routes[path] = known[name]
            for path in paths:
                self.routes[path] = Endpoint(_CHAT_METHODS, chat_stream.serve_chat, chat=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            path = route_path(scope)
            route = self.routes.get(path)
            if route is not None:
                await self._serve(route, scope, receive, send)
                return
            if path in self.replay_paths:
                await self._replay(scope, receive, send)
                return
        elif scope_type == "lifespan" and self.chat_stream is not None:
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        await self.app(scope, receive, send)

    async def _serve(self, route: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.chat_stream is not None
        if scope["method"] not in route.methods:
            allow = ", ".join(sorted(route.methods)).encode()
            await send_json(send, 405, {"error": "method_not_allowed"}, [(b"allow", allow)])
            return
        if not route.reads_body:
            await route.handler(scope, receive, send, b"")
            return
        cs = self.chat_stream
        guard: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if route.chat:  # a callback told of a client that left sees a request whose body reads as a disconnect
            gone = Request(scope, SharedReceive(receive, disconnected=True))
            guard = cs.reports_cancellation(scope, gone, self.callback)
        try:
            async with guard:
                body = await read_body(scope, receive, self.max_body_size)
        except BodyTooLarge:
            if route.chat:
                cs.metrics.rejected.labels(reason="body_too_large").inc()
            await self._send_too_large(send)
            return
        except ClientDisconnected as exc:
            if route.chat:
                request = Request(scope, ReplayReceive(exc.body, SharedReceive(receive, disconnected=True)))
                await cs.report_early_disconnect(scope, request=request, callback=self.callback)
            return
        shared = SharedReceive(receive)
        scope[SHARED_RECEIVE_KEY] = shared
        try:
            if route.chat:
                request = Request(scope, ReplayReceive(body, shared))
                await route.handler(scope, shared, send, body, request=request, callback=self.callback)
            else:
                await route.handler(scope, shared, send, body)
        finally:
            shared.close()

    async def _replay(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.max_body_size)
            shared = SharedReceive(receive)
        except BodyTooLarge:
            if self.chat_stream is not None:
                self.chat_stream.metrics.rejected.labels(reason="body_too_large").inc()
            await self._send_too_large(send)
            return
        except ClientDisconnected as exc:
            body, shared = exc.body, SharedReceive(receive, disconnected=True)
        replay = ReplayReceive(body, shared)
        scope[SHARED_RECEIVE_KEY] = shared

        async def replay_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                replay.response_started = True
            await send(message)

        try:
            await self.app(scope, replay, replay_send)
        finally:
            shared.close()

    async def _send_too_large(self, send: Send) -> None:
        detail = f"the request body is larger than {self.max_body_size} bytes"
        await send_json(send, 413, {"error": "body_too_large", "detail": detail}, [(b"connection", b"close")])

    def _lifespan_receive(self, receive: Receive) -> Receive:
        chat_stream = self.chat_stream
        assert chat_stream is not None

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await chat_stream.start()
            elif message["type"] == "lifespan.shutdown":
                await chat_stream.shutdown()
            return message

        return lifespan_receive
