"""The original library's extra APIs: JSON in, JSON out, per session, with clear errors."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware, GenerationRequest, GenerationStream, MockEngine
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio

WATCHDOG = 10.0


class SpyEngine(MockEngine):
    """A mock engine that keeps the requests it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest) -> GenerationStream:
        self.requests.append(request)
        return super().generate(request)


def make_client(cs: ChatStream) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(create_app(cs)), base_url="http://test")


async def test_clear_context_forgets_the_history() -> None:
    async with make_client(ChatStream(use_mock_response=True, session_secret="s")) as c:
        await c.post("/chat_stream", json={"user_input": "one"})
        await c.post("/chat_stream", json={"user_input": "two"})
        cleared = await c.post("/clear_context")
        prompt = (await c.get("/get_prompt")).json()
        again = await c.post("/clear_context")
    assert cleared.status_code == 200 and cleared.json() == {"cleared": 4}
    assert prompt["messages"] == [] and prompt["prompt"] == ""  # nothing said, no reply opened
    assert again.json() == {"cleared": 0}


async def test_generation_params_per_session_are_the_defaults_of_its_requests() -> None:
    engine = SpyEngine()
    cs = ChatStream(engine, temperature=0.7, top_k=50, top_p=1.0, session_secret="s")
    async with make_client(cs) as c, make_client(cs) as other:
        assert (await c.get("/get_generation_params")).json() == {
            "repetition_penalty": 1.0,
            "temperature": 0.7,
            "top_k": 50,
            "top_p": 1.0,
        }
        set_response = await c.post("/set_generation_params", json={"temperature": 0.2, "top_k": 5})
        assert set_response.json() == {"repetition_penalty": 1.0, "temperature": 0.2, "top_k": 5, "top_p": 1.0}
        assert (await c.get("/get_generation_params")).json() == set_response.json()
        await c.post("/chat_stream", json={"user_input": "a"})
        await c.post("/chat_stream", json={"user_input": "b", "generation_params": {"top_k": 9}})
        await other.post("/chat_stream", json={"user_input": "c"})
        reset = await c.post("/set_generation_params", json={"temperature": None})
    first, second, stranger = (r.params for r in engine.requests)
    assert (first.temperature, first.top_k) == (0.2, 5)
    assert (second.temperature, second.top_k) == (0.2, 9)  # the request's own params win
    assert (stranger.temperature, stranger.top_k) == (0.7, 50)  # another session is unaffected
    assert reset.json()["temperature"] == 0.7 and reset.json()["top_k"] == 5


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"temperature": -1}, "generation_params.temperature must be in [0.0, 5.0]"),
        ({"top_p": 0}, "generation_params.top_p must be in (0.0, 1.0]"),
        ({"top_k": "5"}, "generation_params.top_k must be an integer"),
        ({"seed": 1}, "generation_params.seed is not a known parameter"),
        ({"bogus": None}, "generation_params.bogus is not a known parameter"),
        ([1, 2], "body must be a JSON object"),
    ],
)
async def test_set_generation_params_rejects_invalid_values(body: Any, detail: str) -> None:
    async with make_client(ChatStream(use_mock_response=True, session_secret="s")) as c:
        response = await c.post("/set_generation_params", json=body)
        assert (await c.get("/get_generation_params")).json()["temperature"] == 0.7
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "detail": detail}


async def test_invalid_json_is_400() -> None:
    async with make_client(ChatStream(use_mock_response=True, session_secret="s")) as c:
        response = await c.post("/set_feedback", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request" and "not valid JSON" in response.json()["detail"]


async def test_empty_body_is_400_that_says_so() -> None:
    async with make_client(ChatStream(use_mock_response=True, session_secret="s")) as c:
        response = await c.post("/chat_stream", content=b" \n")
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "detail": "body is empty: expected a JSON object"}


async def test_set_feedback_calls_the_feedback_callback() -> None:
    calls: list[tuple[str, str | None, dict[str, Any]]] = []

    async def on_feedback(request: Request, message_id: str, feedback: str | None) -> None:
        calls.append((message_id, feedback, await request.json()))

    cs = ChatStream(use_mock_response=True, session_secret="s", feedback_callback=on_feedback)
    async with make_client(cs) as c, make_client(cs) as stranger:
        reply = await c.post("/chat_stream", json={"user_input": "rate me"})
        message_id = reply.headers["x-chatstream-last-generated-message-id"]
        liked = await c.post("/set_feedback", json={"message_id": message_id, "feedback": "like"})
        history = (await c.get("/get_prompt")).json()["messages"]
        unknown = await c.post("/set_feedback", json={"message_id": "nope", "feedback": "like"})
        not_yours = await stranger.post("/set_feedback", json={"message_id": message_id, "feedback": "dislike"})
        user_message = await c.post("/set_feedback", json={"message_id": history[0]["id"], "feedback": "like"})
        bad = await c.post("/set_feedback", json={"message_id": message_id, "feedback": "meh"})
        cleared = await c.post("/set_feedback", json={"message_id": message_id, "feedback": None})

    assert liked.status_code == 200 and liked.json() == {"message_id": message_id, "feedback": "like"}
    assert history[1]["feedback"] == "like"
    for response in (unknown, not_yours, user_message):
        assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert bad.status_code == 400 and "feedback must be one of" in bad.json()["detail"]
    assert cleared.json()["feedback"] is None
    assert calls == [
        (message_id, "like", {"message_id": message_id, "feedback": "like"}),
        (message_id, None, {"message_id": message_id, "feedback": None}),
    ]


async def test_a_failing_feedback_callback_is_logged_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: Request, message_id: str, feedback: str | None) -> None:
        raise RuntimeError("boom")

    cs = ChatStream(use_mock_response=True, session_secret="s", feedback_callback=broken)
    async with make_client(cs) as c:
        message_id = (await c.post("/chat_stream", json={"user_input": "x"})).headers[
            "x-chatstream-last-generated-message-id"
        ]
        response = await c.post("/set_feedback", json={"message_id": message_id, "feedback": "dislike"})
    assert response.status_code == 200
    assert "feedback callback failed" in caplog.text


async def test_get_load_and_resource_usage() -> None:
    cs = ChatStream(use_mock_response=True, num_of_concurrent_executions=3, max_queue_size=7, session_secret="s")
    async with make_client(cs) as c:
        load = (await c.get("/get_load")).json()
        usage = (await c.get("/get_resource_usage")).json()
    assert load == {
        "processing": 0,
        "waiting": 0,
        "max_processing": 3,
        "max_waiting": 7,
        "estimated_wait_seconds": 0.0,
        "generated_tokens": 0,
    }
    assert usage["process"]["rss_bytes"] > 1 << 20
    assert isinstance(usage["cuda"], list)  # torch is CPU-only here: no devices


async def test_methods_and_custom_paths() -> None:
    cs = ChatStream(use_mock_response=True, session_secret="s")

    async def fallback(request: Request) -> PlainTextResponse:
        return PlainTextResponse("app", status_code=404)

    inner = Starlette(routes=[Route("/{path:path}", fallback, methods=["GET", "POST"])])
    app = ChatStreamMiddleware(inner, cs, endpoints={"get_prompt": "/api/prompt", "clear_context": None})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        with anyio.fail_after(WATCHDOG):
            wrong = await c.get("/set_feedback")
            moved = await c.get("/api/prompt")
            old = await c.get("/get_prompt")
            dropped = await c.post("/clear_context")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert moved.status_code == 200 and moved.json()["messages"] == []
    assert old.text == "app" and dropped.text == "app"  # passed through to the app
    with pytest.raises(ValueError, match="unknown endpoint"):
        ChatStreamMiddleware(inner, cs, endpoints={"get_promt": "/typo"})


async def test_the_apps_unknown_paths_answer_json_and_it_has_an_icon() -> None:
    async with make_client(ChatStream(use_mock_response=True, session_secret="s")) as c:
        missing = await c.get("/nope")
        static = await c.get("/static/nope.js")
        page_post = await c.post("/")
        icon = await c.get("/favicon.ico")
    for reply, status, error in (
        (missing, 404, "not_found"),
        (static, 404, "not_found"),
        (page_post, 405, "method_not_allowed"),
    ):
        assert reply.status_code == status and reply.headers["content-type"] == "application/json"
        assert reply.json()["error"] == error
    assert missing.json()["detail"] == "no GET /nope here"
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content.startswith(b"\x00\x00\x01\x00")  # an ICO file
