"""An engine wrapper that injects faults into chosen requests, for fault-injection tests.

A request whose last user message is ``fault:<kind>@<n>`` gets that fault at its ``n``-th delta
(0: before the first one): ``raise`` raises an :class:`EngineError`, ``bug`` a ``KeyError`` (a bug,
not an engine error), ``stall`` waits forever (until the reply is cancelled), ``gate`` waits until
:attr:`FaultyEngine.gate` is set, then goes on. Every other request goes to the wrapped engine
untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from chatstream_asgi.engines.base import ChatMessage, Engine, EngineError, GenerationRequest, GenerationStream

PREFIX = "fault:"


def fault(kind: str, at: int) -> str:
    """The user input that asks for ``kind`` at delta ``at``."""
    return f"{PREFIX}{kind}@{at}"


class FaultyStream(GenerationStream):
    """Delegates to ``inner`` until the fault's turn comes."""

    def __init__(self, inner: GenerationStream, kind: str, at: int, gate: asyncio.Event) -> None:
        super().__init__(inner.request_id)
        self.inner, self.kind, self.at, self.gate = inner, kind, at, gate
        self.deltas = 0

    def cancel(self) -> None:
        super().cancel()
        self.inner.cancel()

    async def __anext__(self) -> str:
        if self.deltas == self.at and self.kind == "gate":
            await self.gate.wait()
        elif self.deltas == self.at:
            if self.kind == "stall":
                await asyncio.Event().wait()
            self.finish_reason = "error"
            raise EngineError("injected fault") if self.kind == "raise" else KeyError("injected bug")
        try:
            text = await self.inner.__anext__()
        finally:
            self.finish_reason = self.inner.finish_reason
            self.prompt_tokens, self.completion_tokens = self.inner.prompt_tokens, self.inner.completion_tokens
        self.deltas += 1
        return text


class FaultyEngine(Engine):
    """An :class:`Engine` around ``inner`` that honours ``fault:`` requests (see the module doc); the
    members it does not define keep the contract's defaults."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.context_len = inner.context_len
        self.gate = asyncio.Event()

    async def start(self) -> None:
        await self.inner.start()

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    def generate(self, request: GenerationRequest) -> GenerationStream:
        stream = self.inner.generate(request)
        users = [m["content"] for m in request.messages if m["role"] == "user"]
        if not users or not users[-1].startswith(PREFIX):
            return stream
        kind, _, at = users[-1][len(PREFIX) :].partition("@")
        return FaultyStream(stream, kind, int(at), self.gate)

    def render_prompt(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        return self.inner.render_prompt(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return self.inner.count_tokens(messages)
