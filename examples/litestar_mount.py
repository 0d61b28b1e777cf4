"""Litestar with the chat service mounted as an ASGI app under ``/chat``.

``POST /chat/chat_stream``, ``GET /chat/get_load`` and ``GET /chat/metrics`` reach the mounted
``ChatStreamMiddleware``; Litestar hands a mount the rest of the path with a ``/`` appended
(``/chat_stream/``), so the handler strips it. Nothing else needs a route.

Run: ``cd examples && hypercorn litestar_mount:app`` (or ``python examples/litestar_mount.py``).
"""

from __future__ import annotations

from common import log_completion, make_chat_stream, run
from litestar import Litestar, get
from litestar.handlers import asgi
from litestar.types import Receive, Scope, Send
from starlette.responses import PlainTextResponse

from chatstream_asgi import ChatStreamMiddleware

chat_stream = make_chat_stream(callback=log_completion)
chat_service = ChatStreamMiddleware(PlainTextResponse("Not Found", status_code=404), chat_stream)


@asgi("/chat", is_mount=True, copy_scope=True)
async def chat(scope: Scope, receive: Receive, send: Send) -> None:
    scope["path"] = scope["path"].rstrip("/") or "/"
    await chat_service(scope, receive, send)  # type: ignore[arg-type]


@get("/")
async def index() -> dict[str, str]:
    return {"chat": "POST /chat/chat_stream"}


async def start_engine() -> None:
    """A mounted app gets no lifespan events: start and stop the engine with Litestar's."""
    await chat_stream.start()


async def stop_engine() -> None:
    await chat_stream.shutdown()


app = Litestar(route_handlers=[index, chat], on_startup=[start_engine], on_shutdown=[stop_engine])

if __name__ == "__main__":
    run(app)
