"""CUDA graphs of the engine's steps: the shape buckets steps are padded to, and the capture.

An eager step of a small model on a GPU is bound by kernel launches and Python (16-44 ms a step on
an H100 where the weights take 0.1-0.8 ms to read). The step runner
(:mod:`~chatstream_asgi.engines.transformers.step_runner`) captures one forward per shape bucket at
start-up and replays it; this module holds the buckets and the capture: every runner's graphs in one
memory pool, on streams of the runner's own device.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

__all__ = [
    "bucket_for",
    "capture_all",
    "capture_graph",
    "continued_lengths",
    "frozen_gc",
    "length_buckets",
    "row_buckets",
    "token_buckets",
]

logger = logging.getLogger("chatstream_asgi.engine")

_MIN_LENGTH_BUCKET = 64
_MIN_TOKEN_BUCKET = 16

Key = tuple[int, ...]


def row_buckets(max_rows: int) -> list[int]:
    """Powers of two below ``max_rows``, then ``max_rows`` itself."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return [*sizes, max_rows]


def length_buckets(max_len: int) -> list[int]:
    """Powers of two from 64 below ``max_len``, then ``max_len`` itself."""
    sizes, n = [], _MIN_LENGTH_BUCKET
    while n < max_len:
        sizes.append(n)
        n *= 2
    return [*sizes, max_len]


def continued_lengths(max_len: int) -> list[int]:
    """Powers of four from 64 below ``max_len``, then ``max_len``: the columns a continued chunk reads.

    Coarser than the decode step's buckets: a chunk's own tokens dominate its cost, and each length
    multiplies the graphs captured for every ``(rows, tokens)``.
    """
    sizes, n = [], _MIN_LENGTH_BUCKET
    while n < max_len:
        sizes.append(n)
        n *= 4
    return [*sizes, max_len]


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 16 below ``max_tokens``, then ``max_tokens`` itself: the prompt tokens of a chunk."""
    sizes, n = [], _MIN_TOKEN_BUCKET
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return [*sizes, max_tokens]


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``n``."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """The garbage collector off: collecting another engine's graph or tensors in the middle of a
    capture would invalidate it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def capture_graph(
    forward: Callable[[], torch.Tensor],
    device: torch.device,
    streams: tuple[torch.cuda.Stream, torch.cuda.Stream],
    pool: Any = None,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``forward()`` run once on the warm-up stream, then captured on the capture stream (both ``streams``
    of ``device``: ``torch.cuda.graph``'s default is one stream per process, created on whichever device
    was current first, and capturing a second GPU's kernels on it fails)."""
    warm, capture = streams
    warm.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(warm):
        forward()
    torch.cuda.current_stream(device).wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=capture, capture_error_mode="thread_local"):
        out = forward()
    return graph, out


def capture_all(runners: list[Any], device: torch.device) -> None:
    """Capture every runner's graphs (largest first), one memory pool per runner (its graphs never run at
    once); log the time and memory it took."""
    with frozen_gc():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        started = time.perf_counter()
        streams = torch.cuda.Stream(device), torch.cuda.Stream(device)
        for runner in runners:
            pool = None
            for key in runner.shapes:
                graph, out = capture_graph(partial(runner.forward, key), device, streams, pool)
                pool = graph.pool()
                runner.graphs[key] = (graph, out)
        torch.cuda.synchronize(device)
    logger.info(
        "captured %s graphs in %.1f s, %.0f MiB",
        " + ".join(f"{len(r.graphs)} {r.kind}" for r in runners),
        time.perf_counter() - started,
        (torch.cuda.memory_reserved(device) - before) / 2**20,
    )
