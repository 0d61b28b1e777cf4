"""Engine faults through a real server: injected exceptions in prefill, in a decode step, in
detokenization and in the callback, and an engine that stalls (ended by ``request_timeout``).

The transformers engine runs the tiny random model (faults injected into its generation thread);
the mock engine gets its faults from :mod:`faulty_engine`. Every time: the affected requests end
``unknown_error_occurred`` with an error frame (500 JSON before any text), the others finish,
and the next request is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import torch
from faulty_engine import FaultyEngine, fault
from live_server import serve_in_thread
from model_fixtures import engine_reached
from starlette.applications import Starlette

import chatstream_asgi.engines.transformers.engine as engine_module
from chatstream_asgi import ChatStream, ChatStreamMiddleware, MockEngine, MockParams
from chatstream_asgi.logs import current_request_id

pytestmark = pytest.mark.anyio

WATCHDOG = 30.0
SUCCESS = "success"
ERROR = "unknown_error_occurred"


class Records:
    """A completion callback (on the server's thread) recording ``request id -> [(state, reply)]``."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[str, str]]] = {}
        self._cond = threading.Condition()

    def __call__(self, request: Any, state: Any) -> None:
        result = request.state.chatstream
        with self._cond:
            self.calls.setdefault(current_request_id() or "-", []).append((state.value, result.reply))
            self._cond.notify_all()

    def _wait(self, ids: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
        with self._cond:
            assert self._cond.wait_for(lambda: all(i in self.calls for i in ids), WATCHDOG), self.calls
            return {i: list(self.calls[i]) for i in ids}

    async def states(self, *ids: str) -> dict[str, str]:
        """The one state of each request, once all have one (bounded)."""
        calls = await asyncio.to_thread(self._wait, ids)
        assert all(len(c) == 1 for c in calls.values()), calls  # exactly one callback each
        return {i: c[0][0] for i, c in calls.items()}


class Shared(FaultyEngine):
    """The session's tiny engine, left running when a test's server shuts down."""

    async def shutdown(self) -> None:
        pass


@pytest.fixture
def records() -> Records:
    return Records()


def service(engine: Any, records: Records, **options: Any) -> ChatStream:
    options = {"num_of_concurrent_executions": 2, "max_queue_size": 2, "callback": records, **options}
    return ChatStream(engine, max_new_tokens=64, stream_format="sse", send_timeout=5.0, **options)


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``served(chat_stream)`` serves it in a thread and yields a client factory."""
    stack: list[Any] = []

    def serve(cs: ChatStream) -> str:
        ctx = serve_in_thread(ChatStreamMiddleware(Starlette(), cs))
        stack.append(ctx)
        return ctx.__enter__()

    yield serve
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=WATCHDOG) as c:
        yield c


async def chat(client: httpx.AsyncClient, url: str, rid: str, text: str = "hello", tokens: int = 12) -> Reply:
    body = {"user_input": text, "generation_params": {"max_new_tokens": tokens, "temperature": 0}}
    response = await client.post(url + "/chat_stream", json=body, headers={"x-request-id": rid})
    return Reply(response)


class Reply:
    """A finished response as the client saw it: status, SSE events, the error if any."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.text = response.text
        blocks = response.text.split("\n\n") if self.status == 200 else []
        self.events = [_event(block) for block in blocks if block.strip()]

    @property
    def reply(self) -> str:
        return "".join(data["text"] for name, data in self.events if name == "delta")

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1][0] == "done"

    def error(self) -> dict[str, Any]:
        """The error the client was told about: the last SSE ``error`` event, or the 500/504 JSON body."""
        if self.status == 200:
            name, data = self.events[-1]
            assert name == "error", self.text
            assert data["state"] == ERROR
            return data
        assert self.status in (500, 504), (self.status, self.text)
        return json.loads(self.text)


def _event(block: str) -> tuple[str, dict[str, Any]]:
    lines = dict(line.split(": ", 1) for line in block.strip().split("\n"))
    return lines["event"], json.loads(lines["data"])


async def wait_load(client: httpx.AsyncClient, url: str, key: str, value: int) -> None:
    """Poll ``/get_load`` (bounded) until ``key`` is ``value``: admission has no event to await from outside."""
    with anyio.fail_after(WATCHDOG):
        while (await client.get(url + "/get_load")).json()[key] != value:
            await asyncio.sleep(0.01)


def assert_served(reply: Reply, tokens: int | None = None) -> None:
    assert reply.status == 200 and reply.done, reply.text
    if tokens is not None:
        assert reply.events[-1][1]["usage"]["completion_tokens"] == tokens


# -- the transformers engine (tiny random model), faults in its generation thread -------------


@pytest.fixture
def tiny(tiny_engine: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tiny engine without EOS, so every reply runs to its ``max_new_tokens``."""
    monkeypatch.setattr(tiny_engine, "eos_token_ids", frozenset())
    return tiny_engine


def pause_step_until(engine: Any, monkeypatch: pytest.MonkeyPatch, step: int, go: threading.Event) -> threading.Event:
    """Decode step ``step`` (0-based) waits until ``go`` is set; returns the event set when it starts waiting."""
    inner, steps, reached = engine._forward_step, [], threading.Event()

    def forward_step(*args: Any) -> torch.Tensor:
        if len(steps) == step:
            reached.set()
            assert go.wait(WATCHDOG)
        steps.append(1)
        return inner(*args)

    monkeypatch.setattr(engine, "_forward_step", forward_step)
    return reached


class Generated:
    """Events set when a request (by id) has been handed to the engine."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: dict[str, threading.Event] = {}
        inner = engine.generate

        def generate(request: Any) -> Any:
            stream = inner(request)
            self.event(request.request_id).set()
            return stream

        monkeypatch.setattr(engine, "generate", generate)

    def event(self, rid: str) -> threading.Event:
        return self.events.setdefault(rid, threading.Event())

    async def wait(self, rid: str) -> None:
        await engine_reached(self.event(rid))


async def test_prefill_fault_fails_only_the_joining_request(tiny, served, client, records, monkeypatch) -> None:
    generated = Generated(tiny, monkeypatch)
    # A is prefilled alone and mid-reply until B reaches the engine (not joined with A in one prefill)
    mid_reply = pause_step_until(tiny, monkeypatch, 2, generated.event("B"))
    inner, prefills = tiny._forward_prefill, []

    def forward_prefill(*args: Any) -> Any:
        prefills.append(1)
        if len(prefills) == 2:
            raise RuntimeError("injected prefill fault")
        return inner(*args)

    monkeypatch.setattr(tiny, "_forward_prefill", forward_prefill)
    url = served(service(Shared(tiny), records))
    a = asyncio.ensure_future(chat(client, url, "A", tokens=24))
    await engine_reached(mid_reply)
    b = await chat(client, url, "B")
    assert b.status == 500 and b.error()["error"] == ERROR
    a = await a
    assert_served(a, 24)
    assert_served(await chat(client, url, "C", tokens=4), 4)
    assert await records.states("A", "B", "C") == {"A": SUCCESS, "B": ERROR, "C": SUCCESS}


async def test_decode_fault_fails_the_batch_and_the_queued_request_goes_on(
    tiny, served, client, records, monkeypatch
) -> None:
    """A failed decode step leaves the batch's cache in an unknown state: every row in it fails."""
    inner, failed = tiny._forward_step, []

    def forward_step(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        if input_ids.shape[0] == 2 and not failed:
            failed.append(1)
            raise RuntimeError("injected decode fault")
        return inner(input_ids, *args)

    monkeypatch.setattr(tiny, "_forward_step", forward_step)
    generated = Generated(tiny, monkeypatch)
    queued = threading.Event()
    # A decodes alone (not prefilled with B), and runs on once B has joined and C waits in the queue
    mid_reply = pause_step_until(tiny, monkeypatch, 1, queued)
    cs = service(Shared(tiny), records, num_of_concurrent_executions=2, max_queue_size=1)
    url = served(cs)
    a = asyncio.ensure_future(chat(client, url, "A", tokens=24))
    await engine_reached(mid_reply)
    b = asyncio.ensure_future(chat(client, url, "B", tokens=24))
    await generated.wait("B")
    c = asyncio.ensure_future(chat(client, url, "C", tokens=5))
    await wait_load(client, url, "waiting", 1)
    queued.set()
    a, b, c = await asyncio.wait_for(asyncio.gather(a, b, c), WATCHDOG)
    assert failed
    for reply in (a, b):
        assert reply.error()["error"] == ERROR
        assert "injected" not in reply.text  # the cause stays in the server's log
    assert_served(c, 5)
    assert_served(await chat(client, url, "D", tokens=4), 4)
    assert await records.states("A", "B", "C", "D") == {"A": ERROR, "B": ERROR, "C": SUCCESS, "D": SUCCESS}


async def test_detokenization_fault_fails_only_its_sequence(tiny, served, client, records, monkeypatch) -> None:
    inner = engine_module.IncrementalDetokenizer

    class Faulty(inner):  # type: ignore[misc, valid-type]
        calls = 0

        def advance(self, *args: Any, **kwargs: Any) -> str:
            self.calls += 1
            if self.calls == 4:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenization fault")
            return super().advance(*args, **kwargs)

    def detokenizer(*args: Any) -> Any:  # made in generate(), on the loop, under the request's id
        return (Faulty if current_request_id() == "B" else inner)(*args)

    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", detokenizer)
    url = served(service(Shared(tiny), records))
    a, b = await asyncio.gather(chat(client, url, "A", tokens=24), chat(client, url, "B", tokens=24))
    assert_served(a, 24)
    assert b.error()["error"] == ERROR
    assert_served(await chat(client, url, "C", tokens=4), 4)
    assert await records.states("A", "B", "C") == {"A": SUCCESS, "B": ERROR, "C": SUCCESS}


async def test_stalled_engine_is_ended_by_the_deadline(tiny, served, client, records, monkeypatch) -> None:
    unstall = threading.Event()
    pause_step_until(tiny, monkeypatch, 3, unstall)
    url = served(service(Shared(tiny), records, request_timeout=2.0))
    try:
        stalled = await chat(client, url, "A", tokens=24)
    finally:
        unstall.set()
    assert stalled.error()["error"] == "deadline_exceeded"
    assert await records.states("A") == {"A": ERROR}
    assert_served(await chat(client, url, "B", tokens=4), 4)
    assert await records.states("B") == {"B": SUCCESS}


# -- the mock engine ---------------------------------------------------------------------------


def mock_service(records: Records, **options: Any) -> ChatStream:
    return service(FaultyEngine(MockEngine(MockParams(type="long", time_per_token_sec=0.002))), records, **options)


@pytest.mark.parametrize(("kind", "at"), [("raise", 0), ("raise", 3), ("bug", 0), ("bug", 5)])
async def test_mock_engine_fault_fails_only_its_request(served, client, records, kind: str, at: int) -> None:
    url = served(mock_service(records))
    normal, faulty = await asyncio.gather(chat(client, url, "A", tokens=30), chat(client, url, "B", fault(kind, at)))
    assert_served(normal, 30)
    assert faulty.status == (500 if at == 0 else 200)
    assert faulty.error()["error"] == ERROR
    assert len(faulty.reply.split()) == at  # the deltas before the fault were sent
    assert_served(await chat(client, url, "C", tokens=3), 3)
    assert await records.states("A", "B", "C") == {"A": SUCCESS, "B": ERROR, "C": SUCCESS}


@pytest.mark.parametrize("at", [0, 3])
async def test_mock_engine_stall_is_ended_by_the_deadline(served, client, records, at: int) -> None:
    url = served(mock_service(records, request_timeout=1.5))
    normal, stalled = await asyncio.gather(
        chat(client, url, "A", tokens=20), chat(client, url, "B", fault("stall", at))
    )
    assert_served(normal, 20)
    assert stalled.status == (504 if at == 0 else 200)
    assert stalled.error()["error"] == "deadline_exceeded"
    assert_served(await chat(client, url, "C", tokens=3), 3)
    assert await records.states("A", "B", "C") == {"A": SUCCESS, "B": ERROR, "C": SUCCESS}
    load = httpx.get(url + "/get_load").json()
    assert (load["processing"], load["waiting"]) == (0, 0)


async def test_a_stalled_request_in_the_queue_is_ended_too(served, client, records) -> None:
    url = served(mock_service(records, request_timeout=1.5, num_of_concurrent_executions=1, max_queue_size=1))
    stalled = asyncio.ensure_future(chat(client, url, "A", fault("stall", 2)))
    await wait_load(client, url, "processing", 1)  # well before A's deadline ends it
    queued = await chat(client, url, "B", fault("stall", 0))  # queued behind A, then stalls itself
    assert queued.error()["error"] == "deadline_exceeded"
    assert [name for name, _ in queued.events] == ["queue", "error"]  # told its place, then the error
    assert (await stalled).error()["error"] == "deadline_exceeded"
    assert_served(await chat(client, url, "C", tokens=3), 3)
    assert await records.states("A", "B", "C") == {"A": ERROR, "B": ERROR, "C": SUCCESS}


class Logged(logging.Handler):
    """Counts the package's log records containing ``text`` (logged on any thread); :meth:`wait` awaits a count."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.count, self._cond = text, 0, threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with self._cond:
                self.count += 1
                self._cond.notify_all()

    async def wait(self, count: int) -> None:
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: self.count >= count, WATCHDOG)

        assert await asyncio.to_thread(wait), self.count


@pytest.fixture
def callback_failures() -> Iterator[Logged]:
    logged, logger = Logged("completion callback failed"), logging.getLogger("chatstream_asgi")
    logger.addHandler(logged)
    yield logged
    logger.removeHandler(logged)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callback_fault_never_reaches_the_client(served, client, records, kind, callback_failures) -> None:
    def sync_callback(request: Any, state: Any) -> None:
        records(request, state)
        raise RuntimeError("injected callback fault")

    async def async_callback(request: Any, state: Any) -> None:
        sync_callback(request, state)

    url = served(mock_service(records, callback=sync_callback if kind == "sync" else async_callback))
    replies = await asyncio.gather(*(chat(client, url, rid, tokens=8) for rid in "AB"))
    for reply in replies:
        assert_served(reply, 8)
    assert_served(await chat(client, url, "C", tokens=3), 3)
    assert await records.states("A", "B", "C") == {"A": SUCCESS, "B": SUCCESS, "C": SUCCESS}
    await callback_failures.wait(3)  # logged after the callback raised, and after the client had the reply
    assert callback_failures.count == 3
