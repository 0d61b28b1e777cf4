"""Compression above the middleware must not hold tokens back (PITFALLS: GZip buffering).

Starlette's ``GZipMiddleware`` exempts ``text/event-stream`` and sync-flushes every chunk of other
streams; either way each token must reach the client while generation is still running. Proxies
that buffer (nginx) are told not to by ``X-Accel-Buffering: no`` and ``Cache-Control: no-cache``.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from live_server import serve_in_thread
from starlette.middleware.gzip import GZipMiddleware

from chatstream_asgi import ChatStream, ChatStreamMiddleware, CompletionState, MockEngine, MockParams
from chatstream_asgi.asgi.responses import send_json


async def _not_found(scope: dict, receive: object, send: object) -> None:
    await send_json(send, 404, {"error": "not_found"})  # type: ignore[arg-type]


@pytest.mark.parametrize(("fmt", "encoding"), [("text", "gzip"), ("ndjson", "gzip"), ("sse", None)])
def test_tokens_stream_through_gzip_before_generation_ends(fmt: str, encoding: str | None) -> None:
    states: list[str] = []
    done = threading.Event()

    def callback(request: object, state: CompletionState) -> None:
        states.append(state.value)
        done.set()

    chat_stream = ChatStream(
        MockEngine(MockParams(type="long", time_per_token_sec=0.05)), max_new_tokens=400, callback=callback
    )
    app = GZipMiddleware(ChatStreamMiddleware(_not_found, chat_stream), minimum_size=1)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10.0) as client:
        body = {"user_input": "go", "format": fmt}
        with client.stream("POST", "/chat_stream", json=body, headers={"accept-encoding": "gzip"}) as response:
            assert response.headers.get("content-encoding") == encoding
            assert response.headers["x-accel-buffering"] == "no"
            assert response.headers["cache-control"] == "no-cache"
            chunks = response.iter_bytes()  # keep a reference: a collected iterator closes the response
            assert next(chunks)  # a decoded token arrived ...
            load = client.get("/get_load").json()
            assert load["processing"] == 1  # ... while generation still runs
        # Leaving mid-stream is noticed through the compression layer too, and the slot comes back.
        assert done.wait(10)
        assert states == ["client_disconnected_while_streaming"]
        assert client.get("/get_load").json()["processing"] == 0
