"""Starlette with ``ChatStreamMiddleware`` serving the chat: no endpoint code at all.

The middleware owns ``POST /chat_stream``, ``GET /get_load`` and ``GET /metrics``; every other
path reaches the app's own routes untouched.

Run: ``cd examples && hypercorn starlette_app:app`` (or ``python examples/starlette_app.py``).
"""

from __future__ import annotations

from common import log_completion, make_chat_stream, run
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chatstream_asgi import ChatStreamMiddleware

chat_stream = make_chat_stream(callback=log_completion)


async def homepage(request: Request) -> PlainTextResponse:
    return PlainTextResponse('POST /chat_stream with {"user_input": "..."}\n')


app = Starlette(
    routes=[Route("/", homepage)],
    middleware=[Middleware(ChatStreamMiddleware, chat_stream=chat_stream)],
)

if __name__ == "__main__":
    run(app)
