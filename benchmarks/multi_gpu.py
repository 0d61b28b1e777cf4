"""Several GPUs: one engine per device behind ``EnginePool``, against one engine on one device.

Run (on a machine with N CUDA devices): ``python benchmarks/multi_gpu.py --random-init DIR``, where DIR holds
a config and tokenizer (see engine_throughput.py). The same number of streams per GPU runs on one engine
(cuda:0), then on N engines (cuda:0 ... cuda:N-1) behind one pool in this one process, as
``serve --devices all`` builds them. Printed: aggregate tokens/s, the N-GPU / 1-GPU ratio (target >= 0.9 x N),
and each stream's tokens/s (it should not drop: the engines' threads share one interpreter lock).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import torch
from engine_throughput import engine_run, random_engine

from chatstream_asgi.engines.base import Engine
from chatstream_asgi.engines.pool import EnginePool


async def rate(engine: Engine, streams: int, new_tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median per-stream tokens/s) of ``streams`` greedy requests, after a warm-up."""
    await engine_run(engine, streams, 8)  # graphs of every bucket replayed once
    seconds, tokens, gaps = await engine_run(engine, streams, new_tokens)
    return tokens / seconds, 1 / statistics.median(gaps)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-init", metavar="DIR", required=True)
    parser.add_argument("--streams-per-gpu", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    count = torch.cuda.device_count()
    streams = args.streams_per_gpu
    engines = [random_engine(args.random_init, f"cuda:{i}", None, max_batch_size=streams) for i in range(count)]
    await engines[0].start()
    single = await rate(engines[0], streams, args.new_tokens)
    pool = EnginePool(engines, load_interval=None)
    await pool.start()
    several = await rate(pool, streams * count, args.new_tokens)
    await pool.shutdown()
    name = torch.cuda.get_device_name(0)
    print(f"{count} x {name}, {args.random_init}, {streams} streams per GPU, {args.new_tokens} new tokens, greedy")
    print("| GPUs | streams | aggregate tok/s | per-stream tok/s (median) |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 | {streams} | {single[0]:,.0f} | {single[1]:.1f} |")
    print(f"| {count} | {streams * count} | {several[0]:,.0f} | {several[1]:.1f} |")
    print(f"aggregate ratio {several[0] / single[0]:.2f} (target >= {0.9 * count:.1f}); per-stream ratio "
          f"{several[1] / single[1]:.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
