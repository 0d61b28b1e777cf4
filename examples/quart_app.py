"""Quart: wrap ``app.asgi_app`` so the middleware sees every request before Quart does.

Run: ``cd examples && hypercorn quart_app:app`` (or ``python examples/quart_app.py``).
"""

from __future__ import annotations

from common import log_completion, make_chat_stream, run
from quart import Quart

from chatstream_asgi import ChatStreamMiddleware

chat_stream = make_chat_stream(callback=log_completion)
app = Quart(__name__)


@app.get("/")
async def index() -> str:
    return 'POST /chat_stream with {"user_input": "..."}\n'


app.asgi_app = ChatStreamMiddleware(app.asgi_app, chat_stream)  # type: ignore[method-assign]

if __name__ == "__main__":
    run(app)
