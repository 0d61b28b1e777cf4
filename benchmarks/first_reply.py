"""How long a fresh engine takes to start (cache, graph capture) and to give its first reply, and to stop.

Run: ``python benchmarks/first_reply.py --random-init DIR --device cuda --dtype float32``.

A server starts its engine at the first request, so the first ``POST`` waits for all of this; a stop
that arrives meanwhile waits for the start to end. Only the public API is used, so the same script
times another checkout of the package (put it first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("CHATSTREAM_OTHER_CHECKOUT"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine


async def measure(engine: TransformersEngine, new_tokens: int) -> tuple[float, float, float, str]:
    started = time.perf_counter()
    await engine.start()
    ready = time.perf_counter()
    params = GenerationParams(temperature=0.0, max_new_tokens=new_tokens)
    stream = engine.generate(GenerationRequest("first", [{"role": "user", "content": "Tell me a story."}], params))
    text = "".join([delta async for delta in stream])
    replied = time.perf_counter()
    await engine.shutdown()
    return ready - started, replied - ready, time.perf_counter() - replied, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-init", metavar="DIR", required=True, help="config + tokenizer, random weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chatstream_asgi").setLevel(logging.INFO)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with torch.device(args.device):
        config = AutoConfig.from_pretrained(args.random_init)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.random_init)
    engine = TransformersEngine(model, tokenizer, args.device, max_batch_size=args.max_batch_size, compile_mode=None)
    start, reply, stop, text = asyncio.run(measure(engine, args.new_tokens))
    print(f"{Path(args.random_init).name} {args.dtype} on {args.device}, {args.max_batch_size} rows, no compile: "
          f"start {start:.1f} s, first reply of {args.new_tokens} tokens {reply:.2f} s, stop {stop:.1f} s "
          f"({len(text)} characters)")  # fmt: skip


if __name__ == "__main__":
    main()
