"""A batch key/value cache whose rows join and leave between decode steps.

All rows share one time axis and are right-aligned: row ``i`` holds its tokens in the last
columns of ``[0, length)`` and is left-padded before them. :attr:`BatchKVCache.key_positions` holds
each column's position id (-1: padding, or the gap between a reused prefix and the tokens prefilled
after it), from which the attention's masks are built, so a sliding window counts positions, not columns.
Each layer's keys and values live in one preallocated ``[rows, kv_heads, time, head_dim]`` buffer
with headroom on both axes, so a decode step writes one column in place instead of concatenating
the whole cache; buffers are reallocated only when a row or column capacity runs out.

:meth:`BatchKVCache.as_transformers_cache` exposes the buffers to a transformers model as a
:class:`transformers.cache_utils.Cache` whose ``update`` writes the new column and returns views.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache

from chatstream_asgi.engines.transformers.cache_layer import OwnedLayer

__all__ = ["BatchKVCache", "log_growing_cache"]

logger = logging.getLogger("chatstream_asgi.engine")

_TIME_CHUNK = 128


class _SlabLayer(OwnedLayer):
    """One model layer's view of the batch cache."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        rows, start, end = o.rows, o.length, o.length + key_states.shape[-2]
        keys, values = o.keys[self.index], o.values[self.index]
        keys[:rows, :, start:end] = key_states
        values[:rows, :, start:end] = value_states
        return keys[:rows, :, :end], values[:rows, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return -1


class BatchKVCache:
    """Key/value buffers, each column's position and next position ids for a running batch."""

    def __init__(self, num_layers: int, *, row_capacity: int = 16) -> None:
        self.num_layers = num_layers
        self.row_capacity = row_capacity
        self.rows = 0
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_positions = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self._cache = Cache(layers=[_SlabLayer(self, i) for i in range(num_layers)])

    @property
    def capacity(self) -> int:
        """Columns available before the buffers must grow."""
        return self.key_positions.shape[1]

    def as_transformers_cache(self) -> Cache:
        """The cache object to pass to the model's forward for a step over all rows."""
        return self._cache

    def clear(self) -> None:
        """Drop every row (buffers are kept for reuse)."""
        self.rows = 0
        self.length = 0

    def add_rows(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], key_positions: torch.Tensor) -> None:
        """Append rows from a prefill: per-layer ``(keys, values)`` of ``[n, H, L, D]``, each column's position
        ``[n, L]`` (-1: empty).

        The new rows are right-aligned with the existing ones; if they are longer than the
        current length, the existing rows are shifted right.
        """
        n, new_len = key_positions.shape
        old_rows, old_len = self.rows, self.length
        length = max(old_len, new_len)
        shift = length - old_len
        needs_alloc = (
            not self.keys or old_rows + n > self.keys[0].shape[0] or length + 1 > self.capacity or (shift and old_rows)
        )
        if needs_alloc:
            self._reallocate(layers[0][0], max(self.row_capacity, old_rows + n), length + 1, shift)
        else:
            self.length = length
        col = length - new_len
        rows = slice(old_rows, old_rows + n)
        for i, (k, v) in enumerate(layers):
            self.keys[i][rows, :, col:length] = k
            self.values[i][rows, :, col:length] = v
        self.key_positions[rows] = -1
        self.key_positions[rows, col:length] = key_positions
        self.positions[rows] = key_positions.max(dim=1).values + 1
        self.rows = old_rows + n

    def row_tokens(self, row: int) -> int:
        """How many tokens row ``row`` holds."""
        return int(self.positions[row])

    def copy_row(self, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row ``row``'s keys and values without its padding, per layer ``[kv_heads, tokens, head_dim]``."""
        columns = self.key_positions[row, : self.length] >= 0
        return [buf[row, :, : self.length][:, columns] for buf in self.keys], [
            buf[row, :, : self.length][:, columns] for buf in self.values
        ]

    def keep_rows(self, order: Sequence[int]) -> None:
        """Keep only the rows listed in ``order`` (indices of current rows), in that order."""
        moved = [j for j, i in enumerate(order) if i != j]
        if moved:
            device = self.key_positions.device
            dst = torch.tensor(moved, dtype=torch.long, device=device)
            src = torch.tensor([order[j] for j in moved], dtype=torch.long, device=device)
            t = self.length
            for buf in (*self.keys, *self.values):
                buf[dst, :, :t] = buf[src, :, :t]
            self.key_positions[dst] = self.key_positions[src]
            self.positions[dst] = self.positions[src]
        self.rows = len(order)
        if self.rows == 0:
            self.length = 0

    def prepare_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for one more column; return ``(key_positions, position_ids)`` for the step: every
        column's position ``[rows, length + 1]`` and the new token's ``[rows, 1]``."""
        if self.length + 1 > self.capacity:
            self._compact_or_grow()
        rows, t = self.rows, self.length
        self.key_positions[:rows, t] = self.positions[:rows]
        return self.key_positions[:rows, : t + 1], self.positions[:rows].unsqueeze(1)

    def finish_step(self) -> None:
        """Account for the column written by the step's forward."""
        self.length += 1
        self.positions[: self.rows] += 1

    def _compact_or_grow(self) -> None:
        """Drop leading columns that are padding in every row, or allocate more columns."""
        rows, t = self.rows, self.length
        real = (self.key_positions[:rows, :t] >= 0).any(dim=0).nonzero()
        first = int(real[0]) if len(real) else t
        if first >= _TIME_CHUNK // 4 and self.keys:
            kept = t - first
            for buf in (*self.keys, *self.values):
                buf[:rows, :, :kept] = buf[:rows, :, first:t].clone()
            self.key_positions[:rows, :kept] = self.key_positions[:rows, first:t].clone()
            self.key_positions[:rows, kept:] = -1
            self.length = kept
        else:
            self._reallocate(self.keys[0], self.keys[0].shape[0], t + 1, 0)

    def _reallocate(self, like: torch.Tensor, row_capacity: int, min_length: int, shift: int) -> None:
        """New buffers with at least ``min_length`` columns; existing rows move ``shift`` columns right."""
        _, heads, _, head_dim = like.shape
        columns = -(-(min_length + _TIME_CHUNK) // _TIME_CHUNK) * _TIME_CHUNK
        rows, t = self.rows, self.length
        shape = (row_capacity, heads, columns, head_dim)
        keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(self.num_layers)]
        key_positions = torch.full((row_capacity, columns), -1, dtype=torch.long, device=like.device)
        positions = torch.zeros(row_capacity, dtype=torch.long, device=like.device)
        if rows:
            for new, old in zip((*keys, *values), (*self.keys, *self.values), strict=True):
                new[:rows, :, shift : shift + t] = old[:rows, :, :t]
            key_positions[:rows, shift : shift + t] = self.key_positions[:rows, :t]
            positions[:rows] = self.positions[:rows]
        self.keys, self.values, self.key_positions, self.positions = keys, values, key_positions, positions
        self.length = t + shift


def log_growing_cache(config: Any, itemsize: int, rows: int, context_len: int) -> None:
    """One line for the eager cache, which grows with the batch: its size a token and at most."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize
    logger.info(
        "KV cache: %.0f KiB a token; it grows with the batch, at most %.2f GB (%d rows x %d tokens)",
        per_token / 1024, per_token * context_len * rows / 1e9, rows, context_len,
    )  # fmt: skip
