"""A preallocated key/value cache of fixed slots, sized from a memory budget.

Each sequence owns one slot: row ``s`` of every layer's ``[slots, kv_heads, columns, head_dim]`` key and
value buffers. In a full-attention layer token ``i`` sits at column ``i`` (its position id); a sliding
layer whose window is shorter than the context keeps a ring instead, position ``i`` at column
``i % ring`` (:class:`~chatstream_asgi.engines.transformers.kv_layout.KVLayout`). Each layer's last column
is scratch: padding tokens write there and no real query reads it. The buffers are allocated once; the
hot path only writes into them, and moves a slot's filled columns when rows leave or join
(:meth:`StaticKVCache.move_slots`).

A forward addresses the cache through the :class:`~chatstream_asgi.engines.transformers.attention.SlotStep`
set with :meth:`StaticKVCache.for_step`: each layer writes its tokens' keys where the step says and hands
its whole buffers to the attention function, which reads what the step's parts need.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache

from chatstream_asgi.engines.base import EngineError
from chatstream_asgi.engines.transformers.attention import SlotStep, write_tokens
from chatstream_asgi.engines.transformers.cache_layer import OwnedLayer
from chatstream_asgi.engines.transformers.kv_layout import KVLayout, UnsupportedModel
from chatstream_asgi.engines.transformers.transfer import upload

__all__ = ["KVLayout", "StaticKVCache", "UnsupportedModel", "plan_rows"]

logger = logging.getLogger("chatstream_asgi.engine")

_GIB = 1024**3


def plan_rows(
    layout: KVLayout,
    context_len: int,
    max_rows: int,
    device: torch.device,
    *,
    kv_cache_memory: float | None = None,
    gpu_memory_utilization: float | None = None,
) -> int:
    """How many slots of ``context_len`` tokens the budget holds (at most ``max_rows``).

    A slot costs what each of its layers holds (a ring for a short sliding window, else the context).
    The budget is ``kv_cache_memory`` GiB, or ``gpu_memory_utilization`` of the device's total
    memory minus what is already in use (vLLM's rule), or, with neither, ``max_rows`` slots capped
    at 90% of the free device memory. Raises :class:`EngineError` when not one slot fits.
    """
    slot_bytes = layout.slot_bytes(context_len)
    if kv_cache_memory is not None:
        budget, source = int(kv_cache_memory * _GIB), f"--kv-cache-memory {kv_cache_memory:g} GiB"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if gpu_memory_utilization is not None:
            budget = int(gpu_memory_utilization * total) - (total - free)
            source = f"--gpu-memory-utilization {gpu_memory_utilization:g} ({total / _GIB:.1f} GiB card)"
        else:
            budget, source = min(max_rows * slot_bytes, int(0.9 * free)), "90% of free device memory"
    else:
        budget, source = max_rows * slot_bytes, f"{max_rows} rows"
    rows = min(max_rows, max(budget, 0) // slot_bytes)
    if rows < 1:
        raise EngineError(
            f"the KV cache budget ({source}: {max(budget, 0) / _GIB:.2f} GiB) holds no sequence of "
            f"{context_len} tokens ({slot_bytes / _GIB:.3f} GiB each); raise the budget or lower context_len"
        )
    return rows


class _SlotLayer(OwnedLayer):
    """One model layer's buffers: writes the step's tokens, returns the whole buffers to the attention."""

    def __init__(self, owner: StaticKVCache, index: int) -> None:
        super().__init__(owner, index)
        self.keys = owner.keys[index]
        self.values = owner.values[index]
        self.window = owner.layout.windows[index]
        self.is_sliding = self.window is not None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.owner.step
        columns = step.write_columns[self.window]
        write_tokens(self.keys, key_states, step.write_slots, columns)
        write_tokens(self.values, value_states, step.write_slots, columns)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class StaticKVCache:
    """``rows`` slots of ``max_len`` tokens for every layer, allocated once (see the module docstring)."""

    def __init__(self, layout: KVLayout, rows: int, max_len: int, device: torch.device) -> None:
        self.layout = layout
        self.rows = rows
        self.max_len = max_len
        self.widths = layout.columns(max_len)
        self.rings = {w: layout.ring(w, max_len) for w in layout.windows}
        """Per window of the model's layers: its ring's columns, or None where positions are columns."""
        shapes = [(rows, layout.kv_heads, width, layout.head_dim) for width in self.widths]
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device) for shape in shapes]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=device) for shape in shapes]
        self.nbytes = rows * layout.slot_bytes(max_len)
        self.step: SlotStep | None = None
        self._cache = Cache(layers=[_SlotLayer(self, i) for i in range(layout.num_layers)])

    @property
    def layers(self) -> list[Any]:
        """The per-layer views the model's attention writes through (index ``i``: layer ``i``)."""
        return self._cache.layers

    @property
    def scratch(self) -> int:
        """The column that padding writes to in layers without a ring."""
        return self.max_len

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def for_step(self, step: SlotStep) -> Cache:
        """The cache for a forward over ``step``."""
        self.step = step
        return self._cache

    def move_slots(self, moves: Sequence[tuple[int, int]], columns: int) -> None:
        """Copy the first ``columns`` tokens of slot ``src`` to slot ``dst`` for every ``(src, dst)``, all at once.

        Every source is read before any destination is written, so swaps and chains are safe. Queued
        without a host wait: the slot indices go up from pinned memory (a copy from pageable memory
        can wait for the steps queued before it, which would stall the steps queued one ahead). A ring
        holds a slot's first ``columns`` tokens in its first columns while they fit, else in all of them.
        """
        moves = [(src, dst) for src, dst in moves if src != dst]
        if not moves or not columns:
            return
        src, dst = upload(torch.tensor(moves).T.contiguous(), self.device, torch.long)
        for keys, values, width in zip(self.keys, self.values, self.widths, strict=True):
            n = min(columns, width - 1)
            for buf in (keys, values):
                buf[dst, :, :n] = buf[src, :, :n]
