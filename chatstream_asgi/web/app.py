"""A ready-to-serve ASGI app: the chat page at ``/``, the chat endpoints, the extra APIs and ``/metrics``.

Every response carries the request id, and every error is JSON, in the chat dialect: an unknown path
is ``404 {"error": "not_found", ...}``, a method a page route does not take ``405``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from chatstream_asgi.asgi.request_id import RequestIdMiddleware
from chatstream_asgi.protocols.dialect import CHAT
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.server.middleware import ChatStreamMiddleware

__all__ = ["PAGE_CSP", "STATIC_DIR", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"
"""The chat page (``index.html``), its script, style and icon."""

PAGE_CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
"""The page's Content-Security-Policy: everything comes from this server; no inline script or style."""

_PAGE_HEADERS = {"content-security-policy": PAGE_CSP, "cache-control": "no-cache"}
_ERRORS = {404: "not_found", 405: "method_not_allowed"}


async def _index(request: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)


async def _favicon(request: Request) -> FileResponse:
    return FileResponse(
        STATIC_DIR / "favicon.ico", media_type="image/x-icon", headers={"cache-control": "max-age=86400"}
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _ERRORS.get(exc.status_code, "http_error")
    detail = f"no {request.method} {request.url.path} here" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(CHAT.error(exc.status_code, code, detail), exc.status_code, headers=exc.headers)


def create_app(chat_stream: ChatStream, **options: Any) -> ChatStreamMiddleware:
    """A Starlette app serving the chat page, wrapped in :class:`ChatStreamMiddleware` serving
    ``chat_stream``; ``options`` go to the middleware (``admin_token=``, ``admin_endpoints=``, ...)."""
    page = Starlette(
        routes=[
            Route("/", _index),
            Route("/favicon.ico", _favicon),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    config = chat_stream.config
    page_with_id = RequestIdMiddleware(page, config.request_id_header, echo=config.echo_request_id)
    return ChatStreamMiddleware(page_with_id, chat_stream, **options)
