"""Tenants through the middleware, on both chat endpoints: caps answer 429 with their own Retry-After while
other tenants go on, slots go to the tenant served least, priorities order a tenant's own requests, queue
events give the place in that order, and the tenant key shows up nowhere in clear.

Replies wait at per-request gates (the engine below), so what is asserted is order and status, never timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import anyio
import pytest
from asgi_harness import Receive, Send, StateLog, http_scope, not_found
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from chatstream_asgi import (
    ChatStream,
    ChatStreamConfig,
    ChatStreamMiddleware,
    GenerationRequest,
    MockEngine,
    MockParams,
)
from chatstream_asgi.engines.base import GenerationStream
from chatstream_asgi.service.tenants import Fairness, tenant_name

pytestmark = pytest.mark.anyio

WATCHDOG = 10.0
KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-9876543210"


class _GatedStream(GenerationStream):
    def __init__(self, inner: GenerationStream, gate: asyncio.Event) -> None:
        super().__init__(inner.request_id)
        self.inner, self.gate = inner, gate

    def cancel(self) -> None:
        super().cancel()
        self.inner.cancel()

    async def __anext__(self) -> str:
        await self.gate.wait()
        try:
            return await self.inner.__anext__()
        finally:
            self.finish_reason = self.inner.finish_reason
            self.prompt_tokens, self.completion_tokens = self.inner.prompt_tokens, self.inner.completion_tokens


class GatedEngine(MockEngine):
    """Echoes; each request waits before its first token until its gate (named by its text) opens.
    ``started`` lists the texts in the order the engine got them: the serving order."""

    def __init__(self) -> None:
        super().__init__(MockParams(type="echo"))
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []

    def generate(self, request: GenerationRequest) -> GenerationStream:
        text = request.messages[-1]["content"]
        self.started.append(text)
        return _GatedStream(super().generate(request), self.gates.setdefault(text, asyncio.Event()))

    def open(self, text: str) -> None:
        self.gates.setdefault(text, asyncio.Event()).set()


class Service:
    def __init__(self, *, concurrency: int, queue: int, **fairness: Any) -> None:
        self.engine = GatedEngine()
        self.log = StateLog()
        self.cs = ChatStream(
            self.engine,
            ChatStreamConfig(fairness=Fairness(tenant="header:X-API-Key", **fairness)),
            num_of_concurrent_executions=concurrency,
            max_queue_size=queue,
            callback=self.log,
            session_secret="s",
        )
        self.app = ChatStreamMiddleware(not_found, self.cs)

    async def request(
        self, key: str | None, text: str, *, path: str = "/chat_stream", **extra: Any
    ) -> tuple[Send, Receive]:
        body = (
            {"model": "m", "messages": [{"role": "user", "content": text}], "stream": True, **extra}
            if path.startswith("/v1")
            else {"messages": [{"role": "user", "content": text}], "format": "sse", **extra}
        )
        data = json.dumps(body).encode()
        headers = [(b"x-api-key", key.encode())] if key is not None else []
        send, receive = Send(), Receive(data)
        with anyio.fail_after(WATCHDOG):
            await self.app(http_scope(path, body=data, headers=headers), receive, send)
        return send, receive

    async def get(self, path: str, key: str | None = None) -> Send:
        send = Send()
        headers = [(b"x-api-key", key.encode())] if key is not None else []
        await self.app(http_scope(path, method="GET", headers=headers), Receive(), send)
        return send

    async def until(self, active: int, waiting: int) -> None:
        with anyio.fail_after(WATCHDOG):
            while (self.cs.admission.active, self.cs.admission.waiting) != (active, waiting):
                await anyio.sleep(0.002)  # a poll: admission has no public event for this


def queue_events(send: Send) -> list[dict[str, Any]]:
    events = []
    for block in send.body.decode().split("\n\n"):
        if block.startswith("event: queue"):
            events.append(json.loads(block.split("data: ", 1)[1]))
    return events


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_a_tenant_over_its_cap_gets_its_own_429_and_others_go_on(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    svc = Service(concurrency=3, queue=8, tenant_max_active=1, tenant_max_queued=1)
    caplog.set_level(logging.INFO, "chatstream_asgi")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: svc.request(KEY_A, "a1", path=path))
        await svc.until(1, 0)
        tg.start_soon(lambda: svc.request(KEY_A, "a2", path=path))
        await svc.until(1, 1)  # a slot is free, but a2 waits: a's cap is one reply at once
        over, _ = await svc.request(KEY_A, "a3", path=path)
        assert over.status == 429
        assert int(over.headers["retry-after"]) >= 1
        error = over.json()
        assert error == {"error": "too_many_requests"} or error["error"]["code"] == "too_many_requests"
        tg.start_soon(lambda: svc.request(KEY_B, "b1", path=path))
        await svc.until(2, 1)  # b is not held back by a's queue
        load = json.loads((await svc.get("/get_load", KEY_A)).body)
        assert load["tenant"] == {
            "name": tenant_name(KEY_A),
            "processing": 1,
            "waiting": 1,
            "max_processing": 1,
            "max_waiting": 1,
        }
        assert load["estimated_wait_seconds"] is None  # nothing measured yet
        for text in ("a1", "b1", "a2"):
            svc.engine.open(text)
    assert svc.log.states == ["success"] * 3
    assert svc.engine.started == ["a1", "b1", "a2"]
    metrics = (await svc.get("/metrics")).body.decode()
    name_a = tenant_name(KEY_A)
    assert f'chatstream_tenant_rejected_total{{reason="tenant_limit",tenant="{name_a}"}} 1.0' in metrics
    assert f'chatstream_tenant_admitted_total{{tenant="{name_a}"}} 2.0' in metrics
    assert 'chatstream_rejected_total{reason="tenant_limit"} 1.0' in metrics
    seen = metrics + "\n".join(r.getMessage() for r in caplog.records)
    assert KEY_A not in seen and KEY_B not in seen
    assert f"tenant {name_a}" in "\n".join(r.getMessage() for r in caplog.records)


async def test_a_slot_goes_to_the_tenant_served_least() -> None:
    """A holds the only slot and queues three; B's one request, queued last, goes next, and its queue
    event says position 1 (with FIFO it would wait for all three of A's)."""
    svc = Service(concurrency=1, queue=8)
    sends: dict[str, Send] = {}

    async def run(key: str, text: str) -> None:
        sends[text], _ = await svc.request(key, text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, KEY_A, "a1")
        await svc.until(1, 0)
        for i, text in enumerate(("a2", "a3", "a4")):
            tg.start_soon(run, KEY_A, text)
            await svc.until(1, i + 1)
        tg.start_soon(run, KEY_B, "b1")
        await svc.until(1, 4)
        for text in ("a1", "a2", "a3", "a4", "b1"):
            svc.engine.open(text)
    assert svc.engine.started == ["a1", "b1", "a2", "a3", "a4"]
    assert next(e["position"] for e in queue_events(sends["a4"])) == 3
    assert [e["position"] for e in queue_events(sends["b1"])] == [1]
    assert svc.log.states == ["success"] * 5


async def test_priority_orders_a_tenants_own_requests() -> None:
    svc = Service(concurrency=1, queue=8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.request, KEY_A, "running")
        await svc.until(1, 0)
        tg.start_soon(svc.request, KEY_A, "normal")
        await svc.until(1, 1)
        tg.start_soon(lambda: svc.request(KEY_A, "urgent", priority=-1))
        await svc.until(1, 2)
        for text in ("running", "normal", "urgent"):
            svc.engine.open(text)
    assert svc.engine.started == ["running", "urgent", "normal"]


async def test_the_priority_header_wins_over_the_body() -> None:
    svc = Service(concurrency=1, queue=8, priority_header="X-Priority", priority_names={"batch": 5})
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.request, KEY_A, "running")
        await svc.until(1, 0)
        scope_headers = [(b"x-api-key", KEY_A.encode()), (b"x-priority", b"batch")]
        body = json.dumps({"messages": [{"role": "user", "content": "batch"}], "priority": -5}).encode()
        tg.start_soon(svc.app, http_scope(body=body, headers=scope_headers), Receive(body), Send())
        await svc.until(1, 1)
        tg.start_soon(svc.request, KEY_A, "normal")
        await svc.until(1, 2)
        for text in ("running", "normal", "batch"):
            svc.engine.open(text)
    assert svc.engine.started == ["running", "normal", "batch"]


@pytest.mark.parametrize("priority", [1.5, "high", 101, True])
async def test_a_bad_priority_is_a_400(priority: Any) -> None:
    svc = Service(concurrency=1, queue=1)
    send, _ = await svc.request(KEY_A, "x", priority=priority)
    assert send.status == 400 and "priority" in send.body.decode()
    send, _ = await svc.request(KEY_A, "x", path="/v1/chat/completions", priority=priority)
    assert send.status == 400 and send.json()["error"]["param"] == "priority"


async def test_a_client_that_leaves_while_queued_frees_its_tenants_place() -> None:
    svc = Service(concurrency=1, queue=8, tenant_max_queued=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.request, KEY_A, "running")
        await svc.until(1, 0)
        gone = Receive(json.dumps({"messages": [{"role": "user", "content": "gone"}]}).encode())
        tg.start_soon(svc.app, http_scope(body=gone._messages[0]["body"], headers=[(b"x-api-key", KEY_A.encode())]),
                      gone, Send())  # fmt: skip
        await svc.until(1, 1)
        gone.disconnect()
        await svc.until(1, 0)  # its place is free at once: the next request of A queues, not 429
        tg.start_soon(svc.request, KEY_A, "next")
        await svc.until(1, 1)
        svc.engine.open("running")
        svc.engine.open("next")
    assert sorted(svc.log.states) == ["client_disconnected_before_streaming", "success", "success"]
    assert svc.engine.started == ["running", "next"]


async def test_without_a_tenant_source_everyone_is_one_fifo_tenant() -> None:
    engine = GatedEngine()
    cs = ChatStream(engine, num_of_concurrent_executions=1, max_queue_size=8, session_secret="s")
    app = ChatStreamMiddleware(not_found, cs)
    async with anyio.create_task_group() as tg:
        for i, key in enumerate(["k1", "k2", "k1", "k3"]):
            body = json.dumps({"messages": [{"role": "user", "content": f"r{i}"}]}).encode()
            tg.start_soon(app, http_scope(body=body, headers=[(b"x-api-key", key.encode())]), Receive(body), Send())
            with anyio.fail_after(WATCHDOG):
                while cs.admission.active + cs.admission.waiting < i + 1:
                    await anyio.sleep(0.002)
        for i in range(4):
            engine.open(f"r{i}")
    assert engine.started == ["r0", "r1", "r2", "r3"]
    assert "tenant" not in cs.get_load()


async def test_endpoint_mode_keeps_the_same_rules() -> None:
    """``handle_chat_stream_request`` in a Starlette route: the same tenants, caps and fair order."""
    svc = Service(concurrency=1, queue=8, tenant_max_queued=1)

    async def endpoint(request: Request) -> Any:
        return await svc.cs.handle_chat_stream_request(request)

    svc.app = Starlette(routes=[Route("/chat_stream", endpoint, methods=["POST"])])  # no middleware
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.request, KEY_A, "a1")
        await svc.until(1, 0)
        tg.start_soon(svc.request, KEY_A, "a2")
        await svc.until(1, 1)
        over, _ = await svc.request(KEY_A, "a3")
        assert over.status == 429 and int(over.headers["retry-after"]) >= 1
        tg.start_soon(svc.request, KEY_B, "b1")
        await svc.until(1, 2)
        for text in ("a1", "a2", "b1"):
            svc.engine.open(text)
    assert svc.engine.started == ["a1", "b1", "a2"]


async def test_get_load_reads_the_tenant_of_the_middleware_that_serves_it() -> None:
    """A middleware's own ``tenant=`` source names the caller on ``/get_load`` too, as on its chat paths."""
    svc = Service(concurrency=2, queue=8)
    svc.cs = ChatStream(  # only the middleware tells tenants apart
        svc.engine, num_of_concurrent_executions=2, tenant_max_active=1, callback=svc.log, session_secret="s"
    )
    svc.app = ChatStreamMiddleware(not_found, svc.cs, tenant="header:X-API-Key")
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.request, KEY_A, "a1")
        await svc.until(1, 0)
        load = json.loads((await svc.get("/get_load", KEY_A)).body)
        assert load["tenant"]["name"] == tenant_name(KEY_A) and load["tenant"]["processing"] == 1
        assert load["estimated_wait_seconds"] is None  # A is at its cap: it would wait (nothing measured yet)
        load = json.loads((await svc.get("/get_load", KEY_B)).body)
        assert load["tenant"]["name"] == tenant_name(KEY_B) and load["tenant"]["processing"] == 0
        assert load["estimated_wait_seconds"] == 0.0
        svc.engine.open("a1")
    assert svc.log.states == ["success"]
