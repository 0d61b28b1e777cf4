"""The send loop: queue wait, generation and framing, with a concurrent disconnect watch.

One task writes (never two concurrent ``send`` calls); a second task reads ``receive`` and, on
``http.disconnect``, cancels the first wherever it waits: in the queue, during prefill, between
tokens or inside a blocked ``send``. The completion state comes from the loop's own bookkeeping
(what was sent), never from the disconnect message alone: a disconnect after the final frame is
``success``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from .admission import Ticket
from .engine import Engine, GenerationRequest, GenerationStream
from .formats import Framer, Summary
from .metrics import Metrics
from .responses import send_json
from .states import CompletionState

__all__ = ["Reply"]


class _ClientGone(Exception):
    """A send failed or timed out: the client left or stopped reading."""


Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Reply:
    """Streams one accepted request and decides its :class:`CompletionState`."""

    def __init__(
        self,
        *,
        engine: Engine,
        request: GenerationRequest,
        message_id: str,
        ticket: Ticket,
        framer: Framer,
        headers: list[tuple[bytes, bytes]],
        metrics: Metrics,
        logger: logging.LoggerAdapter[logging.Logger],
        send_timeout: float,
        started_at: float,
    ) -> None:
        self.engine = engine
        self.request = request
        self.message_id = message_id
        self.ticket = ticket
        self.framer = framer
        self.headers = headers
        self.metrics = metrics
        self.log = logger
        self.send_timeout = send_timeout
        self.started_at = started_at
        # Bookkeeping that decides the state.
        self.response_started = False
        self.text_sent = False
        self.final_sent = False
        self.disconnected = False
        self.abort_reason: str | None = None
        self.error: BaseException | None = None
        # What the callback can read.
        self.text_parts: list[str] = []
        self.stream: GenerationStream | None = None
        self._send: Send | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def text(self) -> str:
        """The reply text sent so far."""
        return "".join(self.text_parts)

    @property
    def state(self) -> CompletionState:
        if self.final_sent:
            return CompletionState.SUCCESS
        if self.abort_reason is None and self.disconnected:
            if self.text_sent:
                return CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING
            return CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING
        return CompletionState.UNKNOWN_ERROR_OCCURRED

    def abort(self, reason: str) -> None:
        """End this reply from outside (server shutdown) with an error frame."""
        if self.abort_reason is None:
            self.abort_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    def mark_disconnected(self) -> None:
        """Record that the client is gone (an outer cancellation caused by its departure)."""
        self.disconnected = True

    async def run(self, receive: Receive, send: Send) -> CompletionState:
        """Stream the reply; returns the completion state. Re-raises outer cancellation."""
        self._send = send
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                try:
                    await self._stream()
                except _ClientGone:
                    pass
                except Exception as exc:
                    self.error = exc
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._close_stream()
            self.ticket.leave()
        if not self.final_sent and not self.disconnected and (self.error or self.abort_reason):
            await self._send_error()
        return self.state

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose receive fails after the client left
            self.log.debug("receive failed; treating it as a disconnect", exc_info=True)
        self.disconnected = True
        if not self.final_sent:
            self.log.info("client disconnected")
        scope.cancel()

    async def _stream(self) -> None:
        framer = self.framer
        if not self.ticket.granted:
            await self.ticket.wait(self._send_queue_update if framer.queue_events else None)
        self.stream = stream = self.engine.generate(self.request)
        async for text in stream:
            await self._send_body(framer.delta(text))
            if not self.text_sent:
                self.text_sent = True
                self.metrics.time_to_first_token.observe(time.monotonic() - self.started_at)
            self.text_parts.append(text)
        summary = Summary(self.message_id, stream.finish_reason, stream.prompt_tokens, stream.completion_tokens)
        await self._send_body(framer.final(summary), more_body=False)
        self.final_sent = True

    async def _send_queue_update(self, position: int, estimated_wait: float | None) -> None:
        if position:
            await self._send_body(self.framer.queue(position, estimated_wait))

    async def _send_body(self, body: bytes, *, more_body: bool = True) -> None:
        if not self.response_started:
            await self._bounded_send({"type": "http.response.start", "status": 200, "headers": self.headers})
            self.response_started = True
        await self._bounded_send({"type": "http.response.body", "body": body, "more_body": more_body})

    async def _bounded_send(self, message: Message) -> None:
        assert self._send is not None
        try:
            with anyio.fail_after(self.send_timeout):
                await self._send(message)
        except (OSError, TimeoutError):
            # The client is gone (OSError) or has stopped reading (flow control never drains).
            self.log.info("send failed or timed out; treating it as a disconnect")
            self.disconnected = True
            raise _ClientGone from None

    def _close_stream(self) -> None:
        stream = self.stream
        if stream is None:
            return
        if stream.finish_reason is None:
            stream.cancel()
        self.metrics.generated_tokens.inc(stream.completion_tokens)

    async def _send_error(self) -> None:
        """Tell the client what went wrong: 500 JSON, or an error frame once streaming began."""
        if self.abort_reason is not None:
            error, detail = "server_shutting_down", self.abort_reason
        else:
            error, detail = CompletionState.UNKNOWN_ERROR_OCCURRED.value, "generation failed"
            self.log.error("generation failed", exc_info=self.error)
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.send_timeout):
            try:
                if self.response_started:
                    body = self.framer.error(error, detail)
                    await self._send({"type": "http.response.body", "body": body, "more_body": False})
                else:
                    await send_json(self._send, 500, {"error": error, "detail": detail}, self._id_headers())
            except OSError:
                self.disconnected = True

    def _id_headers(self) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in self.headers if k.startswith(b"x-")]
