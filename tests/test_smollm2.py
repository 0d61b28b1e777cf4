"""The real SmolLM2-135M-Instruct through the engine (slower; marked ``smollm2``)."""

from __future__ import annotations

import asyncio

import pytest

from chatstream_asgi.engine import GenerationParams, GenerationRequest
from chatstream_asgi.transformers_engine import TransformersEngine

pytestmark = pytest.mark.smollm2


def test_smollm2_knows_the_capital_of_france(smollm2_engine: TransformersEngine) -> None:
    async def main() -> tuple[str, str | None]:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        params = GenerationParams(temperature=0.0, max_new_tokens=40)
        stream = smollm2_engine.generate(GenerationRequest("paris", messages, params))
        text = "".join([delta async for delta in stream])
        return text, stream.finish_reason

    text, reason = asyncio.run(asyncio.wait_for(main(), 120))
    assert "Paris" in text
    assert reason in ("stop", "length")
    assert "<|im_end|>" not in text


def test_smollm2_alias_metadata(smollm2_engine: TransformersEngine) -> None:
    assert smollm2_engine.model_name == "SmolLM2-135M-Instruct"
    assert smollm2_engine.context_len == 8192
