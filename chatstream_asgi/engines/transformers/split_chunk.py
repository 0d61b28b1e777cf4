"""A step's prompt-chunk attention split over the keys (flash-decoding style), as one Triton kernel and a merge.

Same contract as :func:`.flash_chunk.flash_attend`: ``query`` ``[T, H, D]`` over ``key``/``value`` ``[L, KV, D]``
(``H`` a multiple of ``KV``: query head ``h`` reads key/value head ``h // (H // KV)``), sequence by sequence as
the :data:`.flash_chunk.ChunkBounds` offsets pack them, causal from each sequence's end (its query ``i`` of
``m`` sees its keys ``j <= i + n - m``), within ``window`` (``j > i + n - m - window``) where given; a query that
sees no key (the padding's, where it has more queries than keys) gets zeros, never NaN.

Why: FlashAttention-2's variable-length kernel runs one thread block per (sequence, head, 128 queries), each
walking every key in turn: a 128-token chunk of a 32-head model fills 32 of an H100's 132 SMs, and its time
grows with the gathered keys (0.37 ms a step at 256 columns, 1.47 ms at 1,920 on the 1.1B shape). Here each
program takes one segment of its query block's visible keys (grid: query block x split, head, sequence),
writes its partial output and log-sum-exp, and one small kernel merges the splits (with one split the first
kernel writes the output itself). The split count is a static function of the shapes and the device's SM
count (no host sync, no branch on device values), so the call replays in a CUDA graph; the launch is a
``torch.library`` custom op with a fake implementation, so ``torch.compile`` calls it without tracing in.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

__all__ = ["choose_splits", "split_attend", "split_attend_launch", "split_takes"]

BLOCK_M = 64
"""Queries (rows of one head) per program."""
BLOCK_N = 64
"""Keys per inner step."""
MAX_SPLITS = 32
"""At most this many key segments per query block."""
MIN_BLOCKS_PER_SPLIT = 2
"""A split walks at least this many key blocks (fewer: the merge costs more than the split saves)."""
_LOG2E = 1.4426950408889634


def split_takes(head_dim: int) -> bool:
    """Whether the kernel takes heads of ``head_dim``: a power of two from 16 to 128 (``tl.dot`` and one tile)."""
    return 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter (tests): an H100's count, so the tests choose what the GPU would
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(
    longest_q: int, longest_k: int, heads: int, sms: int, block_m: int = BLOCK_M, block_n: int = BLOCK_N
) -> int:
    """Key segments per query block so that ``query blocks x heads x splits`` programs cover ``sms`` SMs, each
    segment at least :data:`MIN_BLOCKS_PER_SPLIT` key blocks: a function of the shapes only (graph-safe)."""
    base = max(1, math.ceil(longest_q / block_m)) * heads  # one sequence's programs (the joining request's)
    by_keys = max(1, math.ceil(longest_k / block_n) // MIN_BLOCKS_PER_SPLIT)
    return max(1, min(math.ceil(sms / base), by_keys, MAX_SPLITS))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, offsets_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_off,
    stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    qk_scale, window,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, key split), head, sequence: partial attention over the split's keys (log2 domain)."""
    block = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(offsets_ptr + seq)
    m_len = tl.load(offsets_ptr + seq + 1) - q_start
    k_start = tl.load(offsets_ptr + stride_off + seq)
    n_len = tl.load(offsets_ptr + stride_off + seq + 1) - k_start
    m0 = block * BLOCK_M
    if m0 >= m_len:
        return
    kv_head = head // GROUPS
    diag = n_len - m_len  # query i sees keys j <= i + diag
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < m_len
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=rows[:, None],
        other=0.0,
    )
    # the keys any row of the block sees, [lo, hi), cut into SPLITS segments of whole key blocks
    hi = tl.minimum(tl.minimum(m0 + BLOCK_M, m_len) + diag, n_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 + diag - window + 1, 0)
    span = tl.maximum(hi - lo, 0)
    per = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per
    s_hi = tl.minimum(s_lo + per, lo + span)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(s_lo, s_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        cols = offs_n < s_hi
        k = tl.load(
            k_ptr + (k_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
            mask=cols[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        allowed = cols[None, :] & (offs_n[None, :] <= offs_m[:, None] + diag)
        if HAS_WINDOW:
            allowed = allowed & (offs_n[None, :] > offs_m[:, None] + diag - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet: exp2(-inf) = 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(
            v_ptr + (k_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
            mask=cols[:, None],
            other=0.0,
        )
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw nothing: acc is 0, so 0
    if SPLITS == 1:
        tl.store(
            out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=rows[:, None],
        )
    else:
        t = q_start + offs_m
        tl.store(
            part_o_ptr + split * stride_ps + t[:, None] * stride_pt + head * stride_ph + offs_d[None, :],
            o,
            mask=rows[:, None],
        )
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + split * stride_ls + t * stride_lt + head, lse, mask=rows)


@triton.jit
def _merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    heads,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One token, all heads: the splits' partial outputs weighted by their log-sum-exps (zeros where none saw a key)."""
    t = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    live = offs_h < heads
    top = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        lse = tl.load(part_lse_ptr + s * stride_ls + t * stride_lt + offs_h, mask=live, other=float("-inf"))
        top = tl.maximum(top, lse)
    top = tl.where(top == float("-inf"), 0.0, top)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        lse = tl.load(part_lse_ptr + s * stride_ls + t * stride_lt + offs_h, mask=live, other=float("-inf"))
        w = tl.exp2(lse - top)
        o = tl.load(
            part_o_ptr + s * stride_ps + t * stride_pt + offs_h[:, None] * stride_ph + offs_d[None, :],
            mask=live[:, None],
            other=0.0,
        )
        den += w
        acc += w[:, None] * o
    out = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    tl.store(
        out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=live[:, None],
    )


def split_attend_launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    longest_q: int,
    longest_k: int,
    scaling: float,
    window: int | None,
    splits: int = 0,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """The kernels' launch (eager); tests and benchmarks may pass ``splits`` (0: :func:`choose_splits`) and tiles."""
    tokens, heads, dim = query.shape
    kv_heads = key.shape[1]
    assert heads % kv_heads == 0, f"query heads {heads} not a multiple of key/value heads {kv_heads}"
    assert split_takes(dim), f"head size {dim}: the split kernel takes powers of two from 16 to 128"
    assert offsets.dtype == torch.int32 and offsets.stride(1) == 1
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    if not splits:
        splits = choose_splits(longest_q, longest_k, heads, _sm_count(query.device), block_m, block_n)
    out = torch.empty(tokens, heads, dim, dtype=query.dtype, device=query.device)
    if splits > 1:
        part_o = torch.empty(splits, tokens, heads, dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(splits, tokens, heads, dtype=torch.float32, device=query.device)
    else:
        part_o, part_lse = out, out  # unused: the kernel writes ``out`` itself
    sequences = offsets.shape[1] - 1
    grid = (max(1, math.ceil(longest_q / block_m)) * splits, heads, sequences)
    _split_kernel[grid](
        query, key, value, offsets, out, part_o, part_lse,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        offsets.stride(0), out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        scaling * _LOG2E, window or 0,
        GROUPS=heads // kv_heads, HEAD_DIM=dim, SPLITS=splits, HAS_WINDOW=window is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(tokens,)](
            part_o, part_lse, out,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), heads,
            SPLITS=splits, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads), num_warps=4,
        )  # fmt: skip
    return out


@torch.library.custom_op("chatstream::split_chunk_attend", mutates_args=())
def _split_chunk_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    longest_q: int,
    longest_k: int,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    return split_attend_launch(query, key, value, offsets, longest_q, longest_k, scaling, window)


@_split_chunk_attend.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    longest_q: int,
    longest_k: int,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def split_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: tuple[torch.Tensor, int, int],
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    """:func:`.flash_chunk.flash_attend`'s contract (see the module docstring), through the custom op."""
    offsets, longest_q, longest_k = bounds
    return torch.ops.chatstream.split_chunk_attend(query, key, value, offsets, longest_q, longest_k, scaling, window)
