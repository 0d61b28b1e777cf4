"""The lean CPU decoder (``lean_decoder.py``): which models take it, and that it computes transformers' forward.

Greedy equality with ``model.generate`` on the engine is the coverage matrix's (test_engine_coverage.py, whose
llama, qwen2 and mistral models run through it on the CPU); here its logits are compared with transformers'
own forward for a padded prefill after reused prefixes and a decode step, and the joined int4 projections with
the layers they join.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from model_fixtures import build_architecture  # noqa: E402
from test_quantization import file_blocks  # noqa: E402

from chatstream_asgi.engines.transformers import lean_decoder as lean_decoder_module  # noqa: E402
from chatstream_asgi.engines.transformers.batch_cache import BatchKVCache  # noqa: E402
from chatstream_asgi.engines.transformers.loading import load_model  # noqa: E402
from chatstream_asgi.engines.transformers.model_runner import ModelRunner  # noqa: E402
from chatstream_asgi.engines.transformers.quant import quantize_model  # noqa: E402
from chatstream_asgi.engines.transformers.quant_cpu import Int4Linear  # noqa: E402

LEAN = ("llama", "qwen2", "mistral")
NOT_LEAN = ("qwen2-window", "mistral-window", "qwen3", "gemma", "phi3", "olmo2")


def tiny(tmp_path: Path, name: str) -> Any:
    return load_model(str(build_architecture(tmp_path / name, name)), device="cpu", dtype="float32")[0]


@pytest.mark.parametrize("name", NOT_LEAN)
def test_other_architectures_run_transformers_forward(tmp_path: Path, name: str) -> None:
    assert ModelRunner(tiny(tmp_path, name), torch.device("cpu")).decoder is None


def forwards(runner: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill of two left-padded prompts after reused prefixes (one row without), then of a
    decode step over the growing cache holding both rows."""
    past = [(torch.randn(2, kv.shape[1], 3, kv.shape[3]), torch.randn(2, kv.shape[1], 3, kv.shape[3])) for kv in
            _shapes(runner)]  # fmt: skip
    input_ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    key_positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [-1, -1, -1, -1, -1, 0, 1]])
    positions = torch.tensor([[3, 4, 5, 6], [0, 0, 0, 1]])
    with torch.inference_mode():
        prefill, layers = runner.prefill(input_ids, key_positions, positions, past)
        cache = BatchKVCache(len(layers))
        cache.add_rows(layers, key_positions)
        step_keys, step_positions = cache.prepare_step()
        step = runner.step(cache.as_transformers_cache(), torch.tensor([[11], [12]]), step_keys, step_positions)
    return prefill, step


def _shapes(runner: ModelRunner) -> list[torch.Tensor]:
    config = runner.model.config
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [torch.empty(1, heads, 1, dim) for _ in range(config.num_hidden_layers)]


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "int4"])
@pytest.mark.parametrize("name", LEAN)
def test_lean_forward_is_transformers_forward(tmp_path: Path, name: str, quantized: bool) -> None:
    model = tiny(tmp_path, name)
    if quantized:
        quantize_model(model, "int4")
    runner = ModelRunner(model, torch.device("cpu"))
    assert runner.decoder is not None
    torch.manual_seed(1)
    lean = forwards(runner)
    runner.decoder = None
    torch.manual_seed(1)
    reference = forwards(runner)
    for got, want in zip(lean, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kinds", [("Q4_1", "Q4_0", "Q4_1"), ("Q8_0", "Q8_0")])
def test_joined_int4_layers_compute_the_layers_side_by_side_on_their_codes(kinds: tuple[str, ...]) -> None:
    layers = [Int4Linear(file_blocks(kind, rows=64 * (i + 1), seed=i)[0]) for i, kind in enumerate(kinds)]
    x = torch.randn(3, layers[0].in_features)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    joined = Int4Linear.joined(layers)
    assert joined is not None
    assert torch.equal(joined(x), separate)
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), separate)  # views of the joined codes
    start = joined.packed.data_ptr()
    assert [layer.packed.data_ptr() - start for layer in layers] == [0, 64 * 64, 192 * 64][: len(layers)]


def test_layers_of_other_inputs_terms_or_packed_blocks_stay_apart() -> None:
    q4, q8 = Int4Linear(file_blocks("Q4_1")[0]), Int4Linear(file_blocks("Q8_0")[0])
    wider, short = Int4Linear(file_blocks("Q4_1", cols=256)[0]), Int4Linear(file_blocks("Q4_1", rows=32)[0])
    assert Int4Linear.joined([q4, q8]) is None
    assert Int4Linear.joined([q4, wider]) is None
    assert Int4Linear.joined([short, q4]) is None  # its rows end inside a block of 64
    assert Int4Linear.joined([q4, short]) is not None


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "int4"])
def test_one_row_decode_without_a_mask_is_transformers_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantized: bool
) -> None:
    """A single row's decode step attends all its columns without a mask (SDPA's faster call): the same logits."""
    masks: list[torch.Tensor | None] = []

    def attend(*args: Any) -> torch.Tensor:
        masks.append(args[3])
        return real_attend(*args)

    real_attend = lean_decoder_module.attend
    monkeypatch.setattr(lean_decoder_module, "attend", attend)
    model = tiny(tmp_path, "llama")
    if quantized:
        quantize_model(model, "int4")
    runner = ModelRunner(model, torch.device("cpu"))
    assert runner.decoder is not None

    def steps() -> list[torch.Tensor]:
        prompt = torch.tensor([[5, 6, 7, 8]])
        with torch.inference_mode():
            logits, layers = runner.prefill(prompt, torch.arange(4)[None], torch.arange(4)[None])
            cache = BatchKVCache(len(layers))
            cache.add_rows(layers, torch.arange(4)[None])
            out = [logits]
            for token in (11, 12, 13):
                key_positions, positions = cache.prepare_step()
                ids = torch.tensor([[token]])
                out.append(runner.step(cache.as_transformers_cache(), ids, key_positions, positions))
                cache.finish_step()
        return out

    lean = steps()
    layers = model.config.num_hidden_layers
    assert len(masks) == 4 * layers and all(m is not None for m in masks[:layers])  # the prefill's causal mask
    assert all(m is None for m in masks[layers:])
    runner.decoder = None
    for got, want in zip(lean, steps(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_forward_is_the_layers_forward_bit_for_bit(kind: str, bias: bool) -> None:
    """The lean decoder's bound int4 call (one term, no bias; else the layer's forward) computes the layer's output."""
    blocks = file_blocks(kind)[0]
    layer = Int4Linear(blocks, torch.randn(blocks.shape[0]) if bias else None)
    forward = layer.rows_forward()
    assert (forward == layer.forward) is (bias or kind == "Q8_0")
    for rows in (1, 5):
        x = torch.randn(rows, layer.in_features)
        got = forward(x)
        assert got.dtype == torch.float32 and got.shape == (rows, layer.out_features)
        assert torch.equal(got, layer(x))
