"""The split-KV Triton kernel for a step's prompt chunk (``split_chunk.py``) computes what FlashAttention's
variable-length call does (the reference): packed sequences, causal from each end, windows, grouped heads,
padding queries that see no key, any number of key splits.

Runs on CUDA (``CHATSTREAM_TEST_DEVICE=cuda``, bf16) or on CPU under Triton's interpreter (float32). The
interpreter is chosen when Triton is imported, so on a CPU :func:`test_in_the_interpreter` runs this file
again, with the engine's packed-prompts test through the kernel, in a process started with
``TRITON_INTERPRET=1`` (as ``test_fp8_gemv.py`` does). Skipped where Triton does not import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from attention_reference import varlen_attention

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu") == "cuda" and not INTERPRET
runs_here = pytest.mark.skipif(not (INTERPRET or CUDA), reason="on a CPU test_in_the_interpreter runs these")

from chatstream_asgi.engines.transformers import flash_chunk  # noqa: E402
from chatstream_asgi.engines.transformers.flash_chunk import captured_split_attend  # noqa: E402
from chatstream_asgi.engines.transformers.split_chunk import (  # noqa: E402
    choose_splits,
    split_attend,
    split_attend_launch,
    split_takes,
)

DEVICE = torch.device("cuda" if CUDA else "cpu")
CUDA_ONLY = "needs CHATSTREAM_TEST_DEVICE=cuda (FlashAttention, CUDA graphs)"
ENGINE_TEST = "tests/engine/test_flash_chunk.py::test_prompts_packed_in_one_chunk_each_attend_their_own_keys"


@pytest.mark.skipif(CUDA or INTERPRET, reason="the kernel runs here")
def test_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", __file__, ENGINE_TEST]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2]
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-4000:]
    expected = ("the kernel runs here", CUDA_ONLY)
    assert all(line.endswith(expected) for line in skipped), skipped  # nothing else skipped


DTYPE = torch.bfloat16 if CUDA else torch.float32
TOLERANCE = {"atol": 2e-2, "rtol": 2e-2} if CUDA else {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def _interpreter_loop_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter turns a scalar (held as a one-element array) into a ``range`` bound with
    ``int(array)``, which NumPy 2.4 refuses; 3.8 squeezes it first. Do as 3.8 does (interpreter only)."""
    if not INTERPRET:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


def packed(heads: int, kv_heads: int, dim: int = 32) -> tuple[torch.Tensor, ...]:
    """``test_flash_chunk``'s packing: 7 queries after 20 cached keys, 9 new, an empty sequence, and 16
    padding queries over 12 padding columns (the first 4 of them see no key)."""
    torch.manual_seed(0)
    offsets = torch.tensor([[0, 7, 16, 16, 32], [0, 27, 36, 36, 48]], dtype=torch.int32, device=DEVICE)
    query = torch.randn(32, heads, dim, device=DEVICE, dtype=DTYPE)
    key = torch.randn(48, kv_heads, dim, device=DEVICE, dtype=DTYPE)
    value = torch.randn(48, kv_heads, dim, device=DEVICE, dtype=DTYPE)
    return query, key, value, offsets


@runs_here
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_heads", [8, 2, 1])  # grouped-query ratios 1, 4, 8
@pytest.mark.parametrize("splits", [1, 3])
def test_packed_sequences_match_the_reference(window: int | None, kv_heads: int, splits: int) -> None:
    """Small tiles (16) so that query blocks cross sequences' ends and key runs are not whole tiles."""
    query, key, value, offsets = packed(8, kv_heads)
    bounds = (offsets, 32, 48)
    out = split_attend_launch(query, key, value, offsets, 32, 48, 0.17, window, splits=splits, block_m=16, block_n=16)
    expected = varlen_attention(query, key, value, bounds, 0.17, window)
    assert torch.isfinite(out).all()
    assert not out[16:20].any()  # padding queries that see no key: zeros
    torch.testing.assert_close(out, expected, **TOLERANCE)


@runs_here
@pytest.mark.parametrize("window", [None, 1, 33, 500])
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_a_long_continued_sequence_split_unevenly(window: int | None, splits: int) -> None:
    """40 queries after 100 cached keys (140: not a whole number of tiles), then 3 padding queries over none."""
    torch.manual_seed(1)
    offsets = torch.tensor([[0, 40, 43], [0, 140, 140]], dtype=torch.int32, device=DEVICE)
    query = torch.randn(43, 4, 16, device=DEVICE, dtype=DTYPE)
    key, value = (torch.randn(140, 2, 16, device=DEVICE, dtype=DTYPE) for _ in range(2))
    out = split_attend_launch(query, key, value, offsets, 43, 140, 0.25, window, splits=splits, block_m=16, block_n=16)
    expected = varlen_attention(query, key, value, (offsets, 43, 140), 0.25, window)
    assert not out[40:].any()
    torch.testing.assert_close(out, expected, **TOLERANCE)


@runs_here
@pytest.mark.parametrize("dim", [64, 128])
def test_the_op_with_default_tiles_and_a_strided_query(dim: int) -> None:
    """Through the custom op (the engine's path): default tiles, the split count chosen from the shapes, and a
    query that is a transposed view (as ``SlotStep.attend`` passes it), with no copy needed, and offsets that
    are the first columns of a wider buffer (as ``StepRunner`` slices its ``_bounds``)."""
    torch.manual_seed(2)
    buffer = torch.full((2, 9), 10_000, dtype=torch.int32, device=DEVICE)
    buffer[:, :3] = torch.tensor([[0, 70, 80], [0, 200, 210]], dtype=torch.int32)
    offsets = buffer[:, :3]
    query = torch.randn(4, 80, dim, device=DEVICE, dtype=DTYPE).transpose(0, 1)  # [80, 4, dim], strided
    key, value = (torch.randn(210, 2, dim, device=DEVICE, dtype=DTYPE) for _ in range(2))
    bounds = (offsets, 80, 210)
    assert choose_splits(80, 210, 4, 132) > 1
    out = split_attend(query, key, value, bounds, dim**-0.5, None)
    torch.testing.assert_close(out, varlen_attention(query, key, value, bounds, dim**-0.5, None), **TOLERANCE)


@runs_here
def test_the_split_count_is_a_function_of_the_shapes() -> None:
    """A 128-token chunk of 32 heads: 64 programs unsplit; splits fill the SMs, bounded by the keys."""
    assert choose_splits(128, 64, 32, 132) == 1  # one key tile: nothing to split
    assert choose_splits(128, 256, 32, 132) == 2  # four tiles, two each at least
    assert choose_splits(128, 2048, 32, 132) == choose_splits(128, 1024, 32, 132) > 2
    assert choose_splits(2048, 2048, 32, 132) == 1  # enough query blocks already
    assert choose_splits(16, 1 << 20, 1, 100_000) == 32  # at most MAX_SPLITS
    assert split_takes(64) and split_takes(128) and split_takes(16)
    assert not split_takes(96) and not split_takes(256) and not split_takes(8)


@runs_here
def test_compiled_callers_see_an_opaque_op() -> None:
    """``torch.compile`` (fake tensors, functionalization: ``aot_eager``) calls the op without tracing into it,
    through the engine's kernel (:func:`captured_split_attend`: compiled, it takes the split kernel)."""
    query, key, value, offsets = packed(8, 2)
    bounds = (offsets, 32, 48)

    def chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return captured_split_attend(q * 1.0, k, v, bounds, 0.17, 5) + 0.0

    compiled = torch.compile(chunk, backend="aot_eager", fullgraph=True)
    expected = varlen_attention(query, key, value, bounds, 0.17, 5)
    torch.testing.assert_close(compiled(query, key, value), expected, **TOLERANCE)


@pytest.mark.skipif(not CUDA, reason=CUDA_ONLY)
def test_the_engine_kernel_splits_in_graphs_and_calls_flash_attention_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eagerly (an uncaptured step) the engine's chunk kernel is FlashAttention's call, whose host cost is a
    third of the custom op's; captured in a CUDA graph it is the split kernel, and the replay gives its output."""
    query, key, value, offsets = packed(8, 2)
    bounds = (offsets, 32, 48)
    calls: list[torch.Tensor] = []
    original = flash_chunk.flash_attend

    def flash(*args: Any) -> torch.Tensor:
        calls.append(original(*args))
        return calls[-1]

    monkeypatch.setattr(flash_chunk, "flash_attend", flash)
    eager = captured_split_attend(query, key, value, bounds, 0.17, None)
    assert len(calls) == 1 and eager is calls[0]
    torch.testing.assert_close(eager, varlen_attention(query, key, value, bounds, 0.17, None), **TOLERANCE)
    expected = split_attend(query, key, value, bounds, 0.17, None)  # the kernel, eager (compiled before capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = captured_split_attend(query, key, value, bounds, 0.17, None)
    assert len(calls) == 1  # FlashAttention not called in the capture
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
