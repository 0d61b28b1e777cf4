"""OpenAIEngine against real chatstream-asgi servers (mock engine) on 127.0.0.1: streaming, cancellation, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from live_server import serve_in_thread
from remote_support import (
    MESSAGES,
    WATCHDOG,
    WHILE_STREAMING,
    Recorder,
    chat_stream,
    front,
    long_text,
    processing,
    remote,
    request,
    sse_events,
)
from servers import free_port

from chatstream_asgi import (
    EngineError,
    GenerationParams,
    GenerationRequest,
)
from chatstream_asgi.engines.mock import LONG_TEXT
from chatstream_asgi.engines.remote import EngineOverloaded, EngineUnavailable, OpenAIEngine
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio


async def test_text_streams_through_the_front_with_finish_reason_and_usage() -> None:
    with remote() as (url, remote_states):
        engine = OpenAIEngine(url, timeout=WATCHDOG)
        with anyio.fail_after(WATCHDOG):
            async with front(engine) as (client, states):
                body = {"messages": MESSAGES, "format": "sse", "generation_params": {"max_new_tokens": 12}}
                response = await client.post("/chat_stream", json=body)
                assert response.status_code == 200
                events = sse_events(response.text)
                assert "".join(data["text"] for name, data in events if name == "delta") == long_text(12)
                name, done = events[-1]
                assert name == "done"
                assert done["finish_reason"] == "length"
                assert remote_states.wait(1) == ["success"]
                prompt_tokens, completion_tokens = remote_states.usage[0]
                assert completion_tokens == 12
                assert done["usage"]["prompt_tokens"] == prompt_tokens  # the remote's own count
                assert done["usage"]["completion_tokens"] == 12
                assert await states.wait_async(1) == ["success"]
                # The model name came from the remote's /v1/models and the front's API reports it.
                assert engine.model_name == "mock"
                assert (await client.get("/v1/models")).json()["data"][0]["id"] == "mock"
                response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
                assert response.json()["choices"][0]["message"]["content"] == long_text(5)
        # A reply cut by a stop string ends with finish_reason "stop".
        async with httpx.AsyncClient(timeout=WATCHDOG) as http:
            engine = OpenAIEngine(url, "mock", client=http)
            stream = engine.generate(request(max_new_tokens=2000, stop=("clients",)))
            with anyio.fail_after(WATCHDOG):
                text = "".join([delta async for delta in stream])
            assert text == LONG_TEXT[: LONG_TEXT.index("clients")]
            assert stream.finish_reason == "stop"


async def test_parameters_and_headers_reach_the_remote() -> None:
    with remote(type="echo") as (url, remote_states):
        async with httpx.AsyncClient(timeout=WATCHDOG) as http:
            engine = OpenAIEngine(url + "/v1/", "mock", api_key="sk-test", client=http)
            await engine.start()
            messages = [{"role": "user", "content": "alpha beta STOP gamma"}]
            stream = engine.generate(GenerationRequest("req-42", messages, GenerationParams(stop=("STOP",), seed=1)))
            with anyio.fail_after(WATCHDOG):
                assert "".join([delta async for delta in stream]) == "alpha beta "
            assert stream.finish_reason == "stop"
            # The remote reports its completion after its last byte: wait for it, don't race it.
            assert await remote_states.wait_async(1) == ["success"]
            assert stream.completion_tokens == remote_states.usage[0][1]
            await engine.shutdown()
            assert not http.is_closed  # a client passed in stays the caller's
        headers = remote_states.headers[0]
        assert headers["authorization"] == "Bearer sk-test"
        assert headers["x-request-id"] == "req-42"


async def test_front_client_disconnect_frees_the_remote_slot() -> None:
    with remote(concurrency=1, queue=0, time_per_token_sec=0.02) as (remote_url, remote_states):
        states = Recorder()
        cs = chat_stream(states, OpenAIEngine(remote_url, timeout=WATCHDOG))
        with serve_in_thread(create_app(cs)) as front_url, anyio.fail_after(WATCHDOG):
            async with httpx.AsyncClient(timeout=WATCHDOG) as client:
                body = {"messages": MESSAGES, "generation_params": {"max_new_tokens": 500}}
                async with client.stream("POST", front_url + "/chat_stream", json=body) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_text():
                        if chunk:
                            break
                    assert processing(remote_url) == 1
                # Leaving the block closed the connection mid-stream.
            assert await states.wait_async(1) == [WHILE_STREAMING]
            assert await remote_states.wait_async(1) == [WHILE_STREAMING]
            assert processing(remote_url) == 0
            assert remote_states.usage[0][1] < 500


async def test_cancel_closes_the_remote_response() -> None:
    with remote(concurrency=1, queue=0, time_per_token_sec=0.02) as (url, remote_states):
        engine = OpenAIEngine(url, "mock", timeout=WATCHDOG)
        await engine.start()
        with anyio.fail_after(WATCHDOG):
            stream = engine.generate(request())
            assert await stream.__anext__() == "Once"
            assert processing(url) == 1
            stream.cancel()
            stream.cancel()  # idempotent
            assert await remote_states.wait_async(1) == [WHILE_STREAMING]
            assert processing(url) == 0
            with pytest.raises(StopAsyncIteration):
                while True:
                    await stream.__anext__()
            assert stream.finish_reason == "cancelled"
        await engine.shutdown()


async def test_remote_429_ends_the_front_request_as_unknown_error() -> None:
    with remote(concurrency=1, queue=0, time_per_token_sec=0.02) as (url, remote_states):
        engine = OpenAIEngine(url, "mock", timeout=WATCHDOG)
        with anyio.fail_after(WATCHDOG):
            async with front(engine) as (client, states):
                await engine.start()
                busy = engine.generate(request("busy"))
                await busy.__anext__()  # the remote's only slot is taken and it has no queue
                with pytest.raises(EngineOverloaded, match=r"answered 429: too many requests"):
                    await engine.generate(request("rejected")).__anext__()
                response = await client.post("/chat_stream", json={"messages": MESSAGES})
                assert response.status_code == 500
                assert response.json() == {"error": "unknown_error_occurred", "detail": "generation failed"}
                assert await states.wait_async(1) == ["unknown_error_occurred"]
                busy.cancel()
                assert await remote_states.wait_async(1) == [WHILE_STREAMING]


@pytest.mark.parametrize("fail_after", [0, 3])
async def test_remote_500_surfaces_as_unknown_error(fail_after: int) -> None:
    with remote(fail_after_tokens=fail_after) as (url, remote_states):
        engine = OpenAIEngine(url, "mock", timeout=WATCHDOG)
        with anyio.fail_after(WATCHDOG):
            async with front(engine) as (client, states):
                body = {"messages": MESSAGES, "format": "sse"}
                response = await client.post("/chat_stream", json=body)
                assert await states.wait_async(1) == ["unknown_error_occurred"]
                if fail_after == 0:
                    assert response.status_code == 500  # before any text: a 500 JSON error
                    assert response.json()["error"] == "unknown_error_occurred"
                    match = r"answered 500: generation failed"
                else:
                    assert response.status_code == 200  # after text: an error frame ends the stream
                    events = sse_events(response.text)
                    assert [name for name, _ in events] == ["delta"] * fail_after + ["error"]
                    assert "".join(data["text"] for _, data in events[:-1]) == long_text(fail_after)
                    match = r"the stream failed: generation failed"
                stream = engine.generate(request())
                with pytest.raises(EngineError, match=match):
                    async for _ in stream:
                        pass
                assert stream.finish_reason == "error"
        assert remote_states.wait(2) == ["unknown_error_occurred"] * 2


async def test_dead_remote_fails_fast() -> None:
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}", timeout=WATCHDOG)
    with anyio.fail_after(3):
        await engine.start()  # the model stays unknown; start() only logs
        assert engine.model_name == ""
        stream = engine.generate(request())
        with pytest.raises(EngineUnavailable, match=r"no response from .*ConnectError"):
            await stream.__anext__()
        async with front(engine) as (client, states):
            response = await client.post("/chat_stream", json={"messages": MESSAGES})
            assert response.status_code == 500
            assert await states.wait_async(1) == ["unknown_error_occurred"]


async def test_shutdown_cancels_open_streams() -> None:
    with remote(time_per_token_sec=0.02) as (url, remote_states):
        engine = OpenAIEngine(url, "mock", timeout=WATCHDOG)
        await engine.start()
        with anyio.fail_after(WATCHDOG):
            stream = engine.generate(request())
            await stream.__anext__()
            await engine.shutdown()
            async for _ in stream:  # what had arrived, then the end
                pass
            assert stream.finish_reason == "cancelled"
            assert await remote_states.wait_async(1) == [WHILE_STREAMING]
            assert processing(url) == 0


def test_prompt_without_tokenizer_is_role_tagged_with_estimated_tokens() -> None:
    engine = OpenAIEngine("http://127.0.0.1:1")
    prompt = engine.render_prompt([{"role": "user", "content": "hi"}])
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert engine.count_tokens([{"role": "user", "content": "hi"}]) == 7  # 25 characters / 4, rounded up
    assert engine.context_len == 8192


def test_prompt_with_tokenizer_uses_its_chat_template(tiny_model_dir: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    engine = OpenAIEngine("http://127.0.0.1:1", "tiny", tokenizer=tokenizer, context_len=512)
    messages = [{"role": "user", "content": "hello world"}]
    prompt = engine.render_prompt(messages)
    assert prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert engine.count_tokens(messages) == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert engine.context_len == 512


def _chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"


CANNED: dict[str, tuple[int, str]] = {
    # Comments, a data field split over two lines, TGI's finish reason, no usage event.
    "/tgi": (
        200,
        ": keep-alive\n\n"
        + _chunk({"role": "assistant"})
        + 'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "Hel"}}]}\n\n'
        + _chunk({"content": "lo"}, "eos_token")
        + "data: [DONE]\n\n",
    ),
    "/no-done": (200, _chunk({"content": "cut"}, "length")),
    "/truncated": (200, _chunk({"content": "Hel"})),
    "/garbage": (200, "data: not json\n\n"),
    "/invalid": (400, json.dumps({"error": "Input validation error: `max_tokens` too large", "error_type": "v"})),
    "/overloaded": (503, "Model is overloaded"),
}


async def canned_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A stand-in OpenAI-compatible server answering each path prefix with a canned body."""
    if scope["type"] != "http":
        return
    path = scope["path"].removesuffix("/v1/chat/completions")
    status, body = CANNED.get(path, (200, "ok"))
    media_type = b"text/event-stream" if status == 200 else b"application/json"
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", media_type)]})
    await send({"type": "http.response.body", "body": body.encode()})


@pytest.fixture(scope="module")
def canned_url() -> Iterator[str]:
    with serve_in_thread(canned_app, ready_path="/") as url:
        yield url


@pytest.mark.parametrize(
    ("path", "text", "finish_reason", "error"),
    [
        ("/tgi", "Hello", "stop", None),
        ("/no-done", "cut", "length", None),
        ("/truncated", "Hel", None, r"ended before its last event"),
        ("/garbage", "", None, r"not a JSON event: 'not json'"),
        ("/invalid", "", None, r"answered 400: Input validation error: `max_tokens` too large"),
        ("/overloaded", "", None, r"answered 503: Model is overloaded"),
    ],
)
async def test_other_servers_streams_and_errors(
    canned_url: str, path: str, text: str, finish_reason: str | None, error: str | None
) -> None:
    engine = OpenAIEngine(canned_url + path, "remote", timeout=WATCHDOG)
    stream = engine.generate(request())
    received: list[str] = []
    with anyio.fail_after(WATCHDOG):
        if error is None:
            received = [delta async for delta in stream]
        else:
            expected = EngineOverloaded if path == "/overloaded" else EngineError
            with pytest.raises(expected, match=error):
                async for delta in stream:
                    received.append(delta)
    assert "".join(received) == text
    assert stream.finish_reason == (finish_reason or "error")
    if error is None:  # no usage event: deltas counted, the prompt estimated
        assert stream.completion_tokens == len(received)
        assert stream.prompt_tokens == engine.count_tokens(MESSAGES)
        counted = request()
        counted.prompt_tokens = 1234  # the service's count, made off the loop while fitting: used as it is
        again = engine.generate(counted)
        with anyio.fail_after(WATCHDOG):
            assert [delta async for delta in again] == received
        assert again.prompt_tokens == 1234
    await engine.shutdown()
