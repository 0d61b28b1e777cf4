"""A preallocated key/value cache of fixed slots, sized from a memory budget.

Each sequence owns one slot: row ``s`` of every layer's ``[slots, kv_heads, max_len + 1, head_dim]``
key and value buffers, its tokens left-aligned (token ``i`` at column ``i``, which is also its
position id). Column ``max_len`` is scratch: padding rows and padding tokens write there and no real
query reads it. The buffers are allocated once; the hot path only writes into them, and moves a
row's filled columns when rows leave or join (:meth:`StaticKVCache.move_slots`).

A forward addresses the cache in one of two modes (:meth:`StaticKVCache.for_decode`,
:meth:`StaticKVCache.for_chunk`):

- decode: rows ``[0, b)`` write their one new key at ``positions[:b]`` (a scatter, no host sync)
  and attend over views of the first ``L`` columns. Addresses and shapes are fixed per ``(b, L)``,
  so that step can be captured in a CUDA graph. Inside ``torch.compile`` the write is an index
  assignment into the whole buffer instead: inductor turns the scatter into the slice ``[:b]`` of
  each layer's buffer copied out and back (``b * max_len`` columns), which it does not for the
  assignment (found on CPU: SmolLM2's compiled step took 62 ms at batch 1 with the scatter, 51 ms
  with the assignment, both with inductor's weight freezing).
- chunk (prefill): any slots, several tokens each, written by index and gathered for attention.

The model sees a :class:`transformers.cache_utils.Cache` and an explicit 4D boolean mask, so
transformers builds no mask of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from chatstream_asgi.engines.base import EngineError
from chatstream_asgi.engines.transformers.cache_layer import OwnedLayer

__all__ = ["KVLayout", "StaticKVCache", "UnsupportedModel", "plan_rows"]

logger = logging.getLogger("chatstream_asgi.engine")

_GIB = 1024**3


class UnsupportedModel(EngineError):
    """The static cache would serve this model wrongly (raised at load, never mid-request)."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's keys and values across the model's layers."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> KVLayout:
        """The layout of ``config``'s text model; raises :class:`UnsupportedModel` for layouts it cannot hold.

        Every layer must be plain full attention (no sliding window, chunked or linear attention
        layers: those need a cache that drops or summarises old tokens) with one key/value head
        size (``v_head_dim`` equal to the key head size, unlike MLA models).
        """
        text = config.get_text_config()
        name = getattr(text, "model_type", type(text).__name__)
        layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise UnsupportedModel(
                f"{name}: layer types {sorted(layer_types)} need a cache this engine's static path does not have; "
                "only full-attention layers are supported (TransformersEngine(static_cache=False) uses the eager cache)"
            )
        window = getattr(text, "sliding_window", None)
        if window and getattr(text, "use_sliding_window", True):
            raise UnsupportedModel(f"{name}: sliding-window attention ({window} tokens) is not supported")
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        v_head_dim = getattr(text, "v_head_dim", None) or head_dim
        if v_head_dim != head_dim:
            raise UnsupportedModel(
                f"{name}: value head size {v_head_dim} differs from key head size {head_dim}; not supported"
            )
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype)


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

    The budget is ``kv_cache_memory`` GiB, or ``gpu_memory_utilization`` of the device's total
    memory minus what is already in use (vLLM's rule), or, with neither, ``max_rows`` slots capped
    at 90% of the free device memory. Raises :class:`EngineError` when not one slot fits.
    """
    slot_bytes = layout.bytes_per_token * (context_len + 1)
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
    """One model layer's view of the slots, in the mode the owner is set to."""

    def __init__(self, owner: StaticKVCache, index: int) -> None:
        super().__init__(owner, index)
        self.keys = owner.keys[index]
        self.values = owner.values[index]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        if o.mode == "decode":
            b, length = key_states.shape[0], o.kv_len
            if torch.compiler.is_compiling():  # see the module docstring
                rows = o.row_ids[:b]
                self.keys[rows, :, o.write_cols] = key_states[:, :, 0]
                self.values[rows, :, o.write_cols] = value_states[:, :, 0]
            else:
                index = o.write_cols.view(b, 1, 1, 1).expand(key_states.shape)
                self.keys[:b].scatter_(2, index, key_states)
                self.values[:b].scatter_(2, index, value_states)
            return self.keys[:b, :, :length], self.values[:b, :, :length]
        slots, cols = o.slots, o.write_cols
        self.keys[slots[:, None], :, cols] = key_states.transpose(1, 2)
        self.values[slots[:, None], :, cols] = value_states.transpose(1, 2)
        return (
            self.keys[:, :, : o.kv_len].index_select(0, slots),
            self.values[:, :, : o.kv_len].index_select(0, slots),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len

    def get_max_length(self) -> int:
        return self.owner.max_len


class StaticKVCache:
    """``rows`` slots of ``max_len`` tokens for every layer, allocated once (see the module docstring)."""

    def __init__(self, layout: KVLayout, rows: int, max_len: int, device: torch.device) -> None:
        self.layout = layout
        self.rows = rows
        self.max_len = max_len
        shape = (rows, layout.kv_heads, max_len + 1, layout.head_dim)
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.nbytes = 2 * layout.num_layers * self.keys[0].numel() * self.keys[0].element_size()
        self._cache = Cache(layers=[_SlotLayer(self, i) for i in range(layout.num_layers)])
        self.mode = "decode"
        self.kv_len = 0
        self.write_cols = torch.zeros(0, dtype=torch.long, device=device)
        self.slots = torch.zeros(0, dtype=torch.long, device=device)
        self.row_ids = torch.arange(rows, device=device)

    @property
    def layers(self) -> list[Any]:
        """The per-layer views the model's attention writes through (index ``i``: layer ``i``)."""
        return self._cache.layers

    @property
    def scratch(self) -> int:
        """The column that padding writes to."""
        return self.max_len

    def for_decode(self, positions: torch.Tensor, kv_len: int) -> Cache:
        """The cache for a decode step over rows ``[0, len(positions))`` attending ``kv_len`` columns."""
        self.mode, self.write_cols, self.kv_len = "decode", positions, kv_len
        return self._cache

    def for_chunk(self, slots: torch.Tensor, write_cols: torch.Tensor, kv_len: int) -> Cache:
        """The cache for a prefill chunk: row ``i`` of the input writes slot ``slots[i]`` at ``write_cols[i]``."""
        self.mode, self.slots, self.write_cols, self.kv_len = "chunk", slots, write_cols, kv_len
        return self._cache

    def move_slots(self, moves: Sequence[tuple[int, int]], columns: int) -> None:
        """Copy the first ``columns`` columns of slot ``src`` to slot ``dst`` for every ``(src, dst)``, all at once.

        Every source is read before any destination is written, so swaps and chains are safe. Queued
        without a host wait: the slot indices go up from pinned memory (a copy from pageable memory
        can wait for the steps queued before it, which would stall the steps queued one ahead).
        """
        moves = [(src, dst) for src, dst in moves if src != dst]
        if not moves or not columns:
            return
        device = self.keys[0].device
        pinned = device.type == "cuda"
        index = torch.tensor(moves, dtype=torch.long).T.contiguous()
        src, dst = (index.pin_memory() if pinned else index).to(device, non_blocking=pinned)
        for buf in (*self.keys, *self.values):
            buf[dst, :, :columns] = buf[src, :, :columns]
