"""Constrained and free rows in one batch: every constrained reply of a random model validates against its
schema (only the grammar mask can make it JSON), and the free rows beside it give, token for token, what
they give without it. On the growing cache and the slotted one (CPU), and under CUDA graphs where
``CHATSTREAM_TEST_DEVICE=cuda`` (uncompiled, float32). Log-probabilities agree with the greedy picks."""

from __future__ import annotations

import asyncio
import json
import math
import os
from typing import Any

import jsonschema
import pytest
import torch

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest, UnsupportedFeature
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.loading import load_model

pytest.importorskip("llguidance")

DEVICE = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu")
WATCHDOG = 120.0
FREE = GenerationParams(temperature=0.0, max_new_tokens=16)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "inner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "n", "tags", "inner"],
    "additionalProperties": False,
}
FREE_PROMPTS = ["Hi", "What is the capital of France?", "The quick brown fox", "a b c d e f g"]


def constrained(temperature: float = 0.0, logprobs: int | None = None) -> GenerationParams:
    return GenerationParams(
        temperature=temperature, max_new_tokens=160, json_schema=json.dumps(SCHEMA), logprobs=logprobs
    )


def request(rid: str, content: str, params: GenerationParams) -> GenerationRequest:
    return GenerationRequest(rid, [{"role": "user", "content": content}], params, ignore_eos=params.json_schema is None)


async def collect(stream: Any) -> tuple[str, str | None, list]:
    parts, logprobs = [], []
    async for delta in stream:
        parts.append(delta)
        logprobs += stream.take_logprobs()
    return "".join(parts), stream.finish_reason, logprobs + stream.take_logprobs()


async def batch(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[tuple[str, str | None, list]]:
    """``requests`` queued at once (they start in one step) and collected."""
    await engine.start()
    with engine._cond:  # hold the loop back until every request is queued
        streams = [engine.generate(r) for r in requests]
    return await asyncio.gather(*(collect(s) for s in streams))


def mixed_batch_keeps_free_rows(engine: TransformersEngine) -> None:
    engine.check_params(constrained())

    async def main() -> tuple[list, list]:
        try:
            alone = await batch(engine, [request(f"f{i}", p, FREE) for i, p in enumerate(FREE_PROMPTS)])
            rows = [request(f"f{i}", p, FREE) for i, p in enumerate(FREE_PROMPTS)]
            rows[1:1] = [request("c0", "Describe it as JSON.", constrained()), request("c1", "x", constrained(0.9))]
            rows.append(request("c2", "Another one", constrained(1.0)))
            return alone, await batch(engine, rows)
        finally:
            await engine.shutdown()

    alone, mixed = asyncio.run(asyncio.wait_for(main(), WATCHDOG))
    free = [mixed[0], *mixed[3:6]]
    assert [text for text, _, _ in free] == [text for text, _, _ in alone]
    for text, finish, _ in (mixed[1], mixed[2], mixed[6]):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing-cache", "slotted-cache"])
def test_constrained_and_free_rows_share_a_batch_on_cpu(tiny_engine: TransformersEngine, static_cache: bool) -> None:
    if tiny_engine.device.type != "cpu":
        pytest.skip("the CPU paths")
    engine = TransformersEngine(
        tiny_engine.model, tiny_engine.tokenizer, "cpu", static_cache=static_cache, compile_mode=None, max_batch_size=8
    )
    mixed_batch_keeps_free_rows(engine)


@pytest.mark.skipif(
    not (DEVICE.startswith("cuda") and torch.cuda.is_available()), reason="needs CHATSTREAM_TEST_DEVICE=cuda"
)
def test_constrained_and_free_rows_share_a_batch_under_cuda_graphs(tiny_model_dir: Any) -> None:
    model, tokenizer, _ = load_model(str(tiny_model_dir), device=DEVICE, dtype="float32")
    engine = TransformersEngine(model, tokenizer, model.device, static_cache=True, compile_mode=None, max_batch_size=8)
    mixed_batch_keeps_free_rows(engine)
    assert engine._path.runner is not None and engine._path.runner.graphs  # the steps were replayed graphs


def test_logprobs_agree_with_the_greedy_picks(tiny_engine: TransformersEngine) -> None:
    engine = TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode=None)
    params = GenerationParams(temperature=0.0, max_new_tokens=16, logprobs=5)

    async def main() -> list:
        try:
            return await batch(
                engine,
                [request("a", "Hi", params), request("b", "Hi", FREE), request("c", "x", constrained(logprobs=3))],
            )
        finally:
            await engine.shutdown()

    (text, _, entries), (free_text, _, none), (json_text, _, json_entries) = asyncio.run(
        asyncio.wait_for(main(), WATCHDOG)
    )
    assert none == [] and text == free_text  # asking for log-probabilities changes nothing else
    assert len(entries) == 16 and b"".join(e.raw for e in entries).decode(errors="replace") == text
    for entry in [*entries, *json_entries]:
        assert entry.top[0].token == entry.token and entry.top[0].logprob == entry.logprob  # greedy: the best
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top) <= 1 + 1e-5
    assert len(entries[0].top) == 5 and b"".join(e.raw for e in json_entries).decode().startswith(json_text)
    assert all(len(e.top) <= 3 for e in json_entries)  # fewer where the grammar allows fewer tokens


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "objekt"}, "Invalid type"),
        ({"type": "string", "format": "uri-reference"}, "Unknown format"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not exist"),
        ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["a"]},
         "unsatisfiable"),
        ({"not": {"type": "string"}}, "Unimplemented"),
    ],
)  # fmt: skip
def test_schemas_it_cannot_follow_are_refused_with_the_reason(
    tiny_engine: TransformersEngine, schema: dict, words: str
) -> None:
    with pytest.raises(UnsupportedFeature, match=words) as caught:
        tiny_engine.check_params(GenerationParams(json_schema=json.dumps(schema)))
    assert caught.value.param == "response_format"


def test_a_reply_near_its_limit_is_steered_to_close(tiny_engine: TransformersEngine) -> None:
    """``json_object`` bounds nothing: a random model never closes its strings by itself, so every reply here
    parses only because the last tokens before ``max_new_tokens`` are steered to close it."""
    engine = TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode=None)
    schema = json.dumps({"type": "object"})
    params = [GenerationParams(temperature=1.0, seed=seed, max_new_tokens=64, json_schema=schema) for seed in range(6)]
    engine.check_params(params[0])

    async def main() -> list:
        try:
            return await batch(engine, [request(str(i), "Hi", p) for i, p in enumerate(params)])
        finally:
            await engine.shutdown()

    replies = asyncio.run(asyncio.wait_for(main(), WATCHDOG))
    for text, finish, _ in replies:
        assert finish == "stop" and isinstance(json.loads(text), dict), text
