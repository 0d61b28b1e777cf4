"""Decode steps over a :class:`StaticKVCache`, replayed as CUDA graphs.

An eager decode step of a small model on a GPU is bound by kernel launches and Python (16-44 ms a
step on an H100 where the weights take 0.1-0.8 ms to read). :class:`DecodeRunner` captures one
decode forward per ``(rows bucket, length bucket)`` at start-up and replays it: the live batch is
padded up to the next rows bucket (1, 2, 4, 8, ... up to the cache's rows), attention reads the
next length bucket of columns (powers of two from 64 up to the context), and the step's inputs
(token ids, positions) are copied into the graphs' static buffers. The mask is computed from the
positions inside the graph, so nothing in the step depends on the host.

Padding rows carry the pad token at the scratch position, so they write only the scratch column
and their logits are dropped. With ``use_graphs=False`` (or off CUDA) the same padded step runs
eagerly: the bucketing is the same on CPU, which is how the tests cover it without a GPU.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from chatstream_asgi.engines.transformers.static_cache import StaticKVCache

__all__ = ["DecodeRunner", "bucket_for", "length_buckets", "row_buckets"]

logger = logging.getLogger("chatstream_asgi.engine")

_MIN_LENGTH_BUCKET = 64


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


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``n``."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class DecodeRunner:
    """Runs the decode forward over ``cache`` for rows ``[0, n)``, as a graph replay where captured.

    ``run_model(cache, **inputs)`` is the engine's model call (it applies the attention kernels).
    """

    def __init__(
        self,
        run_model: Callable[..., Any],
        cache: StaticKVCache,
        pad_id: int,
        *,
        use_graphs: bool,
    ) -> None:
        self._run_model = run_model
        self.cache = cache
        self.pad_id = pad_id
        device = cache.keys[0].device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.row_buckets = row_buckets(cache.rows)
        self.length_buckets = length_buckets(cache.max_len)
        # Static inputs: token ids (row 0) and positions (row 1) of every slot.
        self._inputs = torch.zeros(2, cache.rows, dtype=torch.long, device=device)
        self._columns = torch.arange(cache.max_len + 1, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pinned = device.type == "cuda"  # host buffers in pinned memory: copies queue without waiting

    def capture(self) -> None:
        """Capture one graph per (rows, length) bucket, largest first, in one shared memory pool.

        The garbage collector is off meanwhile: collecting another engine's graph or tensors
        in the middle of a capture would invalidate it.
        """
        if not self.use_graphs:
            return
        device = self._inputs.device
        gc.collect()
        gc.disable()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        started = time.perf_counter()
        self._inputs[0] = self.pad_id
        self._inputs[1] = self.cache.scratch
        pool = None
        warm = torch.cuda.Stream(device)
        try:
            for rows in reversed(self.row_buckets):
                for length in reversed(self.length_buckets):
                    warm.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(warm):
                        self._forward(rows, length)
                    torch.cuda.current_stream(device).wait_stream(warm)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        logits = self._forward(rows, length)
                    pool = graph.pool()
                    self._graphs[rows, length] = (graph, logits)
            torch.cuda.synchronize(device)
        finally:
            gc.enable()
        logger.info(
            "captured %d decode graphs (rows %s x lengths %s) in %.1f s, %.0f MiB",
            len(self._graphs),
            self.row_buckets,
            self.length_buckets,
            time.perf_counter() - started,
            (torch.cuda.memory_reserved(device) - before) / 2**20,
        )

    def step(self, positions: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[n, vocab]`` for one decode step of rows ``[0, n)``; queued, not waited for.

        ``positions`` (``[n]``, where each row's token goes) and ``input_ids`` (``[n, 1]``) are host
        tensors; ``input_ids=None`` takes the tokens :meth:`feed` left on the device (same rows).
        """
        n = positions.shape[0]
        rows = bucket_for(n, self.row_buckets)
        length = bucket_for(int(positions.max()) + 1, self.length_buckets)
        host = torch.empty(2, rows, dtype=torch.long, pin_memory=self._pinned)
        host[1, :n] = positions
        host[1, n:] = self.cache.scratch
        if input_ids is None:
            self._inputs[1, :rows].copy_(host[1], non_blocking=self._pinned)
        else:
            host[0, :n] = input_ids[:, 0]
            host[0, n:] = self.pad_id
            self._inputs[:, :rows].copy_(host, non_blocking=self._pinned)
        captured = self._graphs.get((rows, length))
        if captured is None:
            return self._forward(rows, length)[:n]
        graph, logits = captured
        graph.replay()
        return logits[:n]

    def feed(self, tokens: torch.Tensor) -> None:
        """Make ``tokens`` (device, ``[n]``) the input of the next step of the same rows."""
        self._inputs[0, : tokens.shape[0]].copy_(tokens)

    def fetch(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Queue the copy of ``tokens`` to the host; the returned call waits for it (and only it)."""
        if not self._pinned:
            return tokens.tolist
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def read() -> list[int]:
            done.synchronize()
            return host.tolist()

        return read

    def _forward(self, rows: int, length: int) -> torch.Tensor:
        """The step over the static inputs (this is what a graph captures)."""
        ids = self._inputs[0, :rows].unsqueeze(1)
        positions = self._inputs[1, :rows]
        mask = (self._columns[:length] <= positions.unsqueeze(1)).view(rows, 1, 1, length)
        cache = self.cache.for_decode(positions, length)
        out = self._run_model(cache, input_ids=ids, attention_mask=mask, position_ids=positions.unsqueeze(1))
        return out.logits[:, -1, :]
