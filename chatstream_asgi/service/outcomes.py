"""How a request ends: turned away before admission, or completed in one of the four states.

Both are counted and logged once. A rejection never enters a state and never calls the callback.
A completion records the reply in the request's :class:`ChatResult`, saves the session's turn
when its state keeps one, and calls the user's callback exactly once; an exception in the
callback is logged and goes no further.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.logs import current_request_id, logger
from chatstream_asgi.protocols.chat import ChatRequest
from chatstream_asgi.service.metrics import Metrics
from chatstream_asgi.service.prompts import Turn, commit_turn, new_message
from chatstream_asgi.sessions.manager import SessionManager
from chatstream_asgi.sessions.store import Session, update_session
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback, Headers, Scope, Send

if TYPE_CHECKING:
    from starlette.requests import Request

    from chatstream_asgi.asgi.sendloop import Reply

__all__ = ["RESULT_KEY", "SAVED_STATES", "ChatResult", "Outcomes", "Rejection", "get_result"]

RESULT_KEY = "chatstream"
"""Where a request's :class:`ChatResult` lives in ``scope["state"]`` (``request.state.chatstream``)."""

SAVED_STATES = frozenset({CompletionState.SUCCESS, CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING})
"""The states whose turn is saved to the session history (a partial reply when the client left)."""


@dataclass
class ChatResult:
    """What a completion callback can read, as ``request.state.chatstream`` or via :func:`get_result`,
    in middleware and endpoint mode alike.

    As in the original library's example, a callback can print the conversation's prompt::

        def callback(request, state):
            result = get_result(request)
            print(state, result.prompt + result.reply)
            print(result.session.messages)  # the saved history, this reply included
    """

    request_id: str
    message_id: str
    """The reply's id, as sent in ``X-ChatStream-Last-Generated-Message-Id``."""
    messages: list[ChatMessage]
    """The conversation the reply was generated for (system prompt and history included)."""
    prompt: str = ""
    """The prompt text the model was given: ``messages`` through the chat template."""
    reply: str = ""
    """The reply text that was sent (partial when the client left mid-stream)."""
    state: CompletionState | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those the engine reused from its prefix cache instead of computing them."""
    session_id: str | None = None
    """The session of a ``user_input`` request; None for stateless (``messages``) requests."""
    session: Session | None = field(default=None, repr=False)
    """The session: as loaded when the request came, and as saved (this turn included) once
    the reply ended in ``success`` or ``client_disconnected_while_streaming``."""
    turn: Turn | None = field(default=None, repr=False)
    """The user message this reply answers and the history before it (session requests)."""
    chat_request: ChatRequest | None = field(default=None, repr=False)


def get_result(request_or_scope: Request | Scope) -> ChatResult | None:
    """The :class:`ChatResult` of a chat request (``None`` before it was accepted)."""
    scope = request_or_scope if isinstance(request_or_scope, Mapping) else request_or_scope.scope
    return scope.get("state", {}).get(RESULT_KEY)


class Rejection(Exception):
    """A request turned away before admission: ``status`` with ``body`` (by default
    ``{"error": reason, "detail": detail}``), counted under ``reason``."""

    def __init__(self, status: int, reason: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.body = body if body is not None else {"error": reason, "detail": detail}


class Outcomes:
    """Counts, logs and reports every way a request ends."""

    def __init__(
        self, metrics: Metrics, sessions: SessionManager, callback: Callback | None, *, max_history_messages: int = 200
    ) -> None:
        self.metrics = metrics
        self.sessions = sessions
        self.callback = callback
        self.max_history_messages = max_history_messages

    async def reject(self, send: Send, rejection: Rejection, headers: Headers) -> None:
        """Send ``rejection`` and count it."""
        logger.info("rejected: %s (%s)", rejection.reason, rejection.detail)
        self.metrics.rejected.labels(reason=rejection.reason).inc()
        await send_json(send, rejection.status, rejection.body, headers)

    async def complete(self, reply: Reply, result: ChatResult, request: Request, callback: Callback | None) -> None:
        """Record how ``reply`` ended in ``result``, count and log it, save the turn, call the callback."""
        state = reply.state
        result.state = state
        result.reply = reply.text
        if reply.stream is not None:
            result.finish_reason = reply.stream.finish_reason
            result.prompt_tokens = reply.stream.prompt_tokens
            result.completion_tokens = reply.stream.completion_tokens
            result.cached_tokens = reply.stream.cached_tokens
        self.metrics.completions.labels(state=state.value).inc()
        self.metrics.generated_tokens.inc(result.completion_tokens)
        logger.info(
            "completed: %s (%d tokens), %d of %d prompt tokens reused",
            state.value, result.completion_tokens, result.cached_tokens, result.prompt_tokens,
        )  # fmt: skip
        if result.turn is not None and state in SAVED_STATES:
            await self._save_turn(result)
        await self._call_callback(request, callback, state)

    async def left_early(self, request: Request, callback: Callback | None) -> CompletionState:
        """Record a client that left before its request was admitted: while sending the body, or while
        its session loaded (its callback gets a :class:`ChatResult` too, with no conversation)."""
        state = CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING
        result = ChatResult(current_request_id() or "-", uuid.uuid4().hex, [], state=state)
        request.scope.setdefault("state", {})[RESULT_KEY] = result
        logger.info("completed: %s (0 tokens): the client left before admission", state.value)
        self.metrics.completions.labels(state=state.value).inc()
        await self._call_callback(request, callback, state)
        return state

    async def failed_to_start(self, result: ChatResult, request: Request, callback: Callback | None) -> None:
        """Record a request whose engine failed to start (before admission): ``unknown_error_occurred``."""
        state = result.state = CompletionState.UNKNOWN_ERROR_OCCURRED
        request.scope.setdefault("state", {})[RESULT_KEY] = result
        logger.info("completed: %s (0 tokens): the engine did not start", state.value)
        self.metrics.completions.labels(state=state.value).inc()
        await self._call_callback(request, callback, state)

    @contextlib.asynccontextmanager
    async def reports_cancellation(self, request: Request, callback: Callback | None) -> AsyncIterator[None]:
        """Around every wait before admission: a cancellation there (a server that cancels the request
        task when its client leaves, as Ray Serve's proxy does) ends the request as
        ``client_disconnected_before_streaming``, reported once and shielded, then re-raised."""
        try:
            yield
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.left_early(request, callback)
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

    async def _call_callback(self, request: Request, callback: Callback | None, state: CompletionState) -> None:
        callback = callback or self.callback
        if callback is None:
            return
        try:
            outcome = callback(request, state)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("completion callback failed")
