"""GGUF's block formats Q4_0, Q4_1 and Q8_0, read into integer codes and per-group scales and offsets.

A block holds 32 consecutive weights of one row (ggml's layout, ``ggml-common.h``):

- Q4_0: fp16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``;
- Q4_1: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = d * q + m``;
- Q8_0: fp16 ``d``, 32 int8 codes; ``w = d * q``.

Byte ``j`` of a 4-bit block holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one.
:class:`Blocks` keeps every code as it is in the file and the scales and offsets as the file's fp16
values, so a kernel that takes codes, scales and offsets loses nothing the file holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BLOCK_TYPES", "GROUP", "Blocks", "read_blocks"]

GROUP = 32
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # ggml type ids (enum ggml_type)
BLOCK_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


@dataclass(frozen=True)
class Blocks:
    """One quantized matrix ``[rows, cols]``: ``w = scales * (codes - center) + offsets`` per group of 32.

    ``codes``: ``[rows, cols]``, uint8 in 0..15 (4 bits) or int8 (8 bits); ``scales`` and ``offsets``:
    ``[rows, cols // 32]`` float16 (``offsets`` None where the format has none); ``center``: 8 for
    Q4_0, else 0. ``kind`` names the file's format.
    """

    kind: str
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    center: int

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == np.int8 else 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    def rows(self, order: np.ndarray) -> Blocks:
        """The same weights with rows taken in ``order`` (a permutation of output features: exact); these
        blocks themselves where ``order`` keeps every row in place."""
        if np.array_equal(order, np.arange(len(order))):
            return self
        offsets = None if self.offsets is None else self.offsets[order]
        return Blocks(self.kind, self.codes[order], self.scales[order], offsets, self.center)

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 rows ``start:stop``, computed as ggml computes them (the reference the kernels are held to)."""
        codes = self.codes[start:stop]
        rows, cols = codes.shape
        weights = (codes.astype(np.float32).reshape(rows, -1, GROUP) - self.center) * self.scales[
            start:stop, :, None
        ].astype(np.float32)
        if self.offsets is not None:
            weights = weights + self.offsets[start:stop, :, None].astype(np.float32)
        return weights.reshape(rows, cols)


def read_blocks(data: np.ndarray, ggml_type: int, cols: int) -> Blocks:
    """The blocks of a GGUF tensor's ``data`` (``[rows, bytes a row]`` uint8, as ``gguf.GGUFReader`` maps it)."""
    if ggml_type not in BLOCK_TYPES or cols % GROUP:
        raise ValueError(f"not a Q4_0, Q4_1 or Q8_0 matrix of whole blocks (type {ggml_type}, {cols} columns)")
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, cols // GROUP, _BLOCK_BYTES[ggml_type])
    rows = blocks.shape[0]
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    kind = BLOCK_TYPES[ggml_type]
    if ggml_type == Q8_0:
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return Blocks(kind, codes, scales, None, 0)
    start = 4 if ggml_type == Q4_1 else 2
    packed = blocks[..., start:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)
    if ggml_type == Q4_1:
        offsets = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        return Blocks(kind, codes, scales, offsets, 0)
    return Blocks(kind, codes, scales, None, 8)
