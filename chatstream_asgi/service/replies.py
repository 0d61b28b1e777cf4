"""One way to stream a reply, whichever protocol asked for it: admission, the send loop, the ending.

The chat endpoint and the OpenAI-compatible endpoint each turn a request body into a
:class:`PreparedChat`; :meth:`Replies.stream` does the rest the same way for both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from chatstream_asgi.engines.base import Engine, GenerationParams, GenerationRequest
from chatstream_asgi.logs import logger
from chatstream_asgi.protocols.framing import Framer
from chatstream_asgi.service.admission import Admission, QueueFull
from chatstream_asgi.service.exchange import ChatResult, Exchange
from chatstream_asgi.service.metrics import Metrics
from chatstream_asgi.service.outcomes import Outcomes, Rejection
from chatstream_asgi.service.reply import Reply
from chatstream_asgi.service.tenants import Fairness
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Headers

__all__ = ["PreparedChat", "Replies"]

_FULL_DETAIL = {
    "queue_full": "every generation slot is busy and the queue is full",
    "tenant_limit": "this tenant has as many requests running and waiting as it may",
}


def _tokens(reply: Reply) -> tuple[int, int]:
    """A reply's prompt and completion tokens so far."""
    stream = reply.stream
    return (0, 0) if stream is None else (stream.prompt_tokens, stream.completion_tokens)


@dataclass
class PreparedChat:
    """A validated chat, ready to be admitted: what to generate and how to frame it."""

    result: ChatResult
    params: GenerationParams
    framer: Framer
    prompt_tokens: int | None = None
    """The prompt's token count, as the engine counted it when the conversation was fitted."""
    headers: Headers = field(default_factory=list)
    """Response headers beside the stream's own (the session token)."""
    priority: int = 0
    """The body's ``priority`` (lower first, within the request's tenant)."""


@dataclass
class Replies:
    """Admits prepared chats, streams them, and keeps the open ones so shutdown can end them."""

    engine: Engine
    ready: Callable[[], Awaitable[None]]
    """The engine's start (shared by every reply; see ``ChatStream.start``)."""
    admission: Admission
    metrics: Metrics
    outcomes: Outcomes
    send_timeout: float
    request_timeout: float | None = None
    keepalive_interval: float = 15.0
    fairness: Fairness = field(default_factory=Fairness)
    prepare: Callable[[GenerationRequest], Awaitable[GenerationRequest]] | None = None
    """Tokenizes a reply's prompt before it generates (``PromptBuilder.prepare_request``)."""
    _open: set[Reply] = field(default_factory=set, init=False)
    _closed_tokens: int = field(default=0, init=False)

    async def stream(self, exchange: Exchange, chat: PreparedChat) -> CompletionState | None:
        """Admit ``chat`` and stream its reply; its completion state, or None when the queue was full."""
        result = chat.result
        claim = self.fairness.claim(
            exchange.scope,
            session_id=result.session_id,
            body_priority=chat.priority,
            prompt_tokens=chat.prompt_tokens or len(result.prompt) // 4 + 1,
            max_new_tokens=chat.params.max_new_tokens,
            source=exchange.tenant,
        )
        try:
            ticket = self.admission.enter(claim)
        except QueueFull as full:
            await self._send_queue_full(exchange, chat, full)
            return None
        exchange.result = result
        request = GenerationRequest(
            result.request_id,
            result.messages,
            chat.params,
            session_key=result.session_id,
            prompt=result.prompt or None,
            prompt_tokens=chat.prompt_tokens,
        )
        reply = Reply(
            engine=self.engine,
            ready=self.ready,
            request=request,
            message_id=result.message_id,
            ticket=ticket,
            framer=chat.framer,
            dialect=exchange.dialect,
            headers=[
                (b"content-type", chat.framer.media_type.encode()),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-content-type-options", b"nosniff"),
                (b"x-chatstream-last-generated-message-id", result.message_id.encode()),
                *chat.headers,
            ],
            send_timeout=self.send_timeout,
            request_timeout=self.request_timeout,
            keepalive_interval=self.keepalive_interval,
            on_first_text=self._first_text_observer(exchange.started_at, ticket.first_text),
            prepare=self.prepare,
        )
        ticket.meter = lambda: _tokens(reply)
        logger.info("accepted (position %d in queue, tenant %s)", ticket.position, claim.tenant)
        self._open.add(reply)
        try:
            await reply.run(exchange.receive, exchange.send)
        except anyio.get_cancelled_exc_class():
            reply.mark_disconnected()  # the server dropped the request task: its client left
            raise
        finally:
            self._open.discard(reply)
            self._closed_tokens += reply.stream.completion_tokens if reply.stream is not None else 0
            with anyio.CancelScope(shield=True):
                await self.outcomes.end(exchange, reply.state, reply)
        return reply.state

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far, open replies included (two readings a second apart give tokens/s)."""
        return self._closed_tokens + sum(r.stream.completion_tokens for r in self._open if r.stream is not None)

    @property
    def open(self) -> int:
        """Replies admitted and not yet ended."""
        return len(self._open)

    def abort_all(self, reason: str) -> None:
        """End every open reply with an error frame carrying ``reason`` (server shutdown)."""
        for reply in list(self._open):
            reply.abort(reason)

    def _first_text_observer(self, started_at: float, first_text: Callable[[], None]) -> Callable[[], None]:
        histogram = self.metrics.time_to_first_token

        def observe() -> None:
            histogram.observe(time.monotonic() - started_at)
            first_text()

        return observe

    async def _send_queue_full(self, exchange: Exchange, chat: PreparedChat, full: QueueFull) -> None:
        # Every 429 says when to come back: the estimate (rounded up), or a second when there is none yet.
        retry_after = [(b"retry-after", str(max(1, math.ceil(full.retry_after or 1.0))).encode())]
        dialect = exchange.dialect
        detail = _FULL_DETAIL.get(full.reason, _FULL_DETAIL["queue_full"])
        rejection = Rejection(
            dialect.queue_full_status, full.reason, detail, dialect.queue_full(), headers=[*chat.headers, *retry_after]
        )
        await self.outcomes.reject(exchange.send, dialect, rejection)
