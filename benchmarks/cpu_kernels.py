"""The CPU matmul kernels a quantized SmolLM2 could run on, timed on its own shapes.

Run: ``.venv/bin/python benchmarks/cpu_kernels.py`` (about a minute; torchao is timed too when it is
importable). A decode step's linear layers: 30 decoder layers of seven (576x576 twice, 192x576 twice, 1536x576
twice, 576x1536), each with its own weights so that they stream from memory as in a step, and the
output layer (49152x576); at 1 and 16 rows, on one thread. Times are the thread's CPU time
(``time.thread_time``), the least of three passes: on a shared machine, wall time measures the
neighbours as much as the kernel. (The float32-activation int4 path is timed at 1 row only.)

- ``fp32 dense``: ``F.linear`` in float32 (MKL), what transformers' GGUF loading leaves;
- ``bf16 dense``: ``F.linear`` in bfloat16 (oneDNN), half the bytes, no quantization;
- ``int4 (torch)``: ``aten._weight_int4pack_mm_for_cpu``, bf16 activations, a scale and zero per 32;
- ``int4 f32 act``: the same kernel fed float32 (its scalar path, the one that reproduces a file exactly);
- ``int8 (torch)``: ``aten._weight_int8pack_mm``, bf16 activations, a scale per row;
- ``fp16 (fbgemm)``: ``quantized.linear_dynamic_fp16``, fp16 weights, float32 activations and output;
- ``int4 (torchao)``: torchao's ``Int4WeightOnlyConfig(group_size=32, int4_packing_format="opaque")``,
  its CPU int4 layout (a tensor subclass over the same aten kernel).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
HEAD = [(49152, 576)]


def cpu_ms(calls: list[Callable[[], object]]) -> float:
    """The least thread CPU time of three passes over ``calls``, after one to warm up."""
    best = float("inf")
    for _ in range(4):
        started = time.thread_time()
        for call in calls:
            call()
        best = min(best, time.thread_time() - started)
    return 1000 * best


def kernels(rows: int, cols: int) -> dict[str, Callable[[torch.Tensor], object]]:
    weight = torch.randn(rows, cols)
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale_zeros = torch.rand(cols // 32, rows, 2)
    int8, scales = torch.randint(-127, 128, (rows, cols), dtype=torch.int8), torch.rand(rows).bfloat16()
    bf16, fp16 = weight.bfloat16(), torch.ops.quantized.linear_prepack_fp16(weight, None)
    found: dict[str, Callable[[torch.Tensor], object]] = {
        "fp32 dense": lambda x: F.linear(x, weight),
        "bf16 dense": lambda x: F.linear(x.bfloat16(), bf16).float(),
        "int4 (torch)": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), packed, 32, scale_zeros.bfloat16()
        ).float(),
        "int4 f32 act": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zeros),
        "int8 (torch)": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), int8, scales).float(),
        "fp16 (fbgemm)": lambda x: torch.ops.quantized.linear_dynamic_fp16(x, fp16),
    }
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        layer = torch.nn.Linear(cols, rows, bias=False, dtype=torch.bfloat16)
        quantize_(layer, Int4WeightOnlyConfig(group_size=32, int4_packing_format="opaque"))
        found["int4 (torchao)"] = lambda x: layer(x.bfloat16()).float()
    except Exception as exc:  # not installed, or no CPU layout in this version
        if rows == 49152:
            print(f"torchao skipped: {type(exc).__name__}: {str(exc)[:120]}")
    return found


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, one thread")
    table: dict[str, dict[str, float]] = {}
    for label, shapes in (("layer", LAYER), ("output", HEAD)):
        built = [kernels(r, c) for r, c in shapes]
        for name in built[0]:
            for m in (1, 16):
                if name == "int4 f32 act" and m > 1:
                    continue
                inputs = [torch.randn(m, c) for _, c in shapes]
                calls = [partial(k[name], x) for k, x in zip(built, inputs, strict=True)]
                table.setdefault(name, {})[f"{label} {m}"] = cpu_ms(calls)
    columns = ["layer 1", "layer 16", "output 1", "output 16"]
    print("| kernel | 30 layers, 1 row ms | 30 layers, 16 rows ms | output, 1 row ms | output, 16 rows ms |")
    print("|---|" + "---:|" * len(columns))
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(f"{cells[c]:.2f}" if c in cells else "-" for c in columns) + " |")


if __name__ == "__main__":
    main()
