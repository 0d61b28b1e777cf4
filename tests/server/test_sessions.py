"""Sessions: multi-round history per client, signed cookies and X-Session-Id, what gets saved when."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import httpx
import pytest
from live_server import serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from chatstream_asgi import ChatResult, ChatStream, ChatStreamMiddleware, CompletionState, get_result
from chatstream_asgi.engines.mock import LONG_TEXT
from chatstream_asgi.sessions.manager import SessionManager
from chatstream_asgi.sessions.store import MemorySessionStore, Session
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio

WATCHDOG = 10.0
SECRET = "test-secret"


class Recorder:
    """A completion callback that keeps each state with its :class:`ChatResult`."""

    def __init__(self) -> None:
        self.calls: list[tuple[CompletionState, ChatResult]] = []
        self._event = threading.Event()

    def __call__(self, request: Request, state: CompletionState) -> None:
        result = get_result(request)
        assert result is not None
        self.calls.append((state, result))
        self._event.set()

    def wait(self, count: int, timeout: float = WATCHDOG) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"only {len(self.calls)} of {count} completions"
            self._event.wait(0.05)
            self._event.clear()


def make_chat_stream(recorder: Recorder | None = None, **kwargs: Any) -> ChatStream:
    options: dict[str, Any] = {
        "use_mock_response": True,
        "mock_params": {"type": "echo"},
        "session_secret": SECRET,
        "callback": recorder,
    }
    options.update(kwargs)
    return ChatStream(**options)


def client(cs: ChatStream) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(create_app(cs)), base_url="http://test")


async def chat(c: httpx.AsyncClient, text: str | None = None, **body: Any) -> httpx.Response:
    if text is not None:
        body["user_input"] = text
    with anyio.fail_after(WATCHDOG):
        return await c.post("/chat_stream", json=body)


async def test_three_turns_build_on_each_other() -> None:
    recorder = Recorder()
    async with client(make_chat_stream(recorder, system_prompt="Be brief.")) as c:
        replies = [await chat(c, text) for text in ("one", "two", "three")]
        prompt = (await c.get("/get_prompt")).json()

    assert [r.text for r in replies] == ["one", "two", "three"]
    assert [state for state, _ in recorder.calls] == [CompletionState.SUCCESS] * 3
    third = recorder.calls[2][1]
    # The third reply was generated for the first two turns plus the new input.
    assert third.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    turns = [("system", "Be brief."), ("user", "one"), ("assistant", "one"), ("user", "two")]
    turns += [("assistant", "two"), ("user", "three")]
    assert third.prompt == "".join(f"<|{role}|>\n{text}\n" for role, text in turns) + "<|assistant|>\n"
    # get_prompt holds all three turns, and the reply ids are the header's ids.
    assert [m["content"] for m in prompt["messages"]] == ["one", "one", "two", "two", "three", "three"]
    reply_ids = [m["id"] for m in prompt["messages"] if m["role"] == "assistant"]
    assert reply_ids == [r.headers["x-chatstream-last-generated-message-id"] for r in replies]
    assert prompt["prompt"].startswith("<|system|>\nBe brief.\n<|user|>\none\n")
    assert prompt["prompt"].endswith("<|user|>\nthree\n<|assistant|>\nthree\n")  # no reply opened after the last
    # The callback sees the saved session, this reply included.
    assert third.session is not None and third.session.messages[-1]["content"] == "three"


async def test_regenerate_replaces_only_the_last_reply() -> None:
    async with client(make_chat_stream(mock_params={"type": "round"})) as c:
        await chat(c, "first")
        await chat(c, "second")
        before = (await c.get("/get_prompt")).json()["messages"]
        regenerated = await chat(c, regenerate=True)
        after = (await c.get("/get_prompt")).json()["messages"]

    assert regenerated.status_code == 200
    assert after[:3] == before[:3]  # the first turn and the last user message are untouched
    assert len(after) == len(before) == 4
    assert after[3]["role"] == "assistant"
    assert after[3]["id"] == regenerated.headers["x-chatstream-last-generated-message-id"] != before[3]["id"]
    assert after[3]["content"] == regenerated.text != before[3]["content"]


async def test_regenerate_on_an_empty_conversation_is_400() -> None:
    async with client(make_chat_stream()) as c:
        response = await chat(c, regenerate=True)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "regenerate" in response.json()["detail"]


async def test_two_clients_never_see_each_others_history() -> None:
    cs = make_chat_stream()
    async with client(cs) as alice, client(cs) as bob:
        await chat(alice, "alice's secret")
        await chat(bob, "bob's question")
        alice_prompt = (await alice.get("/get_prompt")).json()
        bob_prompt = (await bob.get("/get_prompt")).json()
    assert alice.cookies["chatstream_session"] != bob.cookies["chatstream_session"]
    assert [m["content"] for m in alice_prompt["messages"]] == ["alice's secret"] * 2
    assert [m["content"] for m in bob_prompt["messages"]] == ["bob's question"] * 2
    assert "alice" not in bob_prompt["prompt"]


async def test_a_tampered_cookie_gets_a_fresh_session() -> None:
    async with client(make_chat_stream()) as c:
        first = await chat(c, "remember me")
        token = first.headers["x-session-id"]
        session_id, _, signature = token.partition(".")
        forged = f"{session_id}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
        c.cookies.clear()
        c.cookies.set("chatstream_session", forged)
        second = await chat(c, "who am i")
        prompt = (await c.get("/get_prompt")).json()

    new_token = second.headers["x-session-id"]
    assert new_token != token and new_token.partition(".")[0] != session_id
    assert f"chatstream_session={new_token};" in second.headers["set-cookie"]
    assert [m["content"] for m in prompt["messages"]] == ["who am i"] * 2


async def test_unsigned_or_guessed_session_ids_get_a_fresh_session() -> None:
    async with client(make_chat_stream()) as c:
        first = await chat(c, "private")
        session_id = first.headers["x-session-id"].partition(".")[0]
        c.cookies.clear()
        for guess in (session_id, f"{session_id}.", "anything", ""):
            response = await c.get("/get_prompt", headers={"x-session-id": guess})
            assert response.json()["messages"] == []
            assert response.headers["x-session-id"].partition(".")[0] != session_id


async def test_x_session_id_header_continues_a_conversation_without_cookies() -> None:
    cs = make_chat_stream()
    async with client(cs) as c:
        token = (await chat(c, "hello")).headers["x-session-id"]
    async with client(cs) as api:  # a fresh client: no cookie jar
        response = await api.post("/chat_stream", json={"user_input": "again"}, headers={"x-session-id": token})
        assert response.headers["x-session-id"] == token
        prompt = await api.get("/get_prompt", headers={"x-session-id": token})
    assert [m["content"] for m in prompt.json()["messages"]] == ["hello", "hello", "again", "again"]


async def test_cookie_attributes_and_secure_option() -> None:
    async with client(make_chat_stream()) as c:
        cookie = (await chat(c, "hi")).headers["set-cookie"]
        assert "set-cookie" not in (await chat(c, "again")).headers  # the client already has it
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie and "Secure" not in cookie
    async with client(make_chat_stream(session_cookie_secure=True, session_cookie="sid")) as c:
        cookie = (await chat(c, "hi")).headers["set-cookie"]
    assert cookie.startswith("sid=") and "; Secure" in cookie


async def test_stateless_messages_requests_leave_the_session_alone() -> None:
    recorder = Recorder()
    async with client(make_chat_stream(recorder)) as c:
        await chat(c, "kept")
        response = await c.post("/chat_stream", json={"messages": [{"role": "user", "content": "stateless"}]})
        prompt = (await c.get("/get_prompt")).json()
    assert response.text == "stateless"
    assert "x-session-id" not in response.headers and "set-cookie" not in response.headers
    assert recorder.calls[1][1].session_id is None
    assert [m["content"] for m in prompt["messages"]] == ["kept", "kept"]


async def test_a_failed_reply_is_not_saved() -> None:
    recorder = Recorder()
    async with client(make_chat_stream(recorder, mock_params={"type": "echo", "fail_after_tokens": 0})) as c:
        response = await chat(c, "doomed")
        prompt = (await c.get("/get_prompt")).json()
    assert response.status_code == 500
    assert recorder.calls[0][0] is CompletionState.UNKNOWN_ERROR_OCCURRED
    assert prompt["messages"] == []


async def test_endpoint_mode_sets_the_cookie_and_the_callback_reads_the_session() -> None:
    seen: list[tuple[str, list[dict[str, Any]]]] = []

    def callback(request: Request, state: CompletionState) -> None:
        result = get_result(request)
        assert result is not None and result.session is not None
        seen.append((state.value, result.session.messages))

    cs = make_chat_stream()

    async def endpoint(request: Request) -> Any:
        body = await request.json()
        return await cs.handle_chat_stream_request(request, body, callback=callback)

    app = ChatStreamMiddleware(Starlette(routes=[Route("/chat", endpoint, methods=["POST"])]), cs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        first = await c.post("/chat", json={"user_input": "endpoint one"})
        second = await c.post("/chat", json={"user_input": "endpoint two"})
    assert first.headers["set-cookie"].startswith("chatstream_session=")
    assert second.headers["x-session-id"] == first.headers["x-session-id"]
    assert [state for state, _ in seen] == ["success", "success"]
    assert [m["content"] for m in seen[1][1]] == ["endpoint one"] * 2 + ["endpoint two"] * 2


def test_disconnect_mid_stream_saves_the_partial_reply() -> None:
    recorder = Recorder()
    cs = make_chat_stream(recorder, mock_params={"type": "long", "time_per_token_sec": 0.02}, max_new_tokens=200)
    with serve_in_thread(create_app(cs)) as url, httpx.Client(base_url=url, timeout=WATCHDOG) as c:
        with c.stream("POST", "/chat_stream", json={"user_input": "tell me a story"}) as response:
            received = ""
            for chunk in response.iter_text():
                received += chunk
                if len(received) > 20:
                    break
        recorder.wait(1)
        prompt = c.get("/get_prompt").json()

    state, result = recorder.calls[0]
    assert state is CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING
    messages = prompt["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    partial = messages[1]["content"]
    assert partial == result.reply
    assert partial.startswith(received) and LONG_TEXT.startswith(partial) and len(partial) < len(LONG_TEXT)
    assert messages[1]["id"] == response.headers["x-chatstream-last-generated-message-id"]


def test_disconnect_before_streaming_saves_nothing() -> None:
    recorder = Recorder()
    cs = make_chat_stream(recorder, mock_params={"type": "echo", "initial_wait_sec": 5.0})
    with serve_in_thread(create_app(cs)) as url, httpx.Client(base_url=url, timeout=WATCHDOG) as c:
        token = c.get("/get_prompt").headers["x-session-id"]
        with pytest.raises(httpx.ReadTimeout):
            c.post("/chat_stream", json={"user_input": "never answered"}, timeout=0.3)
        recorder.wait(1)
        prompt = c.get("/get_prompt", headers={"x-session-id": token}).json()
    assert recorder.calls[0][0] is CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING
    assert prompt["messages"] == []


async def test_memory_store_expires_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemorySessionStore(ttl=60, max_sessions=2)
    for name in ("a", "b", "c"):
        await store.save(Session(name, [{"id": "1", "role": "user", "content": name}]))
    assert len(store) == 2
    assert await store.load("a") is None  # the least recently used went first
    loaded = await store.load("b")
    assert loaded is not None and loaded.messages[0]["content"] == "b"
    loaded.messages.clear()  # a loaded copy: changing it does not change the store
    assert (await store.load("b")).messages  # type: ignore[union-attr]

    now = [1000.0]
    monkeypatch.setattr("chatstream_asgi.sessions.store.time.monotonic", lambda: now[0])
    short = MemorySessionStore(ttl=10)
    await short.save(Session("x"))
    now[0] += 9
    assert await short.load("x") is not None  # use slides the expiry
    now[0] += 9
    assert await short.load("x") is not None
    now[0] += 11
    assert await short.load("x") is None
    assert len(short) == 0


def test_tokens_are_signed_and_random(caplog: pytest.LogCaptureFixture) -> None:
    manager = SessionManager(secret=SECRET)
    token = manager.sign("abc")
    assert manager.verify(token) == "abc"
    assert SessionManager(secret="other").verify(token) is None
    assert manager.verify("abc") is None and manager.verify(token + "x") is None
    with caplog.at_level("WARNING", logger="chatstream_asgi"):
        random_secret = SessionManager()
    assert "session_secret" in caplog.text
    assert random_secret.verify(token) is None


class BrokenStore(MemorySessionStore):
    async def load(self, session_id: str) -> Session | None:
        raise ConnectionError("store unreachable")


async def test_an_unreachable_store_is_503_and_no_reply_starts() -> None:
    recorder = Recorder()
    async with client(make_chat_stream(recorder, session_store=BrokenStore())) as c:
        response = await chat(c, "hello")
        stateless = await c.post("/chat_stream", json={"messages": [{"role": "user", "content": "still works"}]})
    assert response.status_code == 503 and response.json()["error"] == "session_store_unavailable"
    assert stateless.text == "still works"
    assert [state for state, _ in recorder.calls] == [CompletionState.SUCCESS]
