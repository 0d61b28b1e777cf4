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
from collections.abc import Iterable, Mapping

from chatstream_asgi.asgi.replay import (
    BodyTooLarge,
    ClientDisconnected,
    ReplayReceive,
    SharedReceive,
    read_body,
    replay_request,
    shared_for,
    shared_of,
)
from chatstream_asgi.asgi.request_id import request_id_scope
from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.logs import DEFAULT_REQUEST_ID_HEADER, current_request_id, logger, unbind_request_id
from chatstream_asgi.protocols.dialect import CHAT, Dialect
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.server.routes import (
    ADMIN_ENDPOINTS,
    DEFAULT_ENDPOINTS,
    Endpoint,
    chat_endpoint,
    extra_endpoints,
    protect,
)
from chatstream_asgi.service.exchange import Exchange
from chatstream_asgi.service.outcomes import Rejection
from chatstream_asgi.service.tenants import TenantSource
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import ASGIApp, ASGIMessage, Callback, Receive, Scope, Send

__all__ = ["ChatStreamMiddleware", "route_path"]


def route_path(scope: Scope) -> str:
    """The path relative to ``root_path`` (uvicorn includes ``root_path`` in ``path``, hypercorn not).

    ``root_path`` is stripped only on a path-segment boundary, as Starlette does: under a mount at
    ``/chat``, ``/chat/chat_stream`` is ``/chat_stream`` while ``/chat_stream`` stays itself.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "").rstrip("/")
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path) :] or "/"
    return path


class ChatStreamMiddleware:
    """Serve ``chat_stream`` on ``paths`` in front of ``app``; replay bodies on ``replay_paths``.

    ``endpoints`` maps extra endpoint names to paths (``None`` drops one); ``callback`` overrides
    the ChatStream's completion callback for requests served here. The admin endpoints
    (``get_resource_usage`` and ``get_prompt``, which shows the system prompt) are dropped with
    ``admin_endpoints=False`` and answer 401 without ``Authorization: Bearer <admin_token>``
    when ``admin_token`` is set. ``tenant`` overrides the ChatStream's tenant source for the
    requests served here. Without ``chat_stream`` the middleware only buffers and replays bodies.
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
        admin_endpoints: bool = True,
        admin_token: str | None = None,
        tenant: TenantSource | None = None,
    ) -> None:
        self.app = app
        self.tenant = tenant
        self.chat_stream = chat_stream
        self.max_body_size = max_body_size
        self.callback = callback
        self.replay_paths = frozenset(replay_paths)
        self.routes: dict[str, Endpoint] = {}
        config = chat_stream.config if chat_stream is not None else None
        self._request_id_header = config.request_id_header if config is not None else DEFAULT_REQUEST_ID_HEADER
        self._echo_request_id = config.echo_request_id if config is not None else True
        if chat_stream is not None:
            known = extra_endpoints(chat_stream, tenant)
            for name, path in {**DEFAULT_ENDPOINTS, **(endpoints or {})}.items():
                if name not in known:
                    raise ValueError(f"unknown endpoint {name!r}; known: {sorted(known)}")
                if path is None or (name in ADMIN_ENDPOINTS and not admin_endpoints):
                    continue
                route = known[name]
                if name in ADMIN_ENDPOINTS and admin_token is not None:
                    route = protect(route, admin_token)
                self.routes[path] = route
            chat = chat_endpoint(chat_stream)
            for path in paths:
                self.routes[path] = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            path = route_path(scope)
            route = self.routes.get(path)
            if route is not None or path in self.replay_paths:
                with request_id_scope(scope, send, self._request_id_header, echo=self._echo_request_id) as send:
                    if route is not None:
                        await self._serve(route, scope, receive, send)
                    else:
                        await self._replay(scope, receive, send)
                return
            if current_request_id() is not None:  # maybe inherited from the task that started this one
                with unbind_request_id(scope):
                    await self.app(scope, receive, send)
                return
        elif scope_type == "lifespan" and self.chat_stream is not None:
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        await self.app(scope, receive, send)

    async def _serve(self, route: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        cs = self.chat_stream
        assert cs is not None
        if scope["method"] not in route.methods:
            allow = ", ".join(sorted(route.methods))
            detail = f"{scope['method']} is not allowed here; use {allow}"
            body = route.dialect.error(405, "method_not_allowed", detail)
            await send_json(send, 405, body, [(b"allow", allow.encode())])
            return
        if not route.reads_body:
            await self._call_api(route, scope, receive, send, b"")
            return
        exchange = None
        guard: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if route.chat:  # a chat request whose task is cancelled while its body arrives still ends in a state
            gone = replay_request(scope, b"", SharedReceive(receive, disconnected=True))
            exchange = Exchange(scope, receive, send, gone, route.dialect, self.callback, tenant=self.tenant)
            guard = cs.outcomes.reports_cancellation(exchange)
        try:
            async with guard:
                body = await read_body(scope, receive, self.max_body_size)
        except BodyTooLarge:
            await self._body_too_large(send, route.dialect)
            return
        except ClientDisconnected as exc:
            if exchange is not None:
                exchange.request = replay_request(scope, exc.body, SharedReceive(receive, disconnected=True))
                await cs.outcomes.end(exchange, CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING)
            return
        outer = shared_of(scope)  # a middleware above replays the body: watch the client through it
        shared = outer or SharedReceive(receive)
        try:
            if exchange is not None:
                exchange.receive, exchange.request = shared, replay_request(scope, body, shared)
                await route.handler(exchange, body)
            else:
                await self._call_api(route, scope, shared, send, body)
        finally:
            if shared is not outer:
                shared.close()

    async def _call_api(self, route: Endpoint, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Call an extra endpoint; a failure before its answer started becomes a JSON answer
        (a rejection's, else 500), never a bare 500 from the server."""
        cs = self.chat_stream
        assert cs is not None
        started = False

        async def tracked_send(message: ASGIMessage) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await route.handler(scope, receive, tracked_send, body)
        except Rejection as rejection:
            if started:
                raise
            await cs.outcomes.reject(send, route.dialect, rejection)
        except Exception:
            if started:
                raise
            logger.exception("%s failed", route_path(scope))
            body = route.dialect.error(500, "internal_error", "the server failed to answer this request")
            await send_json(send, 500, body)

    async def _replay(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.max_body_size)
            shared = SharedReceive(receive)
        except BodyTooLarge:
            await self._body_too_large(send, CHAT)
            return
        except ClientDisconnected as exc:
            body, shared = exc.body, SharedReceive(receive, disconnected=True)
        replay = ReplayReceive(body, shared)

        async def replay_send(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                replay.response_started = True
            await send(message)

        try:
            with shared_for(scope, shared):
                await self.app(scope, replay, replay_send)
        finally:
            shared.close()

    async def _body_too_large(self, send: Send, dialect: Dialect) -> None:
        if self.chat_stream is not None:
            await self.chat_stream.body_too_large(send, dialect, self.max_body_size)
            return
        detail = f"the request body is larger than {self.max_body_size} bytes"
        await send_json(send, 413, dialect.error(413, "body_too_large", detail), [(b"connection", b"close")])

    def _lifespan_receive(self, receive: Receive) -> Receive:
        chat_stream = self.chat_stream
        assert chat_stream is not None

        async def lifespan_receive() -> ASGIMessage:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await chat_stream.start()
            elif message["type"] == "lifespan.shutdown":
                await chat_stream.shutdown()
            return message

        return lifespan_receive
