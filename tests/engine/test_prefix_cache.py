"""Prefix reuse: greedy output with the prefix cache is token for token the output without it.

Each scenario runs the same requests through an engine with reuse on and one with it off (both on the
tiny model in float32, on the eager cache and on the static cache, which runs on CPU with
``cuda_graphs=False``; ``CHATSTREAM_TEST_DEVICE=cuda`` runs the same paths on a GPU) and compares the
texts, and checks that reuse happened where it should (``cached_tokens``). On the static cache the
retained prefixes live in the free slots: the tests check that they cost no memory beyond them, never
keep a request waiting, are evicted least recently used first, survive compaction and are freed by
``clear_context``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Any, NamedTuple

import anyio
import httpx
import pytest
from test_engine_batching import collect, run

from chatstream_asgi import ChatStream, get_result
from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.prefix_cache import PrefixCache
from chatstream_asgi.engines.transformers.session_turns import SessionTurns
from chatstream_asgi.web.app import create_app

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=10)
SYSTEM = "You are a helpful assistant. The quick brown fox jumps over the lazy dog. " * 3
QUESTIONS = ["What is the capital of France?", "Hello world", "a b c d e f g", "The quick brown fox"]


def make(f32_engine: TransformersEngine, static: bool, **options: Any) -> TransformersEngine:
    options = {"prefix_cache": True, **options}  # on: whatever the device's default
    options = {"static_cache": static, **options}  # the same path on any device
    options = {"cuda_graphs": False, **options} if static else options
    options = {"max_batch_size": 8, "compile_mode": None, **options}  # compiles stay out of tests
    return TransformersEngine(f32_engine.model, f32_engine.tokenizer, f32_engine.device, **options)


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


def both(f32_engine: TransformersEngine, static: bool, scenario: Any) -> tuple[Any, Any, TransformersEngine]:
    """Run ``scenario(engine)`` with reuse on and off; return both results and the reusing engine."""
    return both_engines(make(f32_engine, static), make(f32_engine, static, prefix_cache=False), scenario)


def both_engines(on: TransformersEngine, off: TransformersEngine, scenario: Any) -> tuple[Any, Any, TransformersEngine]:
    """Run ``scenario(engine)`` on ``on`` (reuse) and ``off``; return both results and ``on``."""

    async def main(engine: TransformersEngine) -> Any:
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()

    return run(main(on)), run(main(off)), on


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_continued_conversation_reuses_history_and_matches(f32_engine: TransformersEngine, static: bool) -> None:
    with_reuse, without, engine = both(f32_engine, static, lambda e: conversation(e, QUESTIONS[:3]))
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
def test_regenerate_and_truncated_history_match(f32_engine: TransformersEngine, static: bool) -> None:
    async def scenario(engine: TransformersEngine) -> list[Turn]:
        turns = await conversation(engine, QUESTIONS[:2])
        history = _histories(turns)
        regenerated = await ask(engine, history[-1], "s")  # the last turn again
        cut = [history[-1][0], *history[-1][3:]]  # the oldest exchange dropped to fit
        truncated = await ask(engine, cut, "s")
        edited = [{"role": "system", "content": "Another system prompt."}, *history[-1][1:]]
        return [*turns, regenerated, truncated, await ask(engine, edited, "s")]

    with_reuse, without, _ = both(f32_engine, static, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    regenerated, truncated, edited = (t.cached for t in with_reuse[2:])
    assert regenerated >= with_reuse[1].cached  # the whole prompt but its last token
    system_only = len(f32_engine.tokenizer(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")["input_ids"])
    assert system_only <= truncated < regenerated  # the shared system prompt, not the stale history
    assert edited <= 5  # a changed system prompt misses (only the template's first tokens match)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_concurrent_conversations_share_a_system_prompt(f32_engine: TransformersEngine, static: bool) -> None:
    async def scenario(engine: TransformersEngine) -> list[Turn]:
        await ask(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
        tasks = [
            ask(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], str(i))
            for i, q in enumerate(QUESTIONS)
        ]
        return list(await asyncio.gather(*tasks))  # prefilled together: rows with different reused lengths

    with_reuse, without, _ = both(f32_engine, static, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert all(t.cached > len(SYSTEM) // 10 for t in with_reuse)


def test_static_hits_of_different_lengths_are_prefilled_together(f32_engine: TransformersEngine, monkeypatch) -> None:
    """A burst mixing a conversation's next turn (its whole history held), new conversations sharing its
    system prompt, and a prompt that shares nothing: one prefill forward of all four, each row from its
    own held column, and the output of reuse off."""

    async def scenario(engine: TransformersEngine) -> tuple[list[Turn], list[int]]:
        system = {"role": "system", "content": SYSTEM}
        first = await ask(engine, [system, {"role": "user", "content": QUESTIONS[0]}], "a")
        history = [system, {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first.text}]
        burst = {
            "a": [*history, {"role": "user", "content": QUESTIONS[1]}],
            "b": [system, {"role": "user", "content": QUESTIONS[2]}],
            "c": [system, {"role": "user", "content": QUESTIONS[3] * 3}],
            "d": [{"role": "user", "content": QUESTIONS[1]}],
        }
        rows: list[int] = []
        inner = engine._forward_prefill

        def counting(positions: Any, inputs: Any, chunks: list) -> Any:
            rows.append(len(chunks))  # the prompts packed into the forward
            return inner(positions, inputs, chunks)

        monkeypatch.setattr(engine, "_forward_prefill", counting)
        with engine._cond:  # queued together: the engine admits them in one iteration
            streams = [
                engine.generate(GenerationRequest(k, m, GREEDY, ignore_eos=True, session_key=k))
                for k, m in burst.items()
            ]
        done = await asyncio.gather(*(collect(s) for s in streams))
        monkeypatch.undo()
        return [first, *(Turn("".join(d), s.cached_tokens, s.prompt_tokens) for d, s in done)], rows

    (with_reuse, rows), (without, _), _ = both(f32_engine, True, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert rows == [4]  # one forward, whatever each prompt reused
    first, a, b, c, d = with_reuse
    assert a.cached >= first.prompt  # the whole last turn
    assert first.prompt > b.cached == c.cached > len(SYSTEM) // 10  # the system prompt
    assert d.cached == 0


def test_capacity_lru_eviction_and_release(f32_engine: TransformersEngine) -> None:
    engine = make(f32_engine, False, prefix_cache_memory=0)
    engine._path.prefix = PrefixCache(capacity=60)

    async def main() -> None:
        await engine.start()
        try:
            for i, question in enumerate(QUESTIONS):
                await ask(engine, [{"role": "user", "content": question * 3}], f"s{i}")
                assert 0 < engine.prefix_cache_tokens <= 60
            assert len(engine._path.prefix) < len(QUESTIONS)  # the oldest were evicted
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
    f32_engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make(f32_engine, False)
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


# -- the static cache: retained prefixes live in the free slots ---------------------------------------


def test_static_retention_uses_only_the_slots(f32_engine: TransformersEngine) -> None:
    engine = make(f32_engine, True, prefix_cache_memory=0)  # no pool: the slots are all there is
    off = make(f32_engine, True, prefix_cache=False)

    async def main() -> list[Turn]:
        await engine.start()
        await off.start()
        try:
            turns = await conversation(engine, QUESTIONS[:2])
            assert engine._path.kv.nbytes == off._path.kv.nbytes  # no pool: nothing beyond the slots
            held = engine._path.index.held()
            assert list(held.values()) == [(engine.prefix_cache_tokens, {"s"})]  # one slot, the latest turn
            assert engine.kv_cache_usage == 0  # retained slots are free slots
            return turns
        finally:
            await engine.shutdown()
            await off.shutdown()

    first, second = run(main())
    assert first.cached == 0 and second.cached > first.prompt


def test_static_burst_evicts_retained_slots_lru_first_and_never_waits(
    f32_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    on, off = (make(f32_engine, True, max_batch_size=4, prefix_cache=reuse) for reuse in (True, False))
    waiting_after_admission: list[int] = []

    def probe(engine: TransformersEngine) -> None:
        core = engine._core
        iteration = core._iteration

        def wrapped(admitted: list) -> None:
            waiting_after_admission.append(len(core.pending))
            iteration(admitted)

        monkeypatch.setattr(core, "_iteration", wrapped)

    async def burst(engine: TransformersEngine, names: list[str]) -> list[Turn]:
        with engine._cond:  # queued together: the engine admits them in one iteration
            streams = [
                engine.generate(
                    GenerationRequest(
                        n, [{"role": "user", "content": f"{n}: {n} {n}"}], GREEDY, ignore_eos=True, session_key=n
                    )
                )
                for n in names
            ]
        done = await asyncio.gather(*(collect(s) for s in streams))
        return [Turn("".join(d), s.cached_tokens, s.prompt_tokens) for d, s in done]

    async def scenario(engine: TransformersEngine) -> tuple[list, list[Turn]]:
        owners = []
        for name in ["old0", "old1", "old2", "old3"]:  # one after the other: every slot ends up retained
            await burst(engine, [name])
        owners.append(engine._path.index.held() if engine._path.index else {})
        two = await burst(engine, ["new0", "new1"])
        owners.append(engine._path.index.held() if engine._path.index else {})
        four = await burst(engine, ["all0", "all1", "all2", "all3"])
        owners.append(engine._path.index.held() if engine._path.index else {})
        return owners, two + four

    probe(on)
    (owners, with_reuse), (_, without), _ = both_engines(on, off, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert max(waiting_after_admission) == 0  # nobody ever waited for a slot that a retained prefix held
    names = [{next(iter(o)) for _, o in held.values()} for held in owners]
    assert names[0] == {"old0", "old1", "old2", "old3"}  # 4 rows, 4 retained slots
    assert names[1] == {"old2", "old3", "new0", "new1"}  # the two least recently used went first
    assert names[2] == {"all0", "all1", "all2", "all3"}


def test_static_hit_after_compaction_moved_the_slot(f32_engine: TransformersEngine) -> None:
    async def scenario(engine: TransformersEngine) -> tuple[list[Turn], dict]:
        history = {k: [{"role": "user", "content": q}] for k, q in (("a", QUESTIONS[0] * 2), ("b", QUESTIONS[1] * 2))}
        with engine._cond:  # prefilled together: a in slot 0, b in slot 1
            streams = {
                k: engine.generate(
                    GenerationRequest(
                        k, history[k], dataclasses.replace(GREEDY, max_new_tokens=n), ignore_eos=True, session_key=k
                    )
                )
                for k, n in (("a", 2), ("b", 12))
            }
        for k, stream in streams.items():
            history[k].append({"role": "assistant", "content": "".join((await collect(stream))[0])})
            history[k].append({"role": "user", "content": QUESTIONS[2]})
        held = engine._path.index.held() if engine._path.index else {}
        return [await ask(engine, history["a"], "a"), await ask(engine, history["b"], "b")], held

    (with_reuse, held), (without, _), _ = both(f32_engine, True, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    # a left first: b moved down to slot 0, a's columns went up to slot 1 (a swap), and both still hit
    assert {slot: owners for slot, (_, owners) in held.items()} == {1: {"a"}, 0: {"b"}}
    assert [t.cached for t in with_reuse] == [held[1][0], held[0][0]]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_clear_context_frees_the_sessions_slots_and_ids(f32_engine: TransformersEngine, static: bool) -> None:
    engine = make(f32_engine, static)

    async def main() -> None:
        await engine.start()
        try:
            await conversation(engine, QUESTIONS[:2], key="x")
            await conversation(engine, QUESTIONS[2:4], key="y")
            before = engine.prefix_cache_tokens
            freed = engine.release_session("x")
            assert 0 < freed < before and engine.prefix_cache_tokens == before - freed
            assert len(engine._turns) == 1 and engine.release_session("y") > 0
            assert engine.prefix_cache_tokens == 0 and len(engine._turns) == 0
        finally:
            await engine.shutdown()

    run(main())


# -- a conversation's next prompt is built from the ids its last turn generated --------------------


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_spliced_ids_hit_where_retokenizing_the_reply_would_not(f32_engine: TransformersEngine, static: bool) -> None:
    async def scenario(engine: TransformersEngine) -> tuple[list[Turn], list[int], list[int], list[int]]:
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        first = await ask(engine, messages, "s", max_new_tokens=24)
        last = engine._turns._turns["s"]
        held = [*last.prompt_ids, *last.output_ids]
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": QUESTIONS[1]}]
        spliced = engine._turns.encode(engine.render_prompt(messages), "s")
        second = await ask(engine, messages, "s")
        return [first, second], held, spliced, engine._encode(messages)

    (with_reuse, held, spliced, plain), (without, *_), _ = both(f32_engine, static, scenario)
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert spliced[: len(held)] == held  # the generated ids, as generated
    assert plain[: len(held)] != held  # re-tokenizing the reply's text would have merged differently
    assert with_reuse[1].cached >= len(held) - 1  # everything held was reused (the last id may lack its KV)
    assert with_reuse[1].prompt == len(spliced)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_turn_prepared_in_a_worker_thread_is_the_turn_generate_builds(
    f32_engine: TransformersEngine, static: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prepare`` (run off the event loop by the server for a long prompt) gives the spliced ids and the
    same reply, reuse included, and ``generate`` does not tokenize the prepared prompt again."""

    async def scenario(engine: TransformersEngine, prepared: bool) -> tuple[Turn, list[int]]:
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        first = await ask(engine, messages, "s", max_new_tokens=24)
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": QUESTIONS[1]}]
        request = GenerationRequest("r", messages, GREEDY, ignore_eos=True, session_key="s")
        spliced = engine._turns.encode(engine.render_prompt(messages), "s")
        if prepared:
            request = await asyncio.to_thread(engine.prepare, request)
            assert list(request.prompt_ids or ()) == spliced
            monkeypatch.setattr(engine._turns, "encode", None)  # generate calling it again fails the test
        deltas, stream = await collect(engine.generate(request))
        return Turn("".join(deltas), stream.cached_tokens, stream.prompt_tokens), spliced

    async def main(prepared: bool) -> tuple[Turn, list[int]]:
        engine = make(f32_engine, static)
        await engine.start()
        try:
            return await scenario(engine, prepared)
        finally:
            await engine.shutdown()

    (prepared, spliced), (plain, _) = run(main(True)), run(main(False))
    assert prepared == plain and prepared.prompt == len(spliced) and prepared.cached > 0


def test_prompt_ids_without_their_text_are_tokenized_again(f32_engine: TransformersEngine) -> None:
    """A session's next turn is matched on the prompt's text: ids handed in without it are not trusted."""
    engine = make(f32_engine, False)
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    request = GenerationRequest("r", messages, GREEDY, session_key="s", prompt_ids=(1, 2, 3))
    prepared = engine.prepare(request)
    assert prepared.prompt == engine.render_prompt(messages)
    assert list(prepared.prompt_ids or ()) == engine._encode(messages)


def test_session_turns_splice_the_repeated_part_of_the_reply(f32_engine: TransformersEngine) -> None:
    turns = SessionTurns(f32_engine.tokenizer)
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    reply = [i for c in " world, this is" for i in turns.tokenize(c)] + turns.tokenize("<|im_end|>")  # one per byte
    turns.record("s", prompt, turns.tokenize(prompt), reply)
    follow = "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
    text = prompt + " world, this is" + follow
    spliced = [*turns.tokenize(prompt), *reply, *turns.tokenize(follow[len("<|im_end|>") :])]
    assert turns.encode(text, "s") == spliced and len(spliced) > len(turns.tokenize(text))
    assert turns.encode(text, "s", limit=len(spliced) - 1) == turns.tokenize(text)  # too long built: tokenized
    cut = turns.encode(prompt + " wor" + follow, "s")  # a stop string cut the reply: its repeated ids are kept
    assert cut[: len(turns.tokenize(prompt)) + 4] == [*turns.tokenize(prompt), *reply[:4]]
    changed = "<|im_start|>user\nHi<|im_end|>\n"  # another history: tokenized as usual
    assert turns.encode(changed, "s") == turns.tokenize(changed) and turns.encode(prompt, "t") == turns.tokenize(prompt)
    assert turns.release("s") and len(turns) == 0 and turns.tokens == 0
    small = SessionTurns(f32_engine.tokenizer, max_tokens=2 * len(reply) + 2 * len(turns.tokenize(prompt)))
    for key in "abc":  # room for two conversations: the least recently used goes
        small.record(key, prompt, turns.tokenize(prompt), reply)
    assert len(small) == 2 and not small.release("a") and small.release("b")


@pytest.mark.parametrize(("rows", "chunk"), [(2, None), (3, 16), (4, 32)])
def test_static_random_conversations_match(f32_engine: TransformersEngine, rows: int, chunk: int | None) -> None:
    """Seven conversations of three turns at once over fewer slots, some sharing a system prompt, prompts
    prefilled in chunks: every placement, compaction, eviction and hit the interleaving brings."""

    async def chat(engine: TransformersEngine, c: int) -> list[str]:
        rng = random.Random(rows * 100 + c)
        messages = [{"role": "system", "content": SYSTEM}] if c % 2 else []
        for t in range(3):
            messages.append({"role": "user", "content": f"conv {c} turn {t} " + "word " * rng.randint(1, 30)})
            messages.append(
                {
                    "role": "assistant",
                    "content": (await ask(engine, messages, f"c{c}", max_new_tokens=rng.randint(1, 12))).text,
                }
            )
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)  # vary the interleaving
        return [m["content"] for m in messages if m["role"] == "assistant"]

    async def scenario(engine: TransformersEngine) -> list[list[str]]:
        return list(await asyncio.gather(*(chat(engine, c) for c in range(7))))

    options = {"max_batch_size": rows, "max_prefill_tokens": chunk}
    with_reuse, without, engine = both_engines(
        make(f32_engine, True, **options), make(f32_engine, True, prefix_cache=False, **options), scenario
    )
    assert with_reuse == without
    assert engine.prefix_hit_tokens > 0


def test_a_finished_turn_is_kept_before_its_end_is_delivered(f32_engine: TransformersEngine, monkeypatch) -> None:
    """``clear_context`` right after a reply must find what that reply kept: the engine retires (keeps)
    a finished row before the consumer sees the end. Retention is slowed down to widen the race."""
    engine = make(f32_engine, False)
    inner = engine._path._retain

    def slow_retain(*args: Any) -> None:
        time.sleep(0.2)
        inner(*args)

    monkeypatch.setattr(engine._path, "_retain", slow_retain)

    async def main() -> None:
        await engine.start()
        try:
            await ask(engine, [{"role": "user", "content": QUESTIONS[0]}], "s")
            assert engine.prefix_cache_tokens > 0
            assert engine.release_session("s") > 0 and engine.prefix_cache_tokens == 0
        finally:
            await engine.shutdown()

    run(main())


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_cancellations_mid_chunk_leave_a_greedy_reply_unchanged(f32_engine: TransformersEngine, reuse: bool) -> None:
    """A fixed greedy prompt gets the same reply on the idle engine, after a storm of requests that leave
    mid-chunk and mid-reply (sharing its system prompt: their slots are retained, hit, moved and evicted),
    and once more; with reuse on and off (float32, where the comparison is exact; CUDA graphs on a GPU).

    On an H100 in bfloat16 the reply once changed after such a storm: this separates a corrupted cache (which
    would fail here) from a near tie computed in another shape (which float32 does not flip)."""
    engine = make(f32_engine, True, prefix_cache=reuse, cuda_graphs=True, max_batch_size=4, max_prefill_tokens=16)
    fixed = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    cancelled: list[str] = []
    inner = engine._forward_step

    def leaving(positions: Any, inputs: Any, chunks: list) -> Any:
        """Before every third forward, the prompt being prefilled leaves (mid-chunk); before every fifth, the
        oldest running row (mid-reply)."""
        core, count = engine._core, len(cancelled) + 1
        started = [s for s in core.prefilling if s.started and s.stream.request_id.startswith("storm")]
        running = [s for s in core.active if s.stream.request_id.startswith("storm")]
        for seqs, every in ((started, 3), (running, 5)):
            if seqs and len(leaving.calls) % every == 0:
                seqs[0].stream.cancel()
                cancelled.append(seqs[0].stream.request_id)
        leaving.calls.append(count)
        return inner(positions, inputs, chunks)

    leaving.calls = []

    async def scenario(engine: TransformersEngine) -> list[str]:
        before = await ask(engine, fixed, "fixed-before")
        engine._forward_step = leaving
        rng = random.Random(3)
        streams = []
        for i in range(16):
            content = f"storm {i} " + "word " * rng.randint(5, 40)
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
            params = dataclasses.replace(GREEDY, max_new_tokens=rng.randint(2, 20))
            streams.append(engine.generate(GenerationRequest(f"storm{i}", messages, params, session_key=f"s{i}")))
        await asyncio.gather(*(collect(s) for s in streams))
        engine._forward_step = inner
        return [before.text, (await ask(engine, fixed, "fixed-after")).text, (await ask(engine, fixed)).text]

    async def main() -> list[str]:
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()

    before, after, again = run(main())
    assert len(cancelled) >= 4  # prompts left mid-chunk and rows mid-reply
    assert after == before and again == before, _divergence(engine, fixed)


def _divergence(engine: TransformersEngine, messages: list[dict]) -> str:
    """Where the replies kept as "fixed-before" and "fixed-after" part, and how close the model's own logits
    (float32, eagerly) are there: a near tie (a difference in the last bits) or a corrupted cache."""
    import torch

    turns = engine._turns._turns
    before, after = list(turns["fixed-before"].output_ids), list(turns["fixed-after"].output_ids)
    at = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), None)
    if at is None:
        return f"same token ids; texts differ: {before} {after}"
    ids = torch.tensor([[*engine._encode(messages), *before[:at]]], device=engine.device)
    with torch.inference_mode():
        logits = engine.model(ids).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return (
        f"replies part at token {at}: {before[at]} before, {after[at]} after; the model's logits there: "
        f"{logits[before[at]].item():.6f} and {logits[after[at]].item():.6f} (top two {top.values.tolist()})"
    )
