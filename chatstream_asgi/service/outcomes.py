"""How a request ends: turned away before admission, or ended in one of the four states.

:meth:`Outcomes.reject` and :meth:`Outcomes.end` are the only two ways out, each counted and logged
once. A rejection never enters a state and never calls the callback. An ending records the reply in
the request's :class:`~chatstream_asgi.service.exchange.ChatResult`, saves the session's turn when
its state keeps one, and calls the user's callback exactly once; an exception in the callback is
logged and goes no further. The state of an admitted request comes from its send loop
(:attr:`~chatstream_asgi.service.reply.Reply.state`); a request that never reached it (its client
left while it sent the body or while its session loaded) ends ``client_disconnected_before_streaming``.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.logs import logger
from chatstream_asgi.protocols.dialect import Dialect
from chatstream_asgi.service.exchange import ChatResult, Exchange
from chatstream_asgi.service.metrics import Metrics
from chatstream_asgi.service.prompts import commit_turn, new_message
from chatstream_asgi.sessions.manager import SessionManager
from chatstream_asgi.sessions.store import Session, update_session
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback, Send

if TYPE_CHECKING:
    from chatstream_asgi.service.reply import Reply

__all__ = ["SAVED_STATES", "Outcomes", "Rejection"]

SAVED_STATES = frozenset({CompletionState.SUCCESS, CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING})
"""The states whose turn is saved to the session history (a partial reply when the client left)."""


class Rejection(Exception):
    """A request turned away before admission with ``status``, counted under ``reason``; its body is
    the endpoint dialect's error (or queue-full) body, unless ``body`` is given. ``headers`` go with it
    (the session's token, a ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        body: Mapping[str, Any] | None = None,
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.body = body
        self.headers = list(headers)


class Outcomes:
    """Counts, logs and reports every way a request ends."""

    def __init__(
        self, metrics: Metrics, sessions: SessionManager, callback: Callback | None, *, max_history_messages: int = 200
    ) -> None:
        self.metrics = metrics
        self.sessions = sessions
        self.callback = callback
        self.max_history_messages = max_history_messages

    async def reject(self, send: Send, dialect: Dialect, rejection: Rejection) -> None:
        """Answer ``rejection`` in ``dialect`` and count it."""
        logger.info("rejected: %s (%s)", rejection.reason, rejection.detail)
        self.metrics.rejected.labels(reason=rejection.reason).inc()
        body = rejection.body
        if body is None and rejection.reason == "queue_full":
            body = dialect.queue_full()
        elif body is None:
            body = dialect.error(rejection.status, rejection.reason, rejection.detail)
        await send_json(send, rejection.status, body, rejection.headers)

    async def end(self, exchange: Exchange, state: CompletionState, reply: Reply | None = None) -> CompletionState:
        """Record how the request ended, count and log it (one line), save the turn, call the callback.

        ``reply`` is the admitted request's send loop (its text and token counts go into the result);
        without one the request ended before admission.
        """
        result = exchange.result
        if result is None:  # it ended before it was prepared: the callback still gets a result
            result = exchange.result = ChatResult(exchange.request_id, uuid.uuid4().hex, [])
        result.state = state
        note = "the client left before admission"
        if reply is not None:
            result.reply = reply.text
            stream = reply.stream
            note = "the engine did not start" if not reply.engine_started else ""
            if stream is not None:
                result.finish_reason = stream.finish_reason
                result.prompt_tokens = stream.prompt_tokens
                result.completion_tokens = stream.completion_tokens
                result.cached_tokens = stream.cached_tokens
                note = f"{result.cached_tokens} of {result.prompt_tokens} prompt tokens reused"
        self.metrics.completions.labels(state=state.value).inc()
        self.metrics.generated_tokens.inc(result.completion_tokens)
        logger.info("completed: %s (%d tokens)%s", state.value, result.completion_tokens, note and f", {note}")
        if result.turn is not None and state in SAVED_STATES:
            await self._save_turn(result)
        await self._call_callback(exchange, state)
        return state

    @contextlib.asynccontextmanager
    async def reports_cancellation(self, exchange: Exchange) -> AsyncIterator[None]:
        """Around every wait before admission: a cancellation there (a server that cancels the request
        task when its client leaves, as Ray Serve's proxy does) ends the request as
        ``client_disconnected_before_streaming``, reported once and shielded, then re-raised."""
        try:
            yield
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.end(exchange, CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING)
            raise

    async def _save_turn(self, result: ChatResult) -> None:
        assert result.session_id is not None and result.turn is not None
        turn, limit = result.turn, self.max_history_messages
        reply = new_message("assistant", result.reply, result.message_id, tokens=result.completion_tokens)

        def commit(session: Session) -> Session:
            session.messages = commit_turn(session.messages, turn, reply, limit)
            return session

        try:
            session = await update_session(self.sessions.store, result.session_id, commit)
        except Exception:
            logger.exception("saving the conversation failed")
            return
        result.session = session

    async def _call_callback(self, exchange: Exchange, state: CompletionState) -> None:
        callback = exchange.callback or self.callback
        if callback is None:
            return
        try:
            outcome = callback(exchange.request, state)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("completion callback failed")
