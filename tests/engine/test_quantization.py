"""Quantized weights: the GGUF block formats, the CPU int4/int8/fp16 layers, FP8 layers, the loader.

The exactness claims of ``quant_cpu`` are checked here: in float32 the int4 kernel reproduces a
Q4_0 / Q4_1 / Q8_0 file's weights bit for bit from the layer's own packed codes (so the mapping onto
the kernel's ``scale * (code - 8) + zero`` is exact), and the layer's bfloat16 form moves them by no
more than bfloat16's rounding of scales, zeros and outputs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest  # noqa: E402
from chatstream_asgi.engines.transformers import quant_fp8  # noqa: E402
from chatstream_asgi.engines.transformers.gguf_blocks import read_blocks  # noqa: E402
from chatstream_asgi.engines.transformers.loading import ModelLoadError, load_model  # noqa: E402
from chatstream_asgi.engines.transformers.quant import check_quantization, quantize_model  # noqa: E402
from chatstream_asgi.engines.transformers.quant_cpu import (  # noqa: E402
    Fp16Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    RescoredHead,
    nibble_halves,
    scale_zeros,
)
from chatstream_asgi.engines.transformers.quant_fp8 import FP8_MAX, Fp8Linear  # noqa: E402

TYPES = {name: getattr(gguf.GGMLQuantizationType, name) for name in ("Q4_0", "Q4_1", "Q8_0")}


def file_blocks(kind: str, rows: int = 64, cols: int = 128, seed: int = 0):
    """A matrix quantized by gguf-py (ggml's reference quantizer), read back as the loader reads a file."""
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    data = gguf.quantize(weights, TYPES[kind])
    return read_blocks(data, int(TYPES[kind]), cols), data


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_read_as_ggml_dequantizes_them(kind: str) -> None:
    blocks, data = file_blocks(kind)
    assert blocks.kind == kind and blocks.shape == (64, 128)
    assert np.array_equal(blocks.dequantize(), gguf.dequantize(data, TYPES[kind]))
    assert np.array_equal(blocks.dequantize(8, 24), gguf.dequantize(data, TYPES[kind])[8:24])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_int4_kernel_in_float32_reproduces_the_file_bit_for_bit(kind: str) -> None:
    blocks, data = file_blocks(kind)
    layer = Int4Linear(blocks)
    eye = torch.eye(blocks.shape[1])
    terms = nibble_halves(blocks) if kind == "Q8_0" else [blocks]
    assert layer.packed.shape[0] == len(terms)
    weights = sum(
        torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 32, scale_zeros(term, torch.float32)).t()
        for packed, term in zip(layer.packed, terms, strict=True)
    )
    assert torch.equal(weights, torch.from_numpy(gguf.dequantize(data, TYPES[kind])))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_int4_layer_moves_weights_by_bfloat16_rounding_at_most(kind: str) -> None:
    blocks, data = file_blocks(kind, seed=1)
    exact = torch.from_numpy(gguf.dequantize(data, TYPES[kind]))
    layer = Int4Linear(blocks)
    served = layer(torch.eye(blocks.shape[1])).t()
    # the kernel's scale (Q8_0: 16 d, on codes up to 8 away from 8, twice) and zero in bfloat16 (2**-9
    # relative each), and each output rounded to bfloat16 (2**-9 of the weight)
    scale = torch.from_numpy(blocks.scales.astype(np.float32)).abs().repeat_interleave(32, dim=1)
    scale = scale * (32 if kind == "Q8_0" else 1)
    offset = 0 if blocks.offsets is None else torch.from_numpy(blocks.offsets.astype(np.float32))
    offset = 0 if blocks.offsets is None else offset.abs().repeat_interleave(32, dim=1)
    assert ((served - exact).abs() <= 2**-8 * (8 * scale + offset + exact.abs())).all()
    x = torch.randn(5, blocks.shape[1])
    assert ((layer(x) - x @ exact.t()).norm() / (x @ exact.t()).norm()).item() < 0.01


def test_q8_0_embedding_rows_are_exact() -> None:
    blocks, data = file_blocks("Q8_0", rows=32, cols=64)
    table = Int8Embedding(blocks, torch.float32)
    ids = torch.tensor([[3, 0, 31], [7, 7, 1]])
    assert torch.equal(table(ids), torch.from_numpy(gguf.dequantize(data, TYPES["Q8_0"]))[ids])


def test_rescored_head_gives_each_rows_best_logits_exactly_from_the_table() -> None:
    blocks, data = file_blocks("Q8_0", rows=512, cols=64, seed=2)
    table = Int8Embedding(blocks, torch.float32)
    head = RescoredHead(table)
    assert head.table[0] is table and head.packed.numel() == 512 * 64 // 2  # 4-bit ranking codes; the table shared
    x = torch.randn(3, 2, 64)
    exact = x @ torch.from_numpy(gguf.dequantize(data, TYPES["Q8_0"])).t()
    served = head(x)
    assert served.shape == exact.shape and served.dtype == torch.float32
    best = exact.topk(16, dim=-1)
    torch.testing.assert_close(served.gather(-1, best.indices), best.values, rtol=1e-5, atol=1e-5)
    assert (served - exact).norm() < 0.1 * exact.norm()  # the rest: the 4-bit ranking


def test_fp16_and_int8_layers_follow_the_float_layer() -> None:
    seeded = torch.Generator().manual_seed(0)  # fixed inputs: the tolerances hold for these, not for any draw
    weight, bias = torch.randn(48, 64, generator=seeded), torch.randn(48, generator=seeded)
    x = torch.randn(3, 2, 64, generator=seeded)
    reference = torch.nn.functional.linear(x, weight, bias)
    fp16 = Fp16Linear(weight, bias)
    assert fp16(x).dtype == torch.float32 and fp16(x).shape == (3, 2, 48)
    assert torch.allclose(fp16(x), reference, atol=0.02)
    int8 = Int8Linear.from_float(weight, bias)
    assert int8.codes.dtype == torch.int8 and torch.allclose(int8(x), reference, atol=0.2)


def test_fp8_layer_is_per_channel_weights_and_per_token_activations() -> None:
    seeded = torch.Generator().manual_seed(0)  # fixed inputs: the tolerances hold for these, not for any draw
    weight = torch.randn(32, 64, generator=seeded) * torch.logspace(-2, 1, 32)[:, None]  # rows of very different ranges
    layer = Fp8Linear(weight)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 32)
    assert layer.weight_only_rows == 0  # built on the CPU: W8A8 at any rows (the weight-only kernel is CUDA's)
    assert torch.allclose(layer.weight.float().abs().amax(dim=1), torch.full((32,), FP8_MAX))
    x = torch.randn(4, 64, generator=seeded) * torch.tensor(
        [[1e-3], [1.0], [10.0], [1e3]]
    )  # tokens of very different ranges
    x_scale = x.abs().amax(dim=1, keepdim=True) / FP8_MAX
    emulated = ((x / x_scale).to(torch.float8_e4m3fn).float() * x_scale) @ (
        layer.weight.float() * layer.weight_scale.t()
    ).t()
    out = layer(x)
    assert torch.allclose(out, emulated, rtol=1e-5, atol=1e-5 * emulated.abs().max().item())
    relative = (out - x @ weight.t()).norm(dim=1) / (x @ weight.t()).norm(dim=1)
    assert (relative < 0.08).all()  # each token keeps its own precision
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(torch.randn(30, 64, generator=seeded))


def test_fp8_layers_need_no_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton (a CPU install) the weight-only kernel is absent and its module never imported."""
    find_spec = quant_fp8.importlib.util.find_spec
    monkeypatch.setattr(
        quant_fp8.importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name)
    )
    assert not quant_fp8.weight_only_available()


def test_quantize_model_swaps_linear_layers_and_keeps_the_dtype(tiny_model_dir: Path) -> None:
    model, _, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 9, 30, 2, 77, 13]])
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    done = quantize_model(model, "fp8")
    assert done["fp8"] == 2 * 7 and model.dtype == torch.float32
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    with torch.inference_mode():
        fp8 = model(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(fp8.flatten(), reference.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_cpu_quantization_generates_through_the_engine(tiny_model_dir: Path, mode: str) -> None:
    from chatstream_asgi.engines.transformers import TransformersEngine

    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), device="cpu", quantization=mode)
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert {"Int4Linear" if mode == "int4" else "Int8Linear", "Fp16Linear"} <= kinds and "Linear" not in kinds

    async def run() -> tuple[str, int]:
        await engine.start()
        try:
            params = GenerationParams(temperature=0.0, max_new_tokens=8)
            stream = engine.generate(GenerationRequest("q", [{"role": "user", "content": "Hello"}], params, True))
            text = "".join([delta async for delta in stream])
            return text, stream.completion_tokens
        finally:
            await engine.shutdown()

    text, tokens = asyncio.run(run())
    assert tokens == 8 and text


def test_modes_a_device_has_no_kernel_for_are_refused_before_loading(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="fp8 needs a CUDA GPU"):
        load_model(str(tiny_model_dir), device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match="CPU kernels only"):
        check_quantization("int4", torch.device("cuda"))
    with pytest.raises(ValueError, match="expected one of"):
        check_quantization("nf4", torch.device("cpu"))


def test_cli_passes_quantization_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatstream_asgi import cli
    from chatstream_asgi.engines.transformers import TransformersEngine

    seen: dict[str, object] = {}

    def fake(cls: type, name: str, **kw: object) -> str:
        seen.update(kw)
        return "engine"

    monkeypatch.setattr(TransformersEngine, "from_pretrained", classmethod(fake))
    assert cli._engine(cli.build_parser().parse_args(["serve"])) == "engine"
    assert seen["quantization"] is None  # what the checkpoint holds
    assert cli._engine(cli.build_parser().parse_args(["serve", "--quantization", "none"])) == "engine"
    assert seen["quantization"] == "none"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--quantization", "nf4"])


@pytest.fixture(scope="module")
def smollm2_pair() -> tuple[object, object, object]:
    """SmolLM2 as the server loads it (quantized), its tokenizer, and the same file dequantized."""
    quantized, tokenizer, _ = load_model("smollm2", device="cpu")
    reference, _, _ = load_model("smollm2", device="cpu", quantization="none")
    return quantized, tokenizer, reference


@pytest.mark.smollm2
def test_smollm2_loads_quantized_with_the_files_own_weights(smollm2_pair: tuple[object, object, object]) -> None:
    """Every quantized matrix of the bundled file, through the loader's name map and Llama's row order,
    holds the weights transformers' dequantizing loader gives the same parameter."""
    quantized, _, reference = smollm2_pair
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 210 and {m.kind for m in layers.values()} == {"Q4_1"}
    assert isinstance(quantized.model.embed_tokens, Int8Embedding) and isinstance(quantized.lm_head, RescoredHead)
    for name, layer in layers.items():
        expected = reference.get_submodule(name).weight
        eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
        served = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed[0], 32, layer.scale_zeros[0]).t()
        assert (served.float() - expected).abs().max() <= 2**-7 * expected.abs().max(), name
    ids = torch.arange(49152).reshape(64, 768)
    assert torch.equal(quantized.model.embed_tokens(ids), reference.model.embed_tokens(ids))
    hidden = reference.model.embed_tokens(torch.tensor([[5, 900, 30000]]))  # the tied output layer's top logits
    best = reference.lm_head(hidden).topk(32, dim=-1)
    torch.testing.assert_close(quantized.lm_head(hidden).gather(-1, best.indices), best.values, rtol=1e-5, atol=1e-4)
    references = reference.state_dict()
    for name, tensor in quantized.state_dict().items():  # norms, rotary frequencies: as transformers has them
        if name in references and references[name].dtype == tensor.dtype:
            assert torch.equal(tensor, references[name]), name


PROBES = ["What is the capital of France?", "What is 2 + 2?", "What color is the sky on a clear day?"]


@pytest.mark.smollm2
def test_smollm2_greedy_answers_unchanged_by_quantization(smollm2_pair: tuple[object, object, object]) -> None:
    from chatstream_asgi.engines.transformers import TransformersEngine

    quantized, tokenizer, reference = smollm2_pair

    async def ask(model: object) -> list[str]:
        engine = TransformersEngine(model, tokenizer, "cpu")
        await engine.start()
        try:
            params = GenerationParams(temperature=0.0, max_new_tokens=32)
            streams = [
                engine.generate(GenerationRequest(f"p{i}", [{"role": "user", "content": q}], params))
                for i, q in enumerate(PROBES)
            ]
            answers = []
            for stream in streams:
                answers.append("".join([delta async for delta in stream]))
            return answers
        finally:
            await engine.shutdown()

    served, expected = asyncio.run(ask(quantized)), asyncio.run(ask(reference))
    assert "Paris" in served[0] and "4" in served[1]
    assert served == expected
