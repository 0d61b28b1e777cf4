"""What FlashAttention's variable-length call computes, in plain PyTorch (float32 sums), for the tests."""

from __future__ import annotations

import itertools

import torch


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: tuple[torch.Tensor, int, int],
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    """``query`` ``[T, H, D]`` over ``key``/``value`` ``[L, KV, D]`` sequence by sequence (``bounds[0]``: the
    queries' and keys' offsets), causal from each sequence's end, within ``window``; a query that sees no
    key gets zeros (as the kernel writes)."""
    offsets = bounds[0].tolist()
    heads, kv_heads = query.shape[1], key.shape[1]
    out = torch.zeros_like(query)
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(offsets[0]), itertools.pairwise(offsets[1]), strict=True):
        m, n = q1 - q0, k1 - k0
        if not m or not n:
            continue
        at = torch.arange(m, device=query.device)[:, None] + (n - m)  # each query's own key index
        keys = torch.arange(n, device=query.device)[None, :]
        allowed = (keys <= at) & (keys > at - window if window is not None else True)
        k = key[k0:k1].float().repeat_interleave(heads // kv_heads, dim=1)
        v = value[k0:k1].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("mhd,nhd->hmn", query[q0:q1].float(), k) * scaling
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hmn,nhd->mhd", probs, v).to(query.dtype)
    return out
