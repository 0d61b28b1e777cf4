"""The send loop: queue wait, engine start, generation and framing, with a concurrent disconnect watch.

One task writes (never two concurrent ``send`` calls); a second task reads ``receive`` and, on
``http.disconnect``, cancels the first wherever it waits: in the queue, during prefill, between
tokens or inside a blocked ``send``. The completion state comes from the loop's own bookkeeping
(what was sent), never from the disconnect message alone: a disconnect after the final frame is
``success``, and one that arrives while the final frame is being sent lets that send finish. A
third task, the watchdog, bounds every ``send`` by ``send_timeout`` (a client that stops reading
blocks ``send`` on flow control) with one timer per reply rather than a cancel scope per send,
which would cost more than the rest of the per-token work; the same timer ends a reply that runs
past its ``request_timeout`` (a stalled engine) with a ``deadline_exceeded`` error.

:attr:`Reply.state` is where an admitted request's completion state is decided; ``Outcomes.end``
records it (and the state of a request that never got this far) in one place.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import Engine, EngineError, GenerationRequest, GenerationStream
from chatstream_asgi.logs import logger
from chatstream_asgi.protocols.dialect import Dialect
from chatstream_asgi.protocols.framing import Framer, Summary
from chatstream_asgi.service.admission import Ticket
from chatstream_asgi.service.features import check_features
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import ASGIMessage, Headers, Receive, Send

__all__ = ["Reply"]


_ABORT_STATUS = {"server_shutting_down": 503, "deadline_exceeded": 504}
"""The status of an aborted reply that had not started its response (any other error: 500)."""


class _ClientGone(Exception):
    """A send failed or timed out: the client left or stopped reading."""


@dataclass(eq=False, kw_only=True)
class Reply:
    """Streams one accepted request and decides its :class:`CompletionState`."""

    engine: Engine
    ready: Callable[[], Awaitable[None]]
    """The engine's start, awaited once the reply holds a slot (at once when it runs)."""
    request: GenerationRequest
    message_id: str
    ticket: Ticket
    framer: Framer
    dialect: Dialect
    headers: Headers
    send_timeout: float
    request_timeout: float | None = None
    """Seconds the whole reply (queue wait included) may take; None: no deadline."""
    keepalive_interval: float | None = None
    """While queued, the queue event is repeated this often (a keep-alive for proxies)."""
    on_first_text: Callable[[], None] | None = None
    prepare: Callable[[GenerationRequest], Awaitable[GenerationRequest]] | None = None
    """Tokenizes the request's prompt ahead of ``generate`` (off the event loop for a long one); None: the
    engine does it in ``generate``."""
    # Bookkeeping that decides the state.
    response_started: bool = field(default=False, init=False)
    text_sent: bool = field(default=False, init=False)
    final_sent: bool = field(default=False, init=False)
    final_in_flight: bool = field(default=False, init=False)
    disconnected: bool = field(default=False, init=False)
    abort_reason: str | None = field(default=None, init=False)
    abort_error: str = field(default="server_shutting_down", init=False)
    error: BaseException | None = field(default=None, init=False)
    engine_started: bool = field(default=False, init=False)
    # What the callback can read.
    text_parts: list[str] = field(default_factory=list, init=False)
    stream: GenerationStream | None = field(default=None, init=False)
    _send: Send | None = field(default=None, init=False)
    _send_started: float | None = field(default=None, init=False)
    _scope: anyio.CancelScope | None = field(default=None, init=False)

    @property
    def text(self) -> str:
        """The reply text so far: sent, or held back by a framer that sends it at the end."""
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

    def abort(self, reason: str, error: str = "server_shutting_down") -> None:
        """End this reply from outside (server shutdown, deadline) with an ``error`` frame."""
        if self.abort_reason is None:
            self.abort_reason, self.abort_error = reason, error
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
                tg.start_soon(self._watchdog)
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
            logger.debug("receive failed; treating it as a disconnect", exc_info=True)
        self.disconnected = True
        if self.final_sent or self.final_in_flight:
            return  # the disconnect races the last frame: let that send finish (or time out)
        logger.info("client disconnected")
        scope.cancel()

    async def _stream(self) -> None:
        framer = self.framer
        waited = not self.ticket.granted
        if waited:
            on_position = self._send_queue_update if framer.queue_events else None
            await self.ticket.wait(on_position, heartbeat=self.keepalive_interval)
        await self.ready()
        if waited and self.request.params.json_schema is not None:  # checked before admission; again now, off
            await check_features(
                self.engine, self.request.params
            )  # the loop: evicted while it waited, it compiles there
        self.engine_started = True
        request = self.request
        if self.prepare is not None:
            request = await self.prepare(request)
            # a worker thread is waited for, not abandoned, when the reply is cancelled meanwhile (the client
            # left, the deadline, shutdown), and anyio returns its result without a checkpoint: take one
            # here, or generate would start what nobody waits for (after shutdown: the engine's thread again)
            await anyio.lowlevel.checkpoint()
        self.stream = stream = self.engine.generate(request)
        async for text in stream:
            framer.logprobs(stream.take_logprobs())
            frame = framer.delta(text)
            if frame:  # an empty frame holds the text back (a non-streamed body goes out at the end)
                await self._send_body(frame)
                self.text_sent = True
            if not self.text_parts and self.on_first_text is not None:
                self.on_first_text()
            self.text_parts.append(text)
        if stream.finish_reason == "cancelled" and not stream.cancelled:
            raise EngineError("the engine ended the generation (it is shutting down)")
        framer.logprobs(stream.take_logprobs())  # of tokens that gave no text (the end of sequence)
        summary = Summary(self.message_id, stream.finish_reason, stream.prompt_tokens, stream.completion_tokens)
        self.final_in_flight = True
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

    async def _bounded_send(self, message: ASGIMessage) -> None:
        """Send one message; :meth:`_watch_sends` ends the reply if it takes over ``send_timeout``."""
        assert self._send is not None
        self._send_started = time.monotonic()
        try:
            await self._send(message)
        except OSError:
            logger.info("send failed; treating it as a disconnect")
            self.disconnected = True
            raise _ClientGone from None
        finally:
            self._send_started = None

    async def _watchdog(self) -> None:
        """Bound every send by ``send_timeout`` and the reply by ``request_timeout``, with one
        timer per reply, not one per send.

        A client that stops reading makes ``send`` block on flow control; a send in flight for
        ``send_timeout`` (detected within a quarter of it) ends the reply as a disconnect. A reply
        still running at its deadline (a stalled engine) is aborted with ``deadline_exceeded``,
        unless its final frame is already on the way.
        """
        period = max(self.send_timeout / 4, 0.001)
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline and not self.final_in_flight:
                logger.warning("deadline exceeded (%.3g s); ending the reply", self.request_timeout)
                self.abort(f"the reply took longer than {self.request_timeout:g} s", "deadline_exceeded")
                return
            await anyio.sleep(period if deadline is None or now >= deadline else min(period, deadline - now))
            started = self._send_started
            if started is not None and time.monotonic() - started >= self.send_timeout:
                logger.info("send timed out (the client stopped reading); treating it as a disconnect")
                self.disconnected = True
                assert self._scope is not None
                self._scope.cancel()
                return

    def _close_stream(self) -> None:
        stream = self.stream
        if stream is None:
            return
        if stream.finish_reason is None:
            stream.cancel()

    async def _send_error(self) -> None:
        """Tell the client what went wrong: a JSON error in the endpoint's dialect (500; 503 on shutdown,
        504 past the deadline), or an error frame once streaming began."""
        if self.abort_reason is not None:
            error, detail = self.abort_error, self.abort_reason
        else:
            error = CompletionState.UNKNOWN_ERROR_OCCURRED.value
            detail = "generation failed" if self.engine_started else "the engine failed to start"
            logger.error("%s", detail, exc_info=self.error)
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.send_timeout):
            try:
                if self.response_started:
                    body = self.framer.error(error, detail)
                    await self._send({"type": "http.response.body", "body": body, "more_body": False})
                else:
                    status = _ABORT_STATUS.get(error, 500)
                    await send_json(self._send, status, self.dialect.error(status, error, detail), self._x_headers())
            except OSError:
                self.disconnected = True

    def _x_headers(self) -> list[tuple[bytes, bytes]]:
        """The reply's own ``x-`` headers (its message id, the session's token), kept on an error answer."""
        return [(k, v) for k, v in self.headers if k.startswith(b"x-")]
