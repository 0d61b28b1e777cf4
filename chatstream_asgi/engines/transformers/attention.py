"""Attention over the engine's caches: the KV write, the masks, grouped heads and the kernel, in one place.

transformers' attention modules project, rotate and normalise queries and keys, hand the new keys and values
to the cache (``cache.update``), then call the attention function that ``config._attn_implementation``
names with whatever the layer asks for (``scaling``, ``sliding_window``, ``softcap``, ``s_aux`` sinks).
:func:`install` points that name at this module's function for good (``chatstream:<the model's own>``).
The engine's forwards pass a step object under :data:`STEP_KEYWORD`, which transformers hands on to the
attention function; without one (``model.generate``, a user's own call) the function is exactly the
model's own (SDPA, or its module's eager function), with the same masks.

Two step objects, one per cache design:

- :class:`DenseStep` (the growing cache): each row's keys come back from ``cache.update`` as
  ``[rows, kv_heads, columns, head_dim]``; masks come from each column's position (-1: empty), so a
  gap between a reused prefix and the new tokens, or left padding, never shifts a sliding window.
- :class:`SlotStep` (the slotted cache): one forward over a flat list of tokens, the decode tokens of
  running rows ``[0, R)`` (row ``i`` in slot ``i``) first, then a chunk of prompt tokens of any number of
  sequences packed together. The write puts every token's keys at ``(slot, column)``; the decode part
  attends over views of the first columns of slots ``[0, R)``, the chunk part over columns gathered
  from its sequences' slots, with a mask that keeps each sequence to its own. Sliding layers whose
  window is shorter than the context keep a ring (:mod:`~chatstream_asgi.engines.transformers.kv_layout`):
  there a column's position is derived from the query's, and the window hides whatever a ring column held
  before.

The kernel (:func:`attend`): PyTorch's SDPA, with the query heads of each key/value head stacked into one
run of query rows (one product per key/value head instead of copying each key/value head once per query
head, which is what transformers does under ``torch.compile`` and with a mask); a
plain matrix-product attention where the layer asks for logit soft-capping or attention sinks (Gemma 2,
gpt-oss), which SDPA has no slot for. On CUDA in bf16/fp16 a slotted step's chunk runs a packed kernel
instead of a masked SDPA, the step carrying the chunk's packing and the kernel the runner chose
(:func:`~chatstream_asgi.engines.transformers.flash_chunk.chunk_kernel`: a split-KV Triton kernel or
FlashAttention's variable-length call); another kernel (FlexAttention, FlashInfer) would be another such module.
Everything a step needs is computed from small index tensors on the device, so a step replays as a
CUDA graph, and sizes come from tensor shapes, so ``torch.compile`` sees them as dynamic.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from chatstream_asgi.engines.transformers.flash_chunk import ChunkAttend, ChunkBounds, flash_takes

__all__ = [
    "STEP_KEYWORD",
    "DenseStep",
    "SlotStep",
    "attend",
    "dense_masks",
    "install",
    "mask_placeholder",
    "write_tokens",
]

STEP_KEYWORD = "chatstream_step"
"""The keyword under which the engine's forwards pass their step object (transformers passes it through)."""

_PREFIX = "chatstream:"
Window = int | None


def install(model: torch.nn.Module) -> None:
    """Make every attention config of ``model`` name this module's function (once; idempotent).

    transformers' registries are imported only where there is a config to point at them: a model built
    without transformers' modeling code (:mod:`.lean_model`) has none, and importing them imports
    ``transformers.modeling_utils``, about 100 MiB resident.
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    pending = [c for c in configs.values() if isinstance(name := getattr(c, "_attn_implementation", None), str)
               and not name.startswith(_PREFIX)]  # fmt: skip
    if not pending:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    for config in pending:
        original = config._attn_implementation
        name = _PREFIX + original
        AttentionInterface.register(name, _attention_for(original, AttentionInterface._global_mapping))
        masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
        if original in masks:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, masks[original])
        config._attn_implementation = name


def _attention_for(original: str, registry: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, None]]:
    def chatstream_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        step = kwargs.pop(STEP_KEYWORD, None)
        if step is None:
            return _original(original, module, registry)(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return step.attend(query, key, value, scaling, kwargs), None

    return chatstream_attention


def _original(name: str, module: torch.nn.Module, registry: dict[str, Any]) -> Callable[..., Any]:
    """The attention function ``module`` would call under ``name`` (``eager``: its modeling file's own)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return registry[name]


def mask_placeholder(config: Any, device: torch.device) -> Any:
    """What to pass as ``attention_mask`` so that the model builds no mask of its own (the step carries them):
    a 4D tensor (returned as is by transformers' mask functions), per layer type where the config has them."""
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    types = getattr(config.get_text_config(), "layer_types", None)
    return {kind: placeholder for kind in set(types)} if types else placeholder


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, T, D]`` over ``key``/``value`` ``[B, KV, L, D]`` where ``mask``
    (``[B, 1, T, L]``, True: attend; None: every key, for one query a row) allows; returns ``[B, T, H, D]``.
    Honours ``softcap`` and ``s_aux``."""
    b, heads, t, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if groups > 1:  # the query heads of a key/value head as one run of query rows: no copy of keys per head
        query = query.reshape(b, kv_heads, groups * t, dim)
        if t > 1 and mask is not None:
            mask = mask.expand(b, 1, t, mask.shape[-1]).repeat(1, 1, groups, 1)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:
        sinks = None if sinks is None else sinks.reshape(kv_heads, groups, 1).expand(kv_heads, groups, t).reshape(-1)
        out = _matmul_attention(query, key, value, mask, scaling, softcap, sinks)
    return out.reshape(b, heads, t, dim).transpose(1, 2).contiguous()


def _matmul_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention as transformers' eager functions compute it, with soft-capping (Gemma 2) and sinks (gpt-oss)."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if mask is not None:
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    if sinks is None:
        probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        b, x, y, _ = weights.shape
        logits = torch.cat([weights, sinks.to(weights.dtype).reshape(1, x, y, 1).expand(b, x, y, 1)], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs.to(value.dtype), value)


def _allowed(
    key_positions: torch.Tensor, query_positions: torch.Tensor, window: Window, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """Keys at ``key_positions`` (-1: none) a query at ``query_positions`` attends (broadcast), in ``window``."""
    allowed = (key_positions >= 0) & (key_positions <= query_positions)
    if window is not None:
        allowed &= key_positions > query_positions - window
    return allowed if extra is None else allowed & extra


def dense_masks(
    query_positions: torch.Tensor, key_positions: torch.Tensor, windows: Iterable[Window]
) -> dict[Window, torch.Tensor]:
    """Per window, the mask ``[B, 1, T, L]`` of queries at ``query_positions`` ``[B, T]`` over columns whose
    positions are ``key_positions`` ``[B, L]`` (-1: empty). A query at position 0 attends at least its row's
    first token, so padding queries (position 0) never attend nothing."""
    q, k = query_positions[:, None, :, None], key_positions[:, None, None, :]
    return {w: _allowed(k, q, w) for w in set(windows)}


@dataclass(eq=False)
class DenseStep:
    """A forward over the growing cache: every layer attends with the mask of its window."""

    masks: dict[Window, torch.Tensor]

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        return attend(query, key, value, self.masks[kwargs.get("sliding_window")], scaling, kwargs)


def write_tokens(buffer: torch.Tensor, states: torch.Tensor, slots: torch.Tensor, columns: torch.Tensor) -> None:
    """Write ``states`` ``[1, KV, T, D]`` (one flat row of tokens) at ``(slots[t], columns[t])`` of ``buffer``
    ``[slots, KV, columns, D]``: an index assignment (inductor keeps it in place, unlike a scatter)."""
    buffer[slots, :, columns] = states[0].transpose(0, 1)


@dataclass(eq=False)
class SlotStep:
    """A forward over the slotted cache (see the module docstring), built by :meth:`build` inside the step.

    ``rings`` maps each sliding window that keeps a ring to its columns; other windows (and full
    attention) keep positions as columns.
    """

    write_slots: torch.Tensor  # [T]: the slot of each token
    write_columns: dict[Window, torch.Tensor]  # per window, [T]: the column each token's keys go to
    decode_masks: dict[Window, torch.Tensor]  # per window, [R, 1, 1, width]; empty without decode rows
    chunk_masks: dict[Window, torch.Tensor]  # per window, [1, 1, Tc, Lc]; empty without a chunk
    gather_slots: torch.Tensor  # [Lc]: where the chunk's keys are read
    gather_columns: dict[Window, torch.Tensor]  # per window, [Lc]
    chunk_bounds: ChunkBounds | None = None  # the chunk's packing where a chunk kernel runs it (flash_chunk.py)
    chunk_kernel: ChunkAttend | None = None  # that kernel, given with the packing

    @classmethod
    def build(
        cls,
        tokens: torch.Tensor,
        gather: torch.Tensor,
        decode_rows: int,
        decode_width: int,
        rings: dict[Window, int | None],
        scratch: int,
        bounds: ChunkBounds | None = None,
        kernel: ChunkAttend | None = None,
    ) -> SlotStep:
        """The step over ``tokens`` ``[4, T]`` (position, slot, valid, sequence tag: the slot, -1 for padding)
        whose first ``decode_rows`` are decode rows attending ``decode_width`` columns, and ``gather``
        ``[3, Lc]`` (slot, position, tag) the chunk's keys. ``scratch`` is the column padding writes to in
        layers without a ring (a ring's scratch is its last column). ``bounds``: the chunk's packing, where
        its layers may run ``kernel`` (:mod:`.flash_chunk`; both or neither)."""
        positions, slots, valid, tags = tokens
        valid = valid.bool()
        write, gather_columns, decode_masks, chunk_masks = {}, {}, {}, {}
        columns = torch.arange(decode_width, device=tokens.device)
        q_pos, q_tag = positions[decode_rows:, None], tags[decode_rows:, None]
        for window, ring in rings.items():
            write[window] = torch.where(valid, positions if ring is None else positions % ring, ring or scratch)
            gather_columns[window] = gather[1] if ring is None else gather[1] % ring
            if decode_rows:
                width = decode_width if ring is None else min(decode_width, ring)
                decode_masks[window] = _decode_mask(positions[:decode_rows], columns[:width], window, ring)
            if q_pos.shape[0]:  # padding queries (tag -1) attend anything: a row attending nothing is NaN
                own = _allowed(gather[1][None, :], q_pos, window, gather[2][None, :] == q_tag) | (q_tag < 0)
                chunk_masks[window] = own[None, None]
        return cls(slots, write, decode_masks, chunk_masks, gather[0], gather_columns, bounds, kernel)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """``query`` ``[1, H, T, D]`` over a layer's buffers ``key``/``value`` ``[slots, KV, columns, D]``."""
        window = kwargs.get("sliding_window")
        decode, chunk = self.decode_masks.get(window), self.chunk_masks.get(window)
        parts, rows = [], 0
        if decode is not None:
            rows, width = decode.shape[0], decode.shape[-1]
            q = query[0, :, :rows].transpose(0, 1).unsqueeze(2)  # [R, H, 1, D]: one query token a row
            out = attend(q, key[:rows, :, :width], value[:rows, :, :width], decode, scaling, kwargs)
            parts.append(out.transpose(0, 1))  # [1, R, H, D]
        if chunk is not None:
            columns = self.gather_columns[window]
            k, v = key[self.gather_slots, :, columns], value[self.gather_slots, :, columns]  # [Lc, KV, D]
            if self.chunk_kernel is not None and self.chunk_bounds is not None and flash_takes(kwargs):
                q = query[0, :, rows:].transpose(0, 1)  # [Tc, H, D]
                parts.append(self.chunk_kernel(q, k, v, self.chunk_bounds, scaling, window)[None])
            else:
                k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, KV, Lc, D]
                parts.append(attend(query[:, :, rows:], k, v, chunk, scaling, kwargs))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _decode_mask(positions: torch.Tensor, columns: torch.Tensor, window: Window, ring: int | None) -> torch.Tensor:
    """``[R, 1, 1, width]``: row ``i`` (its token at ``positions[i]``) over the first ``width`` columns of its slot.

    In a ring, column ``j`` holds the latest position up to the query's that is ``j`` modulo the ring.
    """
    q = positions[:, None]
    held = columns[None, :] if ring is None else q - (q - columns[None, :]) % ring
    return _allowed(held, q, window)[:, None, None, :]
