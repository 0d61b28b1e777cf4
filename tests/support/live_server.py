"""In-process servers for tests that need a real server (disconnects, real clients).

``serve_in_thread(app)`` runs hypercorn on its own event loop in a thread, on a free 127.0.0.1 port,
waits (bounded) until it answers, and shuts it down on exit; ``uvicorn_in_thread(app, http)`` does
the same with uvicorn (``http``: its protocol implementation). The test's own objects (callbacks,
the ChatStream) stay inspectable from the test thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from hypercorn.asyncio import serve
from hypercorn.config import Config

READY_TIMEOUT = 10.0


@contextlib.contextmanager
def serve_in_thread(app: Any, ready_path: str = "/get_load") -> Iterator[str]:
    """Serve ``app`` for the duration of the block; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = 2.0
    config.accesslog = None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))
        except BaseException as exc:  # reported by the ready check below
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"hypercorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if failure or not thread.is_alive():
            raise RuntimeError(f"server failed to start: {failure}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + ready_path, timeout=1.0).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not ready after {READY_TIMEOUT} s")
        time.sleep(0.02)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@contextlib.contextmanager
def uvicorn_in_thread(app: Any, http: str = "auto") -> Iterator[str]:
    """Serve ``app`` under uvicorn (``http`` protocol implementation, lifespan on) for the block; yields its
    base URL once it has started."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
