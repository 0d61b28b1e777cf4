"""The default model with its default sampling, as ``serve`` runs it: no loops, the facts right (``smollm2``).

Greedy SmolLM2-135M-Instruct answered "Write a short poem about the sea." by repeating one line until
the 256-token limit. Its recommended sampling (``engine.default_generation_params``, which ChatStream
takes for every option it is not given) must stop that without breaking the factual probes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from chatstream_asgi import ChatStream
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.smollm2

PROBES = {
    "Write a short poem about the sea.": None,
    "Write a haiku about autumn.": None,
    "What is the capital of France?": "Paris",
    "What is 2 + 2?": "4",
}


def repeated(text: str) -> tuple[int, float]:
    """The most times one line occurs, and the share of its 4-word windows that occurred before."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    most = max((lines.count(line) for line in lines), default=0)
    return most, (len(grams) - len(set(grams))) / max(1, len(grams))


def test_the_default_model_neither_loops_nor_forgets_its_facts(smollm2_engine: Any) -> None:
    cs = ChatStream(smollm2_engine, num_of_concurrent_executions=4, session_secret="s")  # the CLI's defaults

    async def ask(client: httpx.AsyncClient, question: str) -> str:
        body = {"messages": [{"role": "user", "content": question}]}
        response = await client.post("/chat_stream", json=body, timeout=600)
        assert response.status_code == 200
        return response.text

    async def main() -> list[str]:
        transport = httpx.ASGITransport(app=create_app(cs))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(ask(client, question) for question in PROBES))

    answers = dict(zip(PROBES, asyncio.run(asyncio.wait_for(main(), 900)), strict=True))
    for question, expected in PROBES.items():
        most, share = repeated(answers[question])
        assert most <= 2 and share < 0.2, (question, answers[question])
        if expected is not None:
            assert expected in answers[question], (question, answers[question])
    assert cs.default_params.temperature == 0.0 and cs.default_params.repetition_penalty > 1.0
