"""The chunk's attention kernel alone: FlashAttention-2's varlen call (``flash_attend``) against the split-KV
Triton kernel (``split_chunk.py``), on the 1.1B Llama shape (32 query heads, 4 key/value heads, head size 64).

Run (one GPU, about a minute): ``python benchmarks/split_chunk_micro.py`` (``--keys 256,1024`` for fewer,
``--no-sweep`` to skip the tile sweep). The packing is the engine's for a 128-token chunk of one joining
request with no decode rows: one sequence of 128 queries over its ``n`` gathered keys, 15 empty sequences
(the shape's ``kept`` count, 16 rows), and an empty padding sequence; the query a transposed view, as
``SlotStep.attend`` passes it. Each layer (22) gets its own query/key/value copy, as a step's layers do.

Printed per key run: milliseconds for the 22 layers' calls, eager (CUDA events around a loop: includes
launch overhead, which FlashAttention's C++ op has less of) and replayed in one CUDA graph (what the engine
runs), each kernel's ratio to FlashAttention's, the split count chosen, and the largest difference of the
split kernel's output from FlashAttention's and of each from a float32 reference. Then, unless
``--no-sweep``, graph times of the split kernel per (splits, block_m, block_n, warps), the best first.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import torch
import triton
from attention_reference import varlen_attention
from fp8_gemv import graph_us

from chatstream_asgi.engines.transformers import flash_chunk
from chatstream_asgi.engines.transformers.split_chunk import choose_splits, split_attend, split_attend_launch

HEADS, KV_HEADS, DIM, LAYERS, QUERIES, EMPTY = 32, 4, 64, 22, 128, 15
Call = Callable[[], torch.Tensor]


def graph_ms(calls: list[Call], replays: int = 50) -> float:
    """Milliseconds for ``calls`` once each, captured in one graph (warmed up first), over ``replays``."""
    return graph_us(calls, replays) * len(calls) / 1000


def eager_ms(calls: list[Call], rounds: int = 50) -> float:
    for call in calls:
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        for call in calls:
            call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / rounds


def layers(keys: int) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, int, int]]:
    """Per layer ``(query [128, H, D] strided, key, value [keys, KV, D])`` in bf16, and the engine's bounds."""
    ends_q = [0, QUERIES] + [QUERIES] * EMPTY + [QUERIES]
    ends_k = [0, keys] + [keys] * EMPTY + [keys]
    offsets = torch.tensor([ends_q, ends_k], dtype=torch.int32, device="cuda")
    tensors = []
    for _ in range(LAYERS):
        query = torch.randn(1, HEADS, QUERIES, DIM, device="cuda", dtype=torch.bfloat16)[0].transpose(0, 1)
        key, value = (torch.randn(keys, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        tensors.append((query, key, value))
    return tensors, (offsets, QUERIES, keys)


CONFIGS = ((64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2))
"""The sweep's tiles: (block_m, block_n, warps, stages)."""
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="256,1024,2048", help="gathered key runs, comma-separated")
    parser.add_argument("--no-sweep", action="store_true", help="skip the split kernel's tile sweep")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    scale = DIM**-0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print(f"H={HEADS} KV={KV_HEADS} D={DIM} bf16, {QUERIES} queries, {LAYERS} layers: ms for all layers' calls")
    head = ("keys", "splits", "FA2 eager", "split eager", "ratio", "FA2 graph", "split graph", "ratio")
    print(" ".join(f"{h:>11}" for h in head), f"{'|split-FA2|':>11} {'FA2 err':>8} {'split err':>9}")
    runs = {}
    for keys in (int(k) for k in args.keys.split(",")):
        tensors, bounds = layers(keys)
        runs[keys] = tensors, bounds
        fa = [partial(flash_chunk.flash_attend, *t, bounds, scale, None) for t in tensors]
        split = [partial(split_attend, *t, bounds, scale, None) for t in tensors]
        q, k, v = tensors[0]
        expected = varlen_attention(q.float(), k.float(), v.float(), bounds, scale, None)
        out_fa, out_split = fa[0]().float(), split[0]().float()
        diff = (out_split - out_fa).abs().max().item()
        err_fa, err_split = ((o - expected).abs().max().item() for o in (out_fa, out_split))
        fa_eager, split_eager, fa_graph, split_graph = eager_ms(fa), eager_ms(split), graph_ms(fa), graph_ms(split)
        row = (keys, choose_splits(QUERIES, keys, HEADS, sms))
        row += (fa_eager, split_eager, split_eager / fa_eager, fa_graph, split_graph, split_graph / fa_graph)
        cells = [f"{x:>11}" if isinstance(x, int) else f"{x:>11.3f}" for x in row]
        print(" ".join(cells), f"{diff:>11.4f} {err_fa:>8.4f} {err_split:>9.4f}")
    if args.no_sweep:
        return
    print("\nsweep: the split kernel's graph ms per (splits, tiles), best 8 per key run, ratio to FA2's graph ms")
    for keys, (tensors, bounds) in runs.items():
        fa_ms = graph_ms([partial(flash_chunk.flash_attend, *t, bounds, scale, None) for t in tensors])
        results = []
        for splits, (bm, bn, warps, stages) in itertools.product(SPLITS, CONFIGS):
            tiles = {"splits": splits, "block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
            calls = [partial(split_attend_launch, *t, bounds[0], QUERIES, keys, scale, None, **tiles) for t in tensors]
            try:
                results.append((graph_ms(calls), tiles))
            except Exception as error:  # a tile too large for this device's shared memory: skipped
                print(f"  keys={keys} {tiles}: {type(error).__name__}")
        results.sort(key=lambda r: r[0])
        for ms, tiles in results[:8]:
            print(f"  keys={keys:>5} {tiles}: {ms:.3f} ms ({ms / fa_ms:.2f} of FA2's {fa_ms:.3f})")


if __name__ == "__main__":
    main()
