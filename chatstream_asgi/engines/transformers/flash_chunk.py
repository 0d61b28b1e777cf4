"""FlashAttention over a step's prompt chunk on CUDA: packed sequences of different lengths, no mask.

A slotted-cache step's chunk holds the prompt tokens of one or more sequences packed one after another,
each attending its own gathered keys (positions ``0 .. start + m``) causally. As a masked SDPA call that
is a ``[tokens x columns]`` mask per layer, which keeps PyTorch off its FlashAttention kernel: on an H100
the chunk of a 2,000-token prompt joining 15 streams of a 1.1B model cost 0.9 ms more a step at 2,048
gathered columns than at 128. FlashAttention's variable-length form takes the packing itself: the queries'
and keys' offsets per sequence (``cu_seqlens``), causal from the bottom right (each sequence's last query
sees all of its keys), a window as ``window_size_left``. Padding queries (the bucket's tail) form one
more sequence over the padding columns; where they see no key the kernel writes zeros, never NaN.

Used where it computes what the masked path does: CUDA with FlashAttention built in, bf16 or fp16, no
logit soft-capping or attention sinks, a head size the kernel takes. Everything else (float32, CPU,
Gemma 2, gpt-oss) keeps :func:`.attention.attend`. The offsets come from the host with the step's other
indices, so the call has static shapes and replays in a CUDA graph; inductor calls the op as it is.

:func:`chunk_kernel` picks a model's chunk kernel once, at the runner's start: by default
:mod:`.split_chunk`'s Triton kernel where Triton imports and takes the head size (it computes the same and
splits the keys over more of the GPU: FlashAttention-2 walks them serially in 32 thread blocks for a
128-token chunk of a 32-head model, and on an H100 the split kernel took 0.39-0.47 of its time over 256 to
2,048 keys; a step that runs eagerly calls FlashAttention even so, see
:func:`captured_split_attend`), else this module's call. ``CHATSTREAM_CHUNK_KERNEL`` overrides:
``flash`` or ``split``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "ChunkAttend",
    "ChunkBounds",
    "captured_split_attend",
    "chunk_kernel",
    "flash_attend",
    "flash_available",
    "flash_takes",
]

logger = logging.getLogger("chatstream_asgi.engine")

ChunkBounds = tuple[torch.Tensor, int, int]
"""``(offsets [2, S + 2] int32: queries' then keys' per-sequence offsets, the last entry the padding's end;
the longest query run; the longest key run)``: upper bounds serve for the two lengths."""

ChunkAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ChunkBounds, float, "int | None"], torch.Tensor]
"""A chunk kernel: ``(query, key, value, bounds, scaling, window) -> output``, :func:`flash_attend`'s contract."""

KERNEL_VARIABLE = "CHATSTREAM_CHUNK_KERNEL"
KERNELS = ("auto", "split", "flash")

_TAKES_WINDOWS = any(
    a.name == "window_size_left" for a in torch.ops.aten._flash_attention_forward.default._schema.arguments
)
"""Whether this PyTorch's FlashAttention op takes a window (``window_size_left``; PyTorch 2.6 and later)."""


def flash_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a model's steps on ``device`` in ``dtype`` with heads of ``head_dim`` can run the kernel:
    CUDA with FlashAttention built in, compute capability 8.0 or above, bf16/fp16, a head size it takes.
    Decided once, outside the captured and compiled steps."""
    return (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def chunk_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> ChunkAttend | None:
    """The kernel a model's slotted steps run their chunk through, or None for the masked SDPA (where not
    :func:`flash_available`): :data:`KERNEL_VARIABLE`'s choice, by default (``auto``) the split kernel where
    it can run, else FlashAttention (see the module docstring). Decided once, outside the captured and
    compiled steps; a name not in :data:`KERNELS` raises ``ValueError`` on any device."""
    choice = os.environ.get(KERNEL_VARIABLE, "auto")
    if choice not in KERNELS:
        raise ValueError(f"{KERNEL_VARIABLE}={choice!r}: expected one of {', '.join(KERNELS)}")
    if not flash_available(device, dtype, head_dim):
        return None
    if choice == "flash":
        logger.info("chunks attend through FlashAttention (%s=flash)", KERNEL_VARIABLE)
        return flash_attend
    # asked for by name, a fallback is worth a warning; by default it is only the other kernel
    say = logger.warning if choice == "split" else logger.info
    try:
        from chatstream_asgi.engines.transformers.split_chunk import split_takes  # and registers its op
    except ImportError:  # a PyTorch built without Triton
        say("chunks attend through FlashAttention: Triton does not import (%s=%s)", KERNEL_VARIABLE, choice)
        return flash_attend
    if not split_takes(head_dim):
        say("chunks attend through FlashAttention: the split kernel takes no head size %d", head_dim)
        return flash_attend
    logger.info("chunks attend through the split-KV Triton kernel (%s=%s)", KERNEL_VARIABLE, choice)
    return captured_split_attend


def flash_takes(kwargs: dict[str, Any]) -> bool:
    """Whether a layer calling attention with ``kwargs`` may run the kernel: no logit soft-capping, no
    attention sinks, a window only where the op takes one (plain Python: traced into compiled steps)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return False
    return kwargs.get("sliding_window") is None or _TAKES_WINDOWS


def flash_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: ChunkBounds,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    """``query`` ``[T, H, D]`` over ``key``/``value`` ``[L, KV, D]`` (grouped heads: ``H`` a multiple of
    ``KV``), sequence by sequence as ``bounds`` packs them, causal from each sequence's end, within ``window``
    where given; returns ``[T, H, D]``."""
    offsets, longest_q, longest_k = bounds
    extra = {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}
    return torch.ops.aten._flash_attention_forward(
        query.contiguous(),
        key,
        value,
        offsets[0],
        offsets[1],
        longest_q,
        longest_k,
        0.0,
        True,
        False,
        scale=scaling,
        **extra,
    )[0]


def captured_split_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: ChunkBounds,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    """:func:`flash_attend`'s contract through :mod:`.split_chunk`'s custom op where the call is traced by
    ``torch.compile`` or captured in a CUDA graph, through :func:`flash_attend` where it runs eagerly (a step
    of a shape not captured, or an engine whose capture failed). Eagerly the split kernel's host cost decides:
    the op's dispatch and Triton's two launches took 3.8-4.0 ms a step for the 1.1B shape's 22 layers on an
    H100, FlashAttention 1.1-1.4 ms; replayed in a graph, where host cost is gone, 0.39-0.47 of
    FlashAttention's time. The op exists once :mod:`.split_chunk` is imported, as :func:`chunk_kernel` does
    before it returns this."""
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        offsets, longest_q, longest_k = bounds
        split = torch.ops.chatstream.split_chunk_attend
        return split(query, key, value, offsets, longest_q, longest_k, scaling, window)
    return flash_attend(query, key, value, bounds, scaling, window)
