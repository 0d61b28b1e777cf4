"""The ASGI and callback types, defined once for the whole package."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from chatstream_asgi.states import CompletionState

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = [
    "ASGIApp",
    "ASGIMessage",
    "Callback",
    "ChatService",
    "FeedbackCallback",
    "Headers",
    "Receive",
    "Scope",
    "Send",
]

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
"""An ASGI event (``{"type": "http.request", ...}``); not a chat message."""
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
"""Raw response headers, lower-case names."""

Callback = Callable[["Request", CompletionState], "Awaitable[None] | None"]
"""``callback(request, state)``, sync or async, called once when an accepted request ends."""
FeedbackCallback = Callable[["Request", str, "str | None"], "Awaitable[None] | None"]
"""``feedback_callback(request, message_id, feedback)``, sync or async; feedback is like, dislike or None."""


class ChatService(Protocol):
    """What the ASGI layer needs of :class:`~chatstream_asgi.ChatStream` to serve a chat request."""

    request_id_header: str
    stream_format: str
    max_body_size: int

    async def serve_chat(
        self, scope: Scope, receive: Receive, send: Send, body: Any, *, request: Request, callback: Callback | None
    ) -> CompletionState | None: ...

    async def reject_body_too_large(self, send: Send, limit: int, *, openai: bool = False) -> None: ...

    async def report_early_disconnect(self, request: Request, callback: Callback | None = None) -> CompletionState: ...

    def reports_cancellation(
        self, request: Request, callback: Callback | None
    ) -> AbstractAsyncContextManager[None]: ...
