"""Body buffering and replay: read_body, SharedReceive and ReplayReceive (raw ASGI, no server)."""

from __future__ import annotations

import anyio
import pytest
from asgi_harness import Receive, http_scope

from chatstream_asgi.asgi.replay import BodyTooLarge, ClientDisconnected, ReplayReceive, SharedReceive, read_body

pytestmark = pytest.mark.anyio


async def test_read_body_joins_chunks_and_accepts_an_empty_final_chunk() -> None:
    receive = Receive([b"ab", b"cd", b""])
    assert await read_body(http_scope(content_length=False), receive, 10) == b"abcd"


async def test_missing_more_body_means_false() -> None:
    receive = Receive(messages=[{"type": "http.request", "body": b"x"}])
    assert await read_body(http_scope(), receive, 10) == b"x"


async def test_missing_body_key_is_an_empty_chunk() -> None:
    receive = Receive(messages=[{"type": "http.request", "more_body": True}, {"type": "http.request", "body": b"z"}])
    assert await read_body(http_scope(), receive, 10) == b"z"


async def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    receive = Receive(b"x" * 100)
    with pytest.raises(BodyTooLarge):
        await read_body(http_scope(body=b"x" * 100), receive, 10)
    assert receive.calls == 0


async def test_received_bytes_over_the_limit_are_refused_without_content_length() -> None:
    receive = Receive([b"x" * 6, b"x" * 6, b"x" * 6])
    with pytest.raises(BodyTooLarge):
        await read_body(http_scope(content_length=False), receive, 10)
    assert receive.calls == 2  # stops reading as soon as the limit is passed


async def test_a_lying_content_length_is_caught_on_the_bytes() -> None:
    scope = http_scope(headers=[(b"content-length", b"5")])
    with pytest.raises(BodyTooLarge):
        await read_body(scope, Receive(b"x" * 50), 10)


async def test_disconnect_mid_body_keeps_what_arrived() -> None:
    receive = Receive(
        messages=[{"type": "http.request", "body": b"par", "more_body": True}, {"type": "http.disconnect"}]
    )
    with pytest.raises(ClientDisconnected) as info:
        await read_body(http_scope(), receive, 10)
    assert info.value.body == b"par"


async def test_a_receive_that_raises_mid_body_is_a_disconnect() -> None:
    """Ray Serve's proxy raises ``TaskCancelledError`` from ``receive`` when the client leaves mid-body."""
    first = {"type": "http.request", "body": b"par", "more_body": True}

    async def receive() -> dict[str, object]:
        nonlocal first
        if first:
            message, first = first, {}
            return message
        raise RuntimeError("the proxy's receive task was cancelled")

    with pytest.raises(ClientDisconnected) as info:
        await read_body(http_scope(), receive, 10)
    assert info.value.body == b"par"
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_shared_receive_makes_a_one_shot_disconnect_sticky() -> None:
    upstream = Receive(messages=[], sticky=False)
    upstream.disconnect()
    shared = SharedReceive(upstream)
    with anyio.fail_after(2):
        for _ in range(3):
            assert (await shared())["type"] == "http.disconnect"
    assert upstream.calls == 1


async def test_shared_receive_reads_upstream_once_for_concurrent_readers() -> None:
    upstream = Receive(messages=[], sticky=False)
    shared = SharedReceive(upstream)
    got: list[str] = []

    async def reader() -> None:
        got.append((await shared())["type"])

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            upstream.disconnect()
    assert got == ["http.disconnect"] * 3
    assert upstream.calls == 1


async def test_a_cancelled_reader_does_not_lose_the_message() -> None:
    upstream = Receive(messages=[], sticky=False)
    shared = SharedReceive(upstream)
    with anyio.move_on_after(0.02):
        await shared()
    upstream.disconnect()
    with anyio.fail_after(2):
        assert (await shared())["type"] == "http.disconnect"
    assert upstream.calls == 1


async def test_close_cancels_the_pending_upstream_read() -> None:
    shared = SharedReceive(Receive(messages=[]))
    with anyio.move_on_after(0.02):
        await shared()
    shared.close()
    assert shared._pending is None


async def read_once(replay: ReplayReceive) -> dict:
    """One reader: a coroutine of its own that reads once (a Starlette ``Request``, say)."""
    return dict(await replay())


async def test_replay_gives_every_reader_the_body_then_passes_through() -> None:
    upstream = Receive(messages=[], sticky=False)
    replay = ReplayReceive(b"payload", SharedReceive(upstream))
    for _ in range(3):
        assert await read_once(replay) == {"type": "http.request", "body": b"payload", "more_body": False}
    replay.response_started = True
    upstream.disconnect()
    with anyio.fail_after(2):
        assert (await replay())["type"] == "http.disconnect"
        assert (await replay())["type"] == "http.disconnect"  # sticky for every later reader


async def test_replay_stops_replaying_after_max_replays_so_watchers_block() -> None:
    """A reader polling for a disconnect before the response starts must block, not spin."""
    replay = ReplayReceive(b"x", SharedReceive(Receive(messages=[])), max_replays=3)
    for _ in range(3):
        assert (await read_once(replay))["body"] == b"x"
    with anyio.move_on_after(0.05) as scope:
        await read_once(replay)
    assert scope.cancelled_caught


async def test_replay_reports_a_disconnect_seen_while_buffering() -> None:
    replay = ReplayReceive(b"par", SharedReceive(Receive(), disconnected=True))
    with anyio.fail_after(2):
        assert (await replay())["type"] == "http.disconnect"


async def test_replayed_messages_are_copies() -> None:
    replay = ReplayReceive(b"x", SharedReceive(Receive(messages=[])))
    first = await replay()
    first["body"] = b"changed"
    assert (await read_once(replay))["body"] == b"x"


async def test_the_same_reader_gets_the_body_once_then_waits_for_the_disconnect() -> None:
    upstream = Receive(messages=[])
    replay = ReplayReceive(b"x", SharedReceive(upstream))
    assert (await replay())["body"] == b"x"
    with anyio.move_on_after(0.05) as scope:
        await replay()  # the same coroutine asks again (Quart's loop): no second copy
    assert scope.cancelled_caught
    upstream.disconnect()
    with anyio.fail_after(2):
        assert (await replay())["type"] == "http.disconnect"
