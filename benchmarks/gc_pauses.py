"""Garbage-collector pauses with a model loaded: the start-up heap frozen (the default) against not frozen.

Set up once: ``.venv/bin/pip install -e ".[bench]"`` (its load clients and servers).
Run: ``.venv/bin/python benchmarks/gc_pauses.py`` (``--requests N``, ``--model``; ``--quick`` for a
short smoke run without a model).

Two uvicorn servers run as subprocesses, one after the other. Each loads the model
(SmolLM2-135M-Instruct by default, as the server does) and keeps it, so that its heap is a served
model's, and answers with a zero-delay ``MockEngine`` through the middleware and send loop, so that
thousands of requests run in seconds. Each request is a new user's first chat turn: the sessions a
busy server keeps are what sets full collections off. The collector stops every thread (the GIL), so
a full pass stalls a real engine's streams the same way. The first server freezes its start-up heap
as every started service does (``chatstream_asgi.service.heap``); the second unfreezes it after
start-up, as before freezing was done. Each server logs its full collections and their times. For
each: requests per second; full collections (how many, the longest, all together); and each
request's time from sending it to its last byte, as the client saw it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from subprocess_server import serve_subprocess  # noqa: E402

from chatstream_asgi import ChatStream, MockEngine, MockParams, create_app  # noqa: E402

CONCURRENT = 8
_kept: list[Any] = []  # the served process's model: its objects are the heap


def served_app() -> Any:
    """The app a server of this benchmark runs (uvicorn ``--factory``): a model loaded, a mock engine
    answering, the heap thawed after start-up when ``GC_PAUSES_THAW`` is set. It appends the duration
    of every full collection (seconds) to the file ``GC_PAUSES_LOG`` names."""
    log = open(os.environ["GC_PAUSES_LOG"], "a", buffering=1)  # noqa: SIM115 - open while the server runs
    started = [0.0]

    def observe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            log.write(f"{time.perf_counter() - started[0]}\n")

    gc.callbacks.append(observe)
    model = os.environ.get("GC_PAUSES_MODEL")
    if model:
        from chatstream_asgi.engines.transformers.loading import load_model

        _kept.append(load_model(model, device="cpu"))
    chat_stream = ChatStream(
        MockEngine(MockParams(type="long", initial_wait_sec=0.0, time_per_token_sec=0.0)),
        num_of_concurrent_executions=CONCURRENT,
        max_queue_size=CONCURRENT,
        max_new_tokens=64,
        session_secret="benchmark",
    )
    app = create_app(chat_stream)
    if not os.environ.get("GC_PAUSES_THAW"):
        return app

    async def thawed(scope: Any, receive: Any, send: Any) -> None:
        async def thaw_after_startup() -> Any:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await chat_stream.start()  # started (and frozen) before the middleware's own call
                gc.unfreeze()
            return message

        await app(scope, thaw_after_startup if scope["type"] == "lifespan" else receive, send)

    return thawed


@contextlib.contextmanager
def server(model: str | None, thaw: bool, log: Path) -> Iterator[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    env.pop("GC_PAUSES_THAW", None)
    env["GC_PAUSES_MODEL"] = model or ""
    env["GC_PAUSES_LOG"] = str(log)
    if thaw:
        env["GC_PAUSES_THAW"] = "1"

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "--factory", "gc_pauses:served_app", "--port", str(port),
                "--log-level", "warning"]  # fmt: skip

    with serve_subprocess(command, "/metrics", env, start_timeout=180) as url:
        yield url


async def load(url: str, requests: int) -> tuple[float, list[float]]:
    """``requests`` first turns, ``CONCURRENT`` at a time: requests per second, and each one's seconds
    from sending it to its last byte."""

    async def one(client: httpx.AsyncClient, i: int) -> float:
        started = time.perf_counter()
        async with client.stream("POST", "/chat_stream", json={"user_input": f"request {i} " * 20}) as response:
            response.raise_for_status()
            async for _ in response.aiter_raw():
                pass
        return time.perf_counter() - started

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        latencies: list[float] = []
        for first in range(0, requests, CONCURRENT):
            latencies += await asyncio.gather(*(one(client, i) for i in range(first, first + CONCURRENT)))
        return requests / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="the model whose heap each server loads")
    parser.add_argument("--requests", type=int, default=6000, help="requests per server")
    parser.add_argument("--quick", action="store_true", help="no model, 400 requests: a smoke run")
    args = parser.parse_args()
    model = None if args.quick else args.model
    requests = 400 if args.quick else args.requests
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
          f"model {model or 'none (--quick)'}; {requests} first turns per server, {CONCURRENT} at a time")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, thaw in (("frozen (default)", False), ("not frozen", True)):
            log = Path(tmp) / f"{thaw}.log"
            with server(model, thaw, log) as url:
                asyncio.run(load(url, CONCURRENT * 8))  # warm-up
                skip = len(log.read_text().split())  # the start-up's own (the freeze collects once)
                rate, latencies = asyncio.run(load(url, requests))
                full = [float(t) for t in log.read_text().split()[skip:]]
            results[name] = rate, latencies, full
    print("\n| start-up heap | requests/s | full collections | longest | all together | request p50 | p99 | slowest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (rate, latencies, full) in results.items():
        ms = [f"{t * 1000:.0f} ms" for t in (max(full, default=0), sum(full), *quantiles(latencies), max(latencies))]
        print(f"| {name} | {rate:.0f} | {len(full)} | {' | '.join(ms)} |")
    frozen, thawed = max(results["frozen (default)"][1]), max(results["not frozen"][1])
    print(f"\nslowest request, not frozen / frozen: {thawed / frozen:.1f}x")


def quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99."""
    cuts = statistics.quantiles(values, n=100)
    return cuts[49], cuts[98]


if __name__ == "__main__":
    main()
