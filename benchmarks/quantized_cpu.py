"""The bundled SmolLM2 GGUF served quantized, against llama.cpp's own ``llama-server`` on the same file.

Run: ``.venv/bin/python benchmarks/quantized_cpu.py --llama-server PATH`` (PATH: a ``llama-server``
binary, built once as docs/quantization.md shows; about 6 minutes on 2 cores; ``--quick`` for a
smoke run). Needs the ``bench`` extra (httpx, psutil).

Three servers on the same GGUF, started side by side and driven one at a time through their OpenAI
API (``/v1/chat/completions``, streaming, greedy, ``--tokens`` new tokens, 1 and 16 concurrent
streams, ``--rounds`` interleaved rounds; each cell is the median):

(a) chatstream, quantized   ``python -m chatstream_asgi serve`` (the default: the file's Q4_1 and Q8_0
                            matrices kept quantized);
(b) chatstream, float32     the same with ``--quantization none`` (the file dequantized, as before);
(c) llama-server            llama.cpp's server, ``--parallel 16`` slots (continuous batching),
                            ``--threads`` threads.

It prints aggregate tokens/s per server and the ratios (a)/(c) and (a)/(b), each server's resident
memory (RSS) once loaded and after the runs, the load average (the machine is shared: ratios are
taken side by side for that reason), and first the teacher-forced agreement of (a)'s model with
(b)'s over 512 positions of this repository's text (:mod:`quant_quality`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from quant_quality import HEADER, report
from quant_quality import measure as measure_quality
from remote_llamacpp import gguf, measure
from subprocess_server import running_subprocess

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def started(name: str, command: list[str], ready: str) -> Iterator[tuple[str, psutil.Process]]:
    """Run ``command`` (``{port}`` filled in) until the block ends; yields its URL and process once ``ready`` is
    200. Its output goes to ``quantized_cpu.<name>.log`` in the temporary folder."""

    def argv(port: int) -> list[str]:
        return [part.format(port=port) for part in command]

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    slug = "".join(c if c.isalnum() else "_" for c in name)
    with (
        open(f"{tempfile.gettempdir()}/quantized_cpu.{slug}.log", "w") as log,
        running_subprocess(argv, ready, env, start_timeout=600, log=log) as (url, process),
    ):
        yield url, psutil.Process(process.pid)


def measured(url: str, streams: int, tokens: int) -> dict[str, float]:
    """:func:`remote_llamacpp.measure`, again if the server closed a kept-alive connection as it was reused."""
    for attempt in range(3):
        try:
            return asyncio.run(measure(url, streams, tokens, {}))
        except httpx.RemoteProtocolError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-quality", dest="quality", action="store_false", help="skip the agreement check")
    parser.add_argument("--no-float", dest="float", action="store_false", help="skip (b), the float32 server")
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 and 4 streams, one round, no quality")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.streams, args.rounds, args.quality = 16, [1, 4], 1, False
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    if args.quality:
        print(HEADER)
        print(report("SmolLM2 Q4_1 file, served quantized vs float32", measure_quality("smollm2", None, 512, 256)))
    most = max(args.streams)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # our servers' torch threads: as many as llama-server's
    ours = [sys.executable, "-m", "chatstream_asgi", "serve", "--device", "cpu", "--port", "{port}",
            "--concurrency", str(most), "--queue", str(4 * most), "--max-new-tokens", str(args.tokens),
            "--log-level", "warning"]  # fmt: skip
    llama = [args.llama_server, "-m", gguf(), "--host", "127.0.0.1", "--port", "{port}", "--parallel", str(most),
             "--ctx-size", str(most * 1024), "--threads", str(args.threads), "--no-webui"]  # fmt: skip
    commands = {
        "(a) chatstream, quantized": (ours, "/get_load"),
        "(b) chatstream, float32": ([*ours, "--quantization", "none"], "/get_load"),
        "(c) llama-server": (llama, "/v1/models"),
    }
    if not args.float:
        del commands["(b) chatstream, float32"]
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(started(name, cmd, ready)) for name, (cmd, ready) in commands.items()}
        loaded = {name: rss_mib(process) for name, (_, process) in servers.items()}
        runs: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.streams} for name in servers}
        tokens: dict[str, list[float]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            for n in args.streams:
                for name, (url, _) in servers.items():
                    result = measured(url, n, args.tokens)
                    runs[name][n].append(result["aggregate"])
                    tokens[name].append(result["tokens"])
                    print(f"round {round_ + 1} {name} streams={n}: {result['aggregate']:.1f} tok/s", flush=True)
        after = {name: rss_mib(process) for name, (_, process) in servers.items()}
    print(f"\n{args.tokens} new tokens a stream (at most: greedy, an end token stops a reply), {args.threads} "
          f"threads, median of {args.rounds} rounds; load average at the end {os.getloadavg()}\n")  # fmt: skip
    print("| server | " + " | ".join(f"{n} stream{'s' * (n > 1)} tok/s" for n in args.streams)
          + " | tokens a stream | RSS loaded MiB | RSS after MiB |")  # fmt: skip
    print("|---|" + "---:|" * (len(args.streams) + 3))
    median = {name: {n: statistics.median(v) for n, v in by_n.items()} for name, by_n in runs.items()}
    for name in servers:
        cells = " | ".join(f"{median[name][n]:.1f}" for n in args.streams)
        print(f"| {name} | {cells} | {statistics.mean(tokens[name]):.0f} | {loaded[name]:.0f} | {after[name]:.0f} |")
    a, c = median["(a) chatstream, quantized"], median["(c) llama-server"]
    b = median.get("(b) chatstream, float32")
    for n in args.streams:
        vs_float = f", quantized / float32 = {a[n] / b[n]:.2f}" if b else ""
        print(f"streams={n}: quantized / llama-server = {a[n] / c[n]:.2f}{vs_float}")


if __name__ == "__main__":
    main()
