"""Weight-only FP8 matmul for steps of a few rows: ``y = x @ (w_fp8 * scale[:, None]).T``, a Triton kernel
behind the ``chatstream::fp8_gemv`` op.

Why: a decode step of a few rows reads each weight once, so its matmuls are bound by the weights' bytes.
``torch._scaled_mm`` (W8A8) tiles the output in 64-128 column blocks, which for one row leaves most of an
H100's SMs idle, and it needs the activations quantized per token first (a reduction and a cast per layer).
Here the activations stay in bfloat16 (or float16), each program reads ``BLOCK_N`` whole rows of the FP8
weight, converts them in registers (e4m3 is exact in bf16 and fp16), accumulates in float32 and applies
the per-output-channel scale once at the end. One kernel, no workspace: the output blocks alone fill the
GPU (4096 columns / 16 = 256 programs; the 1024-column k/v projections, 128 in blocks of 8 at one row),
which a split-K reduction would only beat by adding a kernel (zeroing or reducing) per layer, more than
it saves at these sizes.

A ``torch.library.custom_op``: opaque to inductor and captured as it is in CUDA graphs. ``triton.autotune``
picks the block sizes per (N, K, BLOCK_M) on the first call with that key; the engine runs every shape
once before it captures it (``graphs.capture_graph``'s warm-up, ``compiled_step``'s side-stream calls),
so the benchmarking never happens inside a capture. Needs Triton, which ships with PyTorch's CUDA wheels:
:mod:`.quant_fp8` imports this module only where it is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fits", "fp8_gemv"]

_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
    for n, k, warps, stages in (
        (8, 512, 4, 3),  # one row only: 128 programs for the 1024-column k/v projections
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (32, 512, 8, 3),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
    )
]


def fits(config: triton.Config, block_m: int) -> bool:
    """Whether ``config`` compiles for ``block_m`` rows: ``tl.dot`` takes no block under 16."""
    return block_m == 1 or config.kwargs["BLOCK_N"] >= 16


def _prune(configs: list[triton.Config], named_args: dict[str, object], **kwargs: int) -> list[triton.Config]:
    return [config for config in configs if fits(config, kwargs["BLOCK_M"])]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One program: rows ``BLOCK_M * pid_m ...`` of x against ``BLOCK_N`` output channels, all of K.
    ``BLOCK_M == 1``: a multiply and a row sum (one token); else one ``tl.dot`` per K block."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    n_ok = rn[:, None] < N
    m_ok = rm[:, None] < M
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok, other=0.0)
        else:
            k_ok = (k0 + rk)[None, :] < K
            w = tl.load(w_ptrs, mask=n_ok & k_ok, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    y = acc * scale[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok & (rn[None, :] < N))


@torch.library.custom_op("chatstream::fp8_gemv", mutates_args=())
def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (bf16 or fp16) times ``weight [N, K]`` (``float8_e4m3fn``, row-major) scaled by
    ``scale`` (N float32 values, any shape): ``[M, N]`` in x's dtype. Any M is right; a few rows are fast
    (the weights are read once per 16 rows)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    out_features = weight.shape[0]
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    block_m = 1 if rows == 1 else 16

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(rows, block_m)

    _kernel[grid](
        x, weight, scale, y, rows, out_features, cols, x.stride(0), weight.stride(0), y.stride(0), BLOCK_M=block_m
    )
    return y


@fp8_gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
