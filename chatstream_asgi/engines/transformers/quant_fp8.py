"""FP8 linear layers for Hopper (and Ada) GPUs: W8A8 with per-channel weight scales and per-token
activation scales, through ``torch._scaled_mm``.

A decode step at batch 1 reads every weight once: bound by the weights' bytes (the 8B shape's
bf16 step took 5.76 ms on an H100 against a 4.87 ms read floor). ``float8_e4m3fn`` weights halve
the bytes. The weight's scale is per output feature (absmax / 448, e4m3's largest value), the
activation's per row (token), computed in the step: both are device tensors, so the layer runs
inside a captured CUDA graph and under ``torch.compile`` (``_scaled_mm`` is an inductor op). The
rowwise-scaled ``_scaled_mm`` needs sm89+ and returns bfloat16; this is vLLM's "FP8 dynamic" scheme.

The output layer (``lm_head``) and the embeddings stay in the model's dtype, as vLLM keeps them:
the logits are the most sensitive product of the model.
"""

from __future__ import annotations

import torch

from chatstream_asgi.engines.transformers.quant_linear import QuantLinear

__all__ = ["FP8_MAX", "Fp8Linear", "fp8_fits"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12


def fp8_fits(out_features: int, in_features: int) -> bool:
    """Whether ``_scaled_mm`` takes this shape (both dimensions multiples of 16)."""
    return out_features % 16 == 0 and in_features % 16 == 0


class Fp8Linear(QuantLinear):
    """``nn.Linear`` with ``float8_e4m3fn`` weights (a scale per output feature) and activations
    quantized per token at every call; output in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        rows, cols = weight.shape
        if not fp8_fits(rows, cols):
            raise ValueError(f"Fp8Linear needs both dimensions in multiples of 16 ({rows}x{cols})")
        super().__init__(cols, rows, bias)
        weight = weight.detach()
        scale = (weight.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)  # [out, 1]
        self.register_buffer("weight", (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out], as _scaled_mm takes it
        self.kind = "fp8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)  # [rows, 1]
        quantized = (flat.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 and x.is_cuda else x.dtype
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=out_dtype
        )
        return self._finish(out, x)
