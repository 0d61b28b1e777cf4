"""Fair admission and the wait estimate, measured from outside against the ``serve`` CLI.

Set up once: ``.venv/bin/pip install -e ".[bench]"`` (httpx). Run:
``.venv/bin/python benchmarks/fairness.py`` (mock engine, about 6 minutes) or
``.venv/bin/python benchmarks/fairness.py --engine transformers`` (SmolLM2-135M on this machine's CPU).
The table is printed and appended to ``benchmarks/FAIRNESS_RESULTS.md`` (``--no-write`` leaves it).

Every server is ``python -m chatstream_asgi serve`` in a subprocess (``--concurrency 4 --queue 32``),
the client (httpx, SSE ``/chat_stream``) runs here. The *baseline* is the same command run from the
package as it was before fair admission (``--baseline REV``, default: where this branch left main),
extracted with ``git archive``.

1. Fairness. Tenant A floods (``--flood`` requests, ``--flood-concurrency`` at a time, each its own
   ``max_new_tokens`` from 8 to 2 x the reply length) while tenant B sends one request a second
   (``X-API-Key: a`` / ``b``; slower than that when two of B's replies over the slots take longer, as
   SmolLM2 on a shared CPU: B must ask for less than its fair share, or it floods too). B's time to
   first token (request sent to first delta), p50 / p99: on an idle server (B alone), with fair
   queuing (``--tenant-header X-API-Key``), and with one FIFO queue (the same server without
   ``--tenant-header``, and the baseline). Target: B's p99 with fair
   queuing within two reply durations (B's median on the idle server, request to last byte) of its
   idle time to first token.
2. The estimate. Each queued request's first queue event says ``estimated_wait_seconds``; the actual
   wait runs from that event to the first delta. Relative error ``|estimate - actual| / actual`` at
   p50 and p90, per scenario: the flood above; bursts of 2, 4 and 8 x the slots (``--bursts``) after
   a warm-up (one tenant; and the largest from 7 tenants, where later arrivals of tenants served less
   go ahead of the requests of tenants already served, which no first estimate can foresee); a burst
   after an 8-second idle pause; a burst after a slow trickle (one short reply every 1.5 s);
   and a 429's ``Retry-After`` against the time until a queue place actually freed (polled on
   ``/get_load``; whole seconds, rounded up, so sub-second waits read as 1). Targets: p50 <= 25 %,
   p90 <= 50 %. A missing estimate (``null``: nothing measured yet) counts as 100 % off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from subprocess_server import serve_subprocess  # noqa: E402

SLOTS, QUEUE = 4, 32
PROMPTS = [
    "Tell me about the sea.",
    "What is a good name for a cat?",
    "Explain what a queue is to a child.",
    "Write a short poem about the morning.",
    "Why is the sky blue?",
    "Give me three tips for learning to cook.",
    "What makes a story worth telling?",
    "Describe a busy train station.",
]


@dataclass
class Reply:
    """One request as the client saw it."""

    tenant: str
    sent: float
    status: int = 0
    first_queue: float | None = None
    estimate: float | None = None
    position: int | None = None
    first_token: float | None = None
    done: float | None = None
    retry_after: float | None = None
    events: list[str] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def actual_wait(self) -> float | None:
        if self.first_queue is None or self.first_token is None:
            return None
        return self.first_token - self.first_queue


async def chat(client: httpx.AsyncClient, tenant: str, max_new_tokens: int, prompt: str | None = None) -> Reply:
    """One SSE ``/chat_stream`` request of ``tenant``, timed."""
    reply = Reply(tenant, time.monotonic())
    body = {
        "messages": [{"role": "user", "content": prompt or random.choice(PROMPTS)}],
        "format": "sse",
        "generation_params": {"max_new_tokens": max_new_tokens},
    }
    async with client.stream("POST", "/chat_stream", json=body, headers={"x-api-key": tenant}) as response:
        reply.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            if "retry-after" in response.headers:
                reply.retry_after = float(response.headers["retry-after"])
            reply.done = time.monotonic()
            return reply
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                now = time.monotonic()
                if event == "queue" and reply.first_queue is None:
                    data = json.loads(line[6:])
                    reply.first_queue, reply.estimate, reply.position = (
                        now,
                        data["estimated_wait_seconds"],
                        data["position"],
                    )
                elif event == "delta" and reply.first_token is None:
                    reply.first_token = now
    reply.done = time.monotonic()
    return reply


def quantile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def errors(replies: list[Reply]) -> list[float]:
    """Relative errors of the estimates of the queued replies (a missing estimate: 1.0)."""
    out = []
    for r in replies:
        actual = r.actual_wait
        if actual is None or actual <= 0:
            continue
        out.append(1.0 if r.estimate is None else abs(r.estimate - actual) / actual)
    return out


# -- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """The package as it was at ``rev``, in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="chatstream-baseline-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "chatstream_asgi"], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def server(args: argparse.Namespace, package: Path, tenants: bool) -> Iterator[str]:
    def command(port: int) -> list[str]:
        # -P: not the current folder first on sys.path, so PYTHONPATH picks the package (this tree or the baseline)
        cmd = [sys.executable, "-P", "-m", "chatstream_asgi", "serve", "--port", str(port)]
        cmd += ["--concurrency", str(SLOTS), "--queue", str(QUEUE), "--max-new-tokens", str(2 * args.tokens)]
        cmd += ["--stream-format", "sse", "--log-level", "warning"]
        if args.engine == "mock":
            cmd += ["--engine", "mock", "--mock-type", "long", "--mock-time-per-token", str(args.per_token)]
        else:
            cmd += ["--engine", "transformers", "--model", args.model, "--temperature", "0"]
        if tenants:
            cmd += ["--tenant-header", "X-API-Key"]
        return cmd

    env = {**os.environ, "PYTHONPATH": str(package)}
    with serve_subprocess(command, "/get_load", env, start_timeout=300) as url:
        yield url


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=200))


# -- scenarios -----------------------------------------------------------------------------------


async def warm(c: httpx.AsyncClient, args: argparse.Namespace, n: int = SLOTS * 2) -> None:
    await asyncio.gather(*(chat(c, "warm", args.tokens) for _ in range(n)))


async def flood(c: httpx.AsyncClient, args: argparse.Namespace) -> tuple[list[Reply], list[Reply]]:
    """A floods, B sends one a second until A is done; (A's replies, B's replies)."""
    left = args.flood
    a_replies: list[Reply] = []
    b_tasks: list[asyncio.Task[Reply]] = []

    async def a_worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            a_replies.append(await chat(c, "a", random.randint(8, 2 * args.tokens)))

    async def b_sender(stop: asyncio.Event) -> None:
        await asyncio.sleep(1.0)  # let A's flood fill the queue first
        while not stop.is_set():
            b_tasks.append(asyncio.ensure_future(chat(c, "b", args.tokens)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.b_interval)

    stop = asyncio.Event()
    sender = asyncio.ensure_future(b_sender(stop))
    await asyncio.gather(*(a_worker() for _ in range(args.flood_concurrency)))
    stop.set()
    await sender
    return a_replies, list(await asyncio.gather(*b_tasks))


async def b_alone(c: httpx.AsyncClient, args: argparse.Namespace, n: int) -> list[Reply]:
    replies = []
    for _ in range(n):
        replies.append(await chat(c, "b", args.tokens))
        await asyncio.sleep(0.25)
    return replies


async def burst(c: httpx.AsyncClient, args: argparse.Namespace, n: int, tenants: int = 1) -> list[Reply]:
    """``n`` requests at once, from ``tenants`` tenants in turn."""
    replies = (chat(c, f"u{i % tenants}", random.randint(8, 2 * args.tokens)) for i in range(n))
    return list(await asyncio.gather(*replies))


async def retry_after(c: httpx.AsyncClient, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Fill every slot and queue place and then some: each 429's Retry-After against the time until
    ``/get_load`` first shows a free queue place."""
    tasks = [asyncio.ensure_future(chat(c, "a", 2 * args.tokens)) for _ in range(SLOTS + QUEUE)]
    while (await c.get("/get_load")).json()["waiting"] < QUEUE:
        await asyncio.sleep(0.01)
    pairs = []
    for _ in range(3):
        refused = await chat(c, "z", args.tokens)
        if refused.status == 429 and refused.retry_after is not None:
            while (await c.get("/get_load")).json()["waiting"] >= QUEUE:
                await asyncio.sleep(0.02)
            pairs.append((refused.retry_after, time.monotonic() - refused.done))  # type: ignore[operator]
        while (await c.get("/get_load")).json()["waiting"] < QUEUE:  # refill the place that freed
            tasks.append(asyncio.ensure_future(chat(c, "a", 2 * args.tokens)))
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    return pairs


async def estimate_scenarios(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}

    def record(name: str, values: list[float]) -> None:
        out[name] = values
        progress(f"  {name}: p50 {pct(values, 50)}, p90 {pct(values, 90)} (n={len(values)})")

    async with client(url) as c:
        await warm(c, args)
        for factor in args.bursts:
            record(f"burst of {factor} x slots", errors(await burst(c, args, factor * SLOTS)))
        most = max(args.bursts)
        record(f"burst of {most} x slots, 7 tenants", errors(await burst(c, args, most * SLOTS, tenants=7)))
        await warm(c, args)
        await asyncio.sleep(8.0)  # the pause is the scenario
        record("burst after an 8 s pause", errors(await burst(c, args, 3 * SLOTS)))
        for _ in range(6):
            await chat(c, "t", 4)
            await asyncio.sleep(1.5)
        record("burst after a trickle", errors(await burst(c, args, 3 * SLOTS)))
        pairs = await retry_after(c, args)
        record("429 Retry-After", [abs(ra - actual) / actual for ra, actual in pairs if actual > 0])
    return out


def progress(line: str) -> None:
    """A phase's result as soon as it is known (a long run that is cut short keeps them)."""
    print(line, file=sys.stderr, flush=True)


# -- the run -----------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value * 1000:,.0f}"


def pct(values: list[float], q: int) -> str:
    return "n/a" if not values else f"{quantile(values, q) * 100:.0f} %"


async def measure(args: argparse.Namespace, rev: str) -> dict[str, Any]:
    """Every server, one after another: this branch with tenants, this branch as one FIFO tenant, the baseline."""
    random.seed(1)
    results: dict[str, Any] = {}
    with server(args, ROOT, tenants=True) as url:
        async with client(url) as c:
            await warm(c, args)
            results["alone"] = await b_alone(c, args, args.alone)
        reply = statistics.median(r.done - r.sent for r in results["alone"] if r.done is not None)
        progress(f"B alone: reply {ms(reply)} ms")
        if args.b_interval is None:
            args.b_interval = max(1.0, 2 * reply / SLOTS)
        async with client(url) as c:
            await warm(c, args)
            results["fair"] = await flood(c, args)
        progress(f"fair: B's TTFT p50/p99 {flood_line(results['fair'])}")
        progress("estimates:")
        results["estimates"] = await estimate_scenarios(url, args)
    with server(args, ROOT, tenants=False) as url:
        async with client(url) as c:
            await warm(c, args)
            results["fifo"] = await flood(c, args)
        progress(f"FIFO: B's TTFT p50/p99 {flood_line(results['fifo'])}")
    with baseline_tree(rev) as old, server(args, old, tenants=False) as url:
        async with client(url) as c:
            await warm(c, args)
            results["baseline"] = await flood(c, args)
        progress(f"baseline FIFO: B's TTFT p50/p99 {flood_line(results['baseline'])}")
        progress("baseline estimates:")
        results["baseline estimates"] = await estimate_scenarios(url, args)
    return results


def flood_line(replies: tuple[list[Reply], list[Reply]]) -> str:
    b = [r.ttft for r in replies[1] if r.ttft is not None]
    return f"{ms(quantile(b, 50))} / {ms(quantile(b, 99))} ms"


def report(results: dict[str, Any], args: argparse.Namespace, rev: str) -> str:
    lines: list[str] = []
    say = lines.append
    alone = [r.ttft for r in results["alone"] if r.ttft is not None]
    idle_ttft = statistics.median(alone)
    reply = statistics.median(r.done - r.sent for r in results["alone"] if r.done is not None)
    target = idle_ttft + 2 * reply
    b_fair = results["fair"][1]
    loaded = statistics.median(r.done - r.first_token for r in b_fair if r.done and r.first_token)
    loaded_target = idle_ttft + 2 * loaded
    say(
        f"Reply length {args.tokens} tokens (A's: 8 to {2 * args.tokens}). A: {args.flood} requests, "
        f"{args.flood_concurrency} at a time; B: one every {args.b_interval:g} s. B alone: time to first token "
        f"{ms(idle_ttft)} ms, reply {ms(reply)} ms (medians of {len(alone)}), so B's p99 target is {ms(target)} ms; "
        f"B's replies under the flood stream for {ms(loaded)} ms (median, first token to end): {ms(loaded_target)} ms "
        "by replies of that length."
    )
    say("")
    say("| B's time to first token while A floods | B requests | p50 ms | p99 ms | A's p50 ms | target met (by idle"
        " / loaded replies) |")  # fmt: skip
    say("|---|---:|---:|---:|---:|---|")
    say(f"| B alone (idle server) | {len(alone)} | {ms(quantile(alone, 50))} | {ms(quantile(alone, 99))} | | |")
    labels = {"fair": "fair queuing (--tenant-header)", "fifo": "FIFO (this branch, one tenant)"}
    labels["baseline"] = f"FIFO (baseline {rev[:7]})"
    for name, label in labels.items():
        a, b = results[name]
        b_ttft = [r.ttft for r in b if r.ttft is not None]
        a_ttft = [r.ttft for r in a if r.ttft is not None]
        refused = sum(r.status != 200 for r in a + b)
        count = f"{len(b_ttft)}" + (f" ({refused} refused)" if refused else "")
        p99 = quantile(b_ttft, 99)
        met = f"{'yes' if p99 <= target else 'no'} / {'yes' if p99 <= loaded_target else 'no'}"
        say(f"| {label} | {count} | {ms(quantile(b_ttft, 50))} | {ms(quantile(b_ttft, 99))} | "
            f"{ms(quantile(a_ttft, 50))} | {met} |")  # fmt: skip
    say("")
    say("| estimate error, abs(est - actual) / actual | this branch p50 | p90 | n | baseline p50 | p90 | n |")
    say("|---|---:|---:|---:|---:|---:|---:|")
    new = {"flood (this branch: fair; baseline: FIFO)": errors([*results["fair"][0], *results["fair"][1]])}
    old = {"flood (this branch: fair; baseline: FIFO)": errors([*results["baseline"][0], *results["baseline"][1]])}
    new |= results["estimates"]
    old |= results["baseline estimates"]
    new["all queue events"] = [e for k, v in new.items() if k != "429 Retry-After" for e in v]
    old["all queue events"] = [e for k, v in old.items() if k != "429 Retry-After" for e in v]
    for name, values in new.items():
        base = old.get(name, [])
        say(f"| {name} | {pct(values, 50)} | {pct(values, 90)} | {len(values)} | "
            f"{pct(base, 50)} | {pct(base, 90)} | {len(base)} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["mock", "transformers"], default="mock")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=24, help="B's reply length (A's: 8 to twice this)")
    parser.add_argument("--per-token", type=float, default=0.02, help="mock engine: seconds per token")
    parser.add_argument("--flood", type=int, default=200, help="A's requests")
    parser.add_argument("--flood-concurrency", type=int, default=20, help="A's requests at a time")
    parser.add_argument(
        "--b-interval",
        type=float,
        default=None,
        help="seconds between B's requests (default: 1, or two of B's replies over the slots if that is longer:"
        " B must ask for less than its fair share, or it floods too)",
    )
    parser.add_argument("--alone", type=int, default=20, help="B's requests on the idle server")
    parser.add_argument(
        "--bursts",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[2, 4, 8],
        help="burst sizes, in slots, of the estimate scenarios",
    )
    parser.add_argument("--baseline", default=None, help="git revision of the FIFO baseline (default: merge-base)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rev = (
        args.baseline
        or subprocess.run(
            ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    table = report(asyncio.run(measure(args, rev)), args, rev)
    command = "python benchmarks/fairness.py " + " ".join(sys.argv[1:])
    header = (
        f"## {args.engine}: `{command.strip()}` ({started})\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared: not idle), "
        f"CPython {platform.python_version()}; {SLOTS} slots, {QUEUE} queue places.\n"
    )
    print(header)
    print(table)
    if not args.no_write:
        results = Path(__file__).parent / "FAIRNESS_RESULTS.md"
        if not results.exists():
            results.write_text("# Fair admission and the wait estimate\n\nWritten by `benchmarks/fairness.py`.\n")
        with results.open("a") as f:
            f.write(f"\n{header}\n{table}\n")


if __name__ == "__main__":
    main()
