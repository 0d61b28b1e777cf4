"""The engine's static-cache path: slots from a budget, padded decode buckets, chunked prefill.

On CPU these run the same padded steps eagerly (what CI covers); with
``CHATSTREAM_TEST_DEVICE=cuda`` the graph tests compare replayed CUDA graphs with the eager step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import engine_reached
from test_engine_batching import PROMPTS, StepProbe, collect, reference_greedy, request, run
from transformers import LlamaConfig

from chatstream_asgi.engines.base import EngineError, GenerationParams, GenerationStream
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.graph_runner import (
    PrefillRunner,
    bucket_for,
    continued_lengths,
    length_buckets,
    row_buckets,
)
from chatstream_asgi.engines.transformers.loading import load_model
from chatstream_asgi.engines.transformers.static_cache import KVLayout, StaticKVCache, UnsupportedModel, plan_rows

DEVICE = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu")
cuda_only = pytest.mark.skipif(
    not (DEVICE.startswith("cuda") and torch.cuda.is_available()), reason="needs CHATSTREAM_TEST_DEVICE=cuda"
)
LONG = "a b c d e f g h i j k l m n o p The quick brown fox jumps over the lazy dog. " * 3


def static_engine(tiny_engine: TransformersEngine, **options: Any) -> TransformersEngine:
    options.setdefault("max_batch_size", 8)
    options.setdefault("compile_mode", None)  # compiling takes seconds per engine; the compile tests ask for it
    return TransformersEngine(
        tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, static_cache=True, **options
    )


def prepared(engine: TransformersEngine) -> TransformersEngine:
    """``engine`` started and stopped: its static cache and runners built (and kept), nothing running."""

    async def cycle() -> None:
        await engine.start()
        await engine.shutdown()

    run(cycle())
    return engine


def staggered(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch, contents: list[str], joins: dict) -> list:
    """Start ``contents[0]``; before decode step ``s`` start the prompts ``joins[s]``; return all texts."""
    probe = StepProbe(engine, monkeypatch)
    pauses = {step: probe.pause_at(step) for step in joins}

    async def main() -> list[str]:
        def start(i: int) -> asyncio.Task:
            return asyncio.create_task(collect(engine.generate(request(contents[i], rid=str(i)))))

        await engine.start()
        tasks = [start(0)]
        for step, joiners in joins.items():
            reached, release = pauses[step]
            await engine_reached(reached)
            tasks += [start(i) for i in joiners]
            release.set()
        results = await asyncio.gather(*tasks)
        await engine.shutdown()
        return ["".join(deltas) for deltas, _ in results]

    texts = run(main())
    monkeypatch.undo()
    return texts


def test_buckets() -> None:
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert row_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert row_buckets(1) == [1]
    assert length_buckets(512) == [64, 128, 256, 512]
    assert length_buckets(300) == [64, 128, 256, 300]
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9, [1, 2, 4, 8])


def test_prefill_shapes_batch_chunks_that_read_earlier_columns() -> None:
    """New prompts after reused beginnings of different lengths (or a continued chunk) pad to one captured
    ``(rows, tokens, length)`` shape while the columns they gather stay bounded; beyond, they split."""
    assert continued_lengths(8192) == [64, 256, 1024, 4096, 8192]
    layout = KVLayout(num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32)
    runner = PrefillRunner(
        None, None, StaticKVCache(layout, 64, 8192, torch.device("cpu")), 0, use_graphs=False, chunk=256
    )
    key = runner._key
    assert key(5, 20, 20) == (8, 32, 32)  # new prompts
    assert key(5, 20, 300) == (8, 32, 1024)  # after reused beginnings
    assert key(1, 256, 8000) == (1, 256, 8192)  # one long prompt's last chunk
    assert key(64, 16, 256) == (64, 16, 256) and key(32, 100, 1000) == (32, 128, 1024)
    assert runner.batchable(8, 100, 2000) and not runner.batchable(9, 100, 2000)  # 16 x 4096 columns: too many
    assert key(2, 600, 600) is None and not runner.batchable(64, 256, 256)  # past 512 tokens or 8192 a forward
    assert key(2, 300, 900) is None  # a continued chunk beyond the configured chunk's bucket


def test_static_greedy_matches_alone_across_buckets(f32_engine: TransformersEngine, monkeypatch) -> None:
    """Rows of different lengths join at different steps (batch 1 -> 2 -> 4 -> 5, padded to 8) and leave."""
    contents = [*PROMPTS, LONG]
    expected = [reference_greedy(f32_engine, c, 12) for c in contents]
    engine = static_engine(f32_engine)
    assert staggered(engine, monkeypatch, contents, {2: [1], 5: [2, 3], 7: [4]}) == expected


def test_chunked_prefill_keeps_running_rows_decoding(f32_engine: TransformersEngine, monkeypatch) -> None:
    engine = static_engine(f32_engine, max_prefill_tokens=8)
    long_tokens = engine.count_tokens([{"role": "user", "content": LONG}])
    assert long_tokens > 40
    prefills: list[int] = []
    inner = engine._forward_prefill

    def counting(ids: torch.Tensor, *args: Any) -> torch.Tensor:
        prefills.append(ids.shape[1])
        return inner(ids, *args)

    monkeypatch.setattr(engine, "_forward_prefill", counting)
    probe = StepProbe(engine, monkeypatch)
    reached, release = probe.pause_at(2)
    params = GenerationParams(temperature=0.0, max_new_tokens=20)
    running = GenerationParams(temperature=0.0, max_new_tokens=40)  # still running when the long row joins
    mark = []

    async def main() -> list[str]:
        first = asyncio.create_task(collect(engine.generate(request("Hi", running, rid="run"))))
        await engine_reached(reached)
        mark.append(len(prefills))
        second = asyncio.create_task(collect(engine.generate(request(LONG, params, rid="long"))))
        release.set()
        results = await asyncio.gather(first, second)
        await engine.shutdown()
        return ["".join(deltas) for deltas, _ in results]

    texts = run(main())
    assert texts == [reference_greedy(f32_engine, "Hi", 40), reference_greedy(f32_engine, LONG, 20)]
    chunks = prefills[mark[0] :]  # the long prompt's
    assert max(chunks) <= 8 and len(chunks) >= long_tokens // 8
    # The long prompt arrived during decode step 2: from step 3 on, one step of the running row
    # beside every chunk (queued before it), and the long row joins the step after its last chunk.
    assert probe.sizes[3 : 3 + len(chunks)] == [1] * len(chunks)
    assert probe.sizes[3 + len(chunks)] == 2


def test_prefill_budget_applies_only_while_rows_run(f32_engine: TransformersEngine, monkeypatch) -> None:
    """An idle engine prefills a long prompt in one forward; prompts joining a running row are batched
    beside a decode step of the row, at most ``max_prefill_tokens`` of each, and come out as alone."""
    engine = static_engine(f32_engine, max_prefill_tokens=24)
    shapes: list[tuple[int, int]] = []
    inner = engine._forward_prefill

    def recording(ids: torch.Tensor, *args: Any) -> torch.Tensor:
        shapes.append(tuple(ids.shape))
        return inner(ids, *args)

    monkeypatch.setattr(engine, "_forward_prefill", recording)
    probe = StepProbe(engine, monkeypatch)
    reached, release = probe.pause_at(2)
    long_tokens = engine.count_tokens([{"role": "user", "content": LONG}])
    params = GenerationParams(temperature=0.0, max_new_tokens=12)
    running = GenerationParams(temperature=0.0, max_new_tokens=40)

    async def main() -> list[str]:
        first = asyncio.create_task(collect(engine.generate(request(LONG, running, rid="long"))))
        await engine_reached(reached)
        joiners = [asyncio.create_task(collect(engine.generate(request(c, params, rid=c)))) for c in PROMPTS]
        release.set()
        results = await asyncio.gather(first, *joiners)
        await engine.shutdown()
        return ["".join(deltas) for deltas, _ in results]

    texts = run(main())
    assert texts == [reference_greedy(f32_engine, LONG, 40), *(reference_greedy(f32_engine, c, 12) for c in PROMPTS)]
    assert shapes[0] == (1, long_tokens)  # alone: whole, though longer than the budget
    assert shapes[1][0] > 1 and all(width <= 24 for _, width in shapes[1:])  # joiners: batched, chunked
    assert probe.sizes[3] == 1  # the running row's step beside the joiners' first prefill


def test_budget_caps_rows_and_the_rest_wait(tiny_engine: TransformersEngine, monkeypatch) -> None:
    assert KVLayout.of(tiny_engine.model.config, torch.float32).bytes_per_token == 2 * 2 * 2 * 16 * 4  # k+v, layers
    layout = KVLayout.of(tiny_engine.model.config, tiny_engine.model.dtype)
    slot = layout.bytes_per_token * (tiny_engine.context_len + 1)
    two_rows = 2.5 * slot / 2**30
    assert plan_rows(layout, tiny_engine.context_len, 8, torch.device("cpu"), kv_cache_memory=two_rows) == 2
    with pytest.raises(EngineError, match="holds no sequence of 512 tokens"):
        plan_rows(layout, tiny_engine.context_len, 8, torch.device("cpu"), kv_cache_memory=0.5 * slot / 2**30)

    engine = static_engine(tiny_engine, kv_cache_memory=two_rows)
    probe = StepProbe(engine, monkeypatch)
    reached, release = probe.pause_at(1)
    usage = []

    async def main() -> list[GenerationStream]:
        streams = [engine.generate(request(p, rid=str(i))) for i, p in enumerate(PROMPTS)]
        tasks = asyncio.gather(*(collect(s) for s in streams))
        await engine_reached(reached)
        usage.append(engine.kv_cache_usage)
        release.set()
        await tasks
        await engine.shutdown()
        usage.append(engine.kv_cache_usage)
        return streams

    streams = run(main())
    assert [s.finish_reason for s in streams] == ["length"] * 4
    assert max(probe.sizes) == 2  # never more rows than the budget holds
    assert usage == [1.0, 0.0]


def test_budget_too_small_fails_start(tiny_engine: TransformersEngine) -> None:
    engine = static_engine(tiny_engine, kv_cache_memory=1e-6)
    with pytest.raises(EngineError, match="raise the budget or lower context_len"):
        run(engine.start())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sliding_window": 64}, "sliding-window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer types"),
        ({"v_head_dim": 32}, "value head size 32 differs from key head size 16"),
    ],
)
def test_unsupported_models_are_refused_at_load(tiny_engine: TransformersEngine, changes: dict, message: str) -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModel, match=message):
        KVLayout.of(config, torch.float32)
    assert KVLayout.of(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2), torch.float32)


@cuda_only
def test_graph_decode_matches_eager_token_for_token(tiny_engine: TransformersEngine, monkeypatch) -> None:
    contents = [*PROMPTS, LONG, "Hello world", "What is"]
    joins = {2: [1], 4: [2, 3], 6: [4, 5, 6]}
    eager = staggered(static_engine(tiny_engine, cuda_graphs=False), monkeypatch, contents, joins)
    graphs = static_engine(tiny_engine)
    replayed = staggered(graphs, monkeypatch, contents, joins)
    assert graphs._runner is not None and graphs._runner.graphs  # really replayed graphs
    assert replayed == eager


def test_compiled_blocks_write_and_read_the_cache_as_the_plain_step(f32_engine: TransformersEngine) -> None:
    """The model's layers compiled once (one graph for every layer, not one per layer): the fused step
    gives the plain step's logits and leaves every buffer as it does (inside torch.compile the decode
    write is an index assignment, not the scatter the plain step runs); outside ``active()`` the
    model runs its own forward."""
    from torch._dynamo.utils import counters

    from chatstream_asgi.engines.transformers.compiled_step import FusedModules

    engine = prepared(static_engine(f32_engine, max_batch_size=4))
    runner, kv = engine._runner, engine._static_kv
    assert runner is not None and kv is not None
    with torch.inference_mode():
        for buf in (*kv.keys, *kv.values):
            buf.normal_()
        runner.inputs(4).copy_(torch.tensor([[5, 6, 7, 8], [3, 10, 0, 63]]))
        before = [buf.clone() for buf in (*kv.keys, *kv.values)]
        plain = runner.plain_step(runner.inputs(3), 64).clone()
        written = [buf.clone() for buf in (*kv.keys, *kv.values)]
        for buf, old in zip((*kv.keys, *kv.values), before, strict=True):
            buf.copy_(old)
        fused = FusedModules(engine.model, kv.layers, "default")
        graphs = counters["stats"]["unique_graphs"]
        with fused.active():
            compiled = runner.plain_step(runner.inputs(3), 64)
        assert (
            counters["stats"]["unique_graphs"] - graphs == 3
        )  # the layer (both layers), the rotary embedding, the norm
        torch.testing.assert_close(compiled, plain)
        for buf, expected, old in zip((*kv.keys, *kv.values), written, before, strict=True):
            torch.testing.assert_close(buf, expected)  # the same values, up to the fused kernels' rounding
            assert torch.equal(buf != old, expected != old)  # in the same places (3 rows' columns), nothing else
        for buf, old in zip((*kv.keys, *kv.values), before, strict=True):
            buf.copy_(old)
        assert torch.equal(runner.plain_step(runner.inputs(3), 64), plain)  # inactive: the model's own forward
    assert engine.model.config._attn_implementation == "sdpa"  # the grouped attention only while compiled


def test_compiled_blocks_prefill_a_chunk_as_the_plain_forward(f32_engine: TransformersEngine) -> None:
    """Prefill chunks under the compiled layers (two rows continuing at column 30, reading the columns
    before them): the plain chunk's logits, and the same keys and values written."""
    from torch._dynamo.utils import counters

    from chatstream_asgi.engines.transformers.compiled_step import FusedModules

    engine = prepared(static_engine(f32_engine, max_batch_size=4, cuda_graphs=False))  # chunks run, not replayed
    prefill, kv = engine._prefill_runner, engine._static_kv
    assert prefill is not None and kv is not None
    ids = torch.randint(3, 60, (2, 20))
    columns = torch.arange(30, 50).expand(2, 20)
    slots = torch.tensor([1, 3])
    with torch.inference_mode():
        for buf in (*kv.keys, *kv.values):
            buf.normal_()
        plain = prefill.run(ids, columns, columns, slots, 50)
        prefill.join()  # on CUDA the chunk runs on the runner's stream
        written = [buf[:, :, : kv.scratch].clone() for buf in (*kv.keys, *kv.values)]
        plain = plain.clone()
        prefill.fused = FusedModules(engine.model, kv.layers, "default").active
        graphs = counters["stats"]["unique_graphs"]
        compiled = prefill.run(ids, columns, columns, slots, 50)
        prefill.join()
    assert counters["stats"]["unique_graphs"] - graphs == 3  # really compiled: the layer, rotary embedding, norm
    torch.testing.assert_close(compiled, plain)
    for buf, expected in zip((*kv.keys, *kv.values), written, strict=True):
        torch.testing.assert_close(buf[:, :, : kv.scratch], expected)  # (padding tokens all write the scratch column)


def tiny_llama() -> torch.nn.Module:
    """A fresh tiny Llama (grouped query heads), of its own: routing its blocks leaves the shared fixtures alone."""
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_routed_model_still_traces_whole_copies_and_pickles() -> None:
    """Compiling the blocks routes their forward for good: outside the engine's compiled steps the
    model still traces whole with ``fullgraph`` (a user's ``torch.compile``, transformers' ``generate``
    with a static cache), a deep copy of it computes with its own weights, and it pickles."""
    import copy
    import io

    from chatstream_asgi.engines.transformers.compiled_step import FusedModules

    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
        reference = copy.deepcopy(model)  # not routed
        kv = StaticKVCache(KVLayout.of(model.config, torch.float32), 1, 16, model.device)
        FusedModules(model, kv.layers, "default")  # routes; compiles nothing until active
        traced = torch.compile(lambda ids: model(ids).logits, backend="eager", fullgraph=True)(ids)  # run eagerly
        torch.testing.assert_close(traced, expected)
        twin = copy.deepcopy(model)
        for module in (twin, reference):
            for p in module.model.layers.parameters():
                p.zero_()
        assert torch.equal(twin(ids).logits, reference(ids).logits)
        assert not torch.equal(twin(ids).logits, expected)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(ids).logits, expected)


def test_grouped_attention_is_transformers_sdpa_when_compiled() -> None:
    """The compiled blocks' attention (one query token's heads grouped per key/value head) gives
    transformers' SDPA attention's output, called as transformers' function is (``dropout`` and
    ``scaling`` may come positionally), with the engine's mask or none."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from chatstream_asgi.engines.transformers.compiled_step import _grouped_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups = 3
    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    mask = (torch.arange(16) <= torch.tensor([[9], [15]])).view(2, 1, 1, 16)
    attend = torch.compile(lambda *args: _grouped_sdpa(*args), backend="eager", fullgraph=True)  # the grouped path
    for args in ((mask, 0.0, 0.3), (None,)):
        out, _ = attend(module, query, key, value, *args)
        expected, _ = sdpa_attention_forward(module, query, key, value, *args)
        torch.testing.assert_close(out, expected)
        assert out.shape == (2, 1, 6, 8) and out.is_contiguous()


def test_blocks_paired_with_other_cache_layers_are_not_compiled(f32_engine: TransformersEngine) -> None:
    """Each compiled block writes the cache layer at its position: a model whose blocks attend with
    other layers (here two swapped) is refused, which leaves the plain step (the caller warns)."""
    import copy

    from chatstream_asgi.engines.transformers.compiled_step import FusedModules, repeated_blocks

    model = copy.deepcopy(f32_engine.model)
    blocks = repeated_blocks(model)
    assert blocks is not None and len(blocks) == 2
    blocks[0], blocks[1] = blocks[1], blocks[0]
    with pytest.raises(ValueError, match="block 0 of the model attends with cache layer 1"):
        FusedModules(model, [object(), object()], "default")


@cuda_only
def test_compiled_decode_matches_eager_token_for_token(
    f32_engine: TransformersEngine, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The step and the prefill chunks fused by torch.compile (forced on for every rows bucket and chunk)
    give the eager step's tokens (float32: in bfloat16 the fused kernels' rounding flips near-tie picks)."""
    import test_engine_batching

    from chatstream_asgi.engines.transformers import compiled_step

    contents = [*PROMPTS, LONG, "Hello world", "What is"]
    joins = {2: [1], 4: [2, 3], 6: [4, 5, 6]}
    eager = staggered(static_engine(f32_engine, cuda_graphs=False), monkeypatch, contents, joins)
    timings = itertools.cycle([1.0, 0.5])  # plain, then compiled, per bucket: the compiled step "wins"
    monkeypatch.setattr(compiled_step, "_replay_ms", lambda *args: next(timings))
    monkeypatch.setattr(test_engine_batching, "WATCHDOG", 600)  # autotuning the matmuls takes minutes here
    fused = static_engine(f32_engine, compile_mode="auto")  # the engine's default mode
    with caplog.at_level(logging.INFO, logger="chatstream_asgi.engine"):
        replayed = staggered(fused, monkeypatch, contents, joins)
    assert fused._runner is not None and fused._runner.compiled_rows == set(fused._runner.row_buckets)
    assert f"compiled the decode step's blocks ({compiled_step.DEFAULT_COMPILE_MODE})" in caplog.text
    assert "compiled chunks used" in caplog.text
    assert replayed == eager


@pytest.mark.parametrize("options", [{"static_cache": False}, {"static_cache": True, "cuda_graphs": False}])
def test_compile_without_cuda_graphs_warns_and_is_ignored(
    tiny_engine: TransformersEngine, options: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """``--compile`` fuses only the captured CUDA-graph step: elsewhere (CPU) it says so instead of nothing;
    the default (``"auto"``) is off there without a word."""
    from chatstream_asgi.engines.transformers.compiled_step import DEFAULT_COMPILE_MODE

    with caplog.at_level(logging.WARNING, logger="chatstream_asgi.engine"):
        quiet = TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, **options)
        engine = TransformersEngine(
            tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode=True, **options
        )
    assert quiet.compile_mode is None and engine.compile_mode is None
    reason = (
        "the decode step is compiled only where it is captured in CUDA graphs (static cache, cuda_graphs on)"
        if engine.device.type == "cuda"
        else "only the CUDA-graph decode step is compiled; on CPU the step is bound by its matmuls and compiling "
        'measured no worthwhile gain (README: "Fusing the step")'
    )
    assert [r.getMessage() for r in caplog.records if "compile mode" in r.getMessage()] == [
        f"compile mode {DEFAULT_COMPILE_MODE!r} ignored on {engine.device}: {reason}"
    ]
    with pytest.raises(ValueError, match="compile mode 'reduce-overhead': expected one of 'auto', 'default'"):
        TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode="reduce-overhead")


@cuda_only
def test_graph_engine_matches_alone(f32_engine: TransformersEngine, monkeypatch) -> None:
    contents = [*PROMPTS, LONG]
    expected = [reference_greedy(f32_engine, c, 12) for c in contents]
    assert staggered(static_engine(f32_engine), monkeypatch, contents, {2: [1], 5: [2, 3], 7: [4]}) == expected


@cuda_only
def test_engines_on_every_gpu_in_one_process_capture_and_match(tiny_model_dir: Path) -> None:
    """One graph-capturing engine per visible GPU (two on the same one when there is one), started
    one after another, then streaming at once: each gives what its model gives alone. Capturing on
    the first GPU's stream made the second GPU's capture fail."""
    count = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(count)] if count > 1 else ["cuda:0", "cuda:0"]
    engines = []
    for device in devices:
        model, tokenizer, _ = load_model(str(tiny_model_dir), device=device, dtype="float32")
        engines.append(TransformersEngine(model, tokenizer, device, max_batch_size=4))
    params = GenerationParams(temperature=0.0, max_new_tokens=12)

    async def main() -> list[list[str]]:
        for engine in engines:
            await engine.start()
        try:
            runs = [[collect(e.generate(request(c, params, rid=c))) for c in PROMPTS] for e in engines]
            results = await asyncio.gather(*(asyncio.gather(*r) for r in runs))
        finally:
            for engine in engines:
                await engine.shutdown()
        return [["".join(deltas) for deltas, _ in r] for r in results]

    outputs = run(main())
    assert all(e._runner is not None and e._runner.graphs for e in engines)
    assert outputs == [[reference_greedy(e, c, 12) for c in PROMPTS] for e in engines]


def test_cli_hands_the_gpu_options_to_the_engine(monkeypatch) -> None:
    from chatstream_asgi import cli

    seen: dict[str, Any] = {}

    def fake(cls: type, name: str, **options: Any) -> str:
        seen.update(options, name=name)
        return "engine"

    monkeypatch.setattr(TransformersEngine, "from_pretrained", classmethod(fake))
    argv = ["serve", "--no-cuda-graphs", "--kv-cache-memory", "2.5", "--max-prefill-tokens", "256"]
    assert cli._engine(cli.build_parser().parse_args(argv)) == "engine"
    assert seen["cuda_graphs"] is False and seen["compile_mode"] == "auto"
    assert (seen["kv_cache_memory"], seen["gpu_memory_utilization"], seen["max_prefill_tokens"]) == (2.5, None, 256)
    from chatstream_asgi.engines.transformers.compiled_step import AUTO, COMPILE_MODES

    assert (AUTO, *COMPILE_MODES) == cli.COMPILE_CHOICES  # the CLI's choices are the engine's modes
    for flag, mode in ((["--compile"], True), (["--compile", "default"], "default"), (["--no-compile"], None)):
        assert cli._engine(cli.build_parser().parse_args(["serve", *flag])) == "engine"
        assert seen["compile_mode"] == mode


def test_kv_cache_usage_is_a_metric() -> None:
    from chatstream_asgi import MockEngine
    from chatstream_asgi.service.metrics import Metrics

    metrics = Metrics()
    engine = MockEngine()
    engine.kv_cache_usage = 0.25
    metrics.observe_engine(engine)
    assert b"chatstream_kv_cache_usage_ratio 0.25" in metrics.render()
    engine.kv_cache_usage = 1.0
    assert b"chatstream_kv_cache_usage_ratio 1.0" in metrics.render()
    other = Metrics()
    other.observe_engine(MockEngine())  # an engine without a static cache: the contract's default
    assert b"chatstream_kv_cache_usage_ratio 0.0" in other.render()
