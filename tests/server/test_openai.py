"""The OpenAI-compatible endpoints, driven by the official ``openai`` client against a real server."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from live_server import serve_in_thread
from starlette.requests import Request

from chatstream_asgi import ChatStream, CompletionState, get_result
from chatstream_asgi.web.app import create_app

WATCHDOG = 10.0
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, world"}]


class States:
    def __init__(self) -> None:
        self.states: list[CompletionState] = []
        self.replies: list[str] = []
        self.event = threading.Event()

    def __call__(self, request: Request, state: CompletionState) -> None:
        result = get_result(request)
        assert result is not None
        self.states.append(state)
        self.replies.append(result.reply)
        self.event.set()

    def wait(self, count: int) -> list[CompletionState]:
        """The states once there are ``count`` of them (the callback runs after the last byte)."""
        deadline = time.monotonic() + WATCHDOG
        while len(self.states) < count:
            assert time.monotonic() < deadline, f"{len(self.states)} of {count} completions"
            self.event.wait(0.05)
            self.event.clear()
        return self.states


def metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def served() -> Any:
    states = States()
    cs = ChatStream(use_mock_response=True, mock_params={"type": "echo"}, callback=states, session_secret="s")
    with serve_in_thread(create_app(cs)) as url:
        yield url, states


def client(url: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=WATCHDOG, **kwargs)


def test_non_streaming_completion(served: Any) -> None:
    url, states = served
    before = len(states.states)
    completion = client(url).chat.completions.create(model="mock", messages=MESSAGES, max_tokens=50)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello there, world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3
    assert states.wait(before + 1)[before:] == [CompletionState.SUCCESS]
    assert states.replies[-1] == "Hello there, world"


def test_streaming_completion_with_usage(served: Any) -> None:
    url, states = served
    before = len(states.states)
    success_before = metric(url, 'chatstream_completions_total{state="success"}')
    stream = client(url).chat.completions.create(
        model="mock", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there, world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert states.wait(before + 1)[before:] == [CompletionState.SUCCESS]
    assert metric(url, 'chatstream_completions_total{state="success"}') == success_before + 1


def test_stream_wire_format_ends_with_done(served: Any) -> None:
    url, _ = served
    body = {"model": "mock", "messages": MESSAGES, "stream": True, "max_completion_tokens": 2, "stop": ["zzz"]}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=WATCHDOG)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    final = json.loads(events[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length" and "usage" not in final
    assert response.headers["x-chatstream-last-generated-message-id"] in final["id"]


def test_models(served: Any) -> None:
    url, _ = served
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["mock"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        # a call the mock cannot constrain: the field the client sent is named, not response_format
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": {"name": "f"}}},
            "tools",
        ),
    ],
)
def test_invalid_requests_get_openai_errors(served: Any, body: dict[str, Any], param: str) -> None:
    url, _ = served
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(**{"model": "mock", "messages": MESSAGES, **body})
    assert info.value.status_code == 400
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_text_parts_are_joined(served: Any) -> None:
    url, _ = served
    parts = [{"type": "text", "text": "split "}, {"type": "text", "text": "content"}]
    completion = client(url).chat.completions.create(model="mock", messages=[{"role": "user", "content": parts}])
    assert completion.choices[0].message.content == "split content"


def test_queue_full_is_a_rate_limit_error() -> None:
    states = States()
    cs = ChatStream(
        use_mock_response=True,
        mock_params={"type": "long", "time_per_token_sec": 0.05},
        num_of_concurrent_executions=1,
        max_queue_size=0,
        callback=states,
        session_secret="s",
    )
    with serve_in_thread(create_app(cs)) as url:
        stream = client(url).chat.completions.create(model="mock", messages=MESSAGES, stream=True)
        first = next(iter(stream))  # the only slot is taken
        assert first.choices[0].delta.content
        with pytest.raises(openai.RateLimitError) as info:
            client(url, max_retries=0).chat.completions.create(model="mock", messages=MESSAGES)
        assert info.value.status_code == 429
        assert info.value.body["code"] == "too_many_requests"  # type: ignore[index]
        assert metric(url, 'chatstream_rejected_total{reason="queue_full"}') == 1
        stream.close()
        states.wait(1)
    assert states.states == [CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING]


def test_engine_failure_is_a_500_in_openai_shape() -> None:
    states = States()
    cs = ChatStream(use_mock_response=True, mock_params={"fail_after_tokens": 1}, callback=states, session_secret="s")
    with serve_in_thread(create_app(cs)) as url:
        with pytest.raises(openai.InternalServerError) as info:
            client(url, max_retries=0).chat.completions.create(model="mock", messages=MESSAGES)
        assert info.value.status_code == 500 and info.value.body["type"] == "server_error"  # type: ignore[index]
        with pytest.raises(openai.APIError, match="generation failed"):
            list(client(url).chat.completions.create(model="mock", messages=MESSAGES, stream=True))
        states.wait(2)
    assert states.states == [CompletionState.UNKNOWN_ERROR_OCCURRED] * 2
