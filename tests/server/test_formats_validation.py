"""Stream formats on the wire, and request validation (400 invalid_request, never a state)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from asgi_harness import Receive, Send, StateLog, http_scope, not_found

from chatstream_asgi import ChatStream, ChatStreamMiddleware, GenerationRequest, MockEngine, MockParams
from chatstream_asgi.engines.base import GenerationStream
from chatstream_asgi.protocols.framing import FORMATS, ChatStreamFramer, Summary

pytestmark = pytest.mark.anyio

WATCHDOG = 5.0


class CountingEngine(MockEngine):
    def __init__(self) -> None:
        super().__init__(MockParams(type="echo"))
        self.generated = 0

    def generate(self, request: GenerationRequest) -> GenerationStream:
        self.generated += 1
        return super().generate(request)


async def serve(cs: ChatStream, body: bytes, log: StateLog | None = None) -> Send:
    send = Send()
    with anyio.fail_after(WATCHDOG):
        await ChatStreamMiddleware(not_found, cs, callback=log)(http_scope(body=body), Receive(body), send)
    return send


def request(fmt: str, text: str = "one two three") -> bytes:
    return json.dumps({"user_input": text, "format": fmt}).encode()


async def test_text_format() -> None:
    send = await serve(ChatStream(MockEngine(MockParams(type="echo"))), request("text"))
    assert send.headers["content-type"] == "text/plain; charset=utf-8"
    assert send.bodies == [b"one", b" two", b" three", b""]


async def test_chatstream_format_sends_the_whole_reply_so_far_with_eos() -> None:
    send = await serve(ChatStream(MockEngine(MockParams(type="echo"))), request("chatstream"))
    assert send.headers["content-type"] == "text/plain; charset=utf-8"
    assert [b for b in send.bodies if b] == [b"one<::EOS::>", b"one two<::EOS::>", b"one two three<::EOS::>"]


async def test_sse_format() -> None:
    send = await serve(ChatStream(MockEngine(MockParams(type="echo"))), request("sse", "hi there"))
    assert send.headers["content-type"].startswith("text/event-stream")
    assert send.headers["cache-control"] == "no-cache"
    assert send.headers["x-accel-buffering"] == "no"
    events = [e for e in send.body.decode().split("\n\n") if e]
    parsed = [
        (e.split("\n")[0].removeprefix("event: "), json.loads(e.split("\n")[1].removeprefix("data: "))) for e in events
    ]
    assert parsed[:2] == [("delta", {"text": "hi"}), ("delta", {"text": " there"})]
    name, done = parsed[2]
    assert name == "done"
    assert done["state"] == "success" and done["finish_reason"] == "stop"
    assert done["message_id"] == send.headers["x-chatstream-last-generated-message-id"]
    assert done["usage"]["completion_tokens"] == 2


async def test_ndjson_format() -> None:
    send = await serve(ChatStream(MockEngine(MockParams(type="echo"))), request("ndjson", "hi there"))
    assert send.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in send.body.decode().splitlines()]
    assert [line["type"] for line in lines] == ["delta", "delta", "done"]
    assert lines[-1]["usage"]["total_tokens"] == lines[-1]["usage"]["prompt_tokens"] + 2


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_has_an_error_frame(name: str) -> None:
    frame = FORMATS[name]().error("unknown_error_occurred", "generation failed").decode()
    assert "unknown_error_occurred" in frame and "generation failed" in frame


def test_chatstream_framer_final_is_empty_and_error_ends_with_eos() -> None:
    framer = ChatStreamFramer()
    framer.delta("a")
    assert framer.final(Summary("id", "stop", 1, 1)) == b""
    assert framer.error("e", "d").endswith(b"<::EOS::>")


def test_multibyte_text_is_utf8() -> None:
    assert FORMATS["text"]().delta("こんにちは") == "こんにちは".encode()
    assert json.loads(FORMATS["ndjson"]().delta("é"))["text"] == "é"


# -- validation ------------------------------------------------------------------------------------

INVALID: list[tuple[str, Any]] = [
    ("not-json", b"{not json"),
    ("not-utf8", b"\xff\xfe"),
    ("empty", b""),
    ("array", []),
    ("user_input-type", {"user_input": 3}),
    ("missing-input", {"regenerate": False}),
    ("both-inputs", {"user_input": "a", "messages": [{"role": "user", "content": "b"}]}),
    ("regenerate-type", {"user_input": "a", "regenerate": "yes"}),
    ("messages-type", {"messages": "hello"}),
    ("messages-empty", {"messages": []}),
    ("messages-role", {"messages": [{"role": "wizard", "content": "b"}]}),
    ("messages-content", {"messages": [{"role": "user", "content": 5}]}),
    ("params-type", {"user_input": "a", "generation_params": [1]}),
    ("temperature-type", {"user_input": "a", "generation_params": {"temperature": "hot"}}),
    ("temperature-bool", {"user_input": "a", "generation_params": {"temperature": True}}),
    ("temperature-range", {"user_input": "a", "generation_params": {"temperature": -1}}),
    ("top_p-zero", {"user_input": "a", "generation_params": {"top_p": 0}}),
    ("top_p-range", {"user_input": "a", "generation_params": {"top_p": 1.5}}),
    ("top_k-negative", {"user_input": "a", "generation_params": {"top_k": -1}}),
    ("top_k-float", {"user_input": "a", "generation_params": {"top_k": 1.5}}),
    ("penalty-zero", {"user_input": "a", "generation_params": {"repetition_penalty": 0}}),
    ("max_new_tokens-zero", {"user_input": "a", "generation_params": {"max_new_tokens": 0}}),
    ("max_new_tokens-over-limit", {"user_input": "a", "generation_params": {"max_new_tokens": 10_000}}),
    ("stop-empty", {"user_input": "a", "generation_params": {"stop": [""]}}),
    ("seed-negative", {"user_input": "a", "generation_params": {"seed": -1}}),
    ("unknown-param", {"user_input": "a", "generation_params": {"temprature": 0.5}}),
    ("unknown-format", {"user_input": "a", "format": "xml"}),
]


async def test_invalid_requests_are_400_and_never_reach_the_engine_or_the_callback() -> None:
    engine, log = CountingEngine(), StateLog()
    cs = ChatStream(engine, max_new_tokens=64, callback=log)
    for name, payload in INVALID:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        send = await serve(cs, body)
        assert send.status == 400, name
        error = send.json()
        assert error["error"] == "invalid_request", name
        assert isinstance(error["detail"], str) and error["detail"], name
        assert send.headers["content-type"] == "application/json"
    assert engine.generated == 0
    assert log.states == []
    assert cs.get_load()["processing"] == 0 and cs.get_load()["waiting"] == 0
    metrics = cs.metrics.render().decode()
    assert f'chatstream_rejected_total{{reason="invalid_request"}} {float(len(INVALID))}' in metrics
    assert 'chatstream_completions_total{state="success"} 0.0' in metrics
    # The service is still fine afterwards.
    ok = await serve(cs, json.dumps({"user_input": "still here"}).encode())
    assert ok.body == b"still here"
    assert log.states == ["success"]


async def test_valid_generation_params_are_accepted() -> None:
    params = {"temperature": 0, "top_k": 0, "top_p": 1, "repetition_penalty": 1.2, "max_new_tokens": 2,
              "stop": "three", "seed": 7}  # fmt: skip
    body = json.dumps({"user_input": "one two three", "generation_params": params}).encode()
    send = await serve(ChatStream(MockEngine(MockParams(type="echo"))), body)
    assert send.status == 200
    assert send.body == b"one two"
