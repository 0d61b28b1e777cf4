"""The FP8 layer's two paths against bf16, one linear layer at a time: Llama-3.1-8B's shapes, 1 to 64 rows.

Run (one GPU, sm89+, about a minute): ``python benchmarks/fp8_gemv.py`` (``--rows 1,16`` for fewer). For
each weight shape (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336, and the joined
projections the engine's FP8 layers run: q/k/v 6144x4096, gate+up 28672x4096) and rows M, it times

- ``bf16``: ``F.linear`` with bf16 weights (cuBLAS);
- ``w8a8``: ``Fp8Linear``'s path above 16 rows (activations scaled per token, ``torch._scaled_mm``), as
  the layer runs it eagerly (the compiled step fuses the activation scaling into the ops before);
- ``gemv``: ``Fp8Linear``'s weight-only path (``fp8_gemv.py``'s Triton kernel), forced at every M to
  show where it stops paying.

Each time is one call's share of a CUDA graph replaying the layer over enough different weight copies
(about 400 MB) that none is read from L2, as a model's layers are. Printed per line: microseconds of
each, the weight-only kernel's GB/s and its fraction of the device-to-device copy rate, and the largest
error of each against float32 arithmetic (``gemv`` and ``w8a8`` against the dequantized FP8 weights,
``bf16`` against the bf16 weights; relative to the output's largest value). After each shape: the
config ``triton.autotune`` chose for 1 row and for 2-16. At the end: the decoder's linear layers of one
step in milliseconds per M, each path and the FP8 read floor, separate (32 layers x 7) and joined (32 x 4).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from engine_throughput import copy_bandwidth

from chatstream_asgi.engines.transformers import fp8_gemv
from chatstream_asgi.engines.transformers.quant_fp8 import Fp8Linear

SHAPES = {
    "q/o": (4096, 4096),
    "k/v": (1024, 4096),
    "gate/up": (14336, 4096),
    "down": (4096, 14336),
    "q+k+v": (6144, 4096),
    "gate+up": (28672, 4096),
}
STEPS = {  # each shape's linear layers in one decoder layer
    "separate": {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1},
    "joined": {"q+k+v": 1, "q/o": 1, "gate+up": 1, "down": 1},
}
LAYERS = 32
ROWS = (1, 2, 4, 8, 16, 32, 64)
PATHS = ("bf16", "w8a8", "gemv")
_COLD_BYTES = 400e6  # weight copies a round reads: well past an H100's 50 MB of L2


def graph_us(calls: list[Callable[[], torch.Tensor]], replays: int) -> float:
    """Microseconds a call: ``calls`` once each, captured in one graph, replayed ``replays`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # the warm-up: autotuning, allocations, cuBLAS workspaces, all before capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * len(calls))


def max_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).abs().max() / reference.abs().max()).item()


def fp8_call(layer: Fp8Linear, x: torch.Tensor, weight_only: bool) -> Callable[[], torch.Tensor]:
    """The layer on ``x`` by one path: weight-only at any rows, or W8A8 at any rows."""

    def call() -> torch.Tensor:
        layer.weight_only_rows = 1 << 30 if weight_only else 0
        return layer(x)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="the rows M, comma-separated")
    args = parser.parse_args()
    rows = [int(m) for m in args.rows.split(",")]
    device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; copy {bandwidth / 1e9:.0f} GB/s")
    torch.manual_seed(0)
    per_call: dict[tuple[str, int], dict[str, float]] = {}
    print("| shape NxK | M | bf16 us | w8a8 us | gemv us | gemv GB/s | of copy | err gemv | err w8a8 | err bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, round(_COLD_BYTES / (n * k)))
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        layers = [Fp8Linear(w) for w in weights]
        chosen: dict[int, str] = {}
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref_bf16 = x.float() @ weights[0].float().t()
            ref_fp8 = x.float() @ (layers[0].weight.float() * layers[0].weight_scale.t()).t()
            us = {
                "bf16": graph_us([partial(F.linear, x, w) for w in weights], args.replays),
                "w8a8": graph_us([fp8_call(f, x, False) for f in layers], args.replays),
                "gemv": graph_us([fp8_call(f, x, True) for f in layers], args.replays),
            }
            best = (fp8_gemv._row_kernel if m == 1 else fp8_gemv._tile_kernel).best_config
            chosen[m] = f"{best.kwargs} warps {best.num_warps} stages {best.num_stages}"
            errors = (
                max_error(fp8_call(layers[0], x, True)(), ref_fp8),
                max_error(fp8_call(layers[0], x, False)(), ref_fp8),
                max_error(F.linear(x, weights[0]), ref_bf16),
            )
            rate = n * k / (us["gemv"] / 1e6)
            print(
                f"| {name} {n}x{k} | {m} | {us['bf16']:.1f} | {us['w8a8']:.1f} | {us['gemv']:.1f} | "
                f"{rate / 1e9:.0f} | {rate / bandwidth:.2f} | {errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.1e} |",
                flush=True,
            )
            per_call[name, m] = us
        print(f"  autotuned ({name}): " + "; ".join(f"{m} rows {c}" for m, c in chosen.items()), flush=True)
        del weights, layers
        torch.cuda.empty_cache()
    floor_bytes = sum(count * SHAPES[name][0] * SHAPES[name][1] for name, count in STEPS["separate"].items())
    floor_ms = 1000 * LAYERS * floor_bytes / bandwidth
    print(f"\nthe decoder's linear layers of one 8B step, ms; FP8 read floor {floor_ms:.2f} ms")
    print("| M | layers | bf16 | w8a8 | gemv | the layer (gemv up to 16 rows, w8a8 above) | floor / layer |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for m in rows:
        for step, counts in STEPS.items():
            ms = {path: LAYERS * sum(n * per_call[name, m][path] for name, n in counts.items()) / 1e3 for path in PATHS}
            layer = ms["gemv"] if m <= 16 else ms["w8a8"]
            print(f"| {m} | {step} | {ms['bf16']:.2f} | {ms['w8a8']:.2f} | {ms['gemv']:.2f} | {layer:.2f} | "
                  f"{floor_ms / layer:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
