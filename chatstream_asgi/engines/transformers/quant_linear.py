"""What the quantized linear layers share: :mod:`.quant_cpu`'s int4, int8 and fp16 layers, :mod:`.quant_fp8`'s FP8."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """A linear layer over quantized bytes: its shape, the bias, and the weights as buffers, not parameters
    (the model's ``dtype`` stays its float one). ``_finish`` turns a kernel's output into the layer's."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
