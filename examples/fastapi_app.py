"""FastAPI in the original library's endpoint style: one call returns the streaming response.

``POST /chat_stream`` is the seed's endpoint; ``/chat_stream_intercept`` reads the message before
handing it on; ``/chat_stream_callback`` learns how each reply ended. ``ChatStreamMiddleware`` with
no chat paths adds ``/get_load`` and ``/metrics`` and starts/stops the engine with the app.

Run: ``cd examples && uvicorn fastapi_app:app`` (or ``python examples/fastapi_app.py``).
"""

from __future__ import annotations

from common import log_completion, logger, make_chat_stream, run
from fastapi import FastAPI, Request
from fastapi.responses import Response

from chatstream_asgi import ChatStreamMiddleware, CompletionState

chat_stream = make_chat_stream(callback=log_completion)  # the default callback
app = FastAPI()
app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream, paths=[])


@app.post("/chat_stream")
async def stream_api(request: Request) -> Response:
    """Streaming chat with a concurrency limit and a wait queue, in one call."""
    return await chat_stream.handle_chat_stream_request(request)


@app.post("/chat_stream_intercept")
async def stream_api_intercept(request: Request) -> Response:
    """Look at the message first; the body is consumed, so pass it on."""
    request_body = await request.json()
    logger.info("user_input=%r regenerate=%r", request_body.get("user_input"), request_body.get("regenerate"))
    return await chat_stream.handle_chat_stream_request(request, request_body)


async def on_complete(request: Request, message: CompletionState) -> None:
    """Called once when the stream ends: ``message`` is one of the four completion states."""
    result = request.state.chatstream  # also: chatstream_asgi.get_result(request)
    logger.info("completed: state=%s prompt=%r reply=%r", message.value, result.prompt, result.reply)


@app.post("/chat_stream_callback")
async def stream_api_callback(request: Request) -> Response:
    """The reply streams after this returns; ``on_complete`` (instead of the default) hears how it ended."""
    return await chat_stream.handle_chat_stream_request(request, callback=on_complete)


if __name__ == "__main__":
    run(app)
