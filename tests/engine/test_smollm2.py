"""The real SmolLM2-135M-Instruct through the engine (slower; marked ``smollm2``)."""

from __future__ import annotations

import asyncio

import pytest

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine

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


def test_smollm2_answers_through_the_http_endpoint(smollm2_engine: TransformersEngine) -> None:
    import httpx

    from chatstream_asgi import ChatStream, ChatStreamMiddleware

    async def main() -> httpx.Response:
        chat_stream = ChatStream(smollm2_engine, temperature=0.0, max_new_tokens=40)
        app = ChatStreamMiddleware(_not_found, chat_stream)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post("/chat_stream", json={"user_input": "What is the capital of France?"})

    response = asyncio.run(asyncio.wait_for(main(), 120))
    assert response.status_code == 200
    assert response.headers["x-chatstream-last-generated-message-id"]
    assert "Paris" in response.text


async def _not_found(scope: dict, receive: object, send: object) -> None:  # pragma: no cover - never reached
    raise AssertionError("the chat path must be served by the middleware")
