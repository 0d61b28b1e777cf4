"""Weight-only FP8 matmul for steps of a few rows: ``y = x @ (w_fp8 * scale[:, None]).T``, Triton kernels
behind the ``chatstream::fp8_gemv`` op.

Why: a decode step of a few rows reads each weight once, so its matmuls are bound by the weights' bytes.
``torch._scaled_mm`` (W8A8) tiles the output in 64-128 column blocks, which for one row leaves most of an
H100's SMs idle, and it needs the activations quantized per token first (a reduction and a cast per layer).
Here the activations stay in bfloat16 (or float16), each program reads ``BLOCK_N`` whole rows of the FP8
weight, converts them in registers (e4m3 is exact in bf16 and fp16), accumulates in float32 and applies
the per-output-channel scale once at the end. Two kernels, by rows:

- one row (a decode step of one sequence): multiplies and sums in a float32 tile per program, reduced
  once after the loop (:func:`_row_kernel`);
- 2 and more rows: one ``tl.dot`` tile of 16 rows per program and K block (:func:`_tile_kernel`).

One kernel a call, no workspace. No split-K: the engine's FP8 layers join their narrow projections
(:mod:`.quant_joined`: query/key/value 6144 and gate/up 28672 columns on the 8B shape), so the narrowest
layers left have 4096 columns, 512 programs of 8 at one row; a split-K reduction would add a kernel
(zeroing, or reducing the partial sums) a layer.

A ``torch.library.custom_op``: opaque to inductor and captured as it is in CUDA graphs. ``triton.autotune``
picks each kernel's blocks per (N, K) on the first call with that shape; the engine runs every shape once
before it captures it (``graphs.capture_graph``'s warm-up, ``compiled_step``'s side-stream calls), so the
benchmarking never happens inside a capture. Needs Triton, which ships with PyTorch's CUDA wheels:
:mod:`.quant_fp8` imports this module only where it is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ROW_CONFIGS", "TILE_CONFIGS", "fp8_gemv"]

TILE_ROWS = 16
"""Rows a program of the tile kernel multiplies (``tl.dot`` takes no block under 16)."""


def _configs(*blocks: tuple[int, int, int, int]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for n, k, warps, stages in blocks
    ]


ROW_CONFIGS = _configs(
    (4, 2048, 4, 2),
    (8, 512, 4, 3),
    (8, 1024, 4, 2),
    (8, 1024, 8, 2),
    (8, 2048, 8, 2),
    (16, 512, 4, 3),
    (16, 1024, 8, 2),
    (32, 512, 8, 2),
)
"""The one-row kernel's blocks: ``BLOCK_N`` weight rows a program, ``BLOCK_K`` bytes of each a load: 4-16 KB a
load, 32-64 bytes a thread (the bytes in flight against the registers the float32 tile takes); on the 8B
shape's layers 128-7168 programs, fewer rows a program giving more programs and more reads of x."""

TILE_CONFIGS = _configs(
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (16, 1024, 4, 2),
    (32, 256, 4, 4),
    (32, 512, 8, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
)
"""The tile kernel's blocks (``BLOCK_N`` at least 16, ``tl.dot``'s least)."""


def _even_k(args: dict[str, int]) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


@triton.autotune(configs=ROW_CONFIGS, key=["N", "K"])
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _row_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """One row: ``BLOCK_N`` output channels a program, all of K. Products are summed per lane in a
    ``[BLOCK_N, BLOCK_K]`` float32 tile and reduced across lanes once, after the loop: a reduction per
    block would synchronise the program's warps at every load."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn[:, None] < N
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok, other=0.0)
            x = tl.load(x_ptr + k0 + rk)
        else:
            k_ok = k0 + rk < K
            w = tl.load(w_ptrs, mask=n_ok & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + k0 + rk, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.autotune(configs=TILE_CONFIGS, key=["N", "K"])
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _tile_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """``BLOCK_M`` rows of x against ``BLOCK_N`` output channels a program, all of K: one ``tl.dot`` per
    K block, the weights converted to x's dtype in registers."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    n_ok = rn[:, None] < N
    m_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok, other=0.0)
        else:
            k_ok = (k0 + rk)[None, :] < K
            w = tl.load(w_ptrs, mask=n_ok & k_ok, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = acc * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
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
    if rows == 1:
        _row_kernel[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)](
            x, weight, scale, y, out_features, cols, weight.stride(0)
        )
        return y

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(rows, TILE_ROWS)

    _tile_kernel[grid](
        x, weight, scale, y, rows, out_features, cols, x.stride(0), weight.stride(0), y.stride(0), BLOCK_M=TILE_ROWS
    )
    return y


@fp8_gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
