"""The coverage matrix: every architecture of ``model_fixtures.ARCHITECTURES`` on both cache designs.

Each architecture is a tiny random model (2 layers, float32) built in a fixture and loaded back through
the real loading code. On the growing cache (eager) and the slotted cache (static: CUDA graphs with
``CHATSTREAM_TEST_DEVICE=cuda``, the same padded steps run eagerly on CPU) the engine's greedy output is
``model.generate``'s, token for token, where it is most likely to part: three rows joining at different
steps, prompts and replies longer than the sliding windows (8 tokens), prompts prefilled in chunks beside
the running rows' decode tokens in one forward, sliding layers keeping rings that wrap (a ring chunk of 8
here, so a ring holds 15 columns), and a conversation's next turn reusing the keys and values its last
turn left (a prefix hit).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from attention_reference import varlen_attention
from model_fixtures import ARCHITECTURES, build_architecture, engine_reached
from test_engine_batching import StepProbe, collect, run

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine, kv_layout, step_runner
from chatstream_asgi.engines.transformers.loading import load_model

DEVICE = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu")
NEW_TOKENS = 12
CONTENTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "What is the capital of France?",
    "a b c d e f g h i j k l m n o p " * 2,
]
FOLLOW_UP = "Hello world, this is a tiny tokenizer."


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """``(name, model, tokenizer)``: the architecture's tiny model, float32, on ``CHATSTREAM_TEST_DEVICE``."""
    directory = build_architecture(tmp_path_factory.mktemp(request.param), request.param)
    model, tokenizer, _ = load_model(str(directory), device=DEVICE, dtype="float32")
    return request.param, model, tokenizer


def generated(model: Any, tokenizer: Any, ids: list[int]) -> str:
    """What ``model.generate`` gives after ``ids`` (greedy, ``NEW_TOKENS`` tokens, EOS ignored)."""
    prompt = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def ask(engine: TransformersEngine, messages: list[dict], key: str) -> Any:
    params = GenerationParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    return engine.generate(GenerationRequest(key, messages, params, ignore_eos=True, session_key=key))


@pytest.mark.parametrize("path", ["eager", "static", "static-varlen"])
def test_greedy_output_is_transformers_output(
    architecture: tuple[str, Any, Any], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``static-varlen``: the chunks' attention as a packed chunk kernel computes it (the reference of
    ``flash_chunk.py`` and ``split_chunk.py``, on any device and dtype), from the packing the step runner
    gives it; uncaptured, since the reference reads the packing on the host."""
    name, model, tokenizer = architecture
    monkeypatch.setattr(kv_layout, "RING_CHUNK", 8)  # rings of window + 7 columns: they wrap within a reply
    if path == "static-varlen":
        monkeypatch.setattr(step_runner, "chunk_kernel", lambda device, dtype, head_dim: varlen_attention)
    engine = TransformersEngine(
        model, tokenizer, model.device, static_cache=path != "eager", max_batch_size=4, max_prefill_tokens=16,
        compile_mode=None, cuda_graphs=path != "static-varlen",
    )  # fmt: skip
    if path != "eager":
        layout = engine._path.layout
        assert (layout.has_rings(engine.context_len)) == any(layout.windows), name
    conversations = [[{"role": "user", "content": c}] for c in CONTENTS]
    prompts = [engine._encode(messages) for messages in conversations]
    probe = StepProbe(engine, monkeypatch)
    pauses = {step: probe.pause_at(step) for step in (2, 5)}

    async def main() -> tuple[list[str], str, int, list[int]]:
        await engine.start()
        try:
            tasks = [asyncio.create_task(collect(ask(engine, conversations[0], "c0")))]
            for step, joiner in ((2, 1), (5, 2)):  # rows join while others decode
                reached, release = pauses[step]
                await engine_reached(reached)
                tasks.append(asyncio.create_task(collect(ask(engine, conversations[joiner], f"c{joiner}"))))
                release.set()
            texts = ["".join(deltas) for deltas, _ in await asyncio.gather(*tasks)]
            follow = [*conversations[0], {"role": "assistant", "content": texts[0]}]
            follow.append({"role": "user", "content": FOLLOW_UP})
            ids = engine._turns.encode(engine.render_prompt(follow), "c0")  # built from the first turn's ids
            deltas, stream = await collect(ask(engine, follow, "c0"))
            return texts, "".join(deltas), stream.cached_tokens, ids
        finally:
            await engine.shutdown()

    texts, follow_text, reused, follow_ids = run(main())
    assert texts == [generated(model, tokenizer, ids) for ids in prompts], name
    assert follow_text == generated(model, tokenizer, follow_ids), name
    assert reused > len(prompts[0]), name  # the next turn reused the first turn's whole history


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    models = {}
    for name in ("qwen3_moe", "mixtral", "gpt_oss"):
        directory = build_architecture(tmp_path_factory.mktemp(name), name)
        models[name] = load_model(str(directory), device="cpu", dtype="float32")[:2]
    return models


def traced_step(model: Any, tokenizer: Any) -> None:
    """Trace a static engine's whole step (decode rows and a prompt chunk together, the masks and the model)
    with ``torch.compile(fullgraph=True)``: raises on any graph break or data-dependent shape."""
    engine = TransformersEngine(model, tokenizer, "cpu", static_cache=True, max_batch_size=4, compile_mode=None)

    async def cycle() -> None:
        await engine.start()
        await engine.shutdown()

    run(cycle())
    runner = engine._path.runner
    with torch.inference_mode():
        eager = runner.launch(torch.tensor([5, 9]), [3, 4], [(3, 0, list(range(10, 30)), True)]).clone()
        key = runner.key(2, 10, 20, 20)
        torch._dynamo.reset()
        traced = torch.compile(runner.forward, fullgraph=True, backend="eager")(key)
    torch.testing.assert_close(traced[: eager.shape[0]], eager)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("qwen3_moe", torch.float32),
        ("qwen3_moe", torch.bfloat16),
        ("mixtral", torch.float32),
        ("gpt_oss", torch.float32),
        ("gpt_oss", torch.bfloat16),
    ],
)
def test_moe_steps_trace_whole(moe_models: dict, name: str, dtype: torch.dtype) -> None:
    """The CPU stand-in for "captures in a CUDA graph": with the experts implementation the engine picks where
    it captures (``grouped_mm`` in bfloat16, ``batched_mm`` in float32), a step traces as one graph; with
    transformers' loop over the experts (data-dependent ``nonzero``, which broke the capture of Qwen3-MoE) it
    does not."""
    from torch._dynamo.exc import Unsupported, UserError

    from chatstream_asgi.engines.transformers.experts import prepare_experts

    model, tokenizer = moe_models[name]
    model = model.to(dtype)
    model.set_experts_implementation("eager")
    if name == "qwen3_moe" and dtype == torch.float32:
        with pytest.raises((Unsupported, UserError), match=r"data-dependent|nonzero|Dynamic shape"):
            traced_step(model, tokenizer)
    assert prepare_experts(model, torch.device("cpu"), graphs=True) == (
        "grouped_mm" if dtype == torch.bfloat16 else "batched_mm"
    )
    traced_step(model, tokenizer)
    model.to(torch.float32)


def test_blocks_of_both_windows_compile_their_chunk_steps_within_dynamos_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 2 alternates sliding and full attention: compiled as one function, its blocks needed a variant
    per window for every kind of chunk step and passed dynamo's limit of 8 (on the H100 its chunk steps,
    and gpt-oss's, stayed unfused). Each window's blocks have a compiled function of their own, and 28
    step shapes (rows 0-4, two lengths, two chunk sizes, columns reused or not) fit. Traced by dynamo
    without inductor (the variants are dynamo's): the CPU stand-in for the GPU's compile."""
    from chatstream_asgi.engines.transformers import compiled_step

    real = torch.compile
    monkeypatch.setattr(compiled_step.torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))
    model, tokenizer, _ = load_model(str(build_architecture(tmp_path, "gemma2")), device="cpu", dtype="float32")
    engine = TransformersEngine(model, tokenizer, "cpu", static_cache=True, compile_mode=None, max_batch_size=8)

    async def prepare() -> None:
        await engine.start()
        await engine.shutdown()

    run(prepare())
    runner, layers = engine._path.runner, engine._path.kv.layers
    fused = compiled_step.FusedModules(model, layers, "default")
    shapes = [(r, n, t, c) for r in (0, 1, 2, 4) for n in ((0,) if r == 0 else (64, 256)) for t in (16, 32)
              for c in (t, 4 * t)]  # fmt: skip
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=8):
        for shape in shapes:
            with fused.active():
                assert torch.isfinite(runner.forward(shape)).all()
    assert {layer.window for layer in layers} == {None, model.config.sliding_window}


def test_a_model_the_slotted_cache_cannot_hold_falls_back_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Where the slotted cache is the default (CUDA), a model it cannot hold runs on the growing cache, with
    one warning that says why; asked for explicitly, it is refused at once; on CPU nothing is said."""
    from transformers import LlamaConfig

    from chatstream_asgi.engines.transformers.engine import UnsupportedModel, slotted_layout

    odd = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    odd.layer_types = ["full_attention", "chunked_attention"]
    plain = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with caplog.at_level("WARNING", logger="chatstream_asgi.engine"):
        assert slotted_layout(odd, torch.float32, cuda, None, "odd") is None
        assert slotted_layout(odd, torch.float32, cpu, None, "odd") is None
        assert slotted_layout(plain, torch.float32, cuda, None, "plain") is not None
        assert slotted_layout(plain, torch.float32, cuda, False, "plain") is None
    assert [r.getMessage() for r in caplog.records] == [
        "engine odd runs on the growing cache (no CUDA graphs): llama: layer types ['chunked_attention'] need a "
        "cache this engine does not have (only full-attention and sliding-window layers are supported)"
    ]
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        slotted_layout(odd, torch.float32, cpu, True, "odd")


def test_a_capture_that_fails_runs_the_steps_eagerly(
    architecture_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Graphs that fail to capture leave the steps eager (one warning) and the engine serving; with
    ``static_cache=True`` the start fails with :class:`UnsupportedModel` instead."""
    from chatstream_asgi.engines.transformers import static_path
    from chatstream_asgi.engines.transformers.engine import UnsupportedModel
    from chatstream_asgi.engines.transformers.step_runner import StepRunner

    armed = []

    class Capturing(StepRunner):  # the first runner of a start has a shape to capture, as on CUDA
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.shapes = [(1, 64, 0, 0)] if armed else []

    def failing(runners: list, device: torch.device) -> None:
        armed.clear()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(static_path, "StepRunner", Capturing)
    monkeypatch.setattr(static_path, "capture_all", failing)
    model, tokenizer, _ = load_model(str(architecture_dir), device="cpu", dtype="float32")
    strict = TransformersEngine(model, tokenizer, "cpu", static_cache=True, max_batch_size=2, compile_mode=None)
    armed.append(1)
    with pytest.raises(UnsupportedModel, match="capturing the steps in CUDA graphs failed"):
        run(strict.start())
    run(strict.shutdown())
    engine = TransformersEngine(model, tokenizer, "cpu", static_cache=True, max_batch_size=2, compile_mode=None)
    engine._path._strict = False  # as where the slotted cache is the default
    armed.append(1)

    async def serve() -> tuple[list[str], Any]:
        try:
            return await collect(ask(engine, [{"role": "user", "content": "Hi"}], "k"))
        finally:
            await engine.shutdown()

    with caplog.at_level("WARNING", logger="chatstream_asgi.engine"):
        deltas, stream = run(serve())
    assert stream.finish_reason == "length" and "".join(deltas)
    assert not engine._path.runner.shapes
    assert [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()] == [
        "CUDA graphs off (the steps run eagerly): capturing them failed: "
        "RuntimeError('operation not permitted when stream is capturing')"
    ]


@pytest.fixture(scope="module")
def architecture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_architecture(tmp_path_factory.mktemp("llama"), "llama")
