"""The endpoints the middleware serves beside the chat paths, by name, wired to their handlers."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.protocols.dialect import CHAT, OPENAI, Dialect
from chatstream_asgi.server.chat_api import ChatAPI
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.server.openai_serving import OpenAIAPI
from chatstream_asgi.service.tenants import TenantSource
from chatstream_asgi.types import Receive, Scope, Send

__all__ = ["ADMIN_ENDPOINTS", "DEFAULT_ENDPOINTS", "Endpoint", "chat_endpoint", "extra_endpoints", "protect"]

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
documented in :mod:`chatstream_asgi.server.chat_api` and :mod:`chatstream_asgi.protocols.openai`."""

ADMIN_ENDPOINTS = frozenset({"get_resource_usage", "get_prompt"})
"""Endpoints that show the server's internals (process memory; the system prompt): they can be
turned off or put behind a token (see :class:`~chatstream_asgi.ChatStreamMiddleware`)."""

GET = frozenset({"GET", "HEAD"})
POST = frozenset({"POST"})


@dataclass(frozen=True)
class Endpoint:
    """An endpoint the middleware serves.

    ``handler(scope, receive, send, body)`` gets the buffered body (``b""`` without one); a ``chat``
    handler is ``handler(exchange, body)`` (an :class:`~chatstream_asgi.service.exchange.Exchange`)
    and ends the request in a completion state. Its errors take the shape of its ``dialect``.
    """

    methods: frozenset[str]
    handler: Callable[..., Awaitable[Any]]
    chat: bool = False
    dialect: Dialect = CHAT

    @property
    def reads_body(self) -> bool:
        """Whether the middleware buffers the body first."""
        return "POST" in self.methods


def chat_endpoint(chat_stream: ChatStream) -> Endpoint:
    """The ``/chat_stream`` endpoint (served on the middleware's ``paths``)."""
    return Endpoint(POST, chat_stream.serve_chat, chat=True, dialect=chat_stream.chat_dialect)


def extra_endpoints(chat_stream: ChatStream, tenant: TenantSource | None = None) -> dict[str, Endpoint]:
    """Every extra endpoint of ``chat_stream`` by name (the names of :data:`DEFAULT_ENDPOINTS`); ``tenant``:
    the serving middleware's own tenant source."""
    api = ChatAPI(chat_stream, tenant)
    openai = OpenAIAPI(chat_stream)
    return {
        "clear_context": Endpoint(POST, api.clear_context),
        "get_prompt": Endpoint(GET, api.get_prompt),
        "get_load": Endpoint(GET, api.get_load),
        "set_generation_params": Endpoint(POST, api.set_generation_params),
        "get_generation_params": Endpoint(GET, api.get_generation_params),
        "set_feedback": Endpoint(POST, api.set_feedback),
        "get_resource_usage": Endpoint(GET, api.get_resource_usage),
        "metrics": Endpoint(GET, api.metrics),
        "chat_completions": Endpoint(POST, openai.chat_completions, chat=True, dialect=OPENAI),
        "models": Endpoint(GET, openai.models, dialect=OPENAI),
    }


def protect(endpoint: Endpoint, token: str) -> Endpoint:
    """``endpoint`` (not a chat one) behind ``Authorization: Bearer <token>``: 401 JSON without it."""
    assert not endpoint.chat, "protect a chat path with auth middleware outside ChatStreamMiddleware"
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send, body: bytes) -> Any:
        given = next((value for name, value in scope.get("headers", ()) if name == b"authorization"), b"")
        if not hmac.compare_digest(given, expected):
            detail = "this endpoint needs Authorization: Bearer <admin token>"
            headers = [(b"www-authenticate", b"Bearer")]
            return await send_json(send, 401, endpoint.dialect.error(401, "unauthorized", detail), headers)
        return await endpoint.handler(scope, receive, send, body)

    return replace(endpoint, handler=guarded)
