"""FlashAttention for a step's prompt chunk (``flash_chunk.py``): where it is used, and that it computes
what the reference computes (the coverage matrix checks the reference against the masked path, per
architecture: ``test_engine_coverage.py``, ``static-varlen``)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Any

import pytest
import torch
from attention_reference import varlen_attention
from test_engine_batching import collect, reference_greedy, request, run
from test_engine_static import LONG, static_engine

from chatstream_asgi.engines.base import GenerationParams
from chatstream_asgi.engines.transformers import flash_chunk, step_runner
from chatstream_asgi.engines.transformers.flash_chunk import (
    KERNEL_VARIABLE,
    chunk_kernel,
    flash_attend,
    flash_available,
    flash_takes,
)

CUDA = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu") == "cuda"


def test_float32_cpu_soft_capping_and_sinks_keep_the_masked_path() -> None:
    assert not flash_available(torch.device("cpu"), torch.bfloat16, 64)
    assert flash_takes({}) and flash_takes({"sliding_window": 4})
    assert not flash_takes({"softcap": 50.0}) and not flash_takes({"s_aux": torch.zeros(8)})
    if CUDA:
        cuda = torch.device("cuda")
        assert flash_available(cuda, torch.bfloat16, 64) and flash_available(cuda, torch.float16, 128)
        assert not flash_available(cuda, torch.float32, 64) and not flash_available(cuda, torch.bfloat16, 60)


def test_the_chunk_kernel_is_chosen_once_and_a_wrong_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU and float32 get no packed kernel (the masked SDPA) whatever is chosen; a choice that names no kernel
    is refused on any device, so a typo never passes silently; on CUDA the split kernel by default where it
    takes the head size, each name its kernel."""
    cpu = torch.device("cpu")
    for choice in (None, "auto", "flash", "split"):
        if choice is None:
            monkeypatch.delenv(KERNEL_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(KERNEL_VARIABLE, choice)
        assert chunk_kernel(cpu, torch.bfloat16, 64) is None
    monkeypatch.setenv(KERNEL_VARIABLE, "flex")
    with pytest.raises(ValueError, match="CHATSTREAM_CHUNK_KERNEL='flex'"):
        chunk_kernel(cpu, torch.float32, 64)


def test_the_split_kernel_is_the_default_where_it_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where a packed kernel may run (here: told so): by default the split kernel where Triton imports and
    takes the head size, else FlashAttention, the fallback a warning only where ``split`` was asked for."""
    available = flash_chunk.flash_available
    monkeypatch.setattr(flash_chunk, "flash_available", lambda device, dtype, head_dim: True)
    try:
        import chatstream_asgi.engines.transformers.split_chunk  # noqa: F401
    except ImportError:  # no Triton (PyTorch's CPU wheel without the test extra): FlashAttention in every case
        split_kernel, why = flash_attend, "Triton does not import"
    else:
        split_kernel, why = flash_chunk.captured_split_attend, "takes no head size 96"
    cpu = torch.device("cpu")
    monkeypatch.delenv(KERNEL_VARIABLE, raising=False)
    assert chunk_kernel(cpu, torch.bfloat16, 64) is split_kernel
    with caplog.at_level(logging.INFO, logger="chatstream_asgi.engine"):
        assert chunk_kernel(cpu, torch.bfloat16, 96) is flash_attend  # a head size the split kernel takes not
        monkeypatch.setenv(KERNEL_VARIABLE, "split")
        assert chunk_kernel(cpu, torch.bfloat16, 96) is flash_attend
    assert [r.levelno for r in caplog.records if why in r.message] == [logging.INFO, logging.WARNING]
    assert chunk_kernel(cpu, torch.float16, 128) is split_kernel
    monkeypatch.setenv(KERNEL_VARIABLE, "flash")
    assert chunk_kernel(cpu, torch.bfloat16, 64) is flash_attend
    if CUDA:  # the real availability: float32 has no packed kernel
        monkeypatch.setattr(flash_chunk, "flash_available", available)
        cuda = torch.device("cuda")
        monkeypatch.delenv(KERNEL_VARIABLE)
        assert chunk_kernel(cuda, torch.bfloat16, 64) is split_kernel
        assert chunk_kernel(cuda, torch.bfloat16, 96) is flash_attend  # a head size the split kernel takes not
        assert chunk_kernel(cuda, torch.float32, 64) is None
        monkeypatch.setenv(KERNEL_VARIABLE, "flash")
        assert chunk_kernel(cuda, torch.bfloat16, 64) is flash_attend
        monkeypatch.setenv(KERNEL_VARIABLE, "split")
        assert chunk_kernel(cuda, torch.float16, 128) is split_kernel


@pytest.mark.skipif(not CUDA, reason="needs CHATSTREAM_TEST_DEVICE=cuda")
@pytest.mark.parametrize("window", [None, 5])
def test_packed_sequences_match_the_reference(window: int | None) -> None:
    """Three sequences packed (one continuing after 20 cached tokens, one new, one empty), a padded tail
    of queries over a padded tail of keys, and padding queries that see no key: the kernel's output is the
    reference's (zeros where nothing is seen, never NaN)."""
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    # queries: 7 (after 20 cached), 9 new, 0; padding 16 - 16 = 0 -> 32 in all (16 padding queries)
    lengths_q, lengths_k = [7, 9, 0], [27, 9, 0]
    tokens, columns = 32, 48
    q_ends = [0, 7, 16, 16, tokens]
    k_ends = [0, 27, 36, 36, columns]
    bounds = (torch.tensor([q_ends, k_ends], dtype=torch.int32, device=device), tokens, columns)
    query = torch.randn(tokens, 8, 64, device=device, dtype=dtype)
    key = torch.randn(columns, 2, 64, device=device, dtype=dtype)
    value = torch.randn(columns, 2, 64, device=device, dtype=dtype)
    out = flash_attend(query, key, value, bounds, 0.125, window)
    expected = varlen_attention(query, key, value, bounds, 0.125, window)
    assert sum(lengths_q) == 16 and sum(lengths_k) == 36
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:16], expected[:16], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[16:], expected[16:], atol=2e-2, rtol=2e-2)  # padding: 12 columns, 16 queries


@pytest.mark.skipif(not CUDA, reason="needs CHATSTREAM_TEST_DEVICE=cuda")
def test_the_call_replays_in_a_cuda_graph_with_new_offsets() -> None:
    """Captured once, replayed after the offsets (a host copy into the same buffer) change: the packing is
    read on the device at replay, not baked into the graph."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    offsets = torch.tensor([[0, 10, 16], [0, 10, 16]], dtype=torch.int32, device=device)
    query = torch.randn(16, 4, 64, device=device, dtype=dtype)
    key = torch.randn(16, 4, 64, device=device, dtype=dtype)
    value = torch.randn(16, 4, 64, device=device, dtype=dtype)
    bounds = (offsets, 16, 16)
    flash_attend(query, key, value, bounds, 0.125, None)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attend(query, key, value, bounds, 0.125, None)
    offsets.copy_(torch.tensor([[0, 3, 16], [0, 12, 16]], dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out, varlen_attention(query, key, value, bounds, 0.125, None), atol=2e-2, rtol=2e-2)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not CUDA
"""Triton's interpreter on CPU: the split kernel (``split_chunk.py``) runs on the engine's float32 tensors."""


@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize(
    "kernel",
    [
        "reference",
        pytest.param("split", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 on CPU")),
    ],
)
def test_prompts_packed_in_one_chunk_each_attend_their_own_keys(
    f32_engine: Any, monkeypatch: pytest.MonkeyPatch, chunk: int | None, kernel: str
) -> None:
    """Five prompts arriving together at an idle engine of four rows are packed into shared chunks (the
    offsets ``StepRunner.launch`` builds for several sequences, through the call's reference, or the split
    kernel under Triton's interpreter); each reply is its prompt's greedy reply alone. (The coverage
    matrix's chunks hold one sequence each.)"""
    prompts = ["Hi", "What is the capital of France?", "a b c d e f", LONG, "Tell me a story about a dog."]
    packed: list[int] = []
    if kernel == "split":
        from chatstream_asgi.engines.transformers.split_chunk import split_attend as attend
    else:
        attend = varlen_attention

    def counted(*args: Any) -> torch.Tensor:  # a chunk kernel's arguments
        ends = args[3][0][0].tolist()  # the queries' offsets; the last sequence is the padding
        packed.append(sum(b > a for a, b in itertools.pairwise(ends[:-1])))
        return attend(*args)

    monkeypatch.setattr(step_runner, "chunk_kernel", lambda device, dtype, head_dim: counted)
    # the reference reads the offsets on the host: uncaptured steps (a captured step reads them on the device)
    engine = static_engine(f32_engine, max_prefill_tokens=chunk, max_batch_size=4, cuda_graphs=False)
    params = GenerationParams(temperature=0.0, max_new_tokens=8)

    async def main() -> list[str]:
        streams = [engine.generate(request(c, params, rid=str(i))) for i, c in enumerate(prompts)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        return ["".join(deltas) for deltas, _ in results]

    assert run(main()) == [reference_greedy(f32_engine, c, 8) for c in prompts]
    assert max(packed) > 1
