"""CLI scale-out: replicas sharing sessions through ``--session-store redis://``, one engine per ``--device``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from servers import Server, free_port

from chatstream_asgi.cli import _engine, build_parser
from chatstream_asgi.engines.base import GenerationParams, GenerationRequest, GenerationStream
from chatstream_asgi.engines.pool import EnginePool


def replica(*options: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--engine", "mock", "--mock-type", "echo",
               "--mock-time-per-token", "0", "--host", "127.0.0.1", "--port", str(port), *options]  # fmt: skip
    return Server(command, port, env or {})


def test_two_cli_replicas_on_one_redis_continue_a_conversation_with_the_same_cookie(redis_url: str) -> None:
    options = ("--session-store", redis_url, "--session-secret", "shared-by-both")
    a, b = replica(*options), replica(*options)
    try:
        a.wait_ready()
        b.wait_ready()
        with httpx.Client(timeout=10.0) as client:  # one cookie jar, two servers
            first = client.post(a.url + "/chat_stream", json={"user_input": "started on a"})
            assert first.status_code == 200 and first.text == "started on a"
            cookie = client.cookies["chatstream_session"]
            assert saved_history(client, b.url, 2) == ["started on a"] * 2  # b reads what a saved
            second = client.post(b.url + "/chat_stream", json={"user_input": "continued on b"})
            assert second.status_code == 200 and second.text == "continued on b"
            assert "set-cookie" not in second.headers  # b accepted a's cookie
            assert second.headers["x-session-id"] == cookie
            prompt = saved_history(client, a.url, 4)
        assert prompt == ["started on a"] * 2 + ["continued on b"] * 2
    finally:
        a.stop()
        b.stop()


def saved_history(client: httpx.Client, url: str, count: int) -> list[str]:
    """The session's history as ``url`` sees it, once it has ``count`` messages: a turn is saved just
    after its last byte was sent, so the client may ask a moment before (bounded)."""
    deadline = time.monotonic() + 10.0
    while True:
        messages = [m["content"] for m in client.get(url + "/get_prompt").json()["messages"]]
        if len(messages) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.02)


def test_a_shared_store_without_a_fixed_secret_refuses_to_start(redis_url: str) -> None:
    server = replica("--session-store", redis_url, env={"CHATSTREAM_SESSION_SECRET": ""})
    try:
        assert server.wait_exit(20) != 0
        assert "--session-store is shared: set --session-secret" in server.output()
    finally:
        server.stop()
    bad = replica("--session-store", "memcached://x", env={"CHATSTREAM_SESSION_SECRET": "s"})
    try:
        assert bad.wait_exit(20) != 0
        assert "'memory' or a redis:// URL" in bad.output()
    finally:
        bad.stop()


@pytest.mark.anyio
async def test_one_engine_per_device_behind_the_pool(tiny_model_dir: Path) -> None:
    """``--device cpu --device cpu`` (the CPU stand-in for ``--device cuda:0 --device cuda:1``): two engines,
    requests spread over both, the same greedy output from each."""
    args = build_parser().parse_args(
        ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--device", "cpu", "--concurrency", "4"]
    )
    pool = _engine(args)
    assert isinstance(pool, EnginePool)
    assert [str(engine.device) for engine in pool.engines] == ["cpu", "cpu"]  # type: ignore[attr-defined]
    assert [engine.max_batch_size for engine in pool.engines] == [2, 2]  # type: ignore[attr-defined]
    await pool.start()
    try:
        params = GenerationParams(temperature=0.0, max_new_tokens=6)
        messages = [{"role": "user", "content": "hello"}]
        streams = [pool.generate(GenerationRequest(f"r{i}", messages, params, ignore_eos=True)) for i in range(2)]
        assert [stream.index for stream in streams] == [0, 1]
        with anyio.fail_after(60):
            texts = [await collect(stream) for stream in streams]
        assert texts[0] == texts[1] and texts[0]
        assert [stream.completion_tokens for stream in streams] == [6, 6]
        assert pool.active == (0, 0)
    finally:
        await pool.shutdown()


async def collect(stream: GenerationStream) -> str:
    return "".join([delta async for delta in stream])


def test_devices_all_needs_a_cuda_device() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    args = build_parser().parse_args(["serve", "--devices", "all"])
    with pytest.raises(SystemExit, match="no CUDA device"):
        _engine(args)
