"""Joined FP8 projections (``quant_joined.py``): the joined modules compute what the model's own modules do.

On the CPU (FP8 layers run W8A8 there, the same arithmetic per output feature joined or not) the joined
model's logits are the separate layers' (to float32's last bits: a float GEMM's result can depend on its
operands' alignment), so the engine's greedy tokens must be equal, on the eager path and on the static
cache's slotted attention; the compiled step traces whole and the compiled blocks give the plain step's
logits. With ``CHATSTREAM_TEST_DEVICE=cuda`` the model is bfloat16 and runs the weight-only kernel, whose
summation order depends on the layer's shape: the logits are compared within bfloat16's rounding.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from model_fixtures import build_architecture
from test_engine_batching import collect, request, run
from test_engine_coverage import traced_step
from test_engine_static import prepared, static_engine

from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.loading import load_model
from chatstream_asgi.engines.transformers.quant import quantize_model
from chatstream_asgi.engines.transformers.quant_joined import JoinedAttention, JoinedMLP

DEVICE = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu")
ON_CPU = DEVICE == "cpu"
DTYPE = "float32" if ON_CPU else "bfloat16"
cpu_only = pytest.mark.skipif(not ON_CPU, reason="exact on the CPU only: a GPU's kernels sum by the layer's shape")
PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 3, "What is the capital of France?", "a b c d e f"]


@pytest.fixture(scope="module", params=["llama", "mistral-window", "qwen2-window", "qwen3"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    """``(separate, joined, tokenizer)``: an architecture's tiny model quantized to FP8 without and with
    joining (Qwen2: biases on q/k/v; the windowed ones: sliding layers; Qwen3: query/key norms)."""
    directory = build_architecture(tmp_path_factory.mktemp(request.param), request.param)
    model, tokenizer, _ = load_model(str(directory), device=DEVICE, dtype=DTYPE)
    separate, joined = copy.deepcopy(model), model
    assert "joined q/k/v" not in quantize_model(separate, "fp8", join=False)
    done = quantize_model(joined, "fp8")
    assert done["joined q/k/v"] == done["joined gate/up"] == 2 and done["fp8"] == 2 * 7
    return separate, joined, tokenizer


def test_joined_modules_compute_the_models_forward(models: tuple[Any, Any, Any]) -> None:
    separate, joined, _ = models
    for layer in joined.model.layers:
        assert type(layer.self_attn) is JoinedAttention and type(layer.mlp) is JoinedMLP
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(0)).to(joined.device)
    with torch.inference_mode():
        for rows in (ids[:1, :1], ids[:, :1], ids):  # the kernel's one-row and tile paths on a GPU
            expected, got = separate(rows).logits.float(), joined(rows).logits.float()
            assert (got - expected).norm() / expected.norm() < (1e-6 if ON_CPU else 2e-2)


def test_other_architectures_keep_their_layers(tmp_path: Any) -> None:
    """Gemma's modules are not on the allowlist (its MLP is the same computation, its attention is not
    checked): they keep their separate FP8 layers."""
    model, _, _ = load_model(str(build_architecture(tmp_path, "gemma")), device=DEVICE, dtype=DTYPE)
    done = quantize_model(model, "fp8")
    assert done["fp8"] == 2 * 7 and not any(key.startswith("joined") for key in done)
    assert not any(isinstance(m, (JoinedAttention, JoinedMLP)) for m in model.modules())


@cpu_only
@pytest.mark.parametrize("static", [False, True])
def test_the_engine_gives_the_same_greedy_tokens_joined(models: tuple[Any, Any, Any], static: bool) -> None:
    separate, joined, tokenizer = models

    def texts(model: Any) -> list[str]:
        engine = TransformersEngine(
            model, tokenizer, DEVICE, static_cache=static, max_batch_size=4, max_prefill_tokens=16, compile_mode=None
        )

        async def main() -> list[str]:
            await engine.start()
            try:
                results = [await collect(engine.generate(request(p, rid=str(i)))) for i, p in enumerate(PROMPTS)]
                return ["".join(deltas) for deltas, _ in results]
            finally:
                await engine.shutdown()

        return run(main())

    assert texts(joined) == texts(separate)


@cpu_only
def test_the_joined_step_traces_whole(models: tuple[Any, Any, Any]) -> None:
    """Decode rows and a prompt chunk through the joined modules, as one graph (``fullgraph``): what the
    engine compiles and captures on a GPU."""
    _, joined, tokenizer = models
    traced_step(joined, tokenizer)


def test_compiled_joined_blocks_give_the_plain_step(models: tuple[Any, Any, Any]) -> None:
    """The engine's compiled blocks (inductor, ``fullgraph``) over the joined modules: a decode step of three
    rows on the static cache gives the plain step's logits."""
    from torch._dynamo.utils import counters

    from chatstream_asgi.engines.transformers.compiled_step import FusedModules

    _, joined, tokenizer = models
    template = SimpleNamespace(model=joined, tokenizer=tokenizer, device=torch.device(DEVICE))
    engine = prepared(static_engine(template, max_batch_size=4, cuda_graphs=False))  # type: ignore[arg-type]
    runner = engine._path.runner
    fused = FusedModules(engine.model, engine._path.kv.layers, "default")
    positions, inputs = torch.tensor([5, 6, 7]), [3, 10, 0]
    with torch.inference_mode():
        plain = runner.launch(positions, inputs, []).float()
        graphs = counters["stats"]["unique_graphs"]
        runner.fused = lambda key: fused.active()
        compiled = runner.launch(positions, inputs, []).float()  # the same keys rewritten: the same step
    assert counters["stats"]["unique_graphs"] > graphs
    assert (compiled - plain).norm() / plain.norm() < (1e-5 if ON_CPU else 2e-2)
