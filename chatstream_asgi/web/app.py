"""A ready-to-serve ASGI app: the chat page at ``/``, the chat endpoints, the extra APIs and ``/metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from chatstream_asgi.server.middleware import ChatStreamMiddleware
from chatstream_asgi.service.chatstream import ChatStream

__all__ = ["PAGE_CSP", "STATIC_DIR", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"
"""The chat page (``index.html``) and its script."""

PAGE_CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
"""The page's Content-Security-Policy: everything comes from this server; no inline script or style."""

_PAGE_HEADERS = {"content-security-policy": PAGE_CSP, "cache-control": "no-cache"}


async def _index(request: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)


def create_app(chat_stream: ChatStream, **options: Any) -> ChatStreamMiddleware:
    """A Starlette app serving the chat page, wrapped in :class:`ChatStreamMiddleware` serving
    ``chat_stream``; ``options`` go to the middleware (``admin_token=``, ``admin_endpoints=``, ...)."""
    page = Starlette(routes=[Route("/", _index), Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")])
    return ChatStreamMiddleware(page, chat_stream, **options)
