"""Weight-only int4 and int8 linear layers for the CPU, over PyTorch's own weight-packed matmuls.

:class:`Int4Linear` runs ``torch.ops.aten._weight_int4pack_mm_for_cpu``: 4-bit codes in groups of
32 along the input features, each group with its own scale and zero point, dequantized inside the
kernel as ``w = scale * (code - 8) + zero``. :class:`Int8Linear` runs
``torch.ops.aten._weight_int8pack_mm`` (int8 codes, one scale per output feature). Both read the
activations in bfloat16: on x86 only that path of the kernels is vectorized (AVX2 / AVX-512); in
float32 they run a scalar loop, 20-100x slower. The layers take and return the model's dtype, so
the rest of the model (norms, attention, the residual stream) stays in float32.

From a GGUF's blocks (:mod:`.gguf_blocks`) the codes are the file's own: Q4_1's ``w = d * q + m``
is ``scale = d``, ``zero = m + 8 d`` and Q4_0's ``w = d * (q - 8)`` is ``scale = d``, ``zero = 0``,
code for code. The kernel holds scales and zeros in bfloat16, which keeps 8 of fp16's 11 significant
bits: a weight moves by at most ``2**-9`` of its group's ``|scale| * 8 + |zero|`` (the tests bound
it), against a quantization step of ``scale``. Q8_0, whose scales come per group of 32, has no exact
form in the int8 kernel (one scale per row): its codes are quantized again to a row's scale.
Embedding tables keep Q8_0's codes and group scales exactly (:class:`Int8Embedding` gathers rows).

Why these kernels: they ship with PyTorch (nothing to build or install), are what torchao's CPU
int4 layout (``Int4OpaqueTensor``) calls, and torchao's own CPU kernels (``da8w4``) are not in its
PyPI wheel; docs/quantization.md has the comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn

from chatstream_asgi.engines.transformers.gguf_blocks import GROUP, Blocks
from chatstream_asgi.engines.transformers.quant_linear import QuantLinear

__all__ = [
    "Fp16Linear",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "RescoredHead",
    "fp16_available",
    "int4_fits",
    "kernels_available",
    "nibble_halves",
    "rtn_int4",
    "scale_zeros",
]

_COMPUTE = torch.bfloat16
# Rows converted at a time: temporaries of a few MiB. glibc raises its mmap threshold to the largest block
# freed (up to 32 MiB), then keeps up to twice that free at the top of a thread's heap, which malloc_trim
# leaves alone: whole-table temporaries (27 MiB for SmolLM2's) stayed resident after half the loads.
_CHUNK_ROWS = 1024
_PACK_ROWS = 64  # the CPU int4 packing interleaves rows in blocks of 64: packed blocks concatenate


def kernels_available() -> bool:
    """Whether this PyTorch has the CPU weight-packed matmuls (2.6 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the int4 kernel takes this shape (rows in blocks of 16, whole groups of 32)."""
    return out_features % 16 == 0 and in_features % GROUP == 0


class Int4Linear(QuantLinear):
    """``nn.Linear`` over 4-bit codes with a scale and zero point per group of 32 input features.

    Q8_0's int8 codes fit too, as two 4-bit halves: with ``u = q + 128 = 16 h + l``, ``d q`` is
    ``16 d (h - 8) + d l``, two of the kernel's matmuls (scales ``16 d`` and ``d``, zeros 0 and
    ``8 d``) summed in float32: the file's codes again, at twice the 4-bit cost.
    """

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None = None) -> None:
        rows, cols = blocks.shape
        if not int4_fits(rows, cols):
            raise ValueError(f"Int4Linear needs rows in 16s and whole groups of {GROUP} ({rows}x{cols})")
        super().__init__(cols, rows, bias)
        self.kind = blocks.kind
        terms = nibble_halves(blocks) if blocks.bits == 8 else [blocks]
        self.register_buffer("packed", torch.stack([_pack(t) for t in terms]))
        self.register_buffer("scale_zeros", torch.stack([scale_zeros(t) for t in terms]))

    @classmethod
    def joined(cls, layers: Sequence[Int4Linear]) -> Int4Linear | None:
        """One layer whose output is ``layers``' outputs side by side (one kernel call for several), or None
        where their inputs, terms or biases differ, or a layer but the last ends inside a packed block of
        rows. The codes are stored once: each layer's become a view of the joined layer's; scales and zeros
        are copied (the kernel reads them right only when contiguous)."""
        alike = {(x.in_features, len(x.packed), x.bias is None) for x in layers}
        if len(alike) > 1 or any(x.out_features % _PACK_ROWS for x in layers[:-1]):
            return None
        joined = cls.__new__(cls)
        bias = None if layers[0].bias is None else torch.cat([x.bias for x in layers if x.bias is not None])
        QuantLinear.__init__(joined, layers[0].in_features, sum(x.out_features for x in layers), bias)
        joined.kind = layers[0].kind
        joined.register_buffer("packed", torch.cat([x.packed for x in layers], dim=1))
        joined.register_buffer("scale_zeros", torch.cat([x.scale_zeros for x in layers], dim=2))
        start = 0
        for x in layers:
            x.packed = joined.packed[:, start : start + x.out_features]
            start += x.out_features
        return joined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_COMPUTE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed[0], GROUP, self.scale_zeros[0]).float()
        for i in range(1, self.packed.shape[0]):  # Q8_0's second half (indexed: iterating a tensor unbinds it)
            out += torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed[i], GROUP, self.scale_zeros[i])
        return self._finish(out, x)

    def rows_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`forward` of float32 rows ``[N, in]`` (float32 ``[N, out]``), for the lean decoder's one-row steps:
        where the layer is one term without a bias, its kernel with the arguments bound once (the same tensors:
        equal bit for bit). :meth:`forward` reshapes, indexes its stacked terms and reads its buffers through
        ``nn.Module.__getattr__`` at every call: 15 us of a one-row call's 40-75 on SmolLM2's shapes."""
        if self.packed.shape[0] != 1 or self.bias is not None or self.in_features % GROUP:
            return self.forward
        return partial(_int4_rows, packed=self.packed[0], scale_zeros=self.scale_zeros[0])


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default if kernels_available() else None


def _int4_rows(rows: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
    """The int4 kernel on float rows ``[N, in]``: float32 ``[N, out]`` (:meth:`Int4Linear.rows_forward`)."""
    return _INT4_MM(rows.to(_COMPUTE), packed, GROUP, scale_zeros).float()  # type: ignore[misc]


def _pack(blocks: Blocks) -> torch.Tensor:
    """4-bit codes as the CPU kernel reads them."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(blocks.codes.astype(np.int32)), 1)


def scale_zeros(blocks: Blocks, dtype: torch.dtype = _COMPUTE) -> torch.Tensor:
    """The kernel's ``[groups, rows, 2]`` (scale, zero) for ``w = scale * (code - 8) + zero``, in ``dtype``
    (the layers keep bfloat16: see the module docstring; in float32 the kernel reproduces the file)."""
    scales = torch.from_numpy(blocks.scales.astype(np.float32))  # [rows, groups]
    offsets = blocks.offsets if blocks.offsets is not None else np.zeros_like(blocks.scales)
    zeros = torch.from_numpy(offsets.astype(np.float32)) + (8 - blocks.center) * scales  # exact in float32
    return torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()


def nibble_halves(blocks: Blocks) -> list[Blocks]:
    """Q8_0 as two 4-bit matrices whose sum is it (see :class:`Int4Linear`)."""
    unsigned = (blocks.codes.astype(np.int16) + 128).astype(np.uint8)
    high = Blocks(blocks.kind, unsigned >> 4, (blocks.scales.astype(np.float32) * 16).astype(np.float16), None, 8)
    return [high, Blocks(blocks.kind, unsigned & 0x0F, blocks.scales, None, 0)]


class Int8Linear(QuantLinear):
    """``nn.Linear`` over int8 codes with one scale per output feature (absmax, symmetric).

    Built from float rows (:meth:`from_float`, :meth:`from_blocks`), a few thousand rows at a time, so
    that a large output layer is never whole in float32 while it is quantized.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kind: str) -> None:
        rows, cols = codes.shape
        super().__init__(cols, rows, bias)
        self.kind = kind
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(_COMPUTE))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, kind: str = "int8") -> Int8Linear:
        chunks = (weight[i : i + _CHUNK_ROWS].detach().float() for i in range(0, weight.shape[0], _CHUNK_ROWS))
        return cls(*_absmax_int8(chunks), bias, kind)

    @classmethod
    def from_blocks(cls, blocks: Blocks, bias: torch.Tensor | None = None, kind: str | None = None) -> Int8Linear:
        rows = blocks.shape[0]
        chunks = (torch.from_numpy(blocks.dequantize(i, i + _CHUNK_ROWS)) for i in range(0, rows, _CHUNK_ROWS))
        return cls(*_absmax_int8(chunks), bias, kind or blocks.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_COMPUTE)
        return self._finish(torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales), x)


def _absmax_int8(chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = [], []
    for weight in chunks:
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        codes.append(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(codes), torch.cat(scales)


class Fp16Linear(QuantLinear):
    """``nn.Linear`` with float16 weights and float32 activations and output (fbgemm's packed GEMM, as
    ``torch.ao``'s dynamic fp16 linear runs it): for the output layer, whose logits a bfloat16 output
    would round by up to 0.06 (top-1 agreement 93-97% against 98% with this layer)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kind: str = "fp16") -> None:
        rows, cols = weight.shape
        super().__init__(cols, rows, None)
        self.kind = kind
        self.packed_nbytes = rows * cols * 2  # held by fbgemm, not by a tensor
        bias = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self.packed)
        return self._finish(out, x)


def fp16_available() -> bool:
    """Whether this build of PyTorch has fbgemm (x86), which :class:`Fp16Linear` runs on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Embedding(nn.Module):
    """``nn.Embedding`` over Q8_0's int8 codes and fp16 group scales: a looked-up row is exact."""

    def __init__(self, blocks: Blocks, dtype: torch.dtype) -> None:
        super().__init__()
        if blocks.bits != 8 or blocks.center or blocks.offsets is not None:
            raise ValueError(f"Int8Embedding takes Q8_0 blocks, not {blocks.kind}")
        self.num_embeddings, self.embedding_dim = blocks.shape
        self.kind = blocks.kind
        self.dtype = dtype
        # the blocks' own arrays where they are contiguous and writable: a copy of a table is a large temporary
        self.register_buffer("codes", torch.from_numpy(np.require(blocks.codes, requirements="CW")))
        self.register_buffer("scales", torch.from_numpy(np.require(blocks.scales, requirements="CW")))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids).to(self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The table's rows at ``index``, exact in float32 (``d q``: 11 by 8 significant bits)."""
        codes = self.codes[index].to(torch.float32).unflatten(-1, (-1, GROUP))
        return (codes * self.scales[index].to(torch.float32)[..., None]).flatten(-2)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind}"


class RescoredHead(QuantLinear):
    """An output layer tied to a Q8_0 table, ranked in 4 bits and scored exactly where it counts.

    Every token's logit comes from the table re-quantized to 4-bit codes (one int4 matmul, bfloat16: off by
    a few tenths); the ``candidates`` best of each row are then scored again in float32 from the table's own
    rows (:meth:`Int8Embedding.rows`), so the most likely tokens (what greedy decoding, top-k, top-p and
    reported log-probabilities read) carry the float model's logits. The table is the embedding's, shared:
    the layer adds 17 MiB of 4-bit codes for SmolLM2, where an fp16 layer packed by fbgemm takes 98 (its
    blocks pad the 576 inputs to 1024).
    """

    candidates = 64

    def __init__(self, table: Int8Embedding) -> None:
        rows, cols = table.num_embeddings, table.embedding_dim
        super().__init__(cols, rows, None)
        self.kind = table.kind
        self.table = [table]  # a list: not a submodule (the model holds it as its embedding)
        ranks = (rtn_int4(table.rows(torch.arange(i, min(i + _CHUNK_ROWS, rows)))) for i in range(0, rows, _CHUNK_ROWS))
        packed, kernel_scales = zip(*((_pack(b), scale_zeros(b)) for b in ranks), strict=True)
        self.register_buffer("packed", torch.cat(packed))  # packed in blocks of 64 rows: chunks concatenate
        self.register_buffer("scale_zeros", torch.cat(kernel_scales, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        logits = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(_COMPUTE), self.packed, GROUP, self.scale_zeros)
        logits = logits.float()
        best = logits.topk(min(self.candidates, self.out_features), dim=-1).indices  # [rows, candidates]
        exact = torch.bmm(self.table[0].rows(best), flat[:, :, None])[..., 0]
        return self._finish(logits.scatter_(1, best, exact), x)


def rtn_int4(weight: torch.Tensor) -> Blocks:
    """A float matrix as asymmetric 4-bit codes per group of 32 (round to nearest, Q4_1's form)."""
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).to(torch.float16)
    safe = scales.float().clamp(min=torch.finfo(torch.float16).tiny)
    offsets = low.to(torch.float16)
    codes = torch.round((groups - offsets.float()[..., None]) / safe[..., None]).clamp(0, 15)
    return Blocks("int4", codes.reshape(rows, cols).to(torch.uint8).numpy(), scales.numpy(), offsets.numpy(), 0)
