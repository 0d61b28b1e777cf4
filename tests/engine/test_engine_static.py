"""The engine's static-cache path: slots from a budget, padded decode buckets, chunked prefill.

On CPU these run the same padded steps eagerly (what CI covers); with
``CHATSTREAM_TEST_DEVICE=cuda`` the graph tests compare replayed CUDA graphs with the eager step.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from chatstream_asgi.engines.transformers import TransformersEngine, loading
from chatstream_asgi.engines.transformers.graphs import bucket_for, continued_lengths, length_buckets, row_buckets
from chatstream_asgi.engines.transformers.loading import load_model
from chatstream_asgi.engines.transformers.static_cache import KVLayout, StaticKVCache, UnsupportedModel, plan_rows
from chatstream_asgi.engines.transformers.static_path import DEFAULT_PREFILL_CHUNK
from chatstream_asgi.engines.transformers.step_runner import StepRunner

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


def test_step_shapes_pad_decode_rows_and_packed_chunks() -> None:
    """A step's shape: decode rows and the columns they read in buckets; a packed chunk's tokens and the keys
    it gathers in buckets; beside running rows, with graphs, the chunk pads to the captured joining chunk."""
    assert continued_lengths(8192) == [64, 256, 1024, 4096, 8192]
    layout = KVLayout(num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32)
    cache = StaticKVCache(layout, 64, 8192, torch.device("cpu"))
    runner = StepRunner(None, cache, 0, None, use_graphs=False, chunk=256)
    assert runner.token_buckets[-1] == 8192 and runner.joining == 256
    assert runner.key(5, 100, 0, 0) == (8, 128, 0, 0)  # decode alone
    assert runner.key(0, 1, 20, 20) == (0, 0, 32, 32)  # new prompts alone
    assert runner.key(0, 1, 20, 300) == (0, 0, 32, 1024)  # after reused beginnings
    assert runner.key(3, 100, 200, 2000) == (4, 256, 256, 2048)  # beside decode rows: a coarser length,
    assert runner.key(3, 100, 200, 2100) == (4, 256, 256, 4096)  # and the gathered keys in powers of two
    assert runner.key(1, 1, 9000, 9000) is None  # past the buffers: the planner never packs that
    assert runner.fits(0, 100, 100, 25) and not runner.fits(0, 100, 100, 33)  # a 128-token chunk returns 32 logits
    shapes = runner._shapes()
    assert (64, 8192, 0, 0) in shapes and (1, 64, 256, 256) in shapes and (16, 4096, 256, 8192) in shapes
    assert (16, 4096, 256, 2048) in shapes and (0, 0, 256, 2048) not in shapes  # alone: powers of four
    assert (1, 64, 64, 64) not in shapes  # beside rows only the joining chunk is captured: smaller ones pad to it
    assert (0, 0, 8192, 8192) in shapes and (0, 0, 8192, 16384) not in shapes  # a chunk's mask is bounded
    runner.use_graphs, runner._captured = True, shapes
    assert runner.key(3, 100, 20, 300) == (4, 256, 256, 512)


def test_static_greedy_matches_alone_across_buckets(f32_engine: TransformersEngine, monkeypatch) -> None:
    """Rows of different lengths join at different steps (batch 1 -> 2 -> 4 -> 5, padded to 8) and leave."""
    contents = [*PROMPTS, LONG]
    expected = [reference_greedy(f32_engine, c, 12) for c in contents]
    engine = static_engine(f32_engine)
    assert staggered(engine, monkeypatch, contents, {2: [1], 5: [2, 3], 7: [4]}) == expected


class Forwards:
    """Every forward of a static engine, in order: (decode rows, the token counts of its chunk's prompts)."""

    def __init__(self, engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[tuple[int, list[int]]] = []
        for name in ("_forward_step", "_forward_prefill"):
            monkeypatch.setattr(engine, name, self._recording(getattr(engine, name)))

    def _recording(self, inner: Any) -> Any:
        def forward(positions: torch.Tensor, inputs: Any, chunks: list) -> torch.Tensor:
            self.steps.append((len(positions), [len(ids) for _, _, ids, _ in chunks]))
            return inner(positions, inputs, chunks)

        return forward


def test_chunked_prefill_keeps_running_rows_decoding(f32_engine: TransformersEngine, monkeypatch) -> None:
    """A long prompt joins a running row in chunks of ``max_prefill_tokens``, each in the same forward as a
    decode step of the row (one forward a step), and joins the row's steps after its last chunk."""
    engine = static_engine(f32_engine, max_prefill_tokens=8)
    long_tokens = engine.count_tokens([{"role": "user", "content": LONG}])
    assert long_tokens > 40
    probe = StepProbe(engine, monkeypatch)
    forwards = Forwards(engine, monkeypatch)
    reached, release = probe.pause_at(2)
    params = GenerationParams(temperature=0.0, max_new_tokens=20)
    running = GenerationParams(temperature=0.0, max_new_tokens=40)  # still running when the long row joins
    mark = []

    async def main() -> list[str]:
        first = asyncio.create_task(collect(engine.generate(request("Hi", running, rid="run"))))
        await engine_reached(reached)
        mark.append(len(forwards.steps))
        second = asyncio.create_task(collect(engine.generate(request(LONG, params, rid="long"))))
        release.set()
        results = await asyncio.gather(first, second)
        await engine.shutdown()
        return ["".join(deltas) for deltas, _ in results]

    texts = run(main())
    assert texts == [reference_greedy(f32_engine, "Hi", 40), reference_greedy(f32_engine, LONG, 20)]
    joining = [(rows, takes) for rows, takes in forwards.steps[mark[0] :] if takes]  # the long prompt's
    assert sum(t for _, takes in joining for t in takes) == long_tokens
    assert all(rows == 1 and takes[0] <= 8 for rows, takes in joining)  # every chunk beside a decode step
    assert all(rows for rows, _ in forwards.steps[1:])  # after "Hi"'s prefill, no forward without a decode row
    after = forwards.steps.index(joining[-1]) + 1
    assert forwards.steps[after] == (2, [])  # the long row decodes from the step after its last chunk


def test_a_request_arriving_while_steps_run_ahead_joins_the_next_step(
    f32_engine: TransformersEngine, monkeypatch
) -> None:
    """A request submitted while the loop queues steps ahead is planned into the next step without the loop
    stopping its run to admit it (on a GPU that stop left the device idle while the host re-planned, a
    gap in every running stream); its reply and the running one are still their greedy replies alone."""
    engine = static_engine(f32_engine, max_prefill_tokens=8)
    probe = StepProbe(engine, monkeypatch)
    forwards = Forwards(engine, monkeypatch)
    reached, release = probe.pause_at(3)
    turns: list[int] = []  # the forwards run when each loop turn began
    iteration = type(engine._core)._iteration

    def counted(core: Any, admitted: list) -> None:
        turns.append(len(forwards.steps))
        iteration(core, admitted)

    monkeypatch.setattr(type(engine._core), "_iteration", counted)
    running = GenerationParams(temperature=0.0, max_new_tokens=40)
    params = GenerationParams(temperature=0.0, max_new_tokens=12)

    async def main() -> list[str]:
        first = asyncio.create_task(collect(engine.generate(request("Hi", running, rid="run"))))
        await engine_reached(reached)
        mark = len(forwards.steps)
        second = asyncio.create_task(collect(engine.generate(request(LONG, params, rid="late"))))
        assert engine._core.pending  # generate() queued it: it waits for the paused loop
        release.set()
        results = await asyncio.gather(first, second)
        await engine.shutdown()
        joined = next(i for i, (_, takes) in enumerate(forwards.steps) if i >= mark and takes)
        assert not [t for t in turns if mark <= t <= joined], "the loop stopped its run to admit the request"
        return ["".join(deltas) for deltas, _ in results]

    texts = run(main())
    assert texts == [reference_greedy(f32_engine, "Hi", 40), reference_greedy(f32_engine, LONG, 12)]


def test_a_request_arriving_just_before_the_next_step_is_planned_joins_it(
    f32_engine: TransformersEngine, monkeypatch
) -> None:
    """A request that arrives after the loop's look for arrivals and before it plans the next step (the loop
    checks, between queued steps, that nothing waits for a place) is admitted into that step: the run
    goes on (before, that check stopped it, and the loop turn that admitted it left the device idle)."""
    engine = static_engine(f32_engine, max_prefill_tokens=8)
    probe = StepProbe(engine, monkeypatch)
    reached, release = probe.pause_at(3)
    core = engine._core
    turns: list[int] = []
    stash: list[Any] = []
    delivered = [False]
    iteration, deliver, may_run_ahead, submit = (
        type(core)._iteration,
        type(core)._deliver,
        type(core)._may_run_ahead,
        core.submit,
    )

    def counted(self: Any, admitted: list) -> None:
        turns.append(len(probe.sizes))
        iteration(self, admitted)

    def delivering(self: Any, *args: Any) -> None:
        delivered[0] = True
        deliver(self, *args)

    def arriving_after_the_check(self: Any, plan: Any) -> bool:
        allowed = may_run_ahead(self, plan)
        if delivered[0] and allowed and stash:  # the check between queued steps passed: now it arrives
            with self.cond:
                self.pending.extend(stash)
            stash.clear()
        delivered[0] = False
        return allowed

    monkeypatch.setattr(type(core), "_iteration", counted)
    monkeypatch.setattr(type(core), "_deliver", delivering)
    monkeypatch.setattr(type(core), "_may_run_ahead", arriving_after_the_check)
    running = GenerationParams(temperature=0.0, max_new_tokens=40)
    params = GenerationParams(temperature=0.0, max_new_tokens=12)

    async def main() -> list[str]:
        first = asyncio.create_task(collect(engine.generate(request("Hi", running, rid="run"))))
        await engine_reached(reached)
        mark = len(turns)
        monkeypatch.setattr(core, "submit", stash.append)
        second = asyncio.create_task(collect(engine.generate(request(LONG, params, rid="late"))))  # held back
        monkeypatch.setattr(core, "submit", submit)
        assert stash and not core.pending
        release.set()
        results = await asyncio.gather(first, second)
        await engine.shutdown()
        assert not stash, "the request never arrived"
        assert len(turns) == mark, "the loop stopped its run to admit the request"
        return ["".join(deltas) for deltas, _ in results]

    texts = run(main())
    assert texts == [reference_greedy(f32_engine, "Hi", 40), reference_greedy(f32_engine, LONG, 12)]


def test_rows_that_finish_leave_between_queued_steps(f32_engine: TransformersEngine, monkeypatch) -> None:
    """Rows that reach their length or a stop string leave the batch between queued steps, and the loop keeps
    its run going (on a GPU, stopping the run at every finish left the device idle while the host retired
    and re-planned, a gap in every running stream). Every reply is still its greedy reply alone (the rows
    that fill the holes carry their inputs along), and a row that left keeps its keys and values for the next
    prompt that begins with them."""
    engine = static_engine(f32_engine)
    forwards = Forwards(engine, monkeypatch)
    turns: list[int] = []  # forwards each loop turn ran
    iteration = type(engine._core)._iteration

    def counted(core: Any, admitted: list) -> None:
        before = len(forwards.steps)
        iteration(core, admitted)
        turns.append(len(forwards.steps) - before)

    monkeypatch.setattr(type(engine._core), "_iteration", counted)
    stopping = reference_greedy(f32_engine, PROMPTS[2], 24)
    stop = stopping[len(stopping) // 2 : len(stopping) // 2 + 3]
    lengths = [30, 4, 24, 20]
    params = [GenerationParams(temperature=0.0, max_new_tokens=n) for n in lengths]
    params[2] = GenerationParams(temperature=0.0, max_new_tokens=24, stop=(stop,))
    # The row that fills the hole samples, seeded, with a repetition penalty: its generator and the tokens
    # it has seen move with it.
    params[3] = GenerationParams(temperature=0.9, top_k=20, seed=7, repetition_penalty=1.3, max_new_tokens=20)

    async def main() -> list[Any]:
        first = [
            asyncio.create_task(collect(engine.generate(request(c, p, rid=c))))
            for c, p in zip(PROMPTS, params, strict=True)
        ]
        results = await asyncio.gather(*first)
        alone = await collect(engine.generate(request(PROMPTS[3], params[3], rid="alone")))
        again = await collect(engine.generate(request(PROMPTS[1], params[1], rid="again")))
        await engine.shutdown()
        return [*results, alone, again]

    *results, (alone, _), (again, stream) = run(main())
    texts = ["".join(deltas) for deltas, _ in results]
    expected = [reference_greedy(f32_engine, c, n) for c, n in zip(PROMPTS, lengths, strict=True)]
    expected[2] = stopping[: stopping.index(stop)]
    expected[3] = "".join(alone)
    assert texts == expected
    assert [s.finish_reason for _, s in results] == ["length", "length", "stop", "length"]
    assert len([n for n in turns if n]) == 3, turns  # one run for the four replies, one for each request after
    assert "".join(again) == expected[1]
    assert stream.cached_tokens >= stream.prompt_tokens - 1  # what the short row kept when it left


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_a_step_failing_after_rows_left_ends_every_reply(f32_engine: TransformersEngine, monkeypatch, failing) -> None:
    """A step that fails while rows left the batch ahead of their last token (queued, not yet read) ends
    those replies too, as errors: no stream waits for a token that will never come; the engine serves on."""
    engine = static_engine(f32_engine)
    inner = engine._forward_step
    calls = []

    def flaky(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == failing:
            raise RuntimeError("boom")
        return inner(*args)

    monkeypatch.setattr(engine, "_forward_step", flaky)

    async def ended(content: str, new_tokens: int) -> str | None:
        stream = engine.generate(request(content, GenerationParams(temperature=0.0, max_new_tokens=new_tokens)))
        with contextlib.suppress(EngineError):
            await collect(stream)
        return stream.finish_reason

    async def main() -> tuple[list[str | None], str | None]:
        reasons = await asyncio.gather(ended(PROMPTS[0], 2), ended(PROMPTS[1], 3), ended(PROMPTS[2], 12))
        after = await ended(PROMPTS[3], 4)
        await engine.shutdown()
        return list(reasons), after

    reasons, after = run(main())
    assert set(reasons) <= {"length", "error"} and "error" in reasons
    assert after == "length"


def test_prefill_budget_applies_only_while_rows_run(f32_engine: TransformersEngine, monkeypatch) -> None:
    """An idle engine prefills a long prompt in one forward; prompts joining a running row are packed beside
    a decode step of the row, at most ``max_prefill_tokens`` a step, and come out as alone."""
    engine = static_engine(f32_engine, max_prefill_tokens=24)
    forwards = Forwards(engine, monkeypatch)
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
    assert forwards.steps[0] == (0, [long_tokens])  # alone: whole, though longer than the budget
    joined = [takes for rows, takes in forwards.steps[1:] if takes]
    assert all(sum(takes) <= 24 for takes in joined)  # the budget, shared by the packed prompts
    assert len(joined[0]) > 1  # several prompts in one forward
    assert all(rows >= 1 for rows, takes in forwards.steps[1:] if takes)  # always beside the running row


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
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer types \\['chunked_attention'\\]"),
        ({"v_head_dim": 32}, "value head size 32 differs from key head size 16"),
    ],
)
def test_unsupported_models_are_refused_at_load(changes: dict, message: str) -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModel, match=message):
        KVLayout.of(config, torch.float32)


def test_sliding_layers_keep_a_ring_and_the_budget_counts_it() -> None:
    """A window shorter than the context: a ring of ``window + RING_CHUNK - 1`` columns (and scratch) a slot;
    the slot's bytes count what each layer holds; a window as long as the context keeps every column."""
    from chatstream_asgi.engines.transformers.kv_layout import RING_CHUNK

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    config.layer_types, config.sliding_window = ["sliding_attention", "full_attention"], 100
    layout = KVLayout.of(config, torch.float32)
    assert layout.windows == (100, None)
    ring = 100 + RING_CHUNK - 1
    assert layout.columns(8192) == [ring + 1, 8193]
    assert layout.slot_bytes(8192) == (ring + 1 + 8193) * layout.bytes_per_column < 2 * 8193 * layout.bytes_per_column
    assert layout.columns(512) == [513, 513] and not layout.has_rings(512)
    two = 2.5 * layout.slot_bytes(8192) / 2**30
    assert plan_rows(layout, 8192, 8, torch.device("cpu"), kv_cache_memory=two) == 2


@cuda_only
def test_graph_decode_matches_eager_token_for_token(tiny_engine: TransformersEngine, monkeypatch) -> None:
    contents = [*PROMPTS, LONG, "Hello world", "What is"]
    joins = {2: [1], 4: [2, 3], 6: [4, 5, 6]}
    eager = staggered(static_engine(tiny_engine, cuda_graphs=False), monkeypatch, contents, joins)
    graphs = static_engine(tiny_engine)
    replayed = staggered(graphs, monkeypatch, contents, joins)
    assert graphs._path.runner is not None and graphs._path.runner.graphs  # really replayed graphs
    assert replayed == eager


def _launch_twice(engine: TransformersEngine, chunks: list, fused: Any) -> None:
    """Launch the same step over random buffers plainly, then under ``fused``'s compiled blocks: the same
    logits, the same keys and values written in the same places; outside ``active()`` the model's own forward."""
    from torch._dynamo.utils import counters

    runner, kv = engine._path.runner, engine._path.kv
    assert runner is not None and kv is not None
    positions = torch.tensor([5, 6, 7] if not chunks else [], dtype=torch.long)
    inputs = [3, 10, 0] if not chunks else None
    with torch.inference_mode():
        for buf in (*kv.keys, *kv.values):
            buf.normal_()
        before = [buf.clone() for buf in (*kv.keys, *kv.values)]
        plain = runner.launch(positions, inputs, chunks).clone()
        written = [buf.clone() for buf in (*kv.keys, *kv.values)]
        for buf, old in zip((*kv.keys, *kv.values), before, strict=True):
            buf.copy_(old)
        graphs = counters["stats"]["unique_graphs"]
        runner.fused = lambda key: fused.active()
        compiled = runner.launch(positions, inputs, chunks).clone()
        assert counters["stats"]["unique_graphs"] - graphs == 3  # the layer (both layers), rotary embedding, norm
        torch.testing.assert_close(compiled, plain)
        for buf, expected, old in zip((*kv.keys, *kv.values), written, before, strict=True):
            torch.testing.assert_close(buf, expected)  # the same values, up to the fused kernels' rounding
            assert torch.equal(buf != old, expected != old)  # in the same places, nothing else
            buf.copy_(old)
        runner.fused = lambda key: contextlib.nullcontext()
        assert torch.equal(runner.launch(positions, inputs, chunks), plain)  # inactive: the model's own forward


def test_compiled_blocks_write_and_read_the_cache_as_the_plain_step(f32_engine: TransformersEngine) -> None:
    """The model's layers compiled once (one graph for every layer, not one per layer): a decode step of
    three rows under them gives the plain step's logits and leaves every buffer as it does."""
    from chatstream_asgi.engines.transformers.compiled_step import FusedModules

    engine = prepared(static_engine(f32_engine, max_batch_size=4))
    _launch_twice(engine, [], FusedModules(engine.model, engine._path.kv.layers, "default"))


def test_compiled_blocks_prefill_a_chunk_as_the_plain_forward(f32_engine: TransformersEngine) -> None:
    """A chunk of two prompts packed together (one continuing at column 30, reading the columns before it;
    one new) under the compiled layers: the plain chunk's logits, and the same keys and values written."""
    from chatstream_asgi.engines.transformers.compiled_step import FusedModules

    engine = prepared(static_engine(f32_engine, max_batch_size=4, cuda_graphs=False))
    chunks = [(1, 30, torch.randint(3, 60, (20,)).tolist(), True), (3, 0, torch.randint(3, 60, (9,)).tolist(), True)]
    _launch_twice(engine, chunks, FusedModules(engine.model, engine._path.kv.layers, "default"))


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


def test_attention_kernel_is_transformers_attention() -> None:
    """The engine's kernel gives transformers' attention: SDPA's for plain layers (one query token's heads
    grouped per key/value head, traced whole by torch.compile too), and the eager functions' logit
    soft-capping (Gemma 2) and attention sinks (gpt-oss), with one query token or several."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_attention
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_attention

    from chatstream_asgi.engines.transformers.attention import attend

    module = torch.nn.Module().eval()
    module.num_key_value_groups = 3
    module.sinks = torch.randn(6)
    compiled = torch.compile(attend, backend="eager", fullgraph=True)
    for tokens in (1, 5):
        query, key, value = torch.randn(2, 6, tokens, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
        last = torch.tensor([9, 15]).view(2, 1, 1, 1) - tokens + 1 + torch.arange(tokens).view(1, 1, tokens, 1)
        mask = torch.arange(16).view(1, 1, 1, 16) <= last
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        out = compiled(query, key, value, mask, 0.3, {})
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(out, expected)
        assert out.shape == (2, tokens, 6, 8) and out.is_contiguous()
        expected, _ = gemma2_attention(module, query, key, value, additive, scaling=0.3, softcap=2.0)
        torch.testing.assert_close(attend(query, key, value, mask, 0.3, {"softcap": 2.0}), expected)
        expected, _ = gpt_oss_attention(module, query, key, value, additive, scaling=0.3)
        torch.testing.assert_close(attend(query, key, value, mask, 0.3, {"s_aux": module.sinks}), expected)


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
    assert fused._path.runner is not None and fused._path.runner.graphs
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
        engines.append(TransformersEngine(model, tokenizer, device, max_batch_size=4, compile_mode=None))
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
    assert all(e._path.runner is not None and e._path.runner.graphs for e in engines)
    assert outputs == [[reference_greedy(e, c, 12) for c in PROMPTS] for e in engines]


def test_cli_hands_the_gpu_options_to_the_engine(monkeypatch) -> None:
    from chatstream_asgi import cli
    from chatstream_asgi.cli import options as cli_options

    seen: dict[str, Any] = {}

    def fake(cls: type, name: str, **options: Any) -> str:
        seen.update(options, name=name)
        return "engine"

    monkeypatch.setattr(TransformersEngine, "from_pretrained", classmethod(fake))
    monkeypatch.setattr(loading, "resolve_model", lambda name: name)  # the default model need not be installed
    argv = ["serve", "--no-cuda-graphs", "--kv-cache-memory", "2.5", "--max-prefill-tokens", "256"]
    assert cli._engine(cli.build_parser().parse_args(argv)) == "engine"
    assert seen["cuda_graphs"] is False and seen["compile_mode"] == "auto"
    assert (seen["kv_cache_memory"], seen["gpu_memory_utilization"], seen["max_prefill_tokens"]) == (2.5, None, 256)
    from chatstream_asgi.engines.transformers.compiled_step import AUTO, COMPILE_MODES

    assert (AUTO, *COMPILE_MODES) == cli_options.COMPILE_CHOICES  # the CLI's choices are the engine's modes
    defaults = cli.build_parser().parse_args(["serve"])
    assert defaults.max_prefill_tokens == DEFAULT_PREFILL_CHUNK  # the CLI's default is the engine's
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


def test_an_engine_starts_while_another_serves_on_the_same_device(tiny_model_dir: Path) -> None:
    """One process, two slotted engines on one device (an engine per GPU in production): the second starts
    (budget, compile, capture) while the first streams, and a third pair starts at once; every reply is what
    the model gives alone. On a GPU a capture beside another engine's thread failed ("operation not
    permitted when stream is capturing"), and two budgets read the same free memory."""
    built = []
    for _ in range(3):
        model, tokenizer, _ = load_model(str(tiny_model_dir), device=DEVICE, dtype="float32")
        built.append(
            TransformersEngine(model, tokenizer, DEVICE, static_cache=True, max_batch_size=4, compile_mode=None)
        )
    first, second, third = built
    long = GenerationParams(temperature=0.0, max_new_tokens=48)
    params = GenerationParams(temperature=0.0, max_new_tokens=12)

    async def main() -> tuple[str, list[str]]:
        await first.start()
        try:
            streaming = asyncio.ensure_future(collect(first.generate(request(PROMPTS[1], long, rid="long"))))
            await asyncio.gather(second.start(), third.start())
            replies = [collect(e.generate(request(c, params, rid=c))) for e in (first, second, third) for c in PROMPTS]
            done = await asyncio.gather(*replies)
            return "".join((await streaming)[0]), ["".join(deltas) for deltas, _ in done]
        finally:
            for engine in built:
                await engine.shutdown()

    text, outputs = run(main())
    assert text == reference_greedy(first, PROMPTS[1], 48)
    assert outputs == [reference_greedy(e, c, 12) for e in built for c in PROMPTS]
    if DEVICE.startswith("cuda"):
        assert all(e._path.runner is not None and e._path.runner.graphs for e in built)
