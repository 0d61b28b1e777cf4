"""Disconnect fuzz: many raw-socket clients leaving at random moments, on hypercorn, uvicorn and granian.

Each client picks a moment to leave: mid-headers, mid-body, while queued, before the first token,
mid-stream, right after the last chunk, or never; and a way (close or abort), a stream format and
a reply length. Afterwards, from what the server logged and what its callback heard:

- every admitted request has exactly one state, one callback and one ``completed`` log line,
  and the state is consistent with what its client did and saw (the text a client received is
  a prefix of the reply the server recorded; a client that saw the end got ``success``; text
  received rules out ``client_disconnected_before_streaming``; nothing ends in an error);
- 429s are counted once and never enter a state; a client that left mid-headers left no trace;
- slots and queue are back to 0, no ``Reply`` is alive, tasks and memory are back near the start.

The randomness is seeded: the seed is printed; ``CHATSTREAM_FUZZ_SEED`` replays a run's choices
and ``CHATSTREAM_FUZZ_REQUESTS`` sets the count per server (default 1,000).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from faulty_engine import fault
from raw_http import Response, chat_request, connect
from servers import SERVERS, running

from chatstream_asgi.engines.mock import LONG_TEXT, tokenize

REQUESTS = int(os.environ.get("CHATSTREAM_FUZZ_REQUESTS", "1000"))
SEED = int(os.environ.get("CHATSTREAM_FUZZ_SEED", str(random.SystemRandom().randrange(10**9))))
CLIENTS = 16
"""Clients in flight at once: the server has 4 slots and 12 queue places; clients that
  left are still being served for a moment, so a few get 429."""
APP_ENV = {"CS_CONCURRENCY": "4", "CS_QUEUE": "12", "CS_FIRST_TOKEN": "0.005", "CS_PER_TOKEN": "0.002"}
CLIENT_WATCHDOG = 30.0
QUEUE_PATIENCE = 0.05
"""How long a ``queued`` client waits for its first frame (a queue event) before it leaves anyway."""
RUN_WATCHDOG = 240.0
MOMENTS = ("mid_headers", "mid_body", "queued", "before_first_token", "mid_stream", "after_last_chunk", "never")
SUCCESS = "success"
WHILE = "client_disconnected_while_streaming"
BEFORE = "client_disconnected_before_streaming"
TOKENS = tokenize(LONG_TEXT)
TASK_MARGIN = 5
RSS_MARGIN = 48 << 20
"""Growth allowed after warm-up: the records of 1,000 requests and allocator noise fit well inside."""


def full_reply(tokens: int) -> str:
    return "".join(itertools.islice(itertools.cycle(TOKENS), tokens))


GATED = {"queued": 0, "before_first_token": 0}
"""Moments whose request stops at the engine's gate (closed during the fuzz) before that many deltas,
so what the server can have sent before the client leaves is known exactly (``mid_stream`` stops
at the delta after which its client leaves)."""
STATE_OF = {"queued": BEFORE, "before_first_token": BEFORE, "mid_stream": WHILE, "after_last_chunk": SUCCESS}
STATE_OF["never"] = SUCCESS
"""The one state each moment allows once the request was admitted."""


@dataclass
class Client:
    """One client's plan and what it saw."""

    rid: str
    moment: str
    fmt: str
    tokens: int
    abort: bool
    stay_for: int
    """``mid_stream``: the deltas it reads before leaving (the engine stops there until it has left)."""
    cut: float
    """``mid_headers`` / ``mid_body``: the fraction of the head / body sent."""
    sent_all: bool = False
    response: Response | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def plan(cls, rid: str, rng: random.Random) -> Client:
        moment = rng.choice(MOMENTS)
        tokens = rng.randint(2, 60)
        return cls(
            rid=rid,
            moment=moment,
            fmt="sse" if moment == "queued" else rng.choice(("sse", "text")),
            tokens=tokens,
            abort=rng.random() < 0.5,
            stay_for=rng.randint(1, tokens - 1),
            cut=rng.random(),
        )

    def body(self) -> dict[str, Any]:
        gate = self.stay_for if self.moment == "mid_stream" else GATED.get(self.moment)
        text = "hello" if gate is None else fault("gate", gate)
        content = {"format": self.fmt, "generation_params": {"max_new_tokens": self.tokens}}
        if int(self.rid.rsplit("-", 1)[1]) % 2:
            return {"user_input": text, **content}
        return {"messages": [{"role": "user", "content": text}], **content}

    async def run(self, port: int, rng: random.Random, held: list[asyncio.StreamWriter]) -> None:
        head, body = chat_request(self.rid, self.body())
        reader, writer = await connect(port)
        try:
            if self.moment == "mid_headers":
                writer.write(head[: 1 + int(self.cut * (len(head) - 5))])  # never the final CRLF CRLF
                await writer.drain()
                await asyncio.sleep(rng.choice((0, 0.001, 0.005)))
                return
            if self.moment == "mid_body":
                writer.write(head + body[: int(self.cut * (len(body) - 1))])
                await writer.drain()
                await asyncio.sleep(rng.choice((0, 0.001, 0.005)))
                return
            writer.write(head + body)
            await writer.drain()
            self.sent_all = True
            if self.moment == "before_first_token":
                await asyncio.sleep(rng.choice((0, 0, 0.001, 0.003)))
                return
            response = self.response = Response(reader, self.fmt)
            try:
                await asyncio.wait_for(response.read_head(), QUEUE_PATIENCE if self.moment == "queued" else None)
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                return  # not queued (or a slow queue event): it left before its first token all the same
            if response.status != 200:
                await response.read_all()
                return
            async for _ in response.frames():
                if self.moment == "queued":
                    return  # leaves at its first frame, a queue event: its reply waits at the gate
                if self.moment == "mid_stream" and response.deltas >= self.stay_for:
                    return
            if self.moment == "never":
                held.append(writer)  # closed once every client is done
        finally:
            if writer in held:
                pass
            elif self.abort:
                writer.transport.abort()
            else:
                writer.close()


async def fuzz(server: str, port: int, count: int, seed: int) -> list[Client]:
    """Run ``count`` clients, ``CLIENTS`` at a time; returns them with what they saw."""
    held: list[asyncio.StreamWriter] = []
    slots = asyncio.Semaphore(CLIENTS)
    clients = [Client.plan(f"{server}-{i}", random.Random(f"{seed}-{i}")) for i in range(count)]

    async def one(client: Client) -> None:
        async with slots:
            rng = random.Random(f"{seed}-{client.rid}-run")
            try:
                await asyncio.wait_for(client.run(port, rng, held), CLIENT_WATCHDOG)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                client.notes.append(f"connection ended: {exc!r}")
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                raise AssertionError(f"client waited {CLIENT_WATCHDOG} s: {client}") from None

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), RUN_WATCHDOG)
    for writer in held:
        writer.close()
    return clients


def check(client: Client, callbacks: list[list[str]], log: list[str]) -> str | None:
    """The observed outcome of ``client`` (a state, ``rejected`` or None); fails on any inconsistency."""
    response = client.response if client.response is not None and client.response.status is not None else None
    seen = response.text if response is not None and response.status == 200 else ""
    ended = response is not None and response.status == 200 and response.ended
    accepted = log.count("accepted")
    completed = [line.split(": ", 1)[1] for line in log if line.startswith("completed:")]
    rejected = [line for line in log if line.startswith("rejected:")]
    context = (client, callbacks, log)
    assert accepted <= 1 and len(callbacks) <= 1, context
    if response is not None and response.status == 429:
        assert response.json()["error"] == "too_many_requests", context
        assert (accepted, callbacks, completed, rejected) == (0, [], [], ["rejected: queue_full"]), context
        return "rejected"
    if rejected:  # turned away after it had left, unread
        assert response is None and (accepted, callbacks, rejected) == (0, [], ["rejected: queue_full"]), context
        return "rejected"
    if client.moment == "mid_headers":
        assert not (accepted or callbacks or completed), context  # the request never reached the app
        return None
    if accepted:
        assert len(callbacks) == 1 and completed == [callbacks[0][0]], context  # one state, one callback
    elif client.moment == "mid_body" or not client.sent_all or response is None:
        # Left before its body was read: at most a before-streaming state from the body reader.
        assert [c[0] for c in callbacks] in ([], [BEFORE]) and completed == [c[0] for c in callbacks], context
        return callbacks[0][0] if callbacks else None
    else:
        raise AssertionError(f"a response came but the request was never accepted: {context}")
    state, reply = callbacks[0]
    expected = full_reply(client.tokens)
    assert state == STATE_OF[client.moment], context
    assert expected.startswith(reply) and reply.startswith(seen), context  # sent what it generated; seen ⊆ sent
    if ended or client.moment == "never":
        assert ended and state == SUCCESS and seen == expected, context
    if seen:
        assert state in (SUCCESS, WHILE), context
    if state == SUCCESS:
        assert reply == expected, context
    elif state == WHILE:
        assert reply == seen and reply == full_reply(client.stay_for), context  # all it was sent, it read
    else:
        assert reply == "", context
    return state


async def wait_settled(client: httpx.AsyncClient, baseline_tasks: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Records and stats once every accepted request has completed and the tasks are back (bounded)."""
    deadline = time.monotonic() + 20.0
    while True:
        records = (await client.get("/_fuzz/records")).json()
        stats = (await client.get("/_fuzz/stats")).json()
        logs = records["logs"]
        open_ = [
            rid for rid, log in logs.items() if log.count("accepted") > sum(x.startswith("completed") for x in log)
        ]
        settled = not open_ and stats["processing"] == 0 and stats["waiting"] == 0
        if (settled and stats["tasks"] <= baseline_tasks + TASK_MARGIN) or time.monotonic() > deadline:
            return records, stats
        await asyncio.sleep(0.05)


async def warm_up(port: int, url: str) -> dict[str, Any]:
    """A few complete requests, then the idle baseline."""
    for i in range(20):
        head, body = chat_request(f"warm-{i}", {"user_input": "hello", "generation_params": {"max_new_tokens": 5}})
        reader, writer = await connect(port)
        writer.write(head + body)
        response = Response(reader, "text")
        await response.read_head()
        await response.read_all()
        writer.close()
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as c:
        stats = (await c.get("/_fuzz/stats")).json()
        await c.post("/_fuzz/reset")
    return stats


@pytest.mark.parametrize(
    ("server_name", "tenants"), [*((s, 0) for s in SERVERS), ("hypercorn", 4)], ids=[*SERVERS, "hypercorn-4-tenants"]
)
def test_disconnect_fuzz(server_name: str, tenants: int) -> None:
    print(
        f"\ndisconnect fuzz on {server_name}: seed {SEED} (CHATSTREAM_FUZZ_SEED={SEED} replays it), {REQUESTS} requests"
    )
    with running(server_name, "fuzz_app:app", {**APP_ENV, "CS_TENANTS": str(tenants)}) as srv:

        async def main() -> tuple[list[Client], dict[str, Any], dict[str, Any], dict[str, Any], float]:
            baseline = await warm_up(srv.port, srv.url)
            started = time.monotonic()
            clients = await fuzz(server_name, srv.port, REQUESTS, SEED)
            elapsed = time.monotonic() - started
            async with httpx.AsyncClient(base_url=srv.url, timeout=10.0) as c:
                records, stats = await wait_settled(c, baseline["tasks"])
                metrics = (await c.get("/metrics")).text
            assert "chatstream_active_generations 0.0" in metrics and "chatstream_queue_depth 0.0" in metrics
            return clients, records, baseline, stats, elapsed

        clients, records, baseline, stats, elapsed = asyncio.run(main())

    outcomes: collections.Counter[tuple[str, str | None]] = collections.Counter()
    for client in clients:
        outcome = check(client, records["callbacks"].get(client.rid, []), records["logs"].get(client.rid, []))
        outcomes[(client.moment, outcome)] += 1
    known = {c.rid for c in clients}
    assert set(records["callbacks"]) <= known and set(records["logs"]) <= known  # nothing unaccounted for
    print(f"{REQUESTS} clients in {elapsed:.1f} s; moment -> outcome counts:")
    for (moment, outcome), n in sorted(outcomes.items(), key=lambda kv: (MOMENTS.index(kv[0][0]), str(kv[0][1]))):
        print(f"  {moment:<20} {outcome!s:<38} {n}")
    grew = stats["rss"] - baseline["rss"]
    print(f"idle before/after: tasks {baseline['tasks']} -> {stats['tasks']}, RSS +{grew / 2**20:.1f} MiB, "
          f"live replies {stats['live_replies']}")  # fmt: skip
    assert (stats["processing"], stats["waiting"], stats["open_replies"], stats["live_replies"]) == (0, 0, 0, 0)
    assert stats["tasks"] <= baseline["tasks"] + TASK_MARGIN, (baseline, stats)
    assert grew <= RSS_MARGIN, (baseline, stats)
    admitted = sum(n for (_, outcome), n in outcomes.items() if outcome in (SUCCESS, WHILE, BEFORE))
    assert admitted >= REQUESTS // 2, outcomes  # most clients got in: the fuzz exercised the send loop
