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
)
from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.logs import DEFAULT_REQUEST_ID_HEADER, bind_request_id, logger
from chatstream_asgi.protocols.openai import error_body
from chatstream_asgi.server.routes import (
    ADMIN_ENDPOINTS,
    DEFAULT_ENDPOINTS,
    Endpoint,
    chat_endpoint,
    extra_endpoints,
    protect,
)
from chatstream_asgi.service.chatstream import ChatStream
from chatstream_asgi.service.outcomes import Rejection
from chatstream_asgi.service.replies import SHARED_RECEIVE_KEY
from chatstream_asgi.service.tenants import TENANT_KEY, TenantSource
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
        self._request_id_header = (
            chat_stream.request_id_header if chat_stream is not None else DEFAULT_REQUEST_ID_HEADER
        )
        if chat_stream is not None:
            known = extra_endpoints(chat_stream)
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
            if route is not None:
                with bind_request_id(scope, self._request_id_header):
                    await self._serve(route, scope, receive, send)
                return
            if path in self.replay_paths:
                with bind_request_id(scope, self._request_id_header):
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
            detail = f"{scope['method']} is not allowed here; use {allow.decode()}"
            body = error_body(detail, "invalid_request_error", "method_not_allowed") if route.openai else None
            await send_json(send, 405, body or {"error": "method_not_allowed", "detail": detail}, [(b"allow", allow)])
            return
        if not route.reads_body:
            await self._call_api(route, scope, receive, send, b"")
            return
        cs = self.chat_stream
        # A chat request whose task is cancelled while its body arrives (its client left) still ends in a state.
        guard: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if route.chat:
            gone = replay_request(scope, b"", SharedReceive(receive, disconnected=True))
            guard = cs.reports_cancellation(gone, self.callback)
        try:
            async with guard:
                body = await read_body(scope, receive, self.max_body_size)
        except BodyTooLarge:
            await cs.reject_body_too_large(send, self.max_body_size, openai=route.openai)
            return
        except ClientDisconnected as exc:
            if route.chat:
                request = replay_request(scope, exc.body, SharedReceive(receive, disconnected=True))
                await cs.report_early_disconnect(request, self.callback)
            return
        shared = SharedReceive(receive)
        scope[SHARED_RECEIVE_KEY] = shared
        if self.tenant is not None:
            scope[TENANT_KEY] = self.tenant
        try:
            if route.chat:
                request = replay_request(scope, body, shared)
                await route.handler(scope, shared, send, body, request=request, callback=self.callback)
            else:
                await self._call_api(route, scope, shared, send, body)
        finally:
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
            await cs.outcomes.reject(send, rejection, cs.id_headers())
        except Exception:
            if started:
                raise
            logger.exception("%s failed", route_path(scope))
            detail = "the server failed to answer this request"
            payload = error_body(detail, "server_error", "internal_error") if route.openai else None
            await send_json(send, 500, payload or {"error": "internal_error", "detail": detail}, cs.id_headers())

    async def _replay(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.max_body_size)
            shared = SharedReceive(receive)
        except BodyTooLarge:
            if self.chat_stream is not None:
                await self.chat_stream.reject_body_too_large(send, self.max_body_size)
            else:
                detail = f"the request body is larger than {self.max_body_size} bytes"
                await send_json(send, 413, {"error": "body_too_large", "detail": detail}, [(b"connection", b"close")])
            return
        except ClientDisconnected as exc:
            body, shared = exc.body, SharedReceive(receive, disconnected=True)
        replay = ReplayReceive(body, shared)
        scope[SHARED_RECEIVE_KEY] = shared

        async def replay_send(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                replay.response_started = True
            await send(message)

        try:
            await self.app(scope, replay, replay_send)
        finally:
            shared.close()

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
