"""Litestar, wrapped from outside by ``ChatStreamMiddleware``.

Litestar runs its own middleware *after* routing, so a path with no route handler is a 404
before any Litestar middleware sees it. Wrapping the whole Litestar app lets the middleware own
``/chat_stream``, ``/get_load`` and ``/metrics`` without routes for them.

Run: ``cd examples && hypercorn litestar_app:app`` (or ``python examples/litestar_app.py``).
"""

from __future__ import annotations

from common import log_completion, make_chat_stream, run
from litestar import Litestar, get

from chatstream_asgi import ChatStreamMiddleware

chat_stream = make_chat_stream(callback=log_completion)


@get("/")
async def index() -> dict[str, str]:
    return {"chat": "POST /chat_stream"}


app = ChatStreamMiddleware(Litestar(route_handlers=[index]), chat_stream)

if __name__ == "__main__":
    run(app)
