"""The weight-only FP8 kernel (``fp8_gemv.py``) against a float reference: on the GPU where there is one,
else in Triton's interpreter. The interpreter is chosen when Triton is imported (torch's dynamo imports it,
so in a whole run before this file): without a GPU, :func:`test_in_the_interpreter` runs this file again
in a process started with ``TRITON_INTERPRET=1``.

Skipped without Triton: it comes with PyTorch's CUDA wheels, and the ``test`` extra installs it beside the
CPU wheel (on Linux x86-64) for this file and ``test_split_chunk.py``.

The interpreter multiplies bfloat16 tiles in ``tl.dot`` as their raw 16-bit patterns (Triton 3.9), so on
the CPU the ``tl.dot`` path (2 rows and more) is checked in float16 (the same code, ``w.to(x.dtype)``), the
one-row path in both; on the GPU every case runs in both dtypes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from chatstream_asgi.engines.transformers import fp8_gemv  # noqa: E402
from chatstream_asgi.engines.transformers.quant_fp8 import WEIGHT_ONLY_ROWS, Fp8Linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
runs_here = pytest.mark.skipif(
    DEVICE.type == "cpu" and not INTERPRETER, reason="no GPU: test_in_the_interpreter runs these"
)


@pytest.mark.skipif(DEVICE.type == "cuda" or INTERPRETER, reason="the kernel runs here")
def test_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2]
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def quantized(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weights and their per-row scales, rows of very different ranges."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.logspace(-2, 1, out_features)[:, None]
    scale = weight.abs().amax(dim=1) / 448
    return (weight / scale[:, None]).to(torch.float8_e4m3fn).to(DEVICE), scale.to(DEVICE)


def assert_close_to_float(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Within the output dtype's rounding (and float32 summation order) of the exact product."""
    reference = x.float() @ (weight.float() * scale[:, None]).t()
    assert y.dtype == x.dtype and y.shape == reference.shape
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(y.float(), reference, rtol=eps, atol=1e-4 * reference.abs().max().item())


CASES = [
    pytest.param(
        kernel, config, rows, dtype, id=f"{kernel}-n{config.kwargs['BLOCK_N']}-k{config.kwargs['BLOCK_K']}-m{rows}"
    )
    for kernel, configs, row_cases in (
        ("row", fp8_gemv.ROW_CONFIGS, [(1, torch.bfloat16), (1, torch.float16)]),
        ("tile", fp8_gemv.TILE_CONFIGS, [(3, None), (16, None), (17, None)]),
    )
    for config in configs
    for rows, dtype in row_cases
]
"""One row runs the row kernel (in both dtypes everywhere); more rows the tile kernel."""


@runs_here
@pytest.mark.parametrize(("kernel", "config", "rows", "dtype"), CASES)
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 200), (112, 336)])
def test_every_config_matches_a_float_reference(
    monkeypatch: pytest.MonkeyPatch,
    kernel: str,
    config: object,
    rows: int,
    dtype: torch.dtype | None,
    out_features: int,
    in_features: int,
) -> None:
    """N odd multiples of 16 (blocks cut by the mask), K not a multiple of any block, both kernels, more rows
    than one tile."""
    monkeypatch.setattr(getattr(fp8_gemv, f"_{kernel}_kernel"), "configs", [config])  # run as it is, not timed
    weight, scale = quantized(out_features, in_features)
    for each in [dtype] if dtype else DTYPES if DEVICE.type == "cuda" else [torch.float16]:
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(DEVICE, each)
        assert_close_to_float(fp8_gemv.fp8_gemv(x, weight, scale), x, weight, scale)


def one_config_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel with its first config: run as it is, not benchmarked (the interpreter has no timer)."""
    monkeypatch.setattr(fp8_gemv._row_kernel, "configs", fp8_gemv.ROW_CONFIGS[:1])
    monkeypatch.setattr(fp8_gemv._tile_kernel, "configs", fp8_gemv.TILE_CONFIGS[:1])


@runs_here
@pytest.mark.parametrize("rows", [1, 4])
def test_the_op_passes_opcheck(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """The fake (meta) implementation and dynamic shapes as torch.compile sees them (not ``test_schema``:
    it compares the inputs by arithmetic, which float8 tensors lack)."""
    one_config_each(monkeypatch)
    weight, scale = quantized(48, 64)
    x = torch.randn(rows, 64).to(DEVICE, torch.float16)
    tests = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.chatstream.fp8_gemv, (x, weight, scale), test_utils=tests)


@runs_here
@pytest.mark.parametrize("rows", [1, 4, WEIGHT_ONLY_ROWS])
def test_a_joined_layer_is_its_layers_side_by_side(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Layers reading one input (a query, key and value projection, each its own scales and bias), joined:
    the weight-only kernel gives every output feature as the layer it came from does."""
    one_config_each(monkeypatch)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" or rows == 1 else torch.float16
    generator = torch.Generator().manual_seed(rows)
    layers = [
        Fp8Linear(torch.randn(n, 256, generator=generator).to(DEVICE, dtype), torch.randn(n).to(DEVICE, dtype))
        for n in (128, 32, 32)
    ]
    joined = Fp8Linear.joined(layers)
    assert joined.weight.dtype == torch.float8_e4m3fn and joined.weight_scale.shape == (1, 192)
    for layer in (*layers, joined):
        layer.weight_only_rows = WEIGHT_ONLY_ROWS  # built on the CPU too: there the interpreter runs the kernel
    x = torch.randn(rows, 256, generator=generator).to(DEVICE, dtype)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(joined(x), separate, rtol=torch.finfo(dtype).eps, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer runs weight-only on CUDA only")
@pytest.mark.parametrize("rows", [1, 4, WEIGHT_ONLY_ROWS, WEIGHT_ONLY_ROWS + 1])
def test_the_layer_is_weight_only_up_to_its_rows_and_replays_in_a_graph(rows: int) -> None:
    weight = torch.randn(256, 512, device=DEVICE, dtype=torch.bfloat16)  # a bf16 model's layer
    layer = Fp8Linear(weight, torch.randn(256, device=DEVICE, dtype=torch.bfloat16))
    assert layer.weight_only_rows == WEIGHT_ONLY_ROWS
    x = torch.randn(rows, 1, 512, device=DEVICE, dtype=torch.bfloat16)
    dequantized = layer.weight.float() * layer.weight_scale.t()
    weight_only = (x.float() @ dequantized.t()).to(torch.bfloat16) + layer.bias
    eager = layer(x)
    if rows <= WEIGHT_ONLY_ROWS:
        torch.testing.assert_close(eager, weight_only, rtol=2**-7, atol=1e-2)
    else:  # W8A8: activations rounded to e4m3 too
        assert (eager.float() - weight_only.float()).norm() / weight_only.float().norm() < 0.08
    graph, static = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        captured = layer(static)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    compiled = torch.compile(layer, fullgraph=True)(x)  # W8A8's activation scaling fused: rounds apart
    assert (compiled.float() - eager.float()).norm() / eager.float().norm() < 1e-2
