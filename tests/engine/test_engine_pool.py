"""EnginePool over real chatstream-asgi servers: least-loaded routing, dead and full members, cancellation."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import anyio
import pytest
from live_server import serve_in_thread
from remote_support import MESSAGES, WATCHDOG, WHILE_STREAMING, front, processing, remote, request
from servers import free_port

from chatstream_asgi import Engine, MockEngine
from chatstream_asgi.engines.base import GenerationRequest, GenerationStream
from chatstream_asgi.engines.pool import EnginePool
from chatstream_asgi.engines.remote import EngineUnavailable, OpenAIEngine, RemoteLoad

pytestmark = pytest.mark.anyio


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def test_concurrent_requests_spread_over_two_remotes() -> None:
    with remote(time_per_token_sec=0.02) as (url_a, states_a), remote(time_per_token_sec=0.02) as (url_b, states_b):
        pool = EnginePool(
            [OpenAIEngine(url_a, timeout=WATCHDOG), OpenAIEngine(url_b, timeout=WATCHDOG)], load_interval=None
        )
        with anyio.fail_after(WATCHDOG):
            async with front(pool) as (client, states):
                replies: list[int] = []

                async def chat() -> None:
                    body = {"messages": MESSAGES, "generation_params": {"max_new_tokens": 10}}
                    replies.append((await client.post("/chat_stream", json=body)).status_code)

                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(chat)
                assert replies == [200] * 4
                assert await states.wait_async(4) == ["success"] * 4
                assert states_a.wait(2) == ["success"] * 2
                assert states_b.wait(2) == ["success"] * 2
                assert pool.active == (0, 0)
                assert pool.model_name == "mock"


async def test_least_loaded_member_gets_the_next_stream_and_cancel_frees_it() -> None:
    with remote(time_per_token_sec=0.02) as (url_a, states_a), remote(time_per_token_sec=0.02) as (url_b, states_b):
        pool = EnginePool(
            [OpenAIEngine(url_a, "mock", timeout=WATCHDOG), OpenAIEngine(url_b, "mock", timeout=WATCHDOG)],
            load_interval=None,  # the pool's own counts under test
        )
        await pool.start()
        with anyio.fail_after(WATCHDOG):
            streams = [pool.generate(request(f"r{i}")) for i in range(4)]
            for stream in streams:
                assert await stream.__anext__() == "Once"
            assert [stream.index for stream in streams] == [0, 1, 0, 1]  # ties go round robin
            assert pool.active == (2, 2)
            assert (processing(url_a), processing(url_b)) == (2, 2)
            streams[1].cancel()
            assert pool.active == (2, 1)
            # Round robin would pick member 0 next; the least-loaded one is member 1.
            streams.append(pool.generate(request("r4")))
            assert streams[-1].index == 1
            assert pool.active == (2, 2)
            for stream in streams:
                stream.cancel()
            assert pool.active == (0, 0)
            assert await states_a.wait_async(2) == [WHILE_STREAMING] * 2
            assert await states_b.wait_async(2) == [WHILE_STREAMING] * 2
            assert (processing(url_a), processing(url_b)) == (0, 0)
        await pool.shutdown()


async def test_finished_streams_are_released_and_ties_alternate() -> None:
    pool = EnginePool([MockEngine(model_name="m"), MockEngine(model_name="m")])
    with anyio.fail_after(WATCHDOG):
        for i in range(4):
            stream = pool.generate(request(f"r{i}", max_new_tokens=3))
            assert stream.index == i % 2
            assert len([delta async for delta in stream]) == 3
            assert (stream.finish_reason, stream.completion_tokens) == ("length", 3)
            assert pool.active == (0, 0)


async def test_dead_member_is_skipped_until_its_cooldown_ends() -> None:
    with remote() as (url, _):
        pool = EnginePool(
            [OpenAIEngine(dead_url()), OpenAIEngine(url, timeout=WATCHDOG)], cooldown=0.3, load_interval=None
        )
        await pool.start()
        with anyio.fail_after(WATCHDOG):
            first = pool.generate(request(max_new_tokens=5))
            assert first.index == 0  # the dead member is tried first ...
            assert "".join([delta async for delta in first]) == "Once upon a time, a"
            assert first.index == 1  # ... and the request goes on to the live one
            assert first.finish_reason == "length"
            assert pool.healthy == (False, True)
            assert pool.active == (0, 0)
            for i in range(2):  # while it cools down, requests go straight to the live member
                stream = pool.generate(request(f"r{i}", max_new_tokens=1))
                assert stream.index == 1
                assert [delta async for delta in stream] == ["Once"]
            # After the cool-down the dead member is tried again (and fails over again).
            deadline = time.monotonic() + WATCHDOG
            while not pool.healthy[0]:
                assert time.monotonic() < deadline
                await anyio.sleep(0.05)  # the passage of time under test, not a synchronisation
            retried = pool.generate(request("again", max_new_tokens=1))
            assert retried.index == 0
            assert [delta async for delta in retried] == ["Once"]
            assert retried.index == 1
            assert pool.healthy == (False, True)
        await pool.shutdown()


async def test_all_members_dead_fails_fast() -> None:
    pool = EnginePool([OpenAIEngine(dead_url()), OpenAIEngine(dead_url())])
    await pool.start()
    with anyio.fail_after(3):
        stream = pool.generate(request())
        with pytest.raises(EngineUnavailable):
            await stream.__anext__()
        assert stream.finish_reason == "error"
        assert pool.healthy == (False, False)
        assert pool.active == (0, 0)
        async with front(pool) as (client, states):
            response = await client.post("/chat_stream", json={"messages": MESSAGES})
            assert response.status_code == 500
            assert await states.wait_async(1) == ["unknown_error_occurred"]


async def test_full_member_hands_the_request_to_another() -> None:
    with remote(concurrency=1, queue=0, time_per_token_sec=0.02) as (full_url, full_states), remote() as (url, _):
        outsider = OpenAIEngine(full_url, "mock", timeout=WATCHDOG)
        pool = EnginePool(
            [OpenAIEngine(full_url, "mock", timeout=WATCHDOG), OpenAIEngine(url, timeout=WATCHDOG)],
            load_interval=None,  # fail-over under test: the pool must not know the member is full
        )
        await pool.start()
        with anyio.fail_after(WATCHDOG):
            busy = outsider.generate(request("busy"))
            await busy.__anext__()  # another client holds the full member's only slot
            stream = pool.generate(request(max_new_tokens=3))
            assert stream.index == 0
            assert "".join([delta async for delta in stream]) == "Once upon a"
            assert stream.index == 1
            assert pool.healthy == (True, True)  # full is not dead
            busy.cancel()
            assert await full_states.wait_async(1) == [WHILE_STREAMING]
        await pool.shutdown()
        await outsider.shutdown()


def test_pool_reports_its_members() -> None:
    engines = [OpenAIEngine("http://127.0.0.1:1", "a", context_len=2048), MockEngine(model_name="b")]
    pool = EnginePool(engines)
    assert isinstance(pool, Engine)
    assert isinstance(engines[0], Engine)
    assert (pool.model_name, pool.context_len) == ("a", 2048)
    assert EnginePool(engines, model_name="shared").model_name == "shared"
    messages = [{"role": "user", "content": "hi"}]
    assert pool.render_prompt(messages) == engines[0].render_prompt(messages)
    assert pool.count_tokens(messages) == engines[0].count_tokens(messages)
    with pytest.raises(ValueError, match="at least one"):
        EnginePool([])


async def test_pool_is_served_through_the_openai_endpoint() -> None:
    with remote() as (url, _):
        pool = EnginePool([OpenAIEngine(url, timeout=WATCHDOG)])
        with anyio.fail_after(WATCHDOG):
            async with front(pool) as (client, _states):
                body = {
                    "messages": MESSAGES,
                    "max_tokens": 4,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    text = (await response.aread()).decode()
                assert text.endswith("data: [DONE]\n\n")
                assert '"completion_tokens":4' in text


async def test_a_second_front_routes_by_the_remotes_own_load() -> None:
    """Another front end holds two streams on remote A; this pool has opened nothing, yet it sends its
    requests to B, because A's own /get_load says it is busier."""
    with remote(time_per_token_sec=0.02) as (url_a, _), remote(time_per_token_sec=0.02) as (url_b, _):
        other_front = OpenAIEngine(url_a, "mock", timeout=WATCHDOG)
        pool = EnginePool(
            [OpenAIEngine(url_a, "mock", timeout=WATCHDOG), OpenAIEngine(url_b, "mock", timeout=WATCHDOG)],
            load_interval=None,  # refreshed by hand below
        )
        await pool.start()
        with anyio.fail_after(WATCHDOG):
            held = [other_front.generate(request(f"other-{i}")) for i in range(2)]
            for stream in held:
                await stream.__anext__()
            await pool.refresh_loads()
            assert pool.reported == (RemoteLoad(2, 4, "get_load"), RemoteLoad(0, 4, "get_load"))
            ours = [pool.generate(request(f"r{i}")) for i in range(3)]
            # B until it is as busy as A (own streams count on top of the report), then ties rotate.
            assert [stream.index for stream in ours] == [1, 1, 0]
            for stream in [*ours, *held]:
                stream.cancel()
            assert pool.active == (0, 0)
        await pool.shutdown()
        await other_front.shutdown()


class FakeMetrics:
    """A server that reports load the way vLLM, llama.cpp or TGI do (or not at all); counts requests per path."""

    def __init__(self, routes: dict[str, str]) -> None:
        self.routes = routes
        self.hits: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.hits[path] = self.hits.get(path, 0) + 1
        body = self.routes.get(path)
        status = 200 if body is not None else 404
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": (body or "not found").encode()})


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""
LLAMACPP_METRICS = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
llamacpp:requests_deferred 4
"""
LLAMACPP_SLOTS = '[{"id": 0, "is_processing": true}, {"id": 1, "is_processing": false}, {"id": 2, "state": 1}]'


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"/metrics": VLLM_METRICS}, RemoteLoad(5, None, "metrics (vllm)")),
        ({"/metrics": LLAMACPP_METRICS}, RemoteLoad(5, None, "metrics (llama.cpp)")),
        ({"/slots": LLAMACPP_SLOTS, "/metrics": LLAMACPP_METRICS}, RemoteLoad(2, 3, "slots")),
        ({"/metrics": "tgi_queue_size 2\ntgi_batch_current_size 6\n"}, RemoteLoad(8, None, "metrics (tgi)")),
        ({"/metrics": "python_gc_objects_collected_total 5\n"}, None),
        ({}, None),
    ],
)
async def test_probe_load_reads_each_servers_own_endpoint(routes: dict[str, str], expected: RemoteLoad | None) -> None:
    app = FakeMetrics({"/ready": "ok", "/get_load": "not json", **routes})
    with serve_in_thread(app, ready_path="/ready") as url:
        engine = OpenAIEngine(url + "/v1", "m", timeout=WATCHDOG)
        with anyio.fail_after(WATCHDOG):
            assert await engine.probe_load() == expected
            assert await engine.probe_load() == expected
        await engine.shutdown()
    if expected is None:
        assert app.hits == {"/ready": app.hits["/ready"], "/get_load": 1, "/slots": 1, "/metrics": 1}  # asked once
    else:  # the endpoint that answered is remembered: the others are not asked again
        assert app.hits["/" + expected.source.split()[0]] == 2


async def test_loads_are_polled_while_the_pool_runs() -> None:
    with remote() as (url, _):
        pool = EnginePool([OpenAIEngine(url, "mock", timeout=WATCHDOG)], load_interval=0.05)
        await pool.start()
        with anyio.fail_after(WATCHDOG):
            while pool.reported[0] is None:
                await anyio.sleep(0.01)  # the poller's interval under test, not a synchronisation
        assert pool.reported == (RemoteLoad(0, 4, "get_load"),)
        await pool.shutdown()


async def test_a_conversation_returns_to_its_member_while_it_has_a_free_slot() -> None:
    members = [MockEngine(model_name="m"), MockEngine(model_name="m")]
    for member in members:
        member.max_batch_size = 2  # type: ignore[attr-defined]
    pool = EnginePool(members)

    def turn(rid: str, key: str | None) -> GenerationStream:
        req = request(rid, max_new_tokens=50)
        req.session_key = key
        return pool.generate(req)

    with anyio.fail_after(WATCHDOG):
        first = turn("a1", "conversation-a")
        assert first.index == 0
        assert [delta async for delta in first]
        others = [turn("b", "conversation-b"), turn("c", None)]  # least loaded, ties round robin
        assert [s.index for s in others] == [1, 0]
        again = turn("a2", "conversation-a")  # member 0 has a slot left (1 of 2 busy): back there
        assert again.index == 0 and pool.active == (2, 1)
        third = turn("a3", "conversation-a")  # member 0 is full: any other, which misses its cache
        assert third.index == 1
        for stream in [*others, again, third]:
            stream.cancel()
        assert pool.release_session("conversation-a") == 0  # mocks hold no cache; the route is forgotten
        assert turn("a4", "conversation-a").index == 0  # plain least-loaded choice again


async def test_a_conversation_is_prepared_by_the_member_that_holds_its_last_ids() -> None:
    """``EnginePool.prepare`` asks the member that served the conversation last (whose session ids build
    the next prompt), else the first."""

    class Preparing(MockEngine):
        def prepare(self, request: GenerationRequest) -> GenerationRequest:
            return dataclasses.replace(request, prompt=self.model_name, prompt_ids=())

    pool = EnginePool([Preparing(model_name="first"), Preparing(model_name="second")])
    busy = pool.generate(request("x"))  # member 0 busy: the conversation goes to member 1
    req = request("a1")
    req.session_key = "conversation-a"
    served = pool.generate(req)
    assert served.index == 1
    assert pool.prepare(req).prompt == "second" and pool.prepare(request("b")).prompt == "first"
    busy.cancel()
    served.cancel()
