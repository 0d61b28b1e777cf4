"""A ready-to-serve ASGI app: the chat endpoints, the extra APIs and ``/metrics``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .chatstream import ChatStream
from .middleware import ChatStreamMiddleware

__all__ = ["create_app"]


async def _index(request: Request) -> Response:
    cs: ChatStream = request.app.state.chat_stream
    return JSONResponse({"service": "chatstream-asgi", "model": cs.engine.model_name, "chat": "/chat_stream"})


def create_app(chat_stream: ChatStream) -> ChatStreamMiddleware:
    """A Starlette app wrapped in :class:`ChatStreamMiddleware` that serves ``chat_stream``."""
    inner = Starlette(routes=[Route("/", _index)])
    inner.state.chat_stream = chat_stream
    return ChatStreamMiddleware(inner, chat_stream)
