"""Soak: a long mixed load on a real server; memory, asyncio tasks and sessions must stay flat.

Set up once: ``.venv/bin/pip install -e ".[bench]"`` (its load clients and servers).
Run: ``.venv/bin/python benchmarks/soak.py`` (10 minutes; ``--duration SEC``, ``--server
hypercorn|uvicorn|granian``, ``--clients N``). The suite runs a 25-second variant
(``tests/e2e/test_soak.py``).

The server (a subprocess) serves this module's ``app``: a ``ChatStream`` over a mock engine
(8 slots, 16 queue places, 5 ms to the first token, 1 ms a token) with ``/_soak/stats`` (RSS,
asyncio tasks, sessions, live objects, load). Each of 64 users first takes one chat turn (and so
holds a session token); then ``--clients`` clients (httpx, in this process) loop until the end,
each turn one of: a chat turn of one of the users (each starts over with
``/clear_context`` after 6 turns, as people start new conversations), a stateless chat, an OpenAI
streaming completion, a client that leaves mid-stream, one that leaves before its first token,
and a malformed body. Some get 429 when every slot and queue place is taken.

A sample is printed every ``--interval`` seconds. After the warm-up (a tenth of the run, at least
5 s) and at the end the load pauses until the server is idle, and the two idle samples are
compared: the growth of RSS, tasks, sessions and live objects is the result.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import random
import sys
import time
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]  # the package, and this folder when loaded by path

from subprocess_server import serve_subprocess  # noqa: E402

from chatstream_asgi import ChatStream, ChatStreamMiddleware, MockEngine, MockParams  # noqa: E402

USERS = 64
TURNS_PER_CONVERSATION = 6
ACTIONS = {"chat": 50, "stateless": 15, "openai": 5, "leave_mid_stream": 15, "leave_early": 10, "bad_body": 5}
"""Weights of what a client does next."""

chat_stream = ChatStream(
    MockEngine(MockParams(type="long", initial_wait_sec=0.005, time_per_token_sec=0.001)),
    num_of_concurrent_executions=8,
    max_queue_size=16,
    max_new_tokens=256,
    session_secret="soak",
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _stats(request: Request) -> Response:
    gc.collect()
    load = chat_stream.get_load()
    return JSONResponse(
        {
            "rss": _rss(),
            "tasks": len(asyncio.all_tasks()),
            "sessions": len(chat_stream.sessions.store),
            "objects": len(gc.get_objects()),
            "processing": load["processing"],
            "waiting": load["waiting"],
        }
    )


app = ChatStreamMiddleware(Starlette(routes=[Route("/_soak/stats", _stats)]), chat_stream)


# -- the driver -------------------------------------------------------------------------------


def server_command(server: str, port: int) -> list[str]:
    app_ref = "soak:app"
    if server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", app_ref]
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                "warning", app_ref]  # fmt: skip
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                "--loop", "asyncio", "--workers", "1", "--log-level", "warning", app_ref]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


@contextlib.contextmanager
def serving(server: str) -> Any:
    """Serve ``app`` with ``server`` in a subprocess; yields its base URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    with serve_subprocess(lambda port: server_command(server, port), "/get_load", env) as url:
        yield url


@dataclass
class User:
    token: str | None = None
    turns: int = 0


@dataclass
class Load:
    """The clients' side: what they did and got."""

    url: str
    rng: random.Random
    users: list[User] = field(default_factory=lambda: [User() for _ in range(USERS)])
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    async def client(self, http: httpx.AsyncClient, until: float) -> None:
        names, weights = list(ACTIONS), list(ACTIONS.values())
        while time.monotonic() < until:
            action = self.rng.choices(names, weights)[0]
            try:
                outcome = await getattr(self, action)(http)
            except httpx.TransportError:
                outcome = "transport_error"
            self.counts[f"{action}:{outcome}"] += 1

    async def sign_in(self) -> None:
        """One first turn per user, a few at a time (no 429), so every user holds its session token."""
        no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
        async with httpx.AsyncClient(base_url=self.url, timeout=30, cookies=no_cookies) as http:
            for first in range(0, USERS, 4):
                await asyncio.gather(*(self.chat(http, user) for user in self.users[first : first + 4]))
        assert all(user.token for user in self.users), "a user got no session token"

    async def chat(self, http: httpx.AsyncClient, user: User | None = None) -> str:
        user = user or self.rng.choice(self.users)
        if user.turns >= TURNS_PER_CONVERSATION and user.token:
            await http.post("/clear_context", headers={"x-session-id": user.token})
            user.turns = 0
        headers = {"x-session-id": user.token} if user.token else {}
        body = {"user_input": f"turn {user.turns}", "generation_params": {"max_new_tokens": self.rng.randint(8, 64)}}
        response = await http.post("/chat_stream", json=body, headers=headers)
        if response.status_code == 200:
            user.token = response.headers.get("x-session-id", user.token)
            user.turns += 1
        return str(response.status_code)

    async def stateless(self, http: httpx.AsyncClient) -> str:
        body = {"messages": [{"role": "user", "content": "hi"}], "generation_params": {"max_new_tokens": 32}}
        return str((await http.post("/chat_stream", json=body)).status_code)

    async def openai(self, http: httpx.AsyncClient) -> str:
        body = {"model": "mock", "stream": True, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
        return str((await http.post("/v1/chat/completions", json=body)).status_code)

    async def leave_mid_stream(self, http: httpx.AsyncClient) -> str:
        body = {"messages": [{"role": "user", "content": "hi"}], "generation_params": {"max_new_tokens": 200}}
        async with http.stream("POST", "/chat_stream", json=body) as response:
            chunks = 0
            async for _ in response.aiter_raw():
                chunks += 1
                if chunks >= self.rng.randint(1, 20):
                    break
            return str(response.status_code)

    async def leave_early(self, http: httpx.AsyncClient) -> str:
        body = {"messages": [{"role": "user", "content": "hi"}], "generation_params": {"max_new_tokens": 50}}
        with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError from 3.11 on
            await asyncio.wait_for(http.post("/chat_stream", json=body), self.rng.uniform(0, 0.01))
            return "finished"
        return "left"

    async def bad_body(self, http: httpx.AsyncClient) -> str:
        return str((await http.post("/chat_stream", content=b'{"user_input": ')).status_code)


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return (await http.get("/_soak/stats")).json()


async def idle_stats(url: str, settle: float = 15.0) -> dict[str, Any]:
    """Stats once nothing is processing or waiting and the task count has held still for a second
    (closed connections take a moment to end their tasks); bounded by ``settle`` seconds."""
    deadline = time.monotonic() + settle
    last, still_since = await stats(url), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = await stats(url)
        if now["tasks"] != last["tasks"] or now["processing"] or now["waiting"]:
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= 1.0:
            return now
        last = now
    return last


async def run_load(
    load: Load, clients: int, seconds: float, interval: float, samples: list[dict[str, Any]], t0: float
) -> None:
    """Run ``clients`` clients for ``seconds``, sampling the server every ``interval`` seconds."""
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # No cookie jar: each user sends its own session token (a shared jar would give every user the last cookie).
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    async with httpx.AsyncClient(base_url=load.url, timeout=30, limits=limits, cookies=no_cookies) as http:
        workers = [asyncio.ensure_future(load.client(http, until)) for _ in range(clients)]
        while time.monotonic() < until:
            await asyncio.sleep(min(interval, max(until - time.monotonic(), 0)))
            sample = await stats(load.url)
            sample["t"], sample["done"] = time.monotonic() - t0, sum(load.counts.values())
            samples.append(sample)
            print_row(sample)
        await asyncio.gather(*workers)


def print_row(sample: dict[str, Any]) -> None:
    print(f"{sample['t']:>8.0f} {sample['done']:>9} {sample['rss'] / 2**20:>8.1f} {sample['tasks']:>6} "
          f"{sample['sessions']:>8} {sample['objects']:>9} {sample['processing']:>5} {sample['waiting']:>5}",
          flush=True)  # fmt: skip


async def soak(
    duration: float = 600.0, *, server: str = "hypercorn", clients: int = 32, interval: float = 30.0, seed: int = 0
) -> dict[str, Any]:
    """Run the soak; returns the idle samples after warm-up and at the end, and every sample."""
    warmup = max(5.0, duration / 10)
    samples: list[dict[str, Any]] = []
    with serving(server) as url:
        load = Load(url, random.Random(seed))
        await load.sign_in()
        t0 = time.monotonic()
        print(f"soak on {server}: {duration:.0f} s, {clients} clients, warm-up {warmup:.0f} s")
        print(f"{'t (s)':>8} {'requests':>9} {'RSS MiB':>8} {'tasks':>6} {'sessions':>8} {'objects':>9} "
              f"{'busy':>5} {'queue':>5}")  # fmt: skip
        await run_load(load, clients, warmup, interval, samples, t0)
        start = await idle_stats(url)
        await run_load(load, clients, duration - warmup, interval, samples, t0)
        end = await idle_stats(url)
    growth = {key: end[key] - start[key] for key in ("rss", "tasks", "sessions", "objects")}
    print(f"idle after warm-up: RSS {start['rss'] / 2**20:.1f} MiB, {start['tasks']} tasks, "
          f"{start['sessions']} sessions, {start['objects']} objects")  # fmt: skip
    print(f"idle at the end:    RSS {end['rss'] / 2**20:.1f} MiB, {end['tasks']} tasks, "
          f"{end['sessions']} sessions, {end['objects']} objects")  # fmt: skip
    print(f"growth: RSS {growth['rss'] / 2**20:+.1f} MiB, tasks {growth['tasks']:+d}, "
          f"sessions {growth['sessions']:+d}, objects {growth['objects']:+d}")  # fmt: skip
    print("outcomes:", dict(sorted(load.counts.items())))
    return {"start": start, "end": end, "growth": growth, "samples": samples, "counts": dict(load.counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--server", choices=["hypercorn", "uvicorn", "granian"], default="hypercorn")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--interval", type=float, default=None, help="seconds between samples (default: 20 a run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    interval = args.interval or max(1.0, args.duration / 20)
    asyncio.run(soak(args.duration, server=args.server, clients=args.clients, interval=interval, seed=args.seed))


if __name__ == "__main__":
    main()
