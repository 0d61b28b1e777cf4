"""Every request is logged and answered under one id: the client's when well-formed, else a fresh one."""

from __future__ import annotations

import logging
import re

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")  # type: ignore[arg-type]


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("chatstream_asgi")]


def completed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The one-line completion records, token counts masked."""
    return [
        re.sub(r"\(\d+ tokens\).*", "(n tokens)", r.getMessage())
        for r in caplog.records
        if "completed:" in r.getMessage()
    ]


async def test_the_clients_id_names_the_reply_and_every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    async with client(create_app(ChatStream(use_mock_response=True, session_secret="s"))) as c:
        reply = await c.post("/chat_stream", json={"user_input": "hi"}, headers={"X-Request-Id": "order-66"})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "order-66"
    lines = [r.getMessage() for r in ours(caplog)]
    assert lines and all(line.startswith("[order-66] ") for line in lines)
    assert completed_lines(caplog) == ["[order-66] completed: success (n tokens)"]
    assert {r.request_id for r in ours(caplog)} == {"order-66"}  # type: ignore[attr-defined]


async def test_the_header_name_is_configurable_and_a_malformed_id_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    cs = ChatStream(use_mock_response=True, session_secret="s", request_id_header="X-Correlation-Id")
    async with client(create_app(cs)) as c:
        named = await c.post("/chat_stream", json={"user_input": "a"}, headers={"X-Correlation-Id": "trace.1"})
        bad = await c.post("/chat_stream", json={"user_input": "b"}, headers={"X-Correlation-Id": "a b\nc"})
        other = await c.post("/chat_stream", json={"user_input": "c"}, headers={"X-Request-Id": "ignored"})
    assert named.headers["x-correlation-id"] == "trace.1" and "x-request-id" not in named.headers
    fresh = bad.headers["x-correlation-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", fresh)
    assert other.headers["x-correlation-id"] != "ignored"
    assert completed_lines(caplog)[:2] == [
        "[trace.1] completed: success (n tokens)",
        f"[{fresh}] completed: success (n tokens)",
    ]


async def test_concurrent_requests_keep_their_own_ids(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    cs = ChatStream(
        use_mock_response=True,
        mock_params={"time_per_token_sec": 0.002},
        num_of_concurrent_executions=8,
        session_secret="s",
    )
    ids = [f"req-{i}" for i in range(8)]

    async def ask(c: httpx.AsyncClient, request_id: str) -> None:
        body = {"messages": [{"role": "user", "content": request_id}]}
        await c.post("/chat_stream", json=body, headers={"X-Request-Id": request_id})

    async with client(create_app(cs)) as c, anyio.create_task_group() as tg:
        for request_id in ids:
            tg.start_soon(ask, c, request_id)
    by_id: dict[str, list[str]] = {}
    for record in ours(caplog):
        by_id.setdefault(record.request_id, []).append(record.getMessage())  # type: ignore[attr-defined]
    assert sorted(by_id) == sorted(ids)
    for request_id, lines in by_id.items():
        assert all(line.startswith(f"[{request_id}] ") for line in lines)
        assert sum("completed: success" in line for line in lines) == 1


async def test_endpoint_mode_binds_the_id_without_the_middleware() -> None:
    cs = ChatStream(use_mock_response=True, session_secret="s")
    seen: list[str | None] = []

    async def chat(request: Request) -> object:
        return await cs.handle_chat_stream_request(
            request, callback=lambda req, state: seen.append(current_request_id())
        )

    async with client(Starlette(routes=[Route("/chat", chat, methods=["POST"])])) as c:
        reply = await c.post("/chat", json={"user_input": "hi"}, headers={"X-Request-Id": "ep-1"})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "ep-1"
    assert seen == ["ep-1"]
    assert current_request_id() is None


async def test_the_id_is_bound_for_replay_paths_and_unbound_after() -> None:
    seen: list[str | None] = []

    async def inner(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(current_request_id())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = ChatStreamMiddleware(inner, replay_paths=["/hook"])
    async with client(app) as c:
        await c.post("/hook", content=b"x", headers={"X-Request-Id": "hook-7"})
        await c.post("/elsewhere", content=b"x", headers={"X-Request-Id": "pass-1"})
    assert seen == ["hook-7", None]


async def test_every_answer_of_the_package_echoes_the_id() -> None:
    """Not only chat replies: the JSON APIs, /metrics, a 405, a protected endpoint's 401, a 413, a 404 of the CLI
    app, its page and icon, the OpenAI API's errors, and the 503 of a server shutting down."""
    cs = ChatStream(use_mock_response=True, session_secret="s")
    app = create_app(cs, admin_token="t0ken", max_body_size=64)
    asks = [
        ("GET", "/get_load", None, 200),
        ("GET", "/metrics", None, 200),
        ("GET", "/chat_stream", None, 405),
        ("GET", "/get_resource_usage", None, 401),
        ("GET", "/get_generation_params", None, 200),
        ("POST", "/chat_stream", {"user_input": "x" * 100}, 413),
        ("POST", "/chat_stream", {"user_input": 7}, 400),
        ("POST", "/v1/chat/completions", {"messages": []}, 400),
        ("GET", "/v1/models", None, 200),
        ("GET", "/nope", None, 404),
        ("GET", "/", None, 200),
        ("GET", "/favicon.ico", None, 200),
    ]
    async with client(app) as c:
        for number, (method, path, body, status) in enumerate(asks):
            reply = await c.request(method, path, json=body, headers={"X-Request-Id": f"ask-{number}"})
            assert (reply.status_code, reply.headers.get("x-request-id")) == (status, f"ask-{number}"), path
        await cs.shutdown()
        closing = await c.post("/chat_stream", json={"user_input": "hi"}, headers={"X-Request-Id": "late"})
    assert (closing.status_code, closing.headers.get("x-request-id")) == (503, "late")


async def test_a_proxy_that_sets_the_id_gets_no_second_header() -> None:
    """``echo_request_id=False`` (Ray Serve's proxy sets the header): the package adds none, on any answer."""
    cs = ChatStream(use_mock_response=True, session_secret="s", echo_request_id=False)
    async with client(create_app(cs)) as c:
        for path in ("/get_load", "/nope"):
            assert "x-request-id" not in (await c.get(path, headers={"X-Request-Id": "p"})).headers
        assert "x-request-id" not in (await c.post("/chat_stream", json={"user_input": "hi"})).headers


async def test_a_request_started_from_inside_another_keeps_no_id_of_it() -> None:
    """As uvicorn does for pipelined requests: the next request's task is created inside the previous one's
    (its context copied). Served there, it gets its own id; passed through, it runs with none; under a
    second middleware on the same scope, the first one's id stays."""
    from chatstream_asgi.logs import bind_request_id

    seen: list[str | None] = []

    async def inner(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(current_request_id())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = ChatStreamMiddleware(ChatStreamMiddleware(inner), replay_paths=["/hook", "/nested"])
    async with client(app) as c:
        with bind_request_id({"headers": [(b"x-request-id", b"previous")]}):  # another request's binding
            await c.get("/elsewhere")
            hooked = await c.post("/hook", content=b"x")
        nested = await c.post("/nested", content=b"x", headers={"X-Request-Id": "outer-id"})
    assert seen[0] is None
    assert seen[1] == hooked.headers["x-request-id"] != "previous"
    assert seen[2] == "outer-id" and nested.headers.get_list("x-request-id") == ["outer-id"]
