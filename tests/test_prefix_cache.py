"""Prefix reuse: greedy output with the prefix cache is token for token the output without it.

Each scenario runs the same requests through an engine with reuse on and one with it off (both on the
tiny model, on the eager cache and on the static cache, which runs on CPU with ``cuda_graphs=False``)
and compares the texts, and checks that reuse happened where it should (``cached_tokens``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, NamedTuple

import anyio
import httpx
import pytest
from test_engine_batching import collect, run

from chatstream_asgi import ChatStream, get_result
from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.prefix_cache import PrefixCache
from chatstream_asgi.web.app import create_app

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=10)
SYSTEM = "You are a helpful assistant. The quick brown fox jumps over the lazy dog. " * 3
QUESTIONS = ["What is the capital of France?", "Hello world", "a b c d e f g", "The quick brown fox"]


def make(tiny_engine: TransformersEngine, static: bool, **options: Any) -> TransformersEngine:
    options = {"prefix_cache": True, **options}  # on: whatever the device's default
    options = {"static_cache": True, "cuda_graphs": False, **options} if static else options
    return TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, max_batch_size=8, **options)


class Turn(NamedTuple):
    text: str
    cached: int
    prompt: int


async def ask(engine: TransformersEngine, messages: list[dict], key: str | None = None, **params: Any) -> Turn:
    deltas, stream = await collect(
        engine.generate(
            GenerationRequest("r", messages, dataclasses.replace(GREEDY, **params), ignore_eos=True, session_key=key)
        )
    )
    return Turn("".join(deltas), stream.cached_tokens, stream.prompt_tokens)


async def conversation(engine: TransformersEngine, turns: list[str], key: str = "s") -> list[Turn]:
    """Turn after turn, each reply appended to the history the next one sends."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    out = []
    for question in turns:
        messages.append({"role": "user", "content": question})
        turn = await ask(engine, messages, key)
        messages.append({"role": "assistant", "content": turn.text})
        out.append(turn)
    return out


def both(tiny_engine: TransformersEngine, static: bool, scenario: Any) -> tuple[Any, Any, TransformersEngine]:
    """Run ``scenario(engine)`` with reuse on and off; return both results and the reusing engine."""
    on, off = make(tiny_engine, static), make(tiny_engine, static, prefix_cache=False)

    async def main(engine: TransformersEngine) -> Any:
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()

    return run(main(on)), run(main(off)), on


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_continued_conversation_reuses_history_and_matches(tiny_engine: TransformersEngine, static: bool) -> None:
    with_reuse, without, engine = both(tiny_engine, static, lambda e: conversation(e, QUESTIONS[:3]))
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert [t.cached for t in without] == [0, 0, 0]
    first, second, third = (t.cached for t in with_reuse)
    assert first == 0 and 0 < second < third  # every later turn reuses at least the turn before's prompt
    assert engine.prefix_hit_tokens == second + third
    assert engine.prefill_tokens + engine.prefix_hit_tokens == sum(t.prompt for t in with_reuse)


def _histories(turns: list[Turn]) -> list[list[dict]]:
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    out = []
    for question, turn in zip(QUESTIONS, turns, strict=False):
        messages.append({"role": "user", "content": question})
        out.append(list(messages))
        messages.append({"role": "assistant", "content": turn.text})
    return out


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_regenerate_and_truncated_history_match(tiny_engine: TransformersEngine, static: bool) -> None:
    async def scenario(engine: TransformersEngine) -> list[Turn]:
        turns = await conversation(engine, QUESTIONS[:2])
        history = _histories(turns)
        regenerated = await ask(engine, history[-1], "s")  # the last turn again
        cut = [history[-1][0], *history[-1][3:]]  # the oldest exchange dropped to fit
        truncated = await ask(engine, cut, "s")
        edited = [{"role": "system", "content": "Another system prompt."}, *history[-1][1:]]
        return [*turns, regenerated, truncated, await ask(engine, edited, "s")]

    with_reuse, without, _ = both(tiny_engine, static, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    regenerated, truncated, edited = (t.cached for t in with_reuse[2:])
    assert regenerated >= with_reuse[1].cached  # the whole prompt but its last token
    system_only = len(tiny_engine.tokenizer(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")["input_ids"])
    assert system_only <= truncated < regenerated  # the shared system prompt, not the stale history
    assert edited <= 5  # a changed system prompt misses (only the template's first tokens match)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_concurrent_conversations_share_a_system_prompt(tiny_engine: TransformersEngine, static: bool) -> None:
    async def scenario(engine: TransformersEngine) -> list[Turn]:
        await ask(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
        tasks = [
            ask(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], str(i))
            for i, q in enumerate(QUESTIONS)
        ]
        return list(await asyncio.gather(*tasks))  # prefilled together: rows with different reused lengths

    with_reuse, without, _ = both(tiny_engine, static, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert all(t.cached > len(SYSTEM) // 10 for t in with_reuse)


def test_capacity_lru_eviction_and_release(tiny_engine: TransformersEngine) -> None:
    engine = make(tiny_engine, False, prefix_cache_memory=0)
    engine._prefix = PrefixCache(capacity=60)

    async def main() -> None:
        await engine.start()
        try:
            for i, question in enumerate(QUESTIONS):
                await ask(engine, [{"role": "user", "content": question * 3}], f"s{i}")
                assert 0 < engine.prefix_cache_tokens <= 60
            assert len(engine._prefix) < len(QUESTIONS)  # the oldest were evicted
            newest = engine.prefix_cache_tokens
            assert engine.release_session("s0") == 0  # evicted already
            assert engine.release_session(f"s{len(QUESTIONS) - 1}") > 0
            assert engine.prefix_cache_tokens < newest
        finally:
            await engine.shutdown()

    run(main())


def test_prefix_cache_index() -> None:
    cache = PrefixCache(capacity=10)
    empty: list = []
    cache.insert([1, 2, 3], empty, empty, "a")
    cache.insert([1, 2, 3, 4, 5], empty, empty, "b")  # extends [1, 2, 3]: replaces it, keeps its owner
    assert len(cache) == 1 and cache.tokens == 5
    assert cache.match([1, 2, 3, 4, 5])[1] == 4  # one token is always left to prefill
    assert cache.match([1, 2, 9])[1] == 2
    assert cache.match([9, 1, 2])[1] == 0
    cache.insert([7, 8, 9, 10, 11, 12], empty, empty, "c")  # 11 tokens: the least recently used goes
    assert cache.tokens == 6 and cache.match([1, 2, 3])[1] == 0
    assert cache.release("a") == 0 and cache.release("c") == 6 and cache.tokens == 0


@pytest.mark.anyio
async def test_served_turns_report_reuse_and_clear_context_frees_it(
    tiny_engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make(tiny_engine, False)
    seen = []
    cs = ChatStream(
        engine,
        max_new_tokens=6,
        temperature=0.0,
        system_prompt=SYSTEM,
        session_secret="s",
        callback=lambda request, state: seen.append(get_result(request)),
    )
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(cs)), base_url="http://test") as c:
        with anyio.fail_after(60):
            for question in QUESTIONS[:2]:
                assert (await c.post("/chat_stream", json={"user_input": question})).status_code == 200
            metrics = (await c.get("/metrics")).text
            held = engine.prefix_cache_tokens
            assert held > 0
            assert (await c.post("/clear_context")).json() == {"cleared": 4}
        await engine.shutdown()
    first, second = seen
    assert first.cached_tokens == 0 and second.cached_tokens > len(SYSTEM) // 10
    assert f"chatstream_prefix_cache_hit_tokens_total {float(second.cached_tokens)}" in metrics
    prefilled = first.prompt_tokens + second.prompt_tokens - second.cached_tokens
    assert f"chatstream_prefill_tokens_total {float(prefilled)}" in metrics
    assert f"completed: success (6 tokens), {second.cached_tokens} of {second.prompt_tokens} prompt tokens reused" in (
        caplog.text
    )
    assert engine.prefix_cache_tokens == 0  # the conversation's entries are gone
