"""Decode steps and prefill chunks over a :class:`StaticKVCache`, replayed as CUDA graphs.

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

:class:`PrefillRunner` does the same for prompt chunks (an eager prefill forward is as
launch-bound as a decode step: 20-50 ms on an H100 for a few dozen tokens): chunks padded to
``(rows, tokens, length)`` buckets of up to 8,192 tokens, where ``length`` is the columns attention
reads (a chunk that continues a prompt, or a new prompt after a reused beginning, reads the columns
before it). Larger chunks run eagerly, under the engine's attention kernels.
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

from chatstream_asgi.engines.transformers.static_cache import StaticKVCache

__all__ = [
    "DecodeRunner",
    "PrefillRunner",
    "bucket_for",
    "capture_all",
    "capture_graph",
    "continued_lengths",
    "frozen_gc",
    "length_buckets",
    "row_buckets",
]

logger = logging.getLogger("chatstream_asgi.engine")

_MIN_LENGTH_BUCKET = 64
_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)
_MAX_GRAPH_TOKENS = 8192
_MAX_GRAPH_COLUMNS = 32768  # rows x length of a captured chunk of several rows: the columns it gathers per layer

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
    """Capture every runner's graphs, one memory pool per runner; log the time and memory it took.

    A runner's graphs share its pool (they never run at once); runners get their own, because a
    prefill chunk runs on its own stream beside a decode step (:class:`PrefillRunner`).
    """
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


class DecodeRunner:
    """Runs the decode forward over ``cache`` for rows ``[0, n)``, as a graph replay where captured.

    ``call_model(cache, **inputs)`` is the engine's model call.
    """

    kind = "decode"

    def __init__(self, call_model: Callable[..., Any], cache: StaticKVCache, pad_id: int, *, use_graphs: bool) -> None:
        self._call_model = call_model
        self.cache = cache
        self.pad_id = pad_id
        device = cache.keys[0].device
        self.row_buckets = row_buckets(cache.rows)
        self.length_buckets = length_buckets(cache.max_len)
        use_graphs = use_graphs and device.type == "cuda"
        self.shapes: list[Key] = [(r, n) for r in reversed(self.row_buckets) for n in reversed(self.length_buckets)]
        self.shapes = self.shapes if use_graphs else []
        self.graphs: dict[Key, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Static inputs: token ids (row 0) and positions (row 1) of every slot; padding until written.
        self._inputs = torch.stack([torch.full((cache.rows,), pad_id), torch.full((cache.rows,), cache.scratch)]).to(
            device
        )
        self._columns = torch.arange(cache.max_len + 1, device=device)
        self._pinned = device.type == "cuda"  # host buffers in pinned memory: copies queue without waiting
        self.compiled: Callable[[torch.Tensor, int], torch.Tensor] = self.plain_step
        self.compiled_rows: set[int] = set()  # the rows buckets whose graphs capture ``compiled``

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
        return _replay_or_run(self, (rows, length))[:n]

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

    def forward(self, key: Key) -> torch.Tensor:
        """The step over the static inputs for bucket ``(rows, length)`` (what a graph captures)."""
        rows, length = key
        step = self.compiled if rows in self.compiled_rows else self.plain_step
        return step(self.inputs(rows), length)

    def inputs(self, rows: int) -> torch.Tensor:
        """The static inputs of rows ``[0, rows)``: token ids and positions, ``[2, rows]``."""
        return self._inputs[:, :rows]

    def plain_step(self, inputs: torch.Tensor, length: int) -> torch.Tensor:
        """The model's decode forward over ``inputs`` attending ``length`` columns (what ``compiled`` fuses)."""
        ids, positions = inputs
        mask = (self._columns[:length] <= positions.unsqueeze(1)).view(-1, 1, 1, length)
        cache = self.cache.for_decode(positions, length)
        out = self._call_model(
            cache, input_ids=ids.unsqueeze(1), attention_mask=mask, position_ids=positions.unsqueeze(1)
        )
        return out.logits[:, -1, :]


class PrefillRunner:
    """Prompt chunks written into cache slots; returns each row's last-position logits.

    On CUDA a chunk runs on the runner's own stream, so that a decode step queued after it on the
    current stream runs beside it (both are launch-bound: neither fills the GPU alone). The current
    stream waits for the chunk at :meth:`join`, which the engine calls before it reads the logits or
    touches the cache slots again.

    Shapes it pads to (and captures), ``(rows, tokens, length)`` with ``tokens`` in 16, 32, ... 512
    and ``rows * tokens <= 8192``: new prompts as ``(rows, tokens, tokens)``; chunks that read columns
    written before them (a prompt continued after its first chunk, new prompts after reused beginnings
    of different lengths, together) with ``tokens`` up to the bucket of ``max_prefill_tokens`` and
    ``length`` in :func:`continued_lengths`, for several rows while ``rows * length <= 32768``. Other
    chunks run eagerly through ``run_eager`` (the engine's call under its attention kernels), unpadded.
    """

    kind = "prefill"

    def __init__(
        self,
        call_model: Callable[..., Any],
        run_eager: Callable[..., Any],
        cache: StaticKVCache,
        pad_id: int,
        *,
        use_graphs: bool,
        chunk: int | None,
    ) -> None:
        self._call_model = call_model
        self._run_eager = run_eager
        self.cache = cache
        self.pad_id = pad_id
        device = cache.keys[0].device
        self.device = device
        self.row_buckets = row_buckets(cache.rows)
        self.length_buckets = continued_lengths(cache.max_len)
        self.token_buckets = [t for t in _TOKEN_BUCKETS if t <= cache.max_len] or [cache.max_len]
        top = self._joining_tokens = bucket_for(min(chunk or cache.max_len, self.token_buckets[-1]), self.token_buckets)
        self._known = {
            (r, t, n)
            for t in self.token_buckets
            for r in self.row_buckets
            if r * t <= _MAX_GRAPH_TOKENS
            for n in [t, *(n for n in self.length_buckets if n > t and t <= top)]
            if n == t or r == 1 or r * n <= _MAX_GRAPH_COLUMNS
        }
        self.shapes: list[Key] = sorted(self._known, reverse=True) if use_graphs and device.type == "cuda" else []
        self.graphs: dict[Key, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        width = self.token_buckets[-1]
        self._inputs = torch.zeros(3, cache.rows, width, dtype=torch.long, device=device)  # ids, positions, columns
        self._slots = torch.zeros(cache.rows, dtype=torch.long, device=device)
        self._columns = torch.arange(cache.max_len + 1, device=device)
        self._pinned = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._pinned else None
        self.fused: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        """What the captured chunks run under: the model's compiled layers, where they measured faster."""

    def join(self) -> None:
        """Make the current stream wait for the last chunk (queued on the device; no host wait)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def run(
        self, ids: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor, slots: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Run left-padded chunks (host tensors ``[m, c]``; ``slots`` ``[m]``) reading ``kv_len`` columns.

        Call :meth:`join` first (the previous chunk reads the static inputs this overwrites).
        """
        m, width = ids.shape
        key = self._key(m, width, kv_len)
        if key is None:
            ids, positions, columns, slots = (t.to(self.device) for t in (ids, positions, columns, slots))
            return self._beside(lambda: self._chunk(self._run_eager, ids, positions, columns, slots, kv_len))
        rows, tokens, _ = key
        host = torch.zeros(3, rows, tokens, dtype=torch.long, pin_memory=self._pinned)
        host[0] = self.pad_id
        host[2] = self.cache.scratch
        host[0, :m, tokens - width :] = ids
        host[1, :m, tokens - width :] = positions
        host[2, :m, tokens - width :] = columns
        host_slots = torch.zeros(rows, dtype=torch.long, pin_memory=self._pinned)
        host_slots[:m] = slots
        self._inputs[:, :rows, :tokens].copy_(host, non_blocking=self._pinned)
        self._slots[:rows].copy_(host_slots, non_blocking=self._pinned)
        return self._beside(lambda: _replay_or_run(self, key))[:m]

    def _beside(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``forward()`` on the runner's stream, after everything queued so far on the current one."""
        if self._stream is None:
            return forward()
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            out = forward()
        out.record_stream(current)  # eager outputs: their memory is not reused while the current stream reads them
        return out

    def batchable(self, m: int, width: int, kv_len: int) -> bool:
        """Whether ``m`` chunks of up to ``width`` tokens reading ``kv_len`` columns fit one padded shape."""
        return self._key(m, width, kv_len) is not None

    def _key(self, m: int, width: int, kv_len: int) -> Key | None:
        if width > self.token_buckets[-1]:
            return None
        rows = bucket_for(m, self.row_buckets)
        tokens = bucket_for(width, self.token_buckets)
        key = (rows, tokens, tokens if kv_len <= tokens else bucket_for(kv_len, self.length_buckets))
        return key if key in self._known else None

    def joining_key(self, kv_len: int) -> Key | None:
        """The shape of a long prompt's chunk (``max_prefill_tokens``), ``kv_len`` columns in, beside running rows."""
        return self._key(1, self._joining_tokens, kv_len)

    def forward(self, key: Key) -> torch.Tensor:
        """The chunk over the static inputs for bucket ``(rows, tokens, length)`` (what a graph captures)."""
        rows, tokens, length = key
        ids, positions, columns = self._inputs[:, :rows, :tokens]
        with self.fused():
            return self._chunk(self._call_model, ids, positions, columns, self._slots[:rows], length)

    def _chunk(
        self,
        call: Callable[..., Any],
        ids: torch.Tensor,
        positions: torch.Tensor,
        columns: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        mask = (self._columns[:kv_len].view(1, 1, kv_len) <= positions.unsqueeze(2)).unsqueeze(1)
        cache = self.cache.for_chunk(slots, columns, kv_len)
        out = call(cache, input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1, :]


def _replay_or_run(runner: DecodeRunner | PrefillRunner, key: Key) -> torch.Tensor:
    captured = runner.graphs.get(key)
    if captured is None:
        return runner.forward(key)
    graph, out = captured
    graph.replay()
    return out
