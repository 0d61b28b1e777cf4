"""One request being served, in one object: :class:`Exchange`, and what its callback reads, :class:`ChatResult`.

The server layer makes an :class:`Exchange` when a request reaches a chat endpoint (the middleware,
or the endpoint-mode response) and hands it down: the ``receive`` the send loop watches for the
client leaving, the ``send`` that answers (and echoes the request id), the ``request`` the callback
is called with, the endpoint's :class:`~chatstream_asgi.protocols.dialect.Dialect`. Nothing travels
in the ASGI scope, except the :class:`ChatResult` that callbacks read as ``request.state.chatstream``
(the documented view), set in one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.protocols.chat import ChatRequest
from chatstream_asgi.protocols.dialect import CHAT, Dialect
from chatstream_asgi.service.prompts import Turn
from chatstream_asgi.sessions.store import Session
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback, Receive, Scope, Send

if TYPE_CHECKING:
    from starlette.requests import Request

    from chatstream_asgi.service.tenants import TenantSource

__all__ = ["ChatResult", "Exchange", "get_result"]

_STATE_NAME = "chatstream"
"""The result's name in ``request.state``."""


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
    return scope.get("state", {}).get(_STATE_NAME)


@dataclass(eq=False)
class Exchange:
    """A chat request from its arrival to its ending: everything the service needs of it."""

    scope: Scope
    receive: Receive
    """The server's ``receive``, shared by every reader with a sticky disconnect: the send loop watches it."""
    send: Send
    """Answers the request; it echoes the request id on the response start."""
    request: Request
    """What the callback is called with; its body reads replay the body."""
    dialect: Dialect = CHAT
    """The endpoint's error bodies."""
    callback: Callback | None = None
    """Overrides the ChatStream's callback."""
    started_at: float = field(default_factory=time.monotonic)
    """When the request arrived: time to first token counts from here."""
    tenant: TenantSource | None = None
    """Where its tenant key comes from, when its endpoint overrides the ChatStream's (the middleware's ``tenant``)."""
    _result: ChatResult | None = field(default=None, init=False, repr=False)

    @property
    def request_id(self) -> str:
        """The id the request is logged and answered under."""
        return current_request_id() or "-"

    @property
    def result(self) -> ChatResult | None:
        """The request's :class:`ChatResult` once it was prepared (or ended before that)."""
        return self._result

    @result.setter
    def result(self, result: ChatResult) -> None:
        self._result = result
        self.request.scope.setdefault("state", {})[_STATE_NAME] = result
