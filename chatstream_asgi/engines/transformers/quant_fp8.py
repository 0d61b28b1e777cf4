"""FP8 linear layers for Hopper (and Ada) GPUs: ``float8_e4m3fn`` weights with a scale per output feature,
run weight-only for steps of a few rows and W8A8 (per-token activation scales, ``torch._scaled_mm``) above.

A decode step at batch 1 reads every weight once: bound by the weights' bytes (the 8B shape's bf16 step
took 5.76 ms on an H100 against a 4.87 ms read floor). FP8 weights halve the bytes. The weight's scale is
per output feature (absmax / 448, e4m3's largest value).

- Up to :data:`WEIGHT_ONLY_ROWS` rows (decode steps of few sequences), where CUDA and Triton are there and
  the activations are bf16 or fp16: :mod:`.fp8_gemv`'s kernel reads the FP8 weights at full bandwidth and
  keeps the activations as they are. ``_scaled_mm`` lost there: its output tiles leave most SMs idle at
  one row, and each layer first quantized its activations (a reduction and a cast).
- More rows (prefill, large batches): W8A8, vLLM's "FP8 dynamic" scheme: the activations scaled per row
  (token) in the step, ``torch._scaled_mm`` rowwise (sm89+, bfloat16 out) on the FP8 tensor cores. Not a
  dequantized bf16 GEMM: that would write and read a bf16 copy of every weight each call, three bytes a
  weight against one.

Which path runs depends on the rows alone (static in a captured graph; a shape guard under
``torch.compile``). Both run inside captured CUDA graphs and compiled blocks. The two paths round
differently, so a sequence's logits can differ by how many rows its step had (as bf16 GEMMs' do).

The output layer (``lm_head``) and the embeddings stay in the model's dtype, as vLLM keeps them:
the logits are the most sensitive product of the model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from chatstream_asgi.engines.transformers.quant_linear import QuantLinear

__all__ = ["FP8_MAX", "WEIGHT_ONLY_ROWS", "Fp8Linear", "fp8_fits", "weight_only_available"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
WEIGHT_ONLY_ROWS = 16
"""The most rows a step runs weight-only (the kernel's one ``tl.dot`` tile); more run W8A8."""
_WEIGHT_ONLY_DTYPES = (torch.bfloat16, torch.float16)
_TINY = 1e-12


def fp8_fits(out_features: int, in_features: int) -> bool:
    """Whether ``_scaled_mm`` takes this shape (both dimensions multiples of 16)."""
    return out_features % 16 == 0 and in_features % 16 == 0


def weight_only_available() -> bool:
    """Whether the weight-only kernel is there: Triton installed (it comes with PyTorch's CUDA wheels),
    its op registered (``torch.ops.chatstream.fp8_gemv``). Imports Triton."""
    if importlib.util.find_spec("triton") is None:
        return False
    import chatstream_asgi.engines.transformers.fp8_gemv  # noqa: F401  (registers the op)

    return True


class Fp8Linear(QuantLinear):
    """``nn.Linear`` with ``float8_e4m3fn`` weights (a scale per output feature); output in the input's
    dtype. Weight-only up to :data:`WEIGHT_ONLY_ROWS` rows where the kernel is there (the weights on CUDA
    when the layer is built), W8A8 otherwise.

    ``weight``: the float weight, quantized here; or, with ``scale`` (``[1, out]`` float32), its e4m3 codes.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> None:
        rows, cols = weight.shape
        if not fp8_fits(rows, cols):
            raise ValueError(f"Fp8Linear needs both dimensions in multiples of 16 ({rows}x{cols})")
        super().__init__(cols, rows, bias)
        weight = weight.detach()
        if scale is None:
            scale = (weight.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY).t()
            weight = (weight.float() / scale.t()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.contiguous())  # [1, out], as _scaled_mm takes it
        self.weight_only_rows = WEIGHT_ONLY_ROWS if weight.is_cuda and weight_only_available() else 0
        self.kind = "fp8"

    @classmethod
    def joined(cls, layers: Sequence[Fp8Linear]) -> Fp8Linear:
        """One layer whose output is ``layers``' outputs side by side (layers reading one input): their
        codes, scales and biases concatenated by output feature. Exact: every feature keeps its codes and
        scale. The layers must share ``in_features`` and have a bias each or none."""
        if len({layer.in_features for layer in layers}) != 1 or len({layer.bias is None for layer in layers}) != 1:
            raise ValueError("joined FP8 layers need one input size and a bias on each or on none")
        biases = [layer.bias for layer in layers if layer.bias is not None]
        return cls(
            torch.cat([layer.weight for layer in layers]),
            torch.cat(biases) if biases else None,
            torch.cat([layer.weight_scale for layer in layers], dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.weight_only_rows and flat.dtype in _WEIGHT_ONLY_DTYPES:
            return self._finish(torch.ops.chatstream.fp8_gemv(flat, self.weight, self.weight_scale), x)
        scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)  # [rows, 1]
        quantized = (flat.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 and x.is_cuda else x.dtype
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=out_dtype
        )
        return self._finish(out, x)
