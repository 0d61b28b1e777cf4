"""Conversations: turns with ids, regenerate, truncation to the token budget, the chat template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from chatstream_asgi import ChatStream, InvalidRequest, MockEngine, MockParams, get_result
from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.service.prompts import commit_turn, fit_to_budget, new_message, start_turn
from chatstream_asgi.web.app import create_app

WATCHDOG = 30.0


def words(messages: Sequence[ChatMessage]) -> int:
    """A token counter for unit tests: one token per word."""
    return sum(len(m["content"].split()) for m in messages)


def history(*turns: tuple[str, str]) -> list[dict[str, Any]]:
    out = []
    for user, assistant in turns:
        out += [new_message("user", user), new_message("assistant", assistant)]
    return out


def test_truncation_drops_the_oldest_turns_first() -> None:
    past = history(("a a a", "b b b"), ("c c", "d d"), ("e", "f"))
    system = [{"role": "system", "content": "sys"}]
    tail = [{"role": "user", "content": "new"}]
    fitted, tokens = fit_to_budget(words, system, past, tail, budget=7)
    # 1 (system) + 4 (turn 2) + 2 (turn 3) + 1 (new) = 8 > 7, so only the newest turn is kept.
    assert fitted == [*system, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}, *tail]
    assert tokens == words(fitted) == 4  # the count of what was kept comes back with it
    assert fit_to_budget(words, system, past, tail, budget=100)[0][1]["content"] == "a a a"  # all fits
    assert fit_to_budget(words, system, past, tail, budget=2) == ([*system, *tail], 2)
    with pytest.raises(InvalidRequest, match="at most 1 fit"):
        fit_to_budget(words, system, past, tail, budget=1)


def test_a_long_history_costs_few_token_counts() -> None:
    calls = []

    def counting(messages: Sequence[ChatMessage]) -> int:
        calls.append(len(messages))
        return words(messages)

    past = history(*[(f"question {i}", f"answer {i}") for i in range(200)])
    fitted, tokens = fit_to_budget(counting, [], past, [{"role": "user", "content": "now"}], budget=41)
    assert tokens == words(fitted) == 41
    assert fitted[0] == {"role": "user", "content": "question 190"}  # 10 turns of 4 words, then "now"
    assert len(calls) <= 10


def test_regenerate_turn_and_commit() -> None:
    past = history(("q1", "a1"), ("q2", "a2"))
    turn = start_turn(past, None, regenerate=True)
    assert turn.user is past[2] and turn.history == past[:2]
    reply = new_message("assistant", "a2 again")
    assert commit_turn(past, turn, reply) == [*past[:3], reply]

    fresh = start_turn(past, "q3", regenerate=False)
    assert fresh.user["role"] == "user" and fresh.user["content"] == "q3" and fresh.history == past
    assert commit_turn(past, fresh, reply) == [*past, fresh.user, reply]
    with pytest.raises(InvalidRequest):
        start_turn([], None, regenerate=True)


@pytest.mark.anyio
async def test_long_history_is_truncated_to_the_context_over_http() -> None:
    engine = MockEngine(MockParams(type="echo"))
    engine.context_len = 60
    cs = ChatStream(engine, max_new_tokens=20, session_secret="s", callback=lambda request, state: None)
    app = create_app(cs)
    budget = engine.context_len - 20
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        with anyio.fail_after(WATCHDOG):
            for i in range(8):
                response = await c.post("/chat_stream", json={"user_input": f"turn number {i} here"})
                assert response.status_code == 200
        prompt = (await c.get("/get_prompt")).json()
    # Everything is stored, but the prompt keeps only the newest turns that fit the budget.
    assert len(prompt["messages"]) == 16
    assert "turn number 7 here" in prompt["prompt"] and "turn number 0 here" not in prompt["prompt"]
    kept = [m for m in prompt["messages"] if f"\n{m['content']}\n" in prompt["prompt"]]
    assert kept == prompt["messages"][-len(kept) :]
    assert engine.count_tokens([{"role": m["role"], "content": m["content"]} for m in kept]) <= budget


@pytest.mark.anyio
async def test_the_prompt_comes_from_the_chat_template(tiny_engine: Any, tiny_model_dir: Path) -> None:
    seen = []
    cs = ChatStream(
        tiny_engine,
        max_new_tokens=4,
        temperature=0.0,
        system_prompt="You are terse.",
        session_secret="s",
        callback=lambda request, state: seen.append(get_result(request)),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(cs)), base_url="http://test") as c:
        with anyio.fail_after(WATCHDOG):
            first = await c.post("/chat_stream", json={"user_input": "Hello world"})
            await c.post("/chat_stream", json={"user_input": "What is the capital of France?"})
        prompt = (await c.get("/get_prompt")).json()
    assert first.status_code == 200
    reply = seen[0].reply
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello world<|im_end|>\n"
        f"<|im_start|>assistant\n{reply}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert seen[1].prompt == expected
    # /get_prompt is the conversation as it stands: it ends with the last reply, and opens no next one
    assert prompt["prompt"] == f"{expected}{seen[1].reply}<|im_end|>\n"
    assert seen[0].prompt_tokens == tiny_engine.count_tokens(seen[0].messages)
    # the next prompt is the ids the first turn saw and generated (not its reply re-tokenized), then the new text
    new_text = seen[1].prompt[len(seen[0].prompt) + len(reply) :]
    new = len(tiny_engine.tokenizer(new_text, add_special_tokens=False)["input_ids"])
    assert seen[1].prompt_tokens == seen[0].prompt_tokens + seen[0].completion_tokens + new
