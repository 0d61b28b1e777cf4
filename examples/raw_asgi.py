"""A raw ASGI app, no framework: ``ChatStreamMiddleware`` in front of any ASGI callable.

Run: ``cd examples && hypercorn raw_asgi:app`` (or ``python examples/raw_asgi.py``).
"""

from __future__ import annotations

from typing import Any

from common import log_completion, make_chat_stream, run

from chatstream_asgi import ChatStreamMiddleware

chat_stream = make_chat_stream(callback=log_completion)


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app being wrapped: answers lifespan events and says hello on every other path."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello; POST /chat_stream to chat\n"})


app = ChatStreamMiddleware(hello, chat_stream)

if __name__ == "__main__":
    run(app)
