"""Which weights are quantized, to what, on which device; and what the weights then weigh.

``quantization`` (the engine's and the CLI's ``--quantization``):

- None, the default: what the checkpoint holds. A GGUF's Q4_0 / Q4_1 / Q8_0 matrices stay quantized
  on the CPU (:mod:`.gguf_loading`); on CUDA they are dequantized to the model's dtype as before. A
  float checkpoint stays float; one that transformers loads quantized keeps transformers' modules.
- ``"none"``: every weight in the model's dtype (a GGUF dequantized, as transformers loads it).
- ``"int4"`` / ``"int8"`` (CPU): the linear layers of the decoder to 4-bit codes per group of 32
  (round to nearest, scale and zero per group) or to int8 per output feature, :mod:`.quant_cpu`'s
  kernels; the output layer to float16 weights with float32 activations. A GGUF's blocks stay as
  the file has them; its float matrices are quantized so.
- ``"fp8"`` (CUDA, sm89+): the decoder's linear layers to FP8 weights (:mod:`.quant_fp8`: weight-only
  up to 16 rows where Triton is installed, W8A8 above), the output layer and the embeddings kept; the
  projections that read one input (query/key/value, gate/up) joined into one layer each where the
  model's classes allow (:mod:`.quant_joined`).

Swapping happens at the ``nn.Module`` level (a quantized module in place of each ``nn.Linear``),
so the engine's steps, graphs and compiled blocks run the model unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections import Counter

import torch
from torch import nn

from chatstream_asgi.engines.transformers.quant_cpu import (
    Fp16Linear,
    Int4Linear,
    Int8Linear,
    fp16_available,
    int4_fits,
    kernels_available,
    rtn_int4,
)
from chatstream_asgi.engines.transformers.quant_fp8 import Fp8Linear, fp8_fits
from chatstream_asgi.engines.transformers.quant_joined import join_projections

__all__ = ["QUANTIZATION_MODES", "check_quantization", "quantize_model", "release_freed_memory", "weight_footprint"]

logger = logging.getLogger("chatstream_asgi.engine")

QUANTIZATION_MODES = ("none", "int8", "int4", "fp8")
_CPU_MODES = ("int8", "int4")


def check_quantization(mode: str | None, device: torch.device) -> None:
    """Raise ValueError for a mode this device has no kernel for (before anything slow)."""
    if mode is not None and mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization {mode!r}: expected one of {', '.join(QUANTIZATION_MODES)}")
    if mode == "fp8" and device.type != "cuda":
        raise ValueError(
            "--quantization fp8 needs a CUDA GPU with FP8 tensor cores (Ada, Hopper); on CPU use int4/int8"
        )
    if mode in _CPU_MODES and device.type != "cpu":
        raise ValueError(f"--quantization {mode} has CPU kernels only here; on {device.type} use fp8 (or none)")
    if mode in _CPU_MODES and not kernels_available():
        raise ValueError(f"--quantization {mode} needs PyTorch 2.6 or later (its CPU weight-packed matmuls)")


def quantize_model(model: nn.Module, mode: str, join: bool = True) -> Counter[str]:
    """Replace ``model``'s ``nn.Linear`` modules by ``mode``'s (see the module docstring); returns what
    became what. Shapes the kernel does not take stay float. ``join`` (FP8): join the projections that
    read one input (:func:`.quant_joined.join_projections`)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done: Counter[str] = Counter()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.weight.is_meta:
            continue
        rows, cols = module.weight.shape
        if module is output:
            if mode == "fp8" or not fp16_available():
                continue
            new: nn.Module = Fp16Linear(module.weight, module.bias)
        elif mode == "fp8" and fp8_fits(rows, cols):
            new = Fp8Linear(module.weight, module.bias)
        elif mode == "int4" and int4_fits(rows, cols):
            new = Int4Linear(rtn_int4(module.weight), module.bias)
        elif mode in _CPU_MODES:
            new = Int8Linear.from_float(module.weight, module.bias)
        else:
            done["kept (shape)"] += 1
            continue
        model.set_submodule(name, new)
        done[f"{'output ' if module is output else ''}{new.kind}"] += 1  # type: ignore[attr-defined]
    if mode == "fp8" and join:
        done.update(join_projections(model))
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()  # the float weights' memory back to the device: the KV budget counts on it
    else:
        release_freed_memory()
    logger.info("quantized to %s: %s", mode, ", ".join(f"{n} {k}" for k, n in sorted(done.items())) or "nothing")
    return done


def weight_footprint(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) the model holds: parameters and quantized codes and scales, each storage once."""
    seen: set[int] = set()
    count = size = 0
    for module in model.modules():
        quantized = hasattr(module, "kind")
        if quantized:  # its weights as the float layer it replaces counts them
            count += getattr(module, "in_features", 0) * getattr(module, "out_features", 0) or (
                module.num_embeddings * module.embedding_dim
            )
        size += getattr(module, "packed_nbytes", 0)  # held outside any tensor (fbgemm's packed weights)
        parameters = {id(p) for p in module.parameters(recurse=False)}
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            storage = tensor.untyped_storage()
            if tensor.is_meta or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            size += storage.nbytes()
            count += tensor.numel() if id(tensor) in parameters and not quantized else 0
    return count, size


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``), so that the resident
    memory shows the quantized weights, not the float ones freed while loading (130 MB for SmolLM2)."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)
