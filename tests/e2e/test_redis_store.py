"""The Redis session store against a real ``redis-server``: replicas share conversations."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from chatstream_asgi import ChatStream
from chatstream_asgi.sessions.redis_store import RedisSessionStore
from chatstream_asgi.sessions.store import Session
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio

WATCHDOG = 10.0


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
