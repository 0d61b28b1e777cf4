"""What a constrained row costs: throughput of a batch of 16 with 0, 4 and 16 rows constrained to a schema.

Run: ``.venv/bin/python benchmarks/structured_output.py`` (CPU, SmolLM2); ``--device cuda`` on a GPU
(slotted cache, CUDA graphs; ``--no-compile`` skips the fused step's compilation).

Every row generates exactly ``--new-tokens`` tokens (greedy, EOS ignored on free rows), so the runs compare
step for step: a constrained row follows ``{"story": string}`` whose ``minLength`` its reply cannot reach,
so its grammar keeps it going (its mask is computed and applied every step, and the steering of its
last tokens runs too). For each mix it prints the aggregate tokens/s (median of ``--repeats`` rounds, the
mixes interleaved), the time a step takes (batch / tokens/s, prefill included), and the host time of the
grammar's mask fills (per constrained row and step: llguidance's part of the cost).
``1 logprobs`` is 16 free rows of which one asks for log-probabilities: on CUDA such a row, like a
constrained one, stops the engine from queueing a step ahead of the host (see ``EngineCore._steps``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from chatstream_asgi.cli.options import add_compile_options
from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.grammar import RowGrammar

BATCH = 16
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 4000}},
        "required": ["story"],
        "additionalProperties": False,
    }
)
TOPICS = [
    "the sea", "a robot", "autumn", "a lost key", "the moon", "a small town", "coffee", "a dragon",
    "the library", "winter rain", "a violin", "a train ride", "mountains", "a garden", "the market", "a lighthouse",
]  # fmt: skip

FILLS: list[float] = []
_fill = RowGrammar.fill


def _timed_fill(self: RowGrammar, address: int, nbytes: int) -> None:
    start = time.perf_counter()
    _fill(self, address, nbytes)
    FILLS.append(time.perf_counter() - start)


RowGrammar.fill = _timed_fill  # type: ignore[method-assign]


def params(new_tokens: int, *, constrained: bool, logprobs: int | None = None) -> GenerationParams:
    return GenerationParams(
        temperature=0.0,
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        json_schema=SCHEMA if constrained else None,
        logprobs=logprobs,
    )


async def run(engine: TransformersEngine, new_tokens: int, constrained: int, logprobs: int = 0) -> tuple[float, int]:
    """Wall seconds for the batch, and the tokens it generated."""
    requests = []
    for i, topic in enumerate(TOPICS[:BATCH]):
        p = params(new_tokens, constrained=i < constrained, logprobs=5 if i < logprobs else None)
        messages = [{"role": "user", "content": f"Write a long story about {topic} as JSON."}]
        requests.append(GenerationRequest(f"r{i}", messages, p, ignore_eos=i >= constrained))
    start = time.perf_counter()
    with engine._cond:  # queued at once: they share every step
        streams = [engine.generate(r) for r in requests]

    async def drain(stream: object) -> None:
        async for _ in stream:  # type: ignore[attr-defined]
            pass

    await asyncio.gather(*(drain(s) for s in streams))
    return time.perf_counter() - start, sum(s.completion_tokens for s in streams)


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    options = {"max_batch_size": BATCH, "compile_mode": args.compile, "cuda_graphs": not args.no_cuda_graphs}
    engine = TransformersEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, **options)
    await engine.start()
    engine.check_params(params(8, constrained=True))  # the grammar library reads the tokenizer once (not timed)
    print(f"# {engine.model_name} on {engine.device}, {type(engine._path).__name__}, batch {BATCH}, "
          f"{args.new_tokens} new tokens a row, torch threads {args.threads}")  # fmt: skip
    await run(engine, 8, BATCH)  # warm-up: every path once
    mixes = [("0 constrained", 0, 0), ("4 constrained", 4, 0), ("16 constrained", 16, 0), ("1 logprobs", 0, 1)]
    rates: dict[str, list[float]] = {label: [] for label, _, _ in mixes}
    fills: dict[str, list[float]] = {label: [] for label, _, _ in mixes}
    for _ in range(args.repeats):  # the mixes interleaved: a neighbour's load on a shared host spreads over all
        for label, constrained, logprobs in mixes:
            FILLS.clear()
            seconds, tokens = await run(engine, args.new_tokens, constrained, logprobs)
            rates[label].append(tokens / seconds)
            fills[label] += FILLS
    print(f"{'rows':>15} {'tokens/s':>9} {'ms/step':>8} {'vs free':>8} {'mask fill p50/p99 µs':>21}")
    baseline = statistics.median(rates["0 constrained"])
    for label, _, _ in mixes:
        rate = statistics.median(rates[label])
        times = sorted(fills[label])
        fill = f"{1e6 * times[len(times) // 2]:.0f} / {1e6 * times[int(len(times) * 0.99)]:.0f}" if times else "-"
        print(f"{label:>15} {rate:9.1f} {1000 * BATCH / rate:8.1f} {rate / baseline:8.2f} {fill:>21}")
    await engine.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    add_compile_options(parser)
    asyncio.run(main(parser.parse_args()))
