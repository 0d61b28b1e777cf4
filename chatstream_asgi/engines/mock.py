"""A mock engine for fast start and tests: canned, long or echoed replies with set timings.

The original library's mock types: ``round`` (cycles through canned replies), ``long`` (a long
text, cut at ``max_new_tokens``) and ``echo`` (repeats the last user message). Tokens are words
(with their leading space) or single characters of scripts written without spaces.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from chatstream_asgi.engines.base import (
    ChatMessage,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationStream,
    tagged_prompt,
)

__all__ = ["MockEngine", "MockParams"]

MockType = Literal["round", "long", "echo"]

ROUND_REPLIES = (
    "Hello! I am a mock assistant. How can I help you today?",
    "That is an interesting question. Let me think about it for a moment.",
    "Here is a short answer: it depends on the details you did not mention.",
)
LONG_TEXT = (
    "Once upon a time, a small server streamed tokens to many clients at once. "
    "It batched their requests, kept a fair queue, and never forgot a client that left. "
)

_YIELD_EVERY = 16
_TOKEN = re.compile(r"\s*[\w'.,!?;:-]+|\s*[^\s\w]|\s+")


def tokenize(text: str) -> list[str]:
    """Split text into mock tokens that join back to the same text."""
    tokens: list[str] = []
    for piece in _TOKEN.findall(text):
        # Scripts without spaces (Japanese, Chinese) become one token per character.
        if piece.isascii():
            tokens.append(piece)
        else:
            tokens.extend(piece)
    return tokens


@dataclass(frozen=True)
class MockParams:
    """How the mock replies. ``fail_after_tokens`` makes it raise after that many tokens."""

    type: MockType = "round"
    initial_wait_sec: float = 0.0
    time_per_token_sec: float = 0.0
    fail_after_tokens: int | None = None


class _MockStream(GenerationStream):
    def __init__(self, request: GenerationRequest, tokens: list[str], params: MockParams, cut: bool) -> None:
        super().__init__(request.request_id)
        self._tokens = iter(tokens)
        self._params = params
        self._cut = cut
        self._done = False
        self.prompt_tokens = sum(len(tokenize(m["content"])) for m in request.messages)

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        params = self._params
        delay = params.initial_wait_sec if self.completion_tokens == 0 else params.time_per_token_sec
        if delay > 0 or self.completion_tokens % _YIELD_EVERY == 0:
            # Without a delay, yield to the event loop only now and then (as a real engine's
            # batched hand-off does), so a zero-delay stream costs no loop turn per token.
            await asyncio.sleep(delay)
        if self.cancelled:
            return self._end("cancelled")
        if params.fail_after_tokens is not None and self.completion_tokens >= params.fail_after_tokens:
            self._done = True
            self.finish_reason = "error"
            raise EngineError("mock engine failure")
        token = next(self._tokens, None)
        if token is None:
            return self._end("length" if self._cut else "stop")
        self.completion_tokens += 1
        return token

    def _end(self, reason: str) -> str:
        self._done = True
        self.finish_reason = reason  # type: ignore[assignment]
        raise StopAsyncIteration


class MockEngine(Engine):
    """An :class:`~chatstream_asgi.Engine` that needs no model."""

    context_len = 4096

    def __init__(self, params: MockParams | None = None, *, model_name: str = "mock") -> None:
        self.params = params or MockParams()
        self.model_name = model_name
        self._round = itertools.count()

    def generate(self, request: GenerationRequest) -> GenerationStream:
        limit = request.params.max_new_tokens
        kind = self.params.type
        if kind == "echo":
            user = [m["content"] for m in request.messages if m["role"] == "user"]
            tokens = tokenize(user[-1] if user else "")
        elif kind == "long":
            tokens = list(itertools.islice(itertools.cycle(tokenize(LONG_TEXT)), limit + 1))
        else:
            tokens = tokenize(ROUND_REPLIES[next(self._round) % len(ROUND_REPLIES)])
        cut = len(tokens) > limit
        tokens = _cut_at_stop(tokens[:limit], request.params.stop)
        return _MockStream(request, tokens, self.params, cut and len(tokens) == limit)

    def render_prompt(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        return tagged_prompt(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(tokenize(self.render_prompt(messages)))


def _cut_at_stop(tokens: list[str], stop: Sequence[str]) -> list[str]:
    """Tokens of the text before the first stop string (whole tokens; the mock keeps it simple)."""
    if not stop:
        return tokens
    text = "".join(tokens)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return tokens if cut < 0 else tokenize(text[:cut])
