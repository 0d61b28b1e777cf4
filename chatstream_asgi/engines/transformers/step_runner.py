"""One forward per step over the slotted cache: the running rows' decode tokens and a chunk of prompt
tokens together, padded to a shape bucket, replayed as a CUDA graph where captured.

The model sees one flat row of tokens (as vLLM v1 and SGLang batch): decode tokens of rows ``[0, R)``
first, then the chunk, prompt tokens of any number of sequences packed one after another (a long prompt's
next piece, new prompts, new prompts after a reused beginning). Linear layers, norms and experts treat
every token alike; the attention (:class:`~chatstream_asgi.engines.transformers.attention.SlotStep`) keeps
each sequence to its own slot. Logits come back for the decode rows and for each chunk sequence whose
prompt the chunk completes (``logits_to_keep``), into one static buffer.

Shapes ``(rows, length, tokens, columns)``: ``rows`` decode rows (1, 2, 4, ... up to the cache's) reading
``length`` columns of their slots; a chunk of ``tokens`` (16, 32, ... up to 8,192) reading ``columns``
gathered keys (its own tokens, or more after reused beginnings and earlier chunks). Captured at start:
every decode shape (powers of two from 64 columns), every chunk alone (columns in powers of four above its
tokens), and the chunk that joins running rows (``max_prefill_tokens``'s bucket, columns in powers of two:
its gathered keys cost a joining step as much as its tokens do) beside every rows bucket and a coarser
length (powers of four): a prompt joining running rows costs one forward a step. Other
shapes run the same padded forward uncaptured (on CPU, every shape: the padding is the same, which is
how the tests cover it without a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from chatstream_asgi.engines.transformers.attention import STEP_KEYWORD, SlotStep
from chatstream_asgi.engines.transformers.flash_chunk import chunk_kernel
from chatstream_asgi.engines.transformers.graphs import (
    bucket_for,
    continued_lengths,
    length_buckets,
    row_buckets,
    token_buckets,
)
from chatstream_asgi.engines.transformers.static_cache import StaticKVCache
from chatstream_asgi.engines.transformers.transfer import upload

__all__ = ["ChunkInput", "StepRunner"]

Key = tuple[int, int, int, int]
ChunkInput = tuple[int, int, Sequence[int], bool]
"""A chunk sequence: its slot, the position of its first token, the token ids, whether to keep its last logits."""

_MAX_CHUNK_TOKENS = 8192
_MAX_CHUNK_AREA = 2**26  # tokens x gathered columns of a captured chunk (the size of its mask)
_JOINING_DEFAULT = 512


class StepRunner:
    """Runs one step over ``cache`` (see the module docstring); ``call_model(cache, **inputs)`` is the model call."""

    kind = "step"

    def __init__(
        self,
        call_model: Callable[..., Any],
        cache: StaticKVCache,
        pad_id: int,
        mask_placeholder: Any,
        *,
        use_graphs: bool,
        chunk: int | None,
    ) -> None:
        self._call_model = call_model
        self.cache = cache
        self.pad_id = pad_id
        self._placeholder = mask_placeholder
        device = self.device = cache.device
        self.row_buckets = row_buckets(cache.rows)
        self.length_buckets = length_buckets(cache.max_len)
        self.coarse_lengths = continued_lengths(cache.max_len)
        self.token_buckets = token_buckets(min(_MAX_CHUNK_TOKENS, cache.max_len))
        self.joining = bucket_for(min(chunk or _JOINING_DEFAULT, self.token_buckets[-1]), self.token_buckets)
        self.graphs: dict[Key, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_graphs = use_graphs and device.type == "cuda"
        self.shapes: list[Key] = sorted(self._shapes(), reverse=True) if self.use_graphs else []
        self._captured = set(self.shapes)
        most_tokens = self.token_buckets[-1]
        self._tokens = torch.zeros(5, cache.rows + most_tokens, dtype=torch.long, device=device)
        self._gather = torch.zeros(3, cache.max_len, dtype=torch.long, device=device)
        self._keep = torch.zeros(cache.rows + self.kept(most_tokens), dtype=torch.long, device=device)
        self._bounds = torch.zeros(2, self.kept(most_tokens) + 2, dtype=torch.int32, device=device)
        self.chunk_kernel = chunk_kernel(device, cache.layout.dtype, cache.layout.head_dim)
        """The packed kernel chunks attend through (:mod:`.flash_chunk`), or None: the masked SDPA."""
        self._rows = torch.arange(cache.rows, device=device)
        self._out: torch.Tensor | None = None
        self._pinned = device.type == "cuda"  # host buffers in pinned memory: copies queue without waiting
        self.fused: Callable[[Key], contextlib.AbstractContextManager[Any]] = lambda key: contextlib.nullcontext()
        """What a step's forward runs under: the model's compiled layers where they measured faster."""

    def _shapes(self) -> set[Key]:
        decode = {(r, n, 0, 0) for r in self.row_buckets for n in self.length_buckets}
        chunks = {(0, 0, t, c) for t in self.token_buckets for c in self.column_buckets(t) if t * c <= _MAX_CHUNK_AREA}
        mixed = {
            (r, n, self.joining, c)
            for r in self.row_buckets
            for n in self.coarse_lengths
            for c in self.column_buckets(self.joining, joining=True)
        }
        return decode | chunks | mixed

    def column_buckets(self, tokens: int, *, joining: bool = False) -> list[int]:
        """The gathered columns a chunk of ``tokens`` pads to: its own tokens, then powers of four (of two for
        a chunk ``joining`` running rows, which repeats every step of a long prompt's join)."""
        steps = length_buckets if joining else continued_lengths
        return [tokens, *(n for n in steps(self.cache.max_len) if n > tokens)]

    def kept(self, tokens: int) -> int:
        """How many chunk sequences' logits a chunk of ``tokens`` returns (the most it may complete)."""
        return min(self.cache.rows, max(1, tokens // 4)) if tokens else 0

    def key(self, rows: int, length: int, tokens: int, columns: int) -> Key | None:
        """The shape of a step of ``rows`` decode rows reading ``length`` columns, a chunk of ``tokens`` reading
        ``columns``: a captured one where there is one, else the natural buckets; None past the buffers."""
        r = bucket_for(rows, self.row_buckets) if rows else 0
        if not tokens:
            return (r, bucket_for(length, self.length_buckets), 0, 0)
        if tokens > self.token_buckets[-1] or columns > self.cache.max_len:
            return None
        t = (
            self.joining
            if rows and self.use_graphs and tokens <= self.joining
            else bucket_for(tokens, self.token_buckets)
        )
        n = bucket_for(length, self.coarse_lengths) if rows else 0
        return (r, n, t, bucket_for(max(columns, t), self.column_buckets(t, joining=bool(rows))))

    def fits(self, rows: int, tokens: int, columns: int, sequences: int) -> bool:
        """Whether a chunk of ``sequences`` packed sequences fits one shape beside ``rows`` decode rows
        (a captured one, where steps are captured)."""
        key = self.key(rows, 1, tokens, columns)
        if key is None or sequences > self.kept(key[2]):
            return False
        return not self.use_graphs or key in self._captured

    def launch(
        self, positions: torch.Tensor, inputs: Sequence[int] | None, chunks: Sequence[ChunkInput]
    ) -> torch.Tensor:
        """Queue one step; return its logits ``[len(positions) + kept chunks, vocab]`` (not waited for).

        ``positions`` (host, ``[n]``) and ``inputs``: the decode rows' (row ``i`` in slot ``i``); ``inputs=None``
        takes the tokens :meth:`feed` left on the device. ``chunks``: see :data:`ChunkInput`.
        """
        n = positions.shape[0]
        tokens = sum(len(ids) for _, _, ids, _ in chunks)
        columns = sum(start + len(ids) for _, start, ids, _ in chunks)
        key = self.key(n, int(positions.max()) + 1 if n else 1, tokens, columns)
        if key is None:
            raise ValueError(f"a step of {tokens} chunk tokens reading {columns} columns exceeds the runner's buffers")
        rows, _, width, gathered = key
        host = torch.zeros(5, rows + width, dtype=torch.long, pin_memory=self._pinned)
        host[0], host[4] = self.pad_id, -1  # ids, positions, slots, valid, sequence tags
        host[2, :rows] = torch.arange(rows)
        host[1, :n] = positions
        host[3, :n] = 1
        if inputs is not None:
            host[0, :n] = torch.tensor(inputs, dtype=torch.long)
        gather = torch.empty(3, gathered, dtype=torch.long, pin_memory=self._pinned)
        gather[0], gather[1], gather[2] = 0, self.cache.scratch, -1  # slot, position, tag
        keep, t, g, ends = list(range(n)), rows, 0, [(0, 0)]
        for slot, start, ids, last in chunks:
            m = len(ids)
            host[0, t : t + m] = torch.tensor(ids, dtype=torch.long)
            host[1, t : t + m] = torch.arange(start, start + m)
            host[2:5, t : t + m] = torch.tensor([[slot], [1], [slot]])
            gather[0::2, g : g + start + m] = slot
            gather[1, g : g + start + m] = torch.arange(start + m)
            if last:
                keep.append(t + m - 1)
            t, g = t + m, g + start + m
            ends.append((t - rows, g))
        first = 0 if inputs is not None else 1  # fed: the decode rows' ids are already on the device
        self._tokens[first:, : rows + width].copy_(host[first:], non_blocking=self._pinned)
        if inputs is None and width:
            self._tokens[0, rows : rows + width].copy_(host[0, rows:], non_blocking=self._pinned)
        live = len(keep)
        if width:  # a decode step keeps every row's logits (its keep indices never change)
            keep += [keep[-1] if keep else 0] * (rows + self.kept(width) - live)
            host_keep = torch.tensor(keep, dtype=torch.long, pin_memory=self._pinned)
            self._gather[:, :gathered].copy_(gather, non_blocking=self._pinned)
            self._keep[: len(keep)].copy_(host_keep, non_blocking=self._pinned)
        if width and self.chunk_kernel:  # each sequence's end (queries, keys); empty ones to the shape's count; padding
            ends += [ends[-1]] * (self.kept(width) - len(chunks)) + [(width, gathered)]
            bounds = torch.tensor(list(zip(*ends, strict=True)), dtype=torch.int32, pin_memory=self._pinned)
            self._bounds[:, : len(ends)].copy_(bounds, non_blocking=self._pinned)
        return self._replay_or_run(key)[:live]

    def feed(self, tokens: torch.Tensor) -> None:
        """Make ``tokens`` (device, ``[n]``) the input of the next step's first ``n`` decode rows."""
        self._tokens[0, : tokens.shape[0]].copy_(tokens)

    def keep_fed(self, order: Sequence[int]) -> None:
        """Rows left the batch: the input :meth:`feed` left for row ``order[j]`` becomes row ``j``'s."""
        if list(order) != list(range(len(order))):
            index = upload(list(order), self.device, torch.long)
            self._tokens[0, : len(order)] = self._tokens[0, index]

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
        """The step over the static inputs for shape ``key`` (what a graph captures); logits ``[kept, vocab]``."""
        rows, length, width, columns = key
        t = rows + width
        kernel = self.chunk_kernel if width else None
        bounds = (self._bounds[:, : self.kept(width) + 2], width, columns) if kernel else None
        step = SlotStep.build(
            self._tokens[1:, :t], self._gather[:, :columns], rows, length, self.cache.rings, self.cache.scratch,
            bounds, kernel,
        )  # fmt: skip
        keep = self._keep[: rows + self.kept(width)] if width else self._rows[:rows]
        with self.fused(key):
            out = self._call_model(
                self.cache.for_step(step),
                input_ids=self._tokens[0, :t][None],
                position_ids=self._tokens[1, :t][None],
                attention_mask=self._placeholder,
                logits_to_keep=keep,
                **{STEP_KEYWORD: step},
            )
        logits = out.logits[0]
        if self._out is None:
            self._out = torch.empty(self._keep.shape[0], logits.shape[-1], dtype=logits.dtype, device=self.device)
        self._out[: keep.shape[0]].copy_(logits)
        return self._out[: keep.shape[0]]

    def _replay_or_run(self, key: Key) -> torch.Tensor:
        captured = self.graphs.get(key)
        if captured is None:
            return self.forward(key)
        graph, out = captured
        graph.replay()
        return out
