"""Mixture-of-experts layers in a form a CUDA graph can capture.

transformers runs the experts of its MoE blocks (Qwen3-MoE, Mixtral, gpt-oss, ...) through the function
``config._experts_implementation`` names (``transformers/integrations/moe.py``). The eager loop over the
experts a batch hit indexes by data and copies to the host, and grouped matrix products in float32 fall
back to a loop over ``offsets.tolist()``: neither can be captured ("Cannot copy between CPU and CUDA
tensors during CUDA graph capture", seen at start on Qwen3-MoE). Two implementations can:

- ``grouped_mm``: tokens sorted by expert, per-expert offsets counted on the device (``histc``), one
  grouped matrix product per projection: no host sync, static shapes. PyTorch's kernel takes bfloat16 on
  CUDA (compute capability 8.0 and up).
- ``batched_mm``: each (token, expert) pair's weights gathered and multiplied as one batch: any dtype,
  no host sync, but memory and work grow with tokens x experts a token x one expert's weights, so it
  suits small models and float32 checks, not a large model's prompt chunks.

:func:`prepare_experts` picks one where steps are captured: ``grouped_mm`` in bfloat16, else
``batched_mm``; elsewhere the model keeps what transformers chose.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["capturable_experts", "has_experts", "prepare_experts"]

logger = logging.getLogger("chatstream_asgi.engine")


def has_experts(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs experts through transformers' experts interface."""
    return any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in model.modules())


def capturable_experts(dtype: torch.dtype, device: torch.device) -> str:
    """The experts implementation a captured step of a model in ``dtype`` on ``device`` runs with."""
    if dtype == torch.bfloat16 and (device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)):
        return "grouped_mm"
    return "batched_mm"


def prepare_experts(model: Any, device: torch.device, *, graphs: bool) -> str | None:
    """Set ``model``'s experts implementation to a capturable one where its steps are captured (``graphs``);
    returns it (None: the model has no experts, or nothing is captured)."""
    if not graphs or not has_experts(model):
        return None
    choice = capturable_experts(model.dtype, device)
    if model.config._experts_implementation != choice:
        model.set_experts_implementation(choice)
        logger.info("experts run as %s (capturable in CUDA graphs, %s)", choice, model.dtype)
    return choice
