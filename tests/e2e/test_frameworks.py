"""The examples under ``examples/``, each served by a real server (hypercorn, uvicorn, granian)
and driven by a real client.

Every framework gets the same checks: a reply streams, the completion callback hears its state
(the examples log it), and with one slot and no queue a second request while the first streams is
turned away with 429 ``{"error": "too_many_requests"}``; the first request's client then leaves
mid-stream, which the callback hears too, and the slot comes back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from servers import Server, free_port, server_command

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WATCHDOG = 15.0


@dataclass(frozen=True)
class Case:
    target: str  # module:attribute under examples/
    server: str  # hypercorn, uvicorn or granian
    prefix: str = ""  # where the chat service lives in the app


CASES = {
    "fastapi": Case("fastapi_app:app", "uvicorn"),
    "starlette": Case("starlette_app:app", "hypercorn"),
    "quart": Case("quart_app:app", "hypercorn"),
    "litestar": Case("litestar_app:app", "hypercorn"),
    "litestar-mount": Case("litestar_mount:app", "uvicorn", prefix="/chat"),
    "raw-asgi": Case("raw_asgi:app", "hypercorn"),
    "raw-asgi-granian": Case("raw_asgi:app", "granian"),
}


ENV = {
    "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(EXAMPLES.parent)]),
    "CHATSTREAM_ENGINE": "mock",
    "CHATSTREAM_SESSION_SECRET": "test-secret",
    "CHATSTREAM_CONCURRENCY": "1",
    "CHATSTREAM_QUEUE": "0",
    "CHATSTREAM_MAX_NEW_TOKENS": "400",
    "CHATSTREAM_MOCK_TYPE": "long",
    "CHATSTREAM_MOCK_TIME_PER_TOKEN": "0.01",
}


def wait_for_log(server: Server, text: str, *, after: int = 0) -> str:
    """The server's output from offset ``after`` once it contains ``text`` (fails after the watchdog)."""
    deadline = time.monotonic() + WATCHDOG
    while time.monotonic() < deadline:
        tail = server.output()[after:]
        if text in tail:
            return tail
        time.sleep(0.05)
    pytest.fail(f"{text!r} not logged within {WATCHDOG} s:\n{server.output()[after:]}")


@pytest.fixture(scope="module", params=list(CASES))
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Case, Server]]:
    case = CASES[request.param]
    port = free_port()
    server = Server(server_command(case.server, case.target, port), port, ENV, cwd=EXAMPLES)
    try:
        server.wait_ready(case.prefix + "/get_load")
        yield case, server
    finally:
        server.stop()


def wait_idle(client: httpx.Client, load_url: str) -> dict[str, int]:
    """``/get_load`` once no slot is in use (fails after the watchdog)."""
    deadline = time.monotonic() + WATCHDOG
    while time.monotonic() < deadline:
        load = client.get(load_url).json()
        if load["processing"] == 0 and load["waiting"] == 0:
            return load
        time.sleep(0.05)
    pytest.fail(f"slot still in use: {load}")


def test_reply_streams_and_callback_hears_success(served: tuple[Case, Server]) -> None:
    case, server = served
    offset = len(server.output())
    body = {"user_input": "Hello!", "generation_params": {"max_new_tokens": 8}}
    chunks: list[bytes] = []
    with httpx.Client(base_url=server.url, timeout=WATCHDOG) as client:
        with client.stream("POST", case.prefix + "/chat_stream", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            assert response.headers["x-chatstream-last-generated-message-id"]
            chunks.extend(response.iter_bytes())
        reply = b"".join(chunks).decode()
        assert reply.startswith("Once upon a time,")
        log = wait_for_log(server, "chat ended: state=success", after=offset)
        assert f"reply={reply!r}" in log
        wait_idle(client, case.prefix + "/get_load")


def test_overflow_gets_429_and_leaving_mid_stream_is_reported(served: tuple[Case, Server]) -> None:
    case, server = served
    offset = len(server.output())
    chat_url = case.prefix + "/chat_stream"
    with httpx.Client(base_url=server.url, timeout=WATCHDOG) as first, httpx.Client(base_url=server.url) as second:
        with first.stream("POST", chat_url, json={"user_input": "a long story, please"}) as streaming:
            assert streaming.status_code == 200
            chunks = streaming.iter_bytes()  # keep a reference: a collected iterator closes the connection
            assert next(chunks)  # the first token is out: the only slot is busy
            rejected = second.post(chat_url, json={"user_input": "me too"}, timeout=WATCHDOG)
            assert rejected.status_code == 429
            assert rejected.json() == {"error": "too_many_requests"}
            load = second.get(case.prefix + "/get_load").json()
            assert (load["processing"], load["waiting"]) == (1, 0)
        # Leaving the block closed the connection mid-stream.
        wait_for_log(server, "chat ended: state=client_disconnected_while_streaming", after=offset)
        assert "state=success" not in server.output()[offset:]
        wait_idle(second, case.prefix + "/get_load")
        metrics = second.get(case.prefix + "/metrics").text
        assert 'chatstream_rejected_total{reason="queue_full"} 1.0' in metrics


@pytest.mark.parametrize("served", ["fastapi"], indirect=True)
def test_fastapi_intercept_and_callback_endpoints(served: tuple[Case, Server]) -> None:
    """The seed's two other snippets: read the message first, and a per-call completion callback."""
    _, server = served
    offset = len(server.output())
    with httpx.Client(base_url=server.url, timeout=WATCHDOG) as client:
        body = {"user_input": "Hi there", "regenerate": False, "generation_params": {"max_new_tokens": 4}}
        intercepted = client.post("/chat_stream_intercept", json=body)
        assert intercepted.status_code == 200
        assert intercepted.text == "Once upon a time,"
        wait_for_log(server, "user_input='Hi there' regenerate=False", after=offset)
        wait_for_log(server, "chat ended: state=success reply='Once upon a time,'", after=offset)

        offset = len(server.output())
        called_back = client.post("/chat_stream_callback", json=body)
        assert called_back.text == "Once upon a time,"
        log = wait_for_log(server, "completed: state=success", after=offset)
        # The same client (its session cookie): the prompt the callback sees holds the first round.
        prompt = "<|user|>\nHi there\n<|assistant|>\nOnce upon a time,\n<|user|>\nHi there\n<|assistant|>\n"
        assert f"prompt={prompt!r} reply='Once upon a time,'" in log
        assert "chat ended" not in log  # the per-call callback replaces the default one
