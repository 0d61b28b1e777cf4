"""Throughput of the continuous-batching engine against its ceiling and baselines.

Run: ``.venv/bin/python benchmarks/engine_throughput.py`` (``--quick`` for a short smoke run).

For each batch size it measures, on the same model in the same process:

(a) raw    the ceiling: one batched decode forward of the model (DynamicCache holding a KV cache
           of realistic length: prompt + half the new tokens), tokens/s = batch / step time;
(b) engine TransformersEngine's aggregate tokens/s with that many concurrent requests, driven
           through the async API (greedy, EOS ignored, wall time from first submit to last finish);
(c) 1-by-1 the original library's design: one batch-1 forward per request in turn;
(d) hf-cb  transformers' own continuous batching (``model.generate_batch``).

``--device cuda`` runs it on a GPU; ``--random-init DIR`` builds the model from the config and
tokenizer in DIR with random weights (throughput does not depend on the weights), for hosts that
lack the model file.

It then prints the time to first token of a request joining a batch of 15 running sequences,
next to the time of one prefill of that prompt plus one batch-16 decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import DynamicCache, GenerationConfig

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine

TOPICS = [
    "the sea", "a robot", "autumn", "a lost key", "the moon", "a small town", "coffee", "a dragon",
    "the library", "winter rain", "a violin", "a train ride", "mountains", "a garden", "the market",
    "a lighthouse",
]  # fmt: skip


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]


def prompts(engine: TransformersEngine, batch: int) -> list[list[int]]:
    return [engine._encode(messages(i)) for i in range(batch)]


def left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def raw_step_seconds(model: torch.nn.Module, rows: list[list[int]], context: int, steps: int) -> float:
    """Median time of one batched decode forward with ``context`` cached tokens per row."""
    rows = [(row * (context // len(row) + 1))[:context] for row in rows]
    ids, mask = left_pad(rows, 0, model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    step_ids = ids[:, -1:]
    step_mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=model.device)], dim=1)
    times = []
    for _ in range(steps + 1):
        sync(model.device)
        start = time.perf_counter()
        model(input_ids=step_ids, attention_mask=step_mask, cache=cache, use_cache=True)
        sync(model.device)
        times.append(time.perf_counter() - start)
        cache.crop(-1)
    return statistics.median(times[1:])


async def engine_run(engine: TransformersEngine, batch: int, new_tokens: int) -> tuple[float, int]:
    """Seconds and completion tokens for ``batch`` concurrent greedy requests."""
    params = GenerationParams(temperature=0.0, max_new_tokens=new_tokens)

    async def one(i: int) -> int:
        stream = engine.generate(GenerationRequest(f"b{i}", messages(i), params, ignore_eos=True))
        async for _ in stream:
            pass
        return stream.completion_tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(batch)))
    return time.perf_counter() - start, sum(counts)


@torch.inference_mode()
def one_by_one_seconds_per_token(model: torch.nn.Module, rows: list[list[int]], steps: int) -> float:
    """The original design: every request keeps its own cache, one batch-1 forward each in turn."""
    caches, last = [], []
    for row in rows:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([row], device=model.device), cache=cache, use_cache=True, logits_to_keep=1)
        caches.append(cache)
        last.append(out.logits[:, -1].argmax(-1, keepdim=True))
    sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        for r, cache in enumerate(caches):
            out = model(input_ids=last[r], cache=cache, use_cache=True)
            last[r] = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(model.device)
    return (time.perf_counter() - start) / (steps * len(rows))


def hf_generate_batch(model: torch.nn.Module, rows: list[list[int]], new_tokens: int) -> tuple[float, int]:
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    out = model.generate_batch(rows, generation_config=config, warmup=False)
    return time.perf_counter() - start, sum(len(o.generated_tokens) for o in out.values())


async def join_ttft(engine: TransformersEngine, running: int, repeats: int) -> float:
    """Median time to first token of a request joining ``running`` busy sequences."""
    params = GenerationParams(temperature=0.0, max_new_tokens=10_000 // 10)
    busy = [
        engine.generate(GenerationRequest(f"busy{i}", messages(i), params, ignore_eos=True)) for i in range(running)
    ]
    first = await asyncio.gather(*(anext(s) for s in busy))
    assert all(first)
    samples = []
    for k in range(repeats):
        joiner = GenerationParams(temperature=0.0, max_new_tokens=1)
        start = time.perf_counter()
        stream = engine.generate(GenerationRequest(f"join{k}", messages(running + k), joiner, ignore_eos=True))
        async for _ in stream:
            break
        samples.append(time.perf_counter() - start)
    for s in busy:
        s.cancel()
    for s in busy:
        async for _ in s:
            pass
    return statistics.median(samples)


@torch.inference_mode()
def prefill_plus_step_seconds(model: torch.nn.Module, prompt: list[int], rows: list[list[int]]) -> float:
    sync(model.device)
    start = time.perf_counter()
    ids = torch.tensor([prompt], device=model.device)
    model(input_ids=ids, cache=DynamicCache(config=model.config), logits_to_keep=1)
    sync(model.device)
    prefill = time.perf_counter() - start
    return prefill + raw_step_seconds(model, rows, context=max(map(len, rows)) + 64, steps=3)


def random_engine(directory: str, device: str, dtype: str | None, batch: int) -> TransformersEngine:
    """An engine over a model with ``directory``'s config and tokenizer and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch_dtype)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return TransformersEngine(model, tokenizer, device, max_batch_size=batch, name=f"{Path(directory).name} (random)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, fewer repeats")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers' generate_batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--random-init", metavar="DIR", help="config + tokenizer in DIR, random weights")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens = 16
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    if args.random_init:
        engine = random_engine(args.random_init, args.device, args.dtype, max(batch_sizes))
    else:
        engine = TransformersEngine.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, max_batch_size=max(batch_sizes)
        )
    model = engine.model
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else f"{args.threads} threads"
    print(f"model {engine.model_name} ({model.dtype}), torch {torch.__version__}, {where}, "
          f"{args.new_tokens} new tokens per request, greedy, EOS ignored")  # fmt: skip

    async def run_engine() -> tuple[dict[int, tuple[float, int]], float]:
        await engine.start()
        await engine_run(engine, 2, 4)  # warm-up
        results = {b: await engine_run(engine, b, args.new_tokens) for b in batch_sizes}
        ttft = await join_ttft(engine, 15, 2 if args.quick else 5)
        await engine.shutdown()
        return results, ttft

    engine_results, ttft = asyncio.run(run_engine())
    one_by_one_steps = 4 if args.quick else 16
    rows_by_batch = {b: prompts(engine, b) for b in batch_sizes}
    table = []
    for b in batch_sizes:
        rows = rows_by_batch[b]
        context = max(map(len, rows)) + args.new_tokens // 2
        raw = b / raw_step_seconds(model, rows, context, steps=3 if args.quick else 8)
        seconds, tokens = engine_results[b]
        eng = tokens / seconds
        seq = 1 / one_by_one_seconds_per_token(model, rows, one_by_one_steps)
        table.append([b, raw, eng, seq])
    busy_rows = prompts(engine, 15)
    joiner = prompts(engine, 16)[-1]
    reference = prefill_plus_step_seconds(model, joiner, [*busy_rows, joiner])
    for row in table:  # last: generate_batch may switch the model's attention implementation
        if args.skip_hf:
            row.append(float("nan"))
        else:
            seconds, tokens = hf_generate_batch(model, rows_by_batch[row[0]], args.new_tokens)
            row.append(tokens / seconds)

    print()
    print("batch | (a) raw tok/s | (b) engine tok/s | (c) 1-by-1 tok/s | (d) hf-cb tok/s |  b/a |  b/c |  b/d")
    print("------|---------------|------------------|------------------|-----------------|------|------|------")
    for b, raw, eng, seq, hf in table:
        print(
            f"{b:5d} | {raw:13.1f} | {eng:16.1f} | {seq:16.1f} | {hf:15.1f} | "
            f"{eng / raw:4.2f} | {eng / seq:4.1f} | {eng / hf:4.1f}"
        )
    print()
    print(f"time to first token joining 15 running sequences: {ttft * 1000:.0f} ms "
          f"(one prefill of {len(joiner)} tokens + one batch-16 decode step: "
          f"{reference * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
