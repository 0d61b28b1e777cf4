"""The four completion states through real servers (hypercorn, uvicorn, granian) and real clients.

The app (tests/support/apps/chat_app.py) records every completion state; tests wait for them through a
long-poll endpoint instead of sleeping, and check that every slot is free again via /get_load.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from servers import SERVERS, Server, running

from chatstream_asgi.engines.mock import LONG_TEXT, tokenize

pytestmark = pytest.mark.anyio

WATCHDOG = 20.0
SUCCESS = "success"
WHILE = "client_disconnected_while_streaming"
BEFORE = "client_disconnected_before_streaming"
ERROR = "unknown_error_occurred"


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with running(request.param) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as c:
        (await c.post("/_test/reset")).raise_for_status()
        with anyio.fail_after(WATCHDOG):
            yield c
        await assert_idle(c)


def body(max_new_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"user_input": "hello", **extra}
    if max_new_tokens is not None:
        data["generation_params"] = {"max_new_tokens": max_new_tokens}
    return data


async def wait_states(client: httpx.AsyncClient, count: int) -> list[str]:
    """The recorded states once there are ``count`` of them (the server long-polls, bounded)."""
    states = (await client.get("/_test/wait", params={"count": count, "timeout": 10})).json()["states"]
    assert len(states) >= count, states
    return states


async def load(client: httpx.AsyncClient, prefix: str = "") -> dict[str, Any]:
    return (await client.get(f"{prefix}/get_load")).json()


async def wait_load(client: httpx.AsyncClient, prefix: str = "", *, timeout: float = 5.0, **expected: int) -> None:
    """Poll /get_load (bounded) until it shows ``expected``."""
    with anyio.fail_after(timeout):
        while True:
            current = await load(client, prefix)
            if all(current[k] == v for k, v in expected.items()):
                return
            await anyio.sleep(0.01)


async def assert_idle(client: httpx.AsyncClient) -> None:
    for prefix in ("", "/soft", "/slow", "/fail0", "/fail3"):
        await wait_load(client, prefix, processing=0, waiting=0)


async def read_frames(response: httpx.Response, count: int) -> bytes:
    """Read until ``count`` raw chunks arrived."""
    received = b""
    chunks = 0
    async for chunk in response.aiter_raw():
        received += chunk
        chunks += 1
        if chunks >= count:
            break
    return received


class Stream:
    """A streaming request in a task that the test can cancel (the client closes the connection)."""

    def __init__(self, client: httpx.AsyncClient, path: str, data: dict[str, Any]) -> None:
        self.client, self.path, self.data = client, path, data
        self.status: int | None = None
        self.received = b""
        self.first_byte = anyio.Event()
        self.done = anyio.Event()
        self.scope = anyio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            async with self.client.stream("POST", self.path, json=self.data) as response:
                self.status = response.status_code
                async for chunk in response.aiter_raw():
                    self.received += chunk
                    self.first_byte.set()
            self.done.set()

    def close(self) -> None:
        self.scope.cancel()


async def test_normal_end(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat_stream", json=body(10))
    assert response.status_code == 200
    assert response.text == "Once upon a time, a small server streamed tokens to"
    assert await wait_states(client, 1) == [SUCCESS]


async def test_normal_end_in_endpoint_mode(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat", json=body(3))
    assert response.text == "Once upon a"
    assert response.headers["x-chatstream-last-generated-message-id"]
    assert await wait_states(client, 1) == [SUCCESS]


@pytest.mark.parametrize("fmt", ["text", "sse"])
async def test_disconnect_right_after_the_last_chunk_is_success(server: Server, fmt: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as c:
        await c.post("/_test/reset")
        async with c.stream("POST", "/chat_stream", json=body(5, format=fmt)) as response:
            async for _ in response.aiter_raw():
                pass
    # The client (and its connection) is closed right after the last chunk.
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as c:
        assert await wait_states(c, 1) == [SUCCESS]
        await assert_idle(c)


@pytest.mark.parametrize("path", ["/chat_stream", "/chat"])
async def test_client_closes_mid_stream(client: httpx.AsyncClient, path: str) -> None:
    async with client.stream("POST", path, json=body()) as response:
        assert response.status_code == 200
        assert await read_frames(response, 3)
    assert await wait_states(client, 1) == [WHILE]


async def test_client_closes_while_queued_and_the_next_request_moves_up(client: httpx.AsyncClient) -> None:
    first = Stream(client, "/chat_stream", body())
    queued = Stream(client, "/chat_stream", body(3))
    after = Stream(client, "/chat_stream", body(3))
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await first.first_byte.wait()
        tg.start_soon(queued.run)
        await wait_load(client, processing=1, waiting=1)
        queued.close()
        assert await wait_states(client, 1) == [BEFORE]
        await wait_load(client, processing=1, waiting=0)
        # The place is free at once: the next request queues instead of getting a 429.
        tg.start_soon(after.run)
        await wait_load(client, processing=1, waiting=1)
        first.close()
        with anyio.fail_after(5):
            await after.done.wait()
    assert after.status == 200 and after.received == b"Once upon a"
    assert await wait_states(client, 3) == [BEFORE, WHILE, SUCCESS]


async def test_client_closes_during_the_initial_wait(client: httpx.AsyncClient) -> None:
    stream = Stream(client, "/slow/chat_stream", body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await wait_load(client, "/slow", processing=1)
        stream.close()
    assert await wait_states(client, 1) == [BEFORE]
    assert stream.received == b""


async def test_engine_failure_before_the_first_token_is_500_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/fail0/chat_stream", json=body())
    assert response.status_code == 500
    assert response.json()["error"] == ERROR
    assert await wait_states(client, 1) == [ERROR]


@pytest.mark.parametrize(
    ("fmt", "tail"),
    [
        ("text", '<::ERROR::>{"error":"unknown_error_occurred"'),
        ("chatstream", '<::ERROR::>{"error":"unknown_error_occurred"'),
        ("sse", 'event: error\ndata: {"state":"unknown_error_occurred"'),
        ("ndjson", '{"type":"error","state":"unknown_error_occurred"'),
    ],
)
async def test_engine_failure_after_tokens_shows_an_error_frame(client: httpx.AsyncClient, fmt: str, tail: str) -> None:
    response = await client.post("/fail3/chat_stream", json=body(format=fmt))
    assert response.status_code == 200
    assert "upon" in response.text
    assert tail in response.text
    assert response.text.rstrip("\n").endswith(("<::EOS::>", "}", '"}'))
    assert await wait_states(client, 1) == [ERROR]


async def test_queue_overflow_is_429_at_once_while_streams_go_on(client: httpx.AsyncClient) -> None:
    first = Stream(client, "/chat_stream", body())
    queued = Stream(client, "/chat_stream", body(2))
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await first.first_byte.wait()
        tg.start_soon(queued.run)
        await wait_load(client, processing=1, waiting=1)
        for _ in range(3):
            started = time.monotonic()
            response = await client.post("/chat_stream", json=body())
            assert time.monotonic() - started < 2.0
            assert response.status_code == 429
            assert response.json() == {"error": "too_many_requests"}
        before = len(first.received)
        with anyio.fail_after(5):
            while len(first.received) <= before:  # the first stream keeps going
                await anyio.sleep(0.01)
        first.close()
        await queued.done.wait()
    assert queued.received == b"Once upon"
    metrics = (await client.get("/metrics")).text
    assert 'chatstream_rejected_total{reason="queue_full"}' in metrics
    assert await wait_states(client, 2) == [WHILE, SUCCESS]


async def test_queue_overflow_as_200_when_configured(client: httpx.AsyncClient) -> None:
    first = Stream(client, "/soft/chat_stream", body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await first.first_byte.wait()
        response = await client.post("/soft/chat_stream", json=body())
        assert response.status_code == 200
        assert response.json() == {"error": "too_many_requests"}
        first.close()
    assert await wait_states(client, 1) == [WHILE]


def test_oversized_chunked_body_is_413(server: Server) -> None:
    """A chunked upload (no Content-Length) that grows over the limit gets a 413 JSON at once."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /chat_stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 8192
        for _ in range(9):  # 72 KiB, over the app's 64 KiB limit; the body is never finished
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"] == "body_too_large"
    with httpx.Client(base_url=server.url, timeout=5.0) as c:
        c.post("/_test/reset")
        metrics = c.get("/metrics").text
        assert 'chatstream_rejected_total{reason="body_too_large"} 1.0' in metrics
        fine = c.post(
            "/chat_stream",
            content=iter([b'{"user_input":', b' "hi", ', b'"generation_params": ', b'{"max_new_tokens": 3}}']),
        )
        assert fine.status_code == 200
        assert c.get("/_test/wait", params={"count": 1}).json()["states"] == [SUCCESS]


def _read_response(sock: socket.socket) -> bytes:
    """A whole response with a Content-Length (bounded by the socket timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"!"
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            break
        rest += more
    return head + b"\r\n\r\n" + rest


SHUTDOWN_STATES = {"hypercorn": WHILE, "uvicorn": WHILE, "granian": SUCCESS}
"""What a stream open at SIGTERM/SIGINT ends in, per server (see the test's docstring)."""


@pytest.mark.parametrize("server_name", SERVERS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_with_an_open_stream(tmp_path: Path, server_name: str, sig: signal.Signals) -> None:
    """The stream ends, its state is reported once and the server exits: no hang.

    The servers drain connections *before* the lifespan shutdown reaches ChatStream.shutdown
    (which would abort with a ``server_shutting_down`` error frame, ``unknown_error_occurred``):

    - hypercorn and uvicorn cancel the request task after their graceful timeout (1 s here); the
      package cannot tell that cancellation from a client leaving, so the state is
      ``client_disconnected_while_streaming`` and the stream is cut without a final frame;
    - granian lets the open stream run to its end (``success``) and exits after it.
    """
    state_file = tmp_path / "states"
    with running(server_name, env={"CS_STATE_FILE": str(state_file)}) as srv:
        with httpx.Client(base_url=srv.url, timeout=10.0) as c, c.stream("POST", "/chat_stream", json=body(150)) as r:
            chunks = r.iter_raw()
            next(chunks)
            srv.signal(sig)
            started = time.monotonic()
            received = b"".join(_until_closed(chunks))
            ended_after = time.monotonic() - started
        try:
            srv.wait_exit(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{server_name} did not exit after {sig.name}:\n{srv.output()}")
        output = srv.output()
    assert ended_after < 8, output
    assert state_file.read_text().split() == [SHUTDOWN_STATES[server_name]], (received[-200:], output)
    if SHUTDOWN_STATES[server_name] == SUCCESS:  # the whole 150-token reply (its first chunk was read before)
        whole = "".join(itertools.islice(itertools.cycle(tokenize(LONG_TEXT)), 150))
        assert received and whole.endswith(received.decode())


def _until_closed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    except httpx.TransportError:
        return


def test_error_bodies_are_json(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=5.0) as c:
        c.post("/_test/reset")
        response = c.post("/chat_stream", content=b"{not json")
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"
        assert json.loads(c.get("/_test/states").text)["states"] == []
