"""Throughput of the continuous-batching engine against its ceiling and baselines.

Run: ``.venv/bin/python benchmarks/engine_throughput.py`` (``--quick`` for a short smoke run).

For each batch size it measures, on the same model in the same process:

(a) raw    the ceiling: one batched decode forward of the model (DynamicCache holding a KV cache
           of realistic length: prompt + half the new tokens), tokens/s = batch / step time;
(b) engine TransformersEngine's aggregate tokens/s with that many concurrent requests, driven
           through the async API (greedy, EOS ignored, wall time from first submit to last finish);
(c) 1-by-1 the original library's design: one batch-1 forward per request in turn;
(d) hf-cb  transformers' own continuous batching (``model.generate_batch``);
(e) graph  on CUDA, the torch-only ceiling: the HF model over a ``StaticCache`` (prompt + new
           tokens long), one decode step captured in a ``torch.cuda.CUDAGraph`` (warm-up on a side
           stream), replayed; tokens/s = batch / replay time.

On CUDA it also prints the weight-read floor (parameter bytes / measured device-to-device copy
bandwidth: no decode step can be faster), the floor counting the live keys and values each step reads
too, the engine's ratio to both, and the inter-token latency p50/p99 per stream at each batch size.

``--device cuda`` runs it on a GPU; ``--random-init DIR`` builds the model from the config and
tokenizer in DIR with random weights (throughput does not depend on the weights), for hosts that
lack the model file.

It then prints the time to first token of a request joining the largest batch minus one running
sequences, next to the same request alone on the idle engine (one prefill) plus two decode steps;
and, on the static cache, the inter-token latency of 15 running streams while a long prompt joins
them (its chunks go into the same forward as the streams' decode tokens), with the engine's
``--max-prefill-tokens`` or each ``--long-join-chunks`` size.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import DynamicCache, GenerationConfig

from chatstream_asgi.cli.options import add_compile_options
from chatstream_asgi.engines.base import GenerationParams, GenerationRequest, GenerationStream
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.lean_model import LeanLlama
from chatstream_asgi.engines.transformers.loading import load_model
from chatstream_asgi.engines.transformers.static_path import DEFAULT_PREFILL_CHUNK

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


async def engine_run(engine: TransformersEngine, batch: int, new_tokens: int) -> tuple[float, int, list[float]]:
    """Seconds, completion tokens and inter-delta gaps (all streams) for ``batch`` concurrent greedy requests."""
    params = GenerationParams(temperature=0.0, max_new_tokens=new_tokens)
    gaps: list[float] = []

    async def one(i: int) -> int:
        stream = engine.generate(GenerationRequest(f"b{i}", messages(i), params, ignore_eos=True))
        last = None
        async for _ in stream:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
        return stream.completion_tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(batch)))
    return time.perf_counter() - start, sum(counts), gaps


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@torch.inference_mode()
def graph_ceiling_seconds(model: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int) -> float:
    """(e): median replay time of one decode step of the HF model over a StaticCache, captured in a CUDA graph."""
    from transformers import StaticCache

    device = model.device
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    ids = torch.randint(100, 1000, (batch, prompt_len), device=device)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    step_ids = ids[:, -1:].clone()
    positions = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)

    def rewind() -> None:  # the captured step advances the cache's write position: put it back
        for layer in cache.layers:
            layer.cumulative_length.fill_(prompt_len)

    def step() -> torch.Tensor:
        return model(input_ids=step_ids, position_ids=positions, cache=cache, use_cache=True).logits

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
            rewind()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(5):
        rewind()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(new_tokens):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / new_tokens)
    return statistics.median(times[1:])


def copy_bandwidth(device: torch.device) -> float:
    """Bytes a second of a 1 GiB device-to-device copy (read + write); NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    bandwidth = 2 * 10 * src.numel() * src.element_size() / (start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return bandwidth


@torch.inference_mode()
def weight_floor_seconds(model: torch.nn.Module) -> tuple[float, float]:
    """(floor seconds a step, bandwidth GB/s): parameter bytes over a measured device-to-device copy rate."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(model.device)
    return weights / bandwidth, bandwidth / 1e9


class JoinGaps(NamedTuple):
    """Gaps between the text deltas of streams running while a long prompt joins (seconds)."""

    before: float
    """Median gap before the prompt arrives: the normal step."""
    p50: float
    """Median gap while it joins."""
    worst: float
    """Longest gap while it joins."""
    worst_tokens: int
    """Tokens the delta ending the longest gap carried (more than one: text held back for an incomplete
    character; a consumer that fell behind shows as a long gap of one token)."""
    worst_single: float
    """Longest gap ending in a delta of one token."""


async def long_join_itl(engine: TransformersEngine, running: int, prompt_tokens: int, tag: str) -> JoinGaps:
    """Inter-token gaps of ``running`` streams before and while a long prompt joins (see :class:`JoinGaps`).

    The prompt begins with ``tag``, so that no earlier run's kept prefix covers it.
    """
    words = prompt_tokens  # sized before the streams start: tokenizing it blocks the loop that stamps them
    long_prompt = [{"role": "user", "content": f"{tag} " + "word " * words}]
    while engine.count_tokens(long_prompt) > prompt_tokens:
        words -= 50
        long_prompt = [{"role": "user", "content": f"{tag} " + "word " * words}]
    params = GenerationParams(temperature=0.0, max_new_tokens=100_000 // 100)
    busy = [
        engine.generate(GenerationRequest(f"busy{i}", messages(i), params, ignore_eos=True)) for i in range(running)
    ]
    stamps: list[list[tuple[float, int]]] = [[] for _ in busy]  # (time, tokens so far) at each delta
    joined = asyncio.Event()
    window: list[float] = []

    def counting(stream: GenerationStream) -> collections.deque[int]:
        """The token count behind each text delta, taken as the engine pushes it (the stream's own count,
        read when the consumer takes a delta, is already ahead of it when the consumer fell behind)."""
        counts: collections.deque[int] = collections.deque()
        push = stream.push  # type: ignore[attr-defined]

        def counted(text: str, *, completion_tokens: int | None = None, logprobs: Any = None) -> None:
            if text and completion_tokens is not None:
                counts.append(completion_tokens)
            push(text, completion_tokens=completion_tokens, logprobs=logprobs)

        stream.push = counted  # type: ignore[attr-defined]
        return counts

    counts = [counting(stream) for stream in busy]

    async def drain(i: int, stream: GenerationStream) -> None:
        async for _ in stream:
            stamps[i].append((time.perf_counter(), counts[i].popleft() if counts[i] else stream.completion_tokens))
            if joined.is_set() and len(stamps[i]) > 40:
                return

    tasks = [asyncio.create_task(drain(i, s)) for i, s in enumerate(busy)]
    while min(map(len, stamps)) < 20:
        await asyncio.sleep(0.005)
    window.append(time.perf_counter())
    one_token = GenerationParams(temperature=0.0, max_new_tokens=1)
    # tokenized in a worker thread, as the server does for a long prompt (on the loop it holds every stream)
    joining = await asyncio.to_thread(engine.prepare, GenerationRequest("long", long_prompt, one_token))
    joiner = engine.generate(joining)
    async for _ in joiner:
        pass
    window.append(time.perf_counter())
    joined.set()
    await asyncio.gather(*tasks)
    for s in busy:
        s.cancel()
    spans = [(a, b, m - n) for ts in stamps for (a, n), (b, m) in itertools.pairwise(ts)]  # (start, end, tokens)
    before = [b - a for a, b, _ in spans if b < window[0]]
    during = [(b - a, tokens) for a, b, tokens in spans if b >= window[0] and a <= window[1]]
    worst = max(during)
    single = [gap for gap, tokens in during if tokens == 1]
    gaps = [gap for gap, _ in during]
    return JoinGaps(statistics.median(before), statistics.median(gaps), *worst, max(single, default=float("nan")))


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token holds across the model's layers (full attention)."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


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
    # The engine named its own attention on the model (it delegates to the original one); transformers'
    # continuous batching accepts only its own names.
    model.set_attn_implementation(model.config._attn_implementation.removeprefix("chatstream:"))
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


def random_model(directory: str, device: str, dtype: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, name): ``directory``'s config and tokenizer, random weights, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    with torch.device(device):  # initialise on the device: a 1B model's random init on CPU takes minutes
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch_dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(directory), f"{Path(directory).name} (random)"


def random_engine(directory: str, device: str, dtype: str | None, **options: object) -> TransformersEngine:
    """An engine over a model with ``directory``'s config and tokenizer and random weights."""
    model, tokenizer, name = random_model(directory, device, dtype)
    return TransformersEngine(model, tokenizer, device, name=name, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, fewer repeats")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers' generate_batch")
    parser.add_argument(
        "--engine-only", action="store_true", help="skip (c) 1-by-1, (d) hf-cb and (e) graph (they take time)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--random-init", metavar="DIR", help="config + tokenizer in DIR, random weights")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="engine: run the static-cache step eagerly")
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        help="engine: prompt tokens beside one decode step (0: no cap)",
    )
    add_compile_options(parser)  # the server's --compile [MODE] | --no-compile
    parser.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="engine: keep KV between requests (on by default, as in the server)",
    )
    parser.add_argument("--long-prompt", type=int, default=2000, help="tokens of the prompt joining 15 streams")
    parser.add_argument("--joins", type=int, default=3, help="long-prompt joins measured, one line each")
    parser.add_argument(
        "--long-join-chunks",
        default="",
        help="max_prefill_tokens values to measure the long join with (static cache only; 'none': unchunked; "
        "'skip': not at all); default: --max-prefill-tokens, the chunk whose steps are captured (a smaller value "
        "runs padded to that chunk's shape, a larger one uncaptured: start with each to compare them)",
    )
    args = parser.parse_args()
    if args.quick:
        args.new_tokens = 16
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chatstream_asgi").setLevel(logging.INFO)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    options = {
        "max_batch_size": max(batch_sizes),
        "max_prefill_tokens": args.max_prefill_tokens or None,
        "prefix_cache": args.prefix_cache,
        "compile_mode": args.compile,
    }
    if args.no_cuda_graphs:
        options["cuda_graphs"] = False
    if args.random_init:
        engine = random_engine(args.random_init, args.device, args.dtype, **options)
    else:
        engine = TransformersEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, **options)
    model = engine.model
    cuda = model.device.type == "cuda"
    where = torch.cuda.get_device_name(model.device) if cuda else f"{args.threads} threads"
    print(f"model {engine.model_name} ({model.dtype}), torch {torch.__version__}, {where}, "
          f"{args.new_tokens} new tokens per request, greedy, EOS ignored")  # fmt: skip
    joining = max(batch_sizes) - 1

    listed = args.long_join_chunks or str(args.max_prefill_tokens or "none")
    chunks = [None if c == "none" else int(c) for c in listed.split(",") if c and c != "skip"]

    async def run_engine() -> tuple[dict[int, tuple[float, int, list[float]]], float, float, Any]:
        started = time.perf_counter()
        await engine.start()
        print(f"engine start-up (cache, graph capture): {time.perf_counter() - started:.1f} s")
        await engine_run(engine, 2, 4)  # warm-up
        results = {b: await engine_run(engine, b, args.new_tokens) for b in batch_sizes}
        ttft = await join_ttft(engine, joining, 2 if args.quick else 5)
        alone = await join_ttft(engine, 0, 2 if args.quick else 5)  # one prefill on an idle engine
        long_join = {}
        if engine.static:  # the same engine, unchunked and chunked (the setting is read at every step)
            for chunk in chunks:
                engine.max_prefill_tokens = chunk
                long_join[chunk] = [
                    await long_join_itl(engine, 15, args.long_prompt, f"chunk {chunk} join {j}:")
                    for j in range(args.joins)
                ]
            engine.max_prefill_tokens = args.max_prefill_tokens or None
        await engine.shutdown()
        return results, ttft, alone, long_join

    engine_results, ttft, alone, long_join = asyncio.run(run_engine())
    if isinstance(model, LeanLlama):  # no forward of its own: the columns beside the engine's run transformers'
        model = load_model(args.model, device=args.device, dtype=args.dtype, lean=False)[0]
    one_by_one_steps = 4 if args.quick or cuda else 16
    rows_by_batch = {b: prompts(engine, b) for b in batch_sizes}
    table = []
    for b in batch_sizes:
        rows = rows_by_batch[b]
        context = max(map(len, rows)) + args.new_tokens // 2
        raw = b / raw_step_seconds(model, rows, context, steps=3 if args.quick else 8)
        seconds, tokens, _ = engine_results[b]
        eng = tokens / seconds
        nan = float("nan")
        seq = nan if args.engine_only else 1 / one_by_one_seconds_per_token(model, rows, one_by_one_steps)
        ceiling = cuda and not args.engine_only
        graph = b / graph_ceiling_seconds(model, b, max(map(len, rows)), args.new_tokens) if ceiling else nan
        table.append([b, raw, eng, seq, graph])
    busy_rows = prompts(engine, joining)
    joiner = prompts(engine, joining + 1)[-1]
    reference = prefill_plus_step_seconds(model, joiner, [*busy_rows, joiner])
    step_p50 = percentile(engine_results[max(batch_sizes)][2], 0.5)
    floor, bandwidth = weight_floor_seconds(model) if cuda else (float("nan"), float("nan"))
    kv_bytes = kv_bytes_per_token(model)
    for row in table:  # last: generate_batch may switch the model's attention implementation
        if args.skip_hf or args.engine_only:
            row.append(float("nan"))
        else:
            seconds, tokens = hf_generate_batch(model, rows_by_batch[row[0]], args.new_tokens)
            row.append(tokens / seconds)

    print()
    print("batch | (a) raw tok/s | (b) engine tok/s | (c) 1-by-1 tok/s | (d) hf-cb tok/s | (e) graph tok/s "
          "|  b/a |  b/c |  b/d |  b/e | ITL p50/p99 ms")  # fmt: skip
    print("------|---------------|------------------|------------------|-----------------|-----------------"
          "|------|------|------|------|---------------")  # fmt: skip
    for b, raw, eng, seq, graph, hf in table:
        gaps = engine_results[b][2]
        print(
            f"{b:5d} | {raw:13.1f} | {eng:16.1f} | {seq:16.1f} | {hf:15.1f} | {graph:15.1f} | "
            f"{eng / raw:4.2f} | {eng / seq:4.1f} | {eng / hf:4.1f} | {eng / graph:4.2f} | "
            f"{percentile(gaps, 0.5) * 1000:.2f}/{percentile(gaps, 0.99) * 1000:.2f}"
        )
    if cuda:
        print()
        print(f"weight-read floor: {floor * 1000:.3f} ms a step ({bandwidth:.0f} GB/s copy); engine ms/step and "
              "ratio floor/step by batch: " + ", ".join(
                  f"{b}: {b / eng * 1000:.2f} ms ({floor / (b / eng):.2f})" for b, _, eng, *_ in table))  # fmt: skip
        live = {b: max(map(len, rows_by_batch[b])) + args.new_tokens // 2 for b in batch_sizes}
        print("floor counting weights and the live keys and values (prompt + half the reply a row), ratio "
              "floor/step by batch: " + ", ".join(
                  f"{b}: {(floor + b * live[b] * kv_bytes / (bandwidth * 1e9)) / (b / eng):.2f}"
                  for b, _, eng, *_ in table))  # fmt: skip
    print()
    print(f"time to first token joining {joining} running sequences: {ttft * 1000:.1f} ms; the same request "
          f"alone on the idle engine (one prefill): {alone * 1000:.1f} ms; + two engine decode steps at batch "
          f"{joining + 1} (p50 {step_p50 * 1000:.2f} ms): {(alone + 2 * step_p50) * 1000:.1f} ms "
          f"(ratio {ttft / (alone + 2 * step_p50):.2f}, target <= 1); one model prefill of {len(joiner)} "
          f"tokens + one eager decode step: {reference * 1000:.1f} ms")  # fmt: skip
    for chunk, joins in long_join.items():
        for j, g in enumerate(joins, 1):
            print(f"15 streams while a {args.long_prompt}-token prompt joins (max_prefill_tokens={chunk}, join {j} of "
                  f"{len(joins)}): inter-token p50 {g.before * 1000:.2f} ms before, {g.p50 * 1000:.2f} ms p50 "
                  f"({g.p50 / g.before:.2f}x, target <= 1.5) and {g.worst * 1000:.2f} ms max during "
                  f"({g.worst / g.before:.1f}x, target <= 3; its delta carried {g.worst_tokens} token(s)); "
                  f"max over one-token deltas {g.worst_single * 1000:.2f} ms "
                  f"({g.worst_single / g.before:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
