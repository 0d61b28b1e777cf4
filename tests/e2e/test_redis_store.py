"""The Redis session store against a real ``redis-server``: replicas share conversations."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from chatstream_asgi import ChatStream
from chatstream_asgi.sessions.redis_store import RedisSessionStore
from chatstream_asgi.sessions.store import Session
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio

WATCHDOG = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A throwaway redis-server on a free 127.0.0.1 port (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    port = _free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WATCHDOG
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisSessionStore]:
    store = RedisSessionStore.from_url(redis_url, ttl=120, prefix=f"test:{time.monotonic_ns()}:")
    yield store
    await store.close()


async def test_two_replicas_continue_the_same_conversation(store: RedisSessionStore) -> None:
    def replica() -> ChatStream:
        return ChatStream(
            use_mock_response=True, mock_params={"type": "echo"}, session_store=store, session_secret="shared"
        )

    a, b = create_app(replica()), create_app(replica())
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(a), base_url="http://test") as on_a,
        httpx.AsyncClient(transport=httpx.ASGITransport(b), base_url="http://test") as on_b,
    ):
        with anyio.fail_after(WATCHDOG):
            first = await on_a.post("/chat_stream", json={"user_input": "started on a"})
            on_b.cookies.set("chatstream_session", first.headers["x-session-id"])
            second = await on_b.post("/chat_stream", json={"user_input": "continued on b"})
            await on_a.post("/set_generation_params", json={"temperature": 0.3})
            from_a = (await on_a.get("/get_prompt")).json()
            params_b = (await on_b.get("/get_generation_params")).json()
    assert second.headers["x-session-id"] == first.headers["x-session-id"]
    assert "set-cookie" not in second.headers
    assert [m["content"] for m in from_a["messages"]] == ["started on a"] * 2 + ["continued on b"] * 2
    assert "started on a" in from_a["prompt"] and "continued on b" in from_a["prompt"]
    assert params_b["temperature"] == 0.3


async def test_sessions_expire_and_can_be_deleted(store: RedisSessionStore) -> None:
    session = Session("abc", [{"id": "1", "role": "user", "content": "こんにちは"}], {"top_k": 3})
    await store.save(session)
    assert 0 < await store.client.ttl(store.prefix + "abc") <= 120
    loaded = await store.load("abc")
    assert loaded == session
    await store.delete("abc")
    assert await store.load("abc") is None
    assert await store.load("never-saved") is None
